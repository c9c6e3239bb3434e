/**
 * Flushes during the stream (the flushInterval option): the stream calls
 * fdatasync as it goes, counted from outside by strace; the bytes on disk
 * are still exactly the bytes written (their SHA-256, computed by the
 * writer); and a failed flush fails the stream like a failed write.
 */
import { open, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream, SnapshotError } from '../../src/index.js';
import { TargetFile } from '../../src/io/target-file.js';
import { DEFAULT_FLUSH_INTERVAL } from '../../src/stream/options.js';
import { pipeline } from 'node:stream/promises';
import { skipUnlessRan, withLoopDevice } from '../helpers/loopfs.js';
import { fromChunks, pseudoRandom, sha256, sha256OfFile } from '../helpers/streams.js';
import { requireTool, runOk, tmpDir, type TmpDir } from '../helpers/tools.js';

const MiB = 1 << 20;
const STREAM_MIB = 256;
const straceMissing = requireTool('strace');

let dir: TmpDir;
beforeAll(async () => {
  dir = await tmpDir('flush');
});
afterAll(async () => {
  await dir.cleanup();
});

/** Runs test/fixtures/flush-child.mjs under strace; returns its report and the fdatasync calls strace saw. */
async function streamUnderStrace(name: string, interval: string): Promise<{ path: string; bytesWritten: number; sha256: string; fdatasyncs: number }> {
  const path = join(dir.path, `${name}.bin`);
  const trace = join(dir.path, `${name}.strace`);
  const child = join(import.meta.dirname, '../fixtures/flush-child.mjs');
  const { stdout } = await runOk('strace', ['-f', '-qq', '-e', 'trace=fdatasync', '-o', trace, process.execPath, child, path, String(STREAM_MIB), interval], {
    timeoutMs: 120_000,
  });
  const report = JSON.parse(stdout.trim().split('\n').pop() as string) as { bytesWritten: number; sha256: string };
  const fdatasyncs = (await readFile(trace, 'utf8')).split('\n').filter((line) => /fdatasync\(\d+\)\s+= 0/.test(line)).length;
  return { path, ...report, fdatasyncs };
}

describe.skipIf(straceMissing !== undefined)('flushes while the stream runs (strace counts fdatasync)', () => {
  it(`flushes every flushInterval bytes, by default every ${DEFAULT_FLUSH_INTERVAL / MiB} MiB, and none before the end with 0; the file is byte for byte what was written`, async () => {
    const none = await streamUnderStrace('none', '0');
    const every32 = await streamUnderStrace('every32', String(32 * MiB));
    const byDefault = await streamUnderStrace('default', 'default');
    for (const r of [none, every32, byDefault]) {
      expect(r.bytesWritten).toBeGreaterThanOrEqual(STREAM_MIB * MiB);
      expect((await stat(r.path)).size).toBe(r.bytesWritten);
      expect(await sha256OfFile(r.path)).toBe(r.sha256);
    }
    // With 0 only the sink's own flush at the end remains.
    expect(none.fdatasyncs).toBeGreaterThanOrEqual(1);
    expect(none.fdatasyncs).toBeLessThanOrEqual(2);
    // At most one flush per interval; one runs at a time, so a slow disk (or a sanitizer build) may skip some.
    expect(every32.fdatasyncs - none.fdatasyncs).toBeGreaterThanOrEqual(2);
    expect(every32.fdatasyncs - none.fdatasyncs).toBeLessThanOrEqual(STREAM_MIB / 32);
    expect(byDefault.fdatasyncs - none.fdatasyncs).toBeGreaterThanOrEqual(1);
    expect(byDefault.fdatasyncs - none.fdatasyncs).toBeLessThanOrEqual(STREAM_MIB / (DEFAULT_FLUSH_INTERVAL / MiB));
  });
});

