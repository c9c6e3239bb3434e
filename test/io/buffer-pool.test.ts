/**
 * The process's pool of I/O buffers (src/io/buffer-pool.ts): a stream's ring
 * goes back to it, wiped, and the next stream fills the same memory. Checked
 * against the input's SHA-256 for the bytes on disk, and by identity for the
 * buffers.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { createSnapshotStream } from '../../src/index.js';
import { TargetFile } from '../../src/io/target-file.js';
import { validateStreamOptions } from '../../src/options.js';
import { SnapshotStream } from '../../src/stream/snapshot-stream.js';
import { allocAligned } from '../../src/io/alignment.js';
import {
  bufferPoolBytes,
  drainBufferPool,
  POOL_IDLE_MS,
  POOL_MAX_BYTES,
  returnZeroedBuffer,
  setBufferPoolIdleMs,
  takeZeroedBuffer,
} from '../../src/io/buffer-pool.js';
import { failure } from '../helpers/failure.js';
import { chunked, fromChunks, pseudoRandom, sha256 } from '../helpers/streams.js';
import { tmpDir, type TmpDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;

let dir: TmpDir;
beforeAll(async () => {
  dir = await tmpDir('buffer-pool');
});
afterAll(async () => {
  await dir.cleanup();
});

let counter = 0;
function freshPath(): string {
  return join(dir.path, `state-${counter++}.bin`);
}

interface RingInternals {
  _ring?: { buffers: Uint8Array[] };
}

/** Streams `data` to a new file; returns the ring's buffers, taken while it ran, and the path. */
async function streamOnce(data: Buffer, options: { bufferSize: number; buffers: number; signal?: AbortSignal }): Promise<{ ring: Uint8Array[]; path: string }> {
  const path = freshPath();
  const out = createSnapshotStream(path, options);
  let ring: Uint8Array[] = [];
  out.once('progress', () => (ring = [...((out as RingInternals)._ring?.buffers ?? [])]));
  await pipeline(fromChunks(chunked(data, () => 4104)), out);
  expect(ring).toHaveLength(options.buffers);
  return { ring, path };
}

afterEach(() => {
  vi.useRealTimers();
  setBufferPoolIdleMs(POOL_IDLE_MS);
  drainBufferPool();
});

