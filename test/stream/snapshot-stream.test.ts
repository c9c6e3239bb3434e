import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { readFile, readdir, readlink, stat, writeFile, mkdir } from 'node:fs/promises';
import { once } from 'node:events';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream, SnapshotError, type SnapshotStream } from '../../src/index.js';
import { chunked, fromChunks, pseudoRandom, qemuLikePages, sha256, sha256OfFile } from '../helpers/streams.js';
import { skipUnlessRan, withLoopFs } from '../helpers/loopfs.js';
import { requireTool, runOk, tmpDir, type TmpDir } from '../helpers/tools.js';

const MiB = 1 << 20;
const O_DIRECT = 0o40000;

let dir: TmpDir;
beforeAll(async () => {
  dir = await tmpDir('stream');
});
afterAll(async () => {
  await dir.cleanup();
});

async function writeAll(path: string, chunks: Uint8Array[], options = {}): Promise<SnapshotStream> {
  const out = createSnapshotStream(path, options);
  await pipeline(fromChunks(chunks), out);
  return out;
}

/** Writes the chunks through write()/cork so that _writev sees them batched. */
async function writeCorked(out: SnapshotStream, chunks: Uint8Array[], batch: number): Promise<void> {
  for (let i = 0; i < chunks.length; i += batch) {
    out.cork();
    for (let j = i; j < Math.min(i + batch, chunks.length); j++) out.write(chunks[j]);
    process.nextTick(() => out.uncork());
    if (out.writableNeedDrain) await new Promise((r) => out.once('drain', r));
  }
  await new Promise<void>((resolve, reject) => {
    out.once('error', reject);
    out.end(() => resolve());
  });
}

async function openFds(): Promise<Map<string, string>> {
  const fds = new Map<string, string>();
  for (const fd of await readdir('/proc/self/fd')) {
    try {
      fds.set(fd, await readlink(`/proc/self/fd/${fd}`));
    } catch {
      // closed while listing
    }
  }
  return fds;
}

async function fdOf(path: string): Promise<string | undefined> {
  for (const [fd, target] of await openFds()) if (target === path) return fd;
  return undefined;
}

