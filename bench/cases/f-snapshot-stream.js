/**
 * (f) The product: createSnapshotStream with its defaults (src/options.ts,
 * O_DIRECT required). (f2) is a deeper ring. Both record peak RSS growth,
 * checked against buffers x bufferSize + 32 MiB (DESIGN.md, "Memory").
 *
 * (f) takes its ring from the process's buffer pool, where the streams
 * before it left theirs (the runner keeps the pool for the whole run, as the
 * device cells keep their buffers). (fc) is the same stream with the pool
 * bypassed, its ring allocated as a process's first stream allocates it
 * (src/io/buffer-pool.ts); malloc may still hand back memory it kept from
 * earlier streams, so a process's first stream is measured in fresh
 * processes instead (docs/performance.md, sixth round).
 */
import { once } from 'node:events';
import { createSnapshotStream } from '../../dist/index.js';
import { DEFAULT_BUFFER_SIZE, DEFAULT_BUFFERS } from '../../dist/options.js';
import { pumpPages } from '../lib/pump.js';
import { startRssSampler } from '../lib/rss.js';
import { withThreads } from '../lib/threads.js';
import { setBufferPoolEnabled } from '../../dist/io/buffer-pool.js';

/**
 * `threads`: force the target's native threads (bench/lib/threads.js), for the old configuration.
 * `freshRing`: bypass the buffer pool, so the ring is allocated afresh.
 */
export function snapshotStreamCase({ id, label, buffers, bufferSize, threads, freshRing = false }) {
  const options = { direct: true };
  if (buffers !== undefined) options.buffers = buffers;
  if (bufferSize !== undefined) options.bufferSize = bufferSize;
  const ringBytes = (buffers ?? DEFAULT_BUFFERS) * (bufferSize ?? DEFAULT_BUFFER_SIZE);
  return {
    id,
    label,
    sizeClass: 'fast',
    ringBytes,
    async run(ctx) {
      globalThis.gc?.();
      const rss = startRssSampler();
      // Bypassed from before the stream takes its ring until it has given it back (on 'close').
      if (freshRing) setBufferPoolEnabled(false);
      let out;
      try {
        out = createSnapshotStream(ctx.path, options);
        out.on('progress', rss.sample);
        const pump = () => pumpPages(out, ctx.workload, rss.sample);
        await (threads === undefined ? pump() : withThreads(threads, pump));
        if (!out.closed) await once(out, 'close');
      } finally {
        setBufferPoolEnabled(true);
      }
      const mem = rss.stop();
      if (out.direct !== true) throw new Error(`(${id}) expected O_DIRECT in effect, got direct=${out.direct}`);
      return {
        bytes: out.bytesWritten,
        extra: { rssGrowthBytes: mem.growthBytes, ringBytes },
      };
    },
  };
}

export default snapshotStreamCase({
  id: 'f',
  label: `createSnapshotStream defaults (${DEFAULT_BUFFERS} x ${DEFAULT_BUFFER_SIZE >> 20} MiB, O_DIRECT)`,
});

export const freshRing = snapshotStreamCase({
  id: 'fc',
  label: `the same, the buffer pool bypassed (ring allocated afresh)`,
  freshRing: true,
});
