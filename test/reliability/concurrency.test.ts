/**
 * Many streams in one process: every byte lands where it belongs, and the
 * native writers leave Node's shared libuv thread pool (fs, dns, crypto,
 * zlib) free for the rest of the application.
 *
 * Why the latency probe can tell the two designs apart: libuv's pool has 4
 * threads (UV_THREADPOOL_SIZE defaults to 4). Eight streams with two 4 MiB
 * O_DIRECT writes in flight each would keep 16 requests queued on it, and an
 * fs.readFile (open, fstat, read, close: 4 pool requests in a row) would wait
 * behind about 12 queued writes at every step. At this machine's ~1 GB/s that
 * is ~50 ms per step and ~200 ms or more per readFile, against well under a
 * millisecond when the pool is idle.
 *
 * How fast the disk is decides how long a pool thread stays in a write, and a
 * loaded or fast machine can shorten that below what the probe notices. So
 * the comparison with the design the addon avoids (fs.write on the libuv
 * pool, same buffer size, same depth) is made on a disk that does not answer
 * at all: fsfreeze holds every write to a loop-mounted ext4 for 3 s. There
 * the pool design provably blocks the probe for the whole window (the
 * control), and the addon's streams provably do not, whatever the load.
 */
import { createCipheriv, createHash } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { open, readFile, writeFile, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { Worker } from 'node:worker_threads';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream } from '../../src/index.js';
import { allocAligned } from '../../src/io/alignment.js';
import { sha256OfFile } from '../helpers/streams.js';
import { skipUnlessRan, withLoopFs, type SkipContext } from '../helpers/loopfs.js';
import { requireTool, runOk, tmpDir, type TmpDir } from '../helpers/tools.js';

const MiB = 1 << 20;
const STREAMS = 8;
/** 4 MiB buffers, two in the ring: two writes in flight per stream, as in the libuv-pool control. */
const BUFFER_BYTES = 4 * MiB;
const IN_FLIGHT_PER_WRITER = 2;
/** A probe every 25 ms gives dozens of samples over a batch of a few seconds. */
const PROBE_INTERVAL_MS = 25;
/**
 * No probe may wait longer than this; an idle pool answers a 4 KiB readFile in
 * < 1 ms. The file runs in the serial project (vitest.config.ts), but the
 * machine may still be shared: 1 s is 4000x the idle figure and still far
 * below a starved pool's wait behind 8 x 2 queued 4 MiB writes per step.
 */
const MAX_PROBE_LATENCY_MS = 1000;
/**
 * The median separates the two designs. Measured here: native 0.2-0.3 ms;
 * the libuv-pool control 100-130 ms (each of readFile's 4 pool steps waits
 * behind ~12 queued 4 MiB writes, ~25 ms at ~2 GB/s). Only a disk faster than
 * ~8 GB/s would bring the control under this bound, and then the control test
 * fails and says the probe is blind on that machine.
 */
const PROBE_MEDIAN_BOUND_MS = 25;
/** How long fsfreeze holds the disk: 3x MAX_PROBE_LATENCY_MS, so a blocked pool and a free one cannot be confused. */
const HOLD_MS = 3000;
/** Per writer on the frozen disk: four 4 MiB writes, more than the two each keeps in flight. */
const FROZEN_WRITER_BYTES = 16 * MiB;
const freezeSkip = requireTool('fsfreeze');

let dir: TmpDir;
let probeFile: string;
beforeAll(async () => {
  dir = await tmpDir('concurrency');
  probeFile = join(dir.path, 'probe.txt');
  await writeFile(probeFile, Buffer.alloc(4096, 0x61));
});
afterAll(async () => {
  await dir.cleanup();
});

/**
 * Deterministic, distinct content per stream: the AES-128-CTR keystream under
 * a key derived from the seed. Fast enough (GB/s) that producing it never
 * holds the event loop for more than a fraction of a millisecond per chunk.
 * Chunk sizes vary (odd sizes included) so the ring's packing is exercised.
 */