describe('createSnapshotStream on a raw file', () => {
  it('writes random chunk sizes from 1 B to 9 MiB byte-exactly', async () => {
    const data = pseudoRandom(48 * MiB + 12345, 1);
    const sizes = pseudoRandom(4 * 1024, 11);
    const chunks = chunked(data, (i) => {
      const r = sizes.readUInt32LE((i * 4) % sizes.length);
      const limit = [16, 5000, MiB, 9 * MiB][i % 4] as number;
      return 1 + (r % limit);
    });
    expect(chunks.reduce((m, c) => Math.max(m, c.length), 0)).toBeGreaterThan(4 * MiB);
    const path = join(dir.path, 'random.bin');
    const out = await writeAll(path, chunks);
    expect(out.bytesWritten).toBe(data.length);
    expect((await stat(path)).size).toBe(data.length);
    expect(await sha256OfFile(path)).toBe(sha256(data));
  });

  it('writes QEMU-like 8 B + 4 KiB vectored pairs byte-exactly through _writev', async () => {
    const pool = pseudoRandom(4 * MiB, 2);
    const chunks = [...qemuLikePages(5000, pool)];
    const path = join(dir.path, 'pairs.bin');
    const out = createSnapshotStream(path, { bufferSize: MiB });
    let writev = 0;
    const original = out._writev.bind(out);
    out._writev = (c, cb) => {
      writev++;
      original(c, cb);
    };
    await writeCorked(out, chunks, 64);
    expect(writev).toBeGreaterThan(0);
    expect(await sha256OfFile(path)).toBe(sha256(chunks));
    expect((await stat(path)).size).toBe(5000 * (4096 + 8));
  });

  it('writes exact multiples of the buffer size', async () => {
    const data = pseudoRandom(8 * MiB, 3);
    const path = join(dir.path, 'multiple.bin');
    const out = await writeAll(path, chunked(data, () => MiB), { bufferSize: MiB, buffers: 3 });
    expect(out.bytesWritten).toBe(8 * MiB);
    expect(await sha256OfFile(path)).toBe(sha256(data));
  });

  it('writes a single byte with an exact file length of 1', async () => {
    const path = join(dir.path, 'one.bin');
    await writeAll(path, [Buffer.from([0x5a])]);
    expect(await readFile(path)).toEqual(Buffer.from([0x5a]));
  });

  it('leaves an empty file for an empty stream', async () => {
    const path = join(dir.path, 'empty.bin');
    const out = await writeAll(path, []);
    expect(out.bytesWritten).toBe(0);
    expect((await stat(path)).size).toBe(0);
  });

  it('accepts Uint8Array chunks that are views into larger buffers', async () => {
    const backing = pseudoRandom(3 * MiB, 4);
    const views = [new Uint8Array(backing.buffer, backing.byteOffset + 17, 1000), backing.subarray(5, 2 * MiB + 3)];
    const path = join(dir.path, 'views.bin');
    await writeAll(path, views);
    expect(await sha256OfFile(path)).toBe(sha256(views));
  });

  it('uses O_DIRECT on the build disk, visible in /proc/self/fdinfo', async () => {
    const path = join(dir.path, 'direct.bin');
    const out = createSnapshotStream(path, { direct: true, bufferSize: MiB });
    const flags = new Promise<number>((resolve, reject) => {
      out.once('progress', () => {
        try {
          // Synchronously, while the stream still holds the descriptor.
          const fd = readdirSync('/proc/self/fd').find((f) => {
            try {
              return readlinkSync(`/proc/self/fd/${f}`) === path;
            } catch {
              return false;
            }
          });
          const info = readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
          resolve(parseInt(/flags:\s+([0-7]+)/.exec(info)?.[1] ?? '0', 8));
        } catch (err) {
          reject(err);
        }
      });
    });
    const data = pseudoRandom(8 * MiB, 5);
    await pipeline(fromChunks(chunked(data, () => 64 * 1024)), out);
    expect((await flags) & O_DIRECT).toBe(O_DIRECT);
    expect(out.direct).toBe(true);
    expect(out.alignment).toBeGreaterThanOrEqual(512);
    expect(await sha256OfFile(path)).toBe(sha256(data));
  });

  it('creates files with mode 0600 so VM memory is not world-readable', async () => {
    const path = join(dir.path, 'mode.bin');
    await writeAll(path, [Buffer.from('secret')]);
    expect((await stat(path)).mode & 0o777).toBe(0o600);
  });

  it('honours an aligned offset and keeps the bytes before it', async () => {
    const path = join(dir.path, 'offset.bin');
    const head = pseudoRandom(MiB, 6);
    await writeFile(path, head);
    const body = pseudoRandom(3 * MiB + 99, 7);
    await writeAll(path, [body], { offset: MiB });
    const file = await readFile(path);
    expect(file.length).toBe(MiB + body.length);
    expect(sha256(file.subarray(0, MiB))).toBe(sha256(head));
    expect(sha256(file.subarray(MiB))).toBe(sha256(body));
  });

  it('emits progress with bytesWritten and bytesQueued', async () => {
    const path = join(dir.path, 'progress.bin');
    const out = createSnapshotStream(path, { bufferSize: MiB });
    const events: { bytesWritten: number; bytesQueued: number }[] = [];
    out.on('progress', (e) => events.push(e));
    await pipeline(fromChunks(chunked(pseudoRandom(4 * MiB + 10, 8), () => 4096)), out);
    expect(events.length).toBeGreaterThanOrEqual(5);
    expect(events.at(-1)?.bytesWritten).toBe(4 * MiB + 10);
    for (let i = 1; i < events.length; i++) {
      expect(events[i]!.bytesWritten).toBeGreaterThan(events[i - 1]!.bytesWritten);
      expect(events[i]!.bytesQueued).toBeGreaterThanOrEqual(events[i]!.bytesWritten);
    }
  });

});