describe('the I/O buffer pool', () => {
  it("gives a finished stream's wiped ring to the next stream, which writes its input byte for byte", async () => {
    drainBufferPool();
    const first = pseudoRandom(9 * MiB + 123, 31);
    const a = await streamOnce(first, { bufferSize: 4 * MiB, buffers: 3 });
    expect(sha256(await readFile(a.path))).toBe(sha256(first));
    expect(bufferPoolBytes()).toBe(12 * MiB);
    for (const b of a.ring) expect(b.every((x) => x === 0)).toBe(true);

    const second = pseudoRandom(7 * MiB + 5, 32);
    const b = await streamOnce(second, { bufferSize: 4 * MiB, buffers: 3 });
    expect(new Set([...a.ring, ...b.ring]).size, 'the second ring is the first one').toBe(3);
    expect(sha256(await readFile(b.path))).toBe(sha256(second));
  });

  it('hands the ring of an aborted stream on all zero', async () => {
    drainBufferPool();
    const controller = new AbortController();
    const path = freshPath();
    const out = createSnapshotStream(path, { bufferSize: 2 * MiB, buffers: 2, signal: controller.signal });
    let ring: Uint8Array[] = [];
    out.once('progress', () => {
      ring = [...((out as RingInternals)._ring?.buffers ?? [])];
      controller.abort();
    });
    await failure(pipeline(fromChunks(chunked(pseudoRandom(16 * MiB, 33), () => MiB)), out));
    expect(ring).toHaveLength(2);
    const taken = [takeZeroedBuffer(2 * MiB, 4096), takeZeroedBuffer(2 * MiB, 4096)];
    expect(new Set([...ring, ...taken]).size, 'the aborted ring came back').toBe(2);
    for (const b of taken) expect(b.every((x) => x === 0)).toBe(true);
  });

  it("wipes the ring, and pools it, even when the sink's abort and close fail", async () => {
    drainBufferPool();
    const file = await TargetFile.open(freshPath(), { write: true, create: true, direct: false, threads: 2 });
    let closed = false;
    const out = new SnapshotStream(validateStreamOptions({ bufferSize: MiB, buffers: 2 }), async () => ({
      file,
      baseOffset: 0,
      maxLength: undefined,
      finalize: async () => {},
      abort: async () => {
        throw new Error('the sink could not undo its writes');
      },
      close: async () => {
        closed = true;
        await file.close();
        throw new Error('the sink could not close');
      },
    }));
    let ring: Uint8Array[] = [];
    out.once('progress', () => {
      ring = [...((out as RingInternals)._ring?.buffers ?? [])];
      out.destroy(new Error('stopped by the test'));
    });
    await expect(pipeline(fromChunks(chunked(pseudoRandom(8 * MiB, 37), () => MiB)), out)).rejects.toThrow('stopped by the test');
    if (!out.closed) await new Promise((resolve) => out.once('close', resolve));
    expect(closed, 'the sink was closed').toBe(true);
    expect(ring).toHaveLength(2);
    for (const b of ring) expect(b.every((x) => x === 0)).toBe(true);
    expect(bufferPoolBytes()).toBe(2 * MiB);
  });

  it('never gives one buffer to two streams that run at once', async () => {
    drainBufferPool();
    await streamOnce(pseudoRandom(MiB, 34), { bufferSize: MiB, buffers: 3 }); // fills the pool with 3
    const x = pseudoRandom(6 * MiB + 1, 35);
    const y = pseudoRandom(5 * MiB + 2, 36);
    const [rx, ry] = await Promise.all([
      streamOnce(x, { bufferSize: MiB, buffers: 3 }),
      streamOnce(y, { bufferSize: MiB, buffers: 3 }),
    ]);
    expect(new Set([...rx.ring, ...ry.ring]).size).toBe(6);
    expect(sha256(await readFile(rx.path))).toBe(sha256(x));
    expect(sha256(await readFile(ry.path))).toBe(sha256(y));
  });

  it('matches size and alignment, ignores buffers it did not hand out, and holds at most its bound', () => {
    drainBufferPool();
    const b = takeZeroedBuffer(MiB, 4096);
    returnZeroedBuffer(b);
    // Identity compared as booleans: toBe on two distinct 1 MiB arrays compares them element by element.
    expect(takeZeroedBuffer(2 * MiB, 4096) === b, 'another size').toBe(false);
    expect(takeZeroedBuffer(MiB, 1 << 20) === b, 'a stricter alignment than it was made with').toBe(false);
    expect(takeZeroedBuffer(MiB, 512) === b, 'a looser alignment is met').toBe(true);
    returnZeroedBuffer(allocAligned(MiB, 4096)); // not the pool's
    expect(bufferPoolBytes()).toBe(0);

    const many = Array.from({ length: POOL_MAX_BYTES / (16 * MiB) + 2 }, () => takeZeroedBuffer(16 * MiB, 4096));
    for (const m of many) returnZeroedBuffer(m);
    expect(bufferPoolBytes()).toBe(POOL_MAX_BYTES);
  });

  it('lets its buffers go after the idle time', () => {
    drainBufferPool();
    vi.useFakeTimers();
    returnZeroedBuffer(takeZeroedBuffer(MiB, 4096));
    expect(bufferPoolBytes()).toBe(MiB);
    vi.advanceTimersByTime(POOL_IDLE_MS - 1);
    expect(bufferPoolBytes()).toBe(MiB);
    vi.advanceTimersByTime(1);
    expect(bufferPoolBytes()).toBe(0);

    // A longer idle time, set while buffers wait, applies to them at once.
    returnZeroedBuffer(takeZeroedBuffer(MiB, 4096));
    setBufferPoolIdleMs(60_000);
    vi.advanceTimersByTime(59_999);
    expect(bufferPoolBytes()).toBe(MiB);
    vi.advanceTimersByTime(1);
    expect(bufferPoolBytes()).toBe(0);
    expect(() => setBufferPoolIdleMs(0)).toThrow(RangeError);
    expect(() => setBufferPoolIdleMs(Infinity)).toThrow(RangeError);
  });
});