function seededSource(totalBytes: number, seed: number, hash: ReturnType<typeof createHash>): Readable {
  const key = createHash('sha256').update(`snapstream-concurrency-${seed}`).digest().subarray(0, 16);
  const cipher = createCipheriv('aes-128-ctr', key, Buffer.alloc(16));
  const sizes = [MiB + 3, 64 * 1024, 4096 + 8, 3 * MiB - 5, 8 * 1024 + 1];
  let produced = 0;
  let i = 0;
  return new Readable({
    highWaterMark: 2 * MiB,
    read() {
      if (produced >= totalBytes) {
        this.push(null);
        return;
      }
      const n = Math.min(sizes[i++ % sizes.length] as number, totalBytes - produced);
      const chunk = cipher.update(Buffer.alloc(n));
      hash.update(chunk);
      produced += n;
      this.push(chunk);
    },
  });
}

interface ProbeStats {
  samples: number;
  medianMs: number;
  maxMs: number;
}

/**
 * The probe runs in a worker thread: libuv's thread pool is process-wide, so
 * the worker's fs.readFile queues on the same 4 threads, but the worker has
 * its own event loop. A main thread busy producing data therefore cannot blur
 * the measurement; only a saturated pool can delay it.
 */
const PROBE_WORKER = `
const { parentPort, workerData } = require('node:worker_threads');
const { readFile } = require('node:fs/promises');
let running = true;
const latencies = [];
parentPort.on('message', () => { running = false; });
(async () => {
  await readFile(workerData.path); // warm: the first call loads code paths
  parentPort.postMessage({ ready: true });
  while (running) {
    const t0 = performance.now();
    await readFile(workerData.path);
    latencies.push(performance.now() - t0);
    await new Promise((resolve) => setTimeout(resolve, workerData.intervalMs));
  }
  parentPort.postMessage({ latencies });
})();
`;

async function startProbe(path: string): Promise<{ stop(): Promise<ProbeStats> }> {
  const worker = new Worker(PROBE_WORKER, { eval: true, workerData: { path, intervalMs: PROBE_INTERVAL_MS } });
  const messages: { ready?: boolean; latencies?: number[] }[] = [];
  let wake: (() => void) | undefined;
  worker.on('message', (m: { ready?: boolean; latencies?: number[] }) => {
    messages.push(m);
    wake?.();
  });
  const next = async (): Promise<{ ready?: boolean; latencies?: number[] }> => {
    while (messages.length === 0) await new Promise<void>((resolve) => (wake = resolve));
    return messages.shift() as { ready?: boolean; latencies?: number[] };
  };
  expect((await next()).ready).toBe(true);
  return {
    async stop() {
      worker.postMessage('stop');
      const latencies = (await next()).latencies ?? [];
      await worker.terminate();
      const sorted = [...latencies].sort((a, b) => a - b);
      return {
        samples: sorted.length,
        medianMs: sorted[Math.floor(sorted.length / 2)] ?? Number.NaN,
        maxMs: sorted[sorted.length - 1] ?? Number.NaN,
      };
    },
  };
}

/**
 * The design the addon avoids: O_DIRECT writes through fs (libuv's pool),
 * same buffer size and the same number in flight per writer as the stream.
 * The caller opens the handle (an open on a frozen filesystem would block).
 */
async function libuvPoolWriter(handle: FileHandle, totalBytes: number): Promise<void> {
  const buffers = Array.from({ length: IN_FLIGHT_PER_WRITER }, () => allocAligned(BUFFER_BYTES, 4096).fill(0x5a));
  let position = 0;
  const lane = async (buffer: Uint8Array): Promise<void> => {
    while (position < totalBytes) {
      const at = position;
      position += BUFFER_BYTES;
      await handle.write(buffer, 0, BUFFER_BYTES, at);
    }
  };
  await Promise.all(buffers.map(lane));
}

/**
 * Runs the writers `prepare` sets up against a filesystem that fsfreeze holds
 * for HOLD_MS, with the probe running before, during and after: every write
 * blocks in the kernel, so whatever threads issue them are stuck for the
 * whole window. Returns the probe's latencies.
 */