describe('backpressure while the disk holds the I/O back (frozen filesystem)', () => {
  // fsfreeze blocks every write to the filesystem until it is thawed: a real
  // disk that does not answer, with the stream's pwrite stuck in the kernel.
  const skip = requireTool('fsfreeze');
  it.skipIf(skip !== undefined)('write() returns false and the callback stays pending until the I/O completes', async (ctx) => {
    const result = await withLoopFs({ sizeBytes: 32 * MiB, fsType: 'ext4' }, async (mnt) => {
      const path = join(mnt, 'backpressure.bin');
      const out = createSnapshotStream(path, { bufferSize: MiB, buffers: 2 });
      await new Promise((r) => out.write(Buffer.alloc(0), r)); // opened (an open on a frozen fs would block too)
      await runOk('fsfreeze', ['--freeze', mnt]);
      let frozen = true;
      try {
        let called = false;
        const data = pseudoRandom(3 * MiB, 31);
        // Three buffers' worth in one write: the third cannot be copied until one completes.
        const accepted = out.write(data, () => {
          called = true;
        });
        expect(accepted).toBe(false);
        expect(out.writableNeedDrain).toBe(true);
        await sleep(500);
        expect(called).toBe(false); // the disk holds the first buffer: nothing can move
        expect(out.bytesWritten).toBe(0);
        const drained = once(out, 'drain'); // listening first: the thaw may complete the writes at once
        await runOk('fsfreeze', ['--unfreeze', mnt]);
        frozen = false;
        await drained;
        expect(called).toBe(true);
        await new Promise<void>((resolve, reject) => out.end((err?: Error | null) => (err ? reject(err) : resolve())));
        expect(await sha256OfFile(path)).toBe(sha256(data));
      } finally {
        if (frozen) await runOk('fsfreeze', ['--unfreeze', mnt]);
        out.destroy();
      }
    });
    skipUnlessRan(ctx, result);
  });
});