describe('a flush that fails', () => {
  it('fails the stream with its coded error, and the partial file is removed', async () => {
    const path = join(dir.path, 'eio.bin');
    const eio = new SnapshotError('EIO', 'injected write-back failure', { syscall: 'fdatasync', path });
    const datasync = TargetFile.prototype.datasync;
    let calls = 0;
    // The first fdatasync is a flush during the stream (flushInterval 1 MiB, 8 MiB written): it fails as a real EIO would.
    TargetFile.prototype.datasync = function (this: TargetFile) {
      calls++;
      return calls === 1 ? Promise.reject(eio) : datasync.call(this);
    };
    try {
      const out = createSnapshotStream(path, { flushInterval: MiB, bufferSize: MiB, buffers: 2 });
      const data = pseudoRandom(8 * MiB, 21);
      const err = await new Promise<unknown>((resolve) => {
        out.once('error', resolve);
        out.once('finish', () => resolve(undefined));
        for (let at = 0; at < data.length; at += 64 * 1024) out.write(data.subarray(at, at + 64 * 1024));
        out.end();
      });
      expect(calls).toBeGreaterThanOrEqual(1);
      expect(err).toBeInstanceOf(SnapshotError);
      expect(err).toMatchObject({ code: 'EIO', syscall: 'fdatasync' });
      await expect(stat(path)).rejects.toMatchObject({ code: 'ENOENT' });
    } finally {
      TargetFile.prototype.datasync = datasync;
    }
  });

  it('is refused as an option unless a whole number of bytes >= 0', () => {
    const target = join(dir.path, 'never.bin');
    expect(() => createSnapshotStream(target, { flushInterval: -1 })).toThrow(/options\.flushInterval/);
    expect(() => createSnapshotStream(target, { flushInterval: 1.5 })).toThrow(TypeError);
    expect(() => createSnapshotStream(target, { flushInterval: '64M' as unknown as number })).toThrow(/options\.flushInterval/);
  });

  it('on a block device: flushes as it goes and the device holds the bytes', async (ctx) => {
    const result = await withLoopDevice({ sizeBytes: 16 * MiB }, async (device) => {
      const data = pseudoRandom(6 * MiB + 100, 31);
      const datasync = TargetFile.prototype.datasync;
      let syncs = 0;
      TargetFile.prototype.datasync = function (this: TargetFile) {
        syncs++;
        return datasync.call(this);
      };
      try {
        await pipeline(fromChunks([data]), createSnapshotStream(device, { direct: true, bufferSize: MiB, flushInterval: MiB }));
      } finally {
        TargetFile.prototype.datasync = datasync;
      }
      // At least one flush during the stream (one runs at a time, so how many depends on the disk), then the final one.
      expect(syncs).toBeGreaterThanOrEqual(2);
      const handle = await open(device, 'r');
      try {
        const back = Buffer.alloc(data.length);
        await handle.read(back, 0, back.length, 0);
        expect(sha256(back)).toBe(sha256(data));
      } finally {
        await handle.close();
      }
    });
    skipUnlessRan(ctx, result);
  });

  it('an abort while flushes run: ABORTED, no flush left running on a closed descriptor, the partial file removed', async () => {
    const path = join(dir.path, 'abort.bin');
    // Watch the target: flushes started, flushes running, and how many ran when it closed.
    const { datasync, close } = TargetFile.prototype;
    let started = 0;
    let running = 0;
    let runningAtClose: number | undefined;
    TargetFile.prototype.datasync = function (this: TargetFile) {
      started++;
      running++;
      return datasync.call(this).finally(() => running--);
    };
    TargetFile.prototype.close = function (this: TargetFile) {
      runningAtClose ??= running;
      return close.call(this);
    };
    const controller = new AbortController();
    const out = createSnapshotStream(path, { bufferSize: MiB, buffers: 2, flushInterval: MiB, signal: controller.signal });
    const data = pseudoRandom(MiB, 32);
    out.on('progress', ({ bytesWritten }: { bytesWritten: number }) => {
      if (bytesWritten >= 8 * MiB) controller.abort();
    });
    const err = await new Promise<unknown>((resolve) => {
      out.once('error', resolve);
      out.once('finish', () => resolve(undefined));
      const pump = (): void => {
        for (let i = 0; i < 64 && !out.destroyed; i++) if (!out.write(data)) return void out.once('drain', pump);
        if (!out.destroyed) out.end();
      };
      pump();
    });
    await new Promise((resolve) => (out.closed ? resolve(undefined) : out.once('close', resolve)));
    TargetFile.prototype.datasync = datasync;
    TargetFile.prototype.close = close;
    expect(err).toMatchObject({ code: 'ABORTED' });
    expect(started).toBeGreaterThanOrEqual(1); // a flush ran before the abort (one at a time: how many depends on the disk)
    expect(runningAtClose).toBe(0);
    await expect(stat(path)).rejects.toMatchObject({ code: 'ENOENT' });
  });
});