async function probeAcrossFreeze(
  ctx: SkipContext,
  prepare: (mnt: string) => Promise<() => Promise<unknown>>,
): Promise<ProbeStats> {
  const result = await withLoopFs({ sizeBytes: 256 * MiB, fsType: 'ext4' }, async (mnt) => {
    const startWrites = await prepare(mnt);
    const probe = await startProbe(probeFile);
    await runOk('fsfreeze', ['--freeze', mnt]);
    let writes: Promise<unknown> = Promise.resolve();
    try {
      writes = startWrites();
      writes.catch(() => undefined); // awaited below, after the thaw
      await sleep(HOLD_MS);
    } finally {
      await runOk('fsfreeze', ['--unfreeze', mnt]);
    }
    const stats = await probe.stop();
    await writes;
    return stats;
  });
  return skipUnlessRan(ctx, result);
}

describe('eight raw streams in one process', () => {
  it('all complete byte-exactly and leave the libuv thread pool responsive', async () => {
    // 64..120 MiB plus an odd tail each, so every stream ends in a padded, truncated buffer.
    const sizes = Array.from({ length: STREAMS }, (_, i) => (64 + 8 * i) * MiB + 4097 * (i + 1));
    const hashes = sizes.map(() => createHash('sha256'));
    const paths = sizes.map((_, i) => join(dir.path, `stream-${i}.bin`));

    const probe = await startProbe(probeFile);
    const t0 = performance.now();
    await Promise.all(
      sizes.map((size, i) =>
        pipeline(
          seededSource(size, i, hashes[i] as ReturnType<typeof createHash>),
          createSnapshotStream(paths[i] as string, { bufferSize: BUFFER_BYTES, buffers: IN_FLIGHT_PER_WRITER }),
        ),
      ),
    );
    const batchMs = performance.now() - t0;
    const stats = await probe.stop();
    console.log(
      `[concurrency] native: ${STREAMS} streams, ${(sizes.reduce((a, b) => a + b, 0) / MiB).toFixed(0)} MiB in ` +
        `${batchMs.toFixed(0)} ms; readFile probe n=${stats.samples} median=${stats.medianMs.toFixed(2)} ms ` +
        `max=${stats.maxMs.toFixed(2)} ms`,
    );

    for (let i = 0; i < STREAMS; i++) {
      expect(await sha256OfFile(paths[i] as string), `stream ${i}`).toBe((hashes[i] as ReturnType<typeof createHash>).digest('hex'));
    }
    expect(stats.samples).toBeGreaterThanOrEqual(5);
    expect(stats.medianMs).toBeLessThan(PROBE_MEDIAN_BOUND_MS);
    expect(stats.maxMs).toBeLessThan(MAX_PROBE_LATENCY_MS);
    expect(stats.maxMs).toBeLessThan(batchMs / 4);
  });
});