describe('createSnapshotStream refuses bad input with coded errors', () => {
  async function failure(stream: Writable, chunks: unknown[] = []): Promise<SnapshotError> {
    const err = await new Promise<unknown>((resolve) => {
      stream.once('error', resolve);
      for (const c of chunks) stream.write(c);
      stream.end();
    });
    expect(err).toBeInstanceOf(SnapshotError);
    return err as SnapshotError;
  }

  it('fails with ENOENT and the path when the directory is missing', async () => {
    const path = join(dir.path, 'missing', 'x.bin');
    const err = await failure(createSnapshotStream(path));
    expect(err.code).toBe('ENOENT');
    expect(err.path).toBe(path);
    expect(err.syscall).toBe('open');
  });

  it('fails with EISDIR when the path is a directory', async () => {
    const path = join(dir.path, 'a-dir');
    await mkdir(path);
    const err = await failure(createSnapshotStream(path));
    expect(err.code).toBe('EISDIR');
    expect(err.path).toBe(path);
  });

  it('fails with INVALID_CHUNK for chunks that are not bytes, and removes the partial file', async () => {
    const path = join(dir.path, 'badchunk.bin');
    for (const bad of ['text', 42, { length: 3 }, [1, 2, 3]]) {
      const err = await failure(createSnapshotStream(path), [Buffer.from('ok'), bad]);
      expect(err.code).toBe('INVALID_CHUNK');
      await expect(stat(path)).rejects.toMatchObject({ code: 'ENOENT' });
    }
  });

  it('refuses to write raw bytes over a qcow2 image unless format raw is given', async () => {
    const path = join(dir.path, 'looks.qcow2');
    const header = Buffer.alloc(4096);
    header.write('QFI\xfb', 0, 'latin1');
    await writeFile(path, header);
    const err = await failure(createSnapshotStream(path), [Buffer.from('x')]);
    expect(err.code).toBe('NOT_RAW');
    expect(await readFile(path)).toEqual(header);
    await writeAll(path, [Buffer.from('raw now')], { format: 'raw' });
    expect(await readFile(path, 'utf8')).toBe('raw now');
  });

  it('fails a write after end like any Writable', async () => {
    const path = join(dir.path, 'after-end.bin');
    const out = createSnapshotStream(path);
    const emitted = new Promise((resolve) => out.once('error', resolve));
    out.end(Buffer.from('a'));
    const err = await new Promise<Error>((resolve) => {
      out.write(Buffer.from('b'), (e) => resolve(e as Error));
    });
    expect((err as NodeJS.ErrnoException).code).toBe('ERR_STREAM_WRITE_AFTER_END');
    expect(await emitted).toBe(err);
  });

  it('aborts mid-stream with ABORTED, closes its descriptor and leaves no partial file', async () => {
    const path = join(dir.path, 'abort.bin');
    const before = (await openFds()).size;
    const ac = new AbortController();
    const out = createSnapshotStream(path, { signal: ac.signal, bufferSize: MiB });
    out.once('progress', () => ac.abort());
    const source = fromChunks(chunked(pseudoRandom(64 * MiB, 9), () => 256 * 1024));
    const err = await pipeline(source, out).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(SnapshotError);
    expect((err as SnapshotError).code).toBe('ABORTED');
    expect(out.bytesWritten).toBeLessThan(64 * MiB);
    expect(await fdOf(path)).toBeUndefined();
    expect((await openFds()).size).toBeLessThanOrEqual(before);
    await expect(stat(path)).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('fails at once with ABORTED for a signal that is already aborted', async () => {
    const path = join(dir.path, 'pre-aborted.bin');
    const err = await failure(createSnapshotStream(path, { signal: AbortSignal.abort() }));
    expect(err.code).toBe('ABORTED');
  });
});

describe('a failure inside the write path', () => {
  it('fails the stream (no finish, no unhandled rejection) when the target throws while the depth tuner changes its depth', async () => {
    // What a stale addon without setConcurrency did: the throw escaped a promise
    // reaction, and the stream still emitted 'finish' with a truncated file.
    const { TargetFile } = await import('../../src/io/target-file.js');
    const original = TargetFile.prototype.setConcurrency;
    const unhandled: unknown[] = [];
    const onUnhandled = (reason: unknown): void => {
      unhandled.push(reason);
    };
    process.on('unhandledRejection', onUnhandled);
    TargetFile.prototype.setConcurrency = function broken(): void {
      throw new TypeError('this._native.setConcurrency is not a function');
    };
    try {
      const path = join(dir.path, 'tuner-throws.bin');
      // 16 MiB buffers; the tuner changes depth after an 8 MiB warm-up and a 32 MiB probe.
      const data = pseudoRandom(160 * MiB, 77);
      const out = createSnapshotStream(path, { bufferSize: 4 * MiB, buffers: 3 });
      let finished = false;
      out.on('finish', () => {
        finished = true;
      });
      const err = await pipeline(fromChunks(chunked(data, () => 1 * MiB)), out).then(
        () => undefined,
        (e: unknown) => e,
      );
      await sleep(50);
      expect(err).toBeInstanceOf(SnapshotError);
      expect((err as SnapshotError).message).toMatch(/setConcurrency/);
      expect(finished).toBe(false);
      expect(unhandled).toEqual([]);
      // A file this stream created does not survive its failure.
      await expect(stat(path)).rejects.toMatchObject({ code: 'ENOENT' });
    } finally {
      TargetFile.prototype.setConcurrency = original;
      process.off('unhandledRejection', onUnhandled);
    }
  });
});
