/**
 * (f) The product: createSnapshotStream with its defaults (src/options.ts,
 * O_DIRECT required). (f2) is a deeper ring. Both record peak RSS growth,
 * checked against buffers x bufferSize + 32 MiB (DESIGN.md, "Memory").
 */
import { createSnapshotStream } from '../../dist/index.js';
import { DEFAULT_BUFFER_SIZE, DEFAULT_BUFFERS } from '../../dist/options.js';
import { pumpPages } from '../lib/pump.js';
import { startRssSampler } from '../lib/rss.js';
import { withThreads } from '../lib/threads.js';

/** `threads`: force the target's native threads (bench/lib/threads.js), for the old configuration. */
export function snapshotStreamCase({ id, label, buffers, bufferSize, threads }) {
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
      const out = createSnapshotStream(ctx.path, options);
      out.on('progress', rss.sample);
      const pump = () => pumpPages(out, ctx.workload, rss.sample);
      await (threads === undefined ? pump() : withThreads(threads, pump));
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