describe.skipIf(freezeSkip !== undefined)('a frozen disk: writes that block in the kernel for seconds', () => {
  it('control: libuv-pool writers blocked on it starve the probe (so the probe can see starvation)', async (ctx) => {
    const stats = await probeAcrossFreeze(ctx, async (mnt) => {
      const flags = fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_DIRECT;
      const handles = await Promise.all(Array.from({ length: STREAMS }, (_, i) => open(join(mnt, `control-${i}.bin`), flags, 0o600)));
      return async () => {
        try {
          await Promise.all(handles.map((h) => libuvPoolWriter(h, FROZEN_WRITER_BYTES)));
        } finally {
          await Promise.all(handles.map((h) => h.close()));
        }
      };
    });
    console.log(
      `[concurrency] control (fs.write on libuv's pool) across a ${HOLD_MS} ms freeze: readFile probe ` +
        `n=${stats.samples} median=${stats.medianMs.toFixed(2)} ms max=${stats.maxMs.toFixed(2)} ms`,
    );
    // 16 writes stuck in the kernel hold all 4 pool threads: the readFile in
    // flight at the freeze cannot finish before the thaw, whatever the load.
    expect(stats.maxMs).toBeGreaterThan(HOLD_MS / 2);
    expect(stats.maxMs).toBeGreaterThan(MAX_PROBE_LATENCY_MS);
  });

  it('snapstream streams blocked on it leave the probe responsive (their writes are on the addon\'s own threads)', async (ctx) => {
    const hashes = Array.from({ length: STREAMS }, () => createHash('sha256'));
    const paths: string[] = [];
    const stats = await probeAcrossFreeze(ctx, async (mnt) => {
      const outs = await Promise.all(
        hashes.map(async (_, i) => {
          paths.push(join(mnt, `stream-${i}.bin`));
          const out = createSnapshotStream(paths[i] as string, { bufferSize: BUFFER_BYTES, buffers: IN_FLIGHT_PER_WRITER });
          await new Promise((resolve) => out.write(Buffer.alloc(0), resolve)); // opened before the freeze
          return out;
        }),
      );
      return async () => {
        await Promise.all(outs.map((out, i) => pipeline(seededSource(FROZEN_WRITER_BYTES + 4097, i, hashes[i] as ReturnType<typeof createHash>), out)));
        for (const [i, path] of paths.entries()) {
          expect(await sha256OfFile(path), `stream ${i}`).toBe((hashes[i] as ReturnType<typeof createHash>).digest('hex'));
        }
      };
    });
    console.log(
      `[concurrency] native across a ${HOLD_MS} ms freeze: readFile probe n=${stats.samples} ` +
        `median=${stats.medianMs.toFixed(2)} ms max=${stats.maxMs.toFixed(2)} ms`,
    );
    expect(stats.samples).toBeGreaterThanOrEqual(HOLD_MS / PROBE_INTERVAL_MS / 4);
    expect(stats.medianMs).toBeLessThan(PROBE_MEDIAN_BOUND_MS);
    expect(stats.maxMs).toBeLessThan(MAX_PROBE_LATENCY_MS);
  });
});

describe('the event loop under a synchronous producer', () => {
  /**
   * Write completions reach JS through a Node-API ThreadSafeFunction, which
   * (since nodejs/node PR #38506) delivers, in the same loop turn, calls
   * queued while its callbacks run, up to 1000 per wake-up. If a completion
   * resumed the producer inline, write -> completion -> write could chain
   * inside one turn; the stream therefore resumes a held producer from
   * setImmediate. A synchronous Readable starves timers by itself (its flow
   * loop runs in nextTicks while the sink accepts), so the reference is the
   * same sources piped into a Writable that accepts everything at once:
   * snapstream must add no stall of its own on top of that.
   */
  async function largestTimerGap(run: () => Promise<unknown>): Promise<{ gapMs: number; batchMs: number }> {
    const started = performance.now();
    let last = started;
    let gapMs = 0;
    const timer = setInterval(() => {
      const now = performance.now();
      gapMs = Math.max(gapMs, now - last);
      last = now;
    }, 10);
    try {
      await run();
    } finally {
      clearInterval(timer);
    }
    const ended = performance.now();
    return { gapMs: Math.max(gapMs, ended - last), batchMs: ended - started };
  }

  it('adds no event-loop stall beyond what eight CPU-bound synchronous sources cause into a null Writable', async () => {
    const control = await largestTimerGap(() =>
      Promise.all(
        Array.from({ length: STREAMS }, (_, i) =>
          pipeline(seededSource(64 * MiB, 100 + i, createHash('sha256')), new Writable({ write: (_c, _e, cb) => cb() })),
        ),
      ),
    );
    const ours = await largestTimerGap(() =>
      Promise.all(
        Array.from({ length: STREAMS }, (_, i) =>
          pipeline(
            seededSource(64 * MiB, 100 + i, createHash('sha256')),
            createSnapshotStream(join(dir.path, `loop-${i}.bin`), { bufferSize: BUFFER_BYTES }),
          ),
        ),
      ),
    );
    console.log(
      `[concurrency] largest timer gap: snapstream ${ours.gapMs.toFixed(0)} ms of a ${ours.batchMs.toFixed(0)} ms batch; ` +
        `null Writable ${control.gapMs.toFixed(0)} ms of ${control.batchMs.toFixed(0)} ms`,
    );
    // Margin: 1.5x the control plus 100 ms, for a shared machine's scheduling noise
    // (the serial project keeps other test files away, not other processes).
    expect(ours.gapMs).toBeLessThanOrEqual(control.gapMs * 1.5 + 100);
  });
});
