/**
 * A snapshot is a copy of guest memory: keys, passwords, page cache. These
 * tests pin what snapstream promises about that data outside the target:
 * who may read the files it creates, that a failed stream leaves nothing
 * behind, and that no byte of one stream (or of an earlier buffer of the
 * same stream) reaches the disk as padding.
 */
import { once } from 'node:events';
import { chmod, mkdir, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream, SnapshotError } from '../../src/index.js';
import { failure } from '../helpers/failure.js';
import { DEFAULT_BUFFERS } from '../../src/stream/options.js';
import { chunked, fromChunks, pseudoRandom, sha256 } from '../helpers/streams.js';
import { findTool, isRoot, runOk, tmpDir, type TmpDir } from '../helpers/tools.js';

const MiB = 1 << 20;
const BUFFER_BYTES = MiB;

let dir: TmpDir;
beforeAll(async () => {
  dir = await tmpDir('secrets');
});
afterAll(async () => {
  await dir.cleanup();
});

/** A fresh empty directory per test, so "no new files" means exactly that. */
let counter = 0;
async function freshDir(): Promise<string> {
  const path = join(dir.path, `case-${counter++}`);
  await mkdir(path);
  return path;
}

/** Every name in `path`, hidden ones included, recursively. */
async function listing(path: string): Promise<string[]> {
  return (await readdir(path, { recursive: true })).map(String).sort();
}

function currentUmask(): number {
  // process.umask() with no argument is deprecated but is the only read; set-and-restore is racy in threads.
  return process.umask();
}

describe('permissions of files snapstream creates', () => {
  it('creates the target with mode 0600 (less the umask) when no mode is given', async () => {
    const path = join(await freshDir(), 'state.bin');
    await pipeline(fromChunks([pseudoRandom(10_000, 1)]), createSnapshotStream(path, { bufferSize: BUFFER_BYTES }));
    expect((await stat(path)).mode & 0o7777).toBe(0o600 & ~currentUmask());
  });

  it('creates the target with the caller\'s mode (less the umask) when one is given', async () => {
    const path = join(await freshDir(), 'state.bin');
    await pipeline(fromChunks([pseudoRandom(10_000, 2)]), createSnapshotStream(path, { mode: 0o640, bufferSize: BUFFER_BYTES }));
    expect((await stat(path)).mode & 0o7777).toBe(0o640 & ~currentUmask());
  });

  it('leaves the mode of an existing target alone', async () => {
    const path = join(await freshDir(), 'state.bin');
    await writeFile(path, 'old');
    await chmod(path, 0o644);
    await pipeline(fromChunks([pseudoRandom(10_000, 3)]), createSnapshotStream(path, { bufferSize: BUFFER_BYTES }));
    expect((await stat(path)).mode & 0o7777).toBe(0o644);
  });
});

describe('nothing is left behind by a stream that fails', () => {
  it('leaves the directory as it was after an abort in mid-stream', async () => {
    const where = await freshDir();
    const before = await listing(where);
    const controller = new AbortController();
    const out = createSnapshotStream(join(where, 'state.bin'), { signal: controller.signal, bufferSize: BUFFER_BYTES });
    out.once('progress', () => controller.abort());
    const err = await failure(pipeline(fromChunks(chunked(pseudoRandom(16 * MiB, 4), () => 256 * 1024)), out));
    expect(err.code).toBe('ABORTED');
    expect(await listing(where)).toEqual(before);
  });

  it('leaves the directory as it was when the signal is already aborted', async () => {
    const where = await freshDir();
    const before = await listing(where);
    const out = createSnapshotStream(join(where, 'state.bin'), { signal: AbortSignal.abort() });
    const err = await failure(pipeline(fromChunks([Buffer.alloc(100)]), out));
    expect(err.code).toBe('ABORTED');
    expect(await listing(where)).toEqual(before);
  });

  it('leaves the directory as it was when the producer fails', async () => {
    const where = await freshDir();
    const before = await listing(where);
    async function* source(): AsyncGenerator<Buffer> {
      yield pseudoRandom(3 * MiB, 5);
      throw new Error('producer died');
    }
    const err = await pipeline(source(), createSnapshotStream(join(where, 'state.bin'), { bufferSize: BUFFER_BYTES })).then(
      () => undefined,
      (e: unknown) => e as Error,
    );
    expect(err?.message).toBe('producer died');
    // The stream's teardown runs after pipeline settles; give it a moment.
    await waitFor(async () => (await listing(where)).length === before.length);
    expect(await listing(where)).toEqual(before);
  });

  it('leaves the directory as it was when a chunk is not bytes', async () => {
    const where = await freshDir();
    const before = await listing(where);
    const out = createSnapshotStream(join(where, 'state.bin'), { bufferSize: BUFFER_BYTES });
    const source = Readable.from([Buffer.alloc(5000), 'a string' as unknown as Buffer], { objectMode: true });
    const err = await failure(pipeline(source, out));
    expect(err.code).toBe('INVALID_CHUNK');
    expect(await listing(where)).toEqual(before);
  });

  it('keeps a target it did not create (it is the caller\'s file) after a failure', async () => {
    const where = await freshDir();
    const path = join(where, 'state.bin');
    await writeFile(path, 'callers data');
    const controller = new AbortController();
    const out = createSnapshotStream(path, { signal: controller.signal, bufferSize: BUFFER_BYTES });
    out.once('progress', () => controller.abort());
    await failure(pipeline(fromChunks(chunked(pseudoRandom(8 * MiB, 6), () => MiB)), out));
    expect(await listing(where)).toEqual(['state.bin']);
  });
});

async function waitFor(predicate: () => Promise<boolean>, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await predicate())) {
    if (Date.now() > deadline) return;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Internals read by the white-box test below; not API. */
interface RingInternals {
  _ring?: { buffers: Uint8Array[] };
}

/**
 * The ring's buffers, taken while the stream runs (once the stream ends they
 * go back to the process's buffer pool and the ring lists none), after
 * asserting that the ring is there with `count` of them (so the loop over them
 * cannot be empty).
 */
function ringBuffers(out: object, count: number): Uint8Array[] {
  const ring = (out as RingInternals)._ring;
  expect(ring, 'the stream has no _ring: the white-box test no longer sees the buffers').toBeDefined();
  expect(ring?.buffers.length).toBe(count);
  return [...(ring?.buffers ?? [])];
}

describe('ring buffers', () => {
  it('are all zero once a stream has finished (white-box: the ring is wiped on destroy)', async () => {
    const out = createSnapshotStream(join(await freshDir(), 'state.bin'), { bufferSize: BUFFER_BYTES, buffers: 3 });
    let buffers: Uint8Array[] = [];
    out.once('progress', () => (buffers = ringBuffers(out, 3)));
    await pipeline(fromChunks(chunked(pseudoRandom(5 * MiB + 77, 7), () => 300_000)), out);
    if (!out.closed) await once(out, 'close'); // the ring is wiped in _destroy, after 'finish'
    expect(buffers).toHaveLength(3);
    for (const b of buffers) expect(b.every((x) => x === 0)).toBe(true);
    expect(ringBuffers(out, 0), 'the wiped buffers went back to the pool').toEqual([]);
  });

  it('are all zero once a stream has failed (white-box)', async () => {
    const controller = new AbortController();
    const out = createSnapshotStream(join(await freshDir(), 'state.bin'), {
      bufferSize: BUFFER_BYTES,
      signal: controller.signal,
    });
    let buffers: Uint8Array[] = [];
    out.once('progress', () => {
      buffers = ringBuffers(out, DEFAULT_BUFFERS);
      controller.abort();
    });
    await failure(pipeline(fromChunks(chunked(pseudoRandom(6 * MiB, 8), () => MiB)), out));
    if (!out.closed) await once(out, 'close');
    expect(buffers).toHaveLength(DEFAULT_BUFFERS);
    for (const b of buffers) expect(b.every((x) => x === 0)).toBe(true);
  });
});

const loopSkip =
  !isRoot() ? 'loop devices need root' : findTool('losetup') === undefined ? 'losetup is missing' : undefined;

describe.skipIf(loopSkip !== undefined)('tail padding on a block device (read-modify-write of the last block)', () => {
  const DEVICE_BYTES = 16 * MiB;

  async function withLoopDevice(fn: (device: string) => Promise<void>): Promise<void> {
    const backing = join(await freshDir(), 'disk.img');
    await runOk('truncate', ['-s', String(DEVICE_BYTES), backing]);
    const device = (await runOk('losetup', ['--find', '--show', backing])).stdout.trim();
    try {
      await fn(device);
    } finally {
      await runOk('losetup', ['-d', device]).catch(() => undefined);
    }
  }

  for (const direct of [true, false] as const) {
    it(`keeps the device's own bytes, never bytes of an earlier buffer (direct ${direct})`, async () => {
      await withLoopDevice(async (device) => {
        // The device holds a recognisable pattern of its owner's.
        const owner = Buffer.alloc(DEVICE_BYTES, 0xee);
        await pipeline(fromChunks([owner]), createSnapshotStream(device, { direct, bufferSize: BUFFER_BYTES }));
        // Two buffers: the tail lands in buffer 0 again, which last held this
        // stream's own first MiB. Its padding must not repeat those bytes, and
        // (read-modify-write of the last block) must not zero the owner's.
        const data = pseudoRandom(2 * BUFFER_BYTES + 1000, 9);
        const out = createSnapshotStream(device, { direct, bufferSize: BUFFER_BYTES, buffers: 2 });
        await pipeline(fromChunks(chunked(data, () => 64 * 1024)), out);
        const alignment = out.alignment ?? 4096;
        const paddedEnd = Math.ceil(data.length / alignment) * alignment;
        const back = await readFile(device);
        expect(sha256(back.subarray(0, data.length))).toBe(sha256(data));
        const padding = back.subarray(data.length, paddedEnd);
        expect(padding.length).toBe(paddedEnd - data.length);
        expect(padding.every((b) => b === 0xee)).toBe(true);
        // Beyond the padding the device is untouched too.
        expect(back.subarray(paddedEnd).every((b) => b === 0xee)).toBe(true);
      });
    });
  }
});
