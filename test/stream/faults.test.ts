/**
 * Real faults: a filesystem that refuses O_DIRECT, tmpfs, a full disk, a
 * block device whose backing store runs out, and a 2 GiB write watched for
 * memory growth in a child process.
 */
import { execFile } from 'node:child_process';
import { readFile, stat, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream, SnapshotError } from '../../src/index.js';
import { freeBytes, skipUnlessRan, withLoopFs, withRamfs } from '../helpers/loopfs.js';
import { chunked, fromChunks, pseudoRandom, sha256, sha256OfFile } from '../helpers/streams.js';
import { runOk, tmpDir, type TmpDir } from '../helpers/tools.js';

const MiB = 1 << 20;
const run = promisify(execFile);

let dir: TmpDir;
beforeAll(async () => {
  dir = await tmpDir('faults');
});
afterAll(async () => {
  await dir.cleanup();
});

async function expectError(promise: Promise<unknown>): Promise<SnapshotError> {
  const err = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(SnapshotError);
  return err as SnapshotError;
}

describe('filesystems without O_DIRECT', () => {
  it("falls back to the page cache on tmpfs with direct 'auto' and says so", async () => {
    const path = `/dev/shm/snapstream-test-${process.pid}.bin`;
    try {
      const data = pseudoRandom(5 * MiB + 3, 21);
      const out = createSnapshotStream(path, { direct: 'auto', bufferSize: MiB });
      await pipeline(fromChunks(chunked(data, () => 100_000)), out);
      expect(out.direct).toBe(false);
      expect(await sha256OfFile(path)).toBe(sha256(data));
    } finally {
      await truncate(path, 0).catch(() => undefined);
      await import('node:fs/promises').then((fs) => fs.rm(path, { force: true }));
    }
  });

  it('fails with DIRECT_IO_UNSUPPORTED on tmpfs with direct true', async () => {
    const path = `/dev/shm/snapstream-test-strict-${process.pid}.bin`;
    const out = createSnapshotStream(path, { direct: true });
    const err = await expectError(pipeline(fromChunks([Buffer.from('x')]), out));
    expect(err.code).toBe('DIRECT_IO_UNSUPPORTED');
    expect(err.path).toBe(path);
    await expect(stat(path)).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('handles a filesystem whose open() refuses O_DIRECT (ramfs) both ways', async (ctx) => {
    const result = await withRamfs(async (mnt) => {
      const strict = await expectError(
        pipeline(fromChunks([Buffer.from('x')]), createSnapshotStream(join(mnt, 'strict.bin'), { direct: true })),
      );
      expect(strict.code).toBe('DIRECT_IO_UNSUPPORTED');
      const data = pseudoRandom(3 * MiB, 22);
      const out = createSnapshotStream(join(mnt, 'auto.bin'), { direct: 'auto', bufferSize: MiB });
      await pipeline(fromChunks([data]), out);
      expect(out.direct).toBe(false);
      expect(sha256(await readFile(join(mnt, 'auto.bin')))).toBe(sha256(data));
    });
    skipUnlessRan(ctx, result);
  });
});

describe('a full disk', () => {
  it('reports ENOSPC once as a SnapshotError, without hanging or leaking the descriptor', async (ctx) => {
    const result = await withLoopFs({ sizeBytes: 32 * MiB, fsType: 'ext4' }, async (mnt) => {
      const path = join(mnt, 'state.bin');
      const out = createSnapshotStream(path, { bufferSize: MiB });
      let errors = 0;
      out.on('error', () => errors++);
      const err = await expectError(pipeline(fromChunks(chunked(pseudoRandom(64 * MiB, 23), () => 64 * 1024)), out));
      expect(err.code).toBe('ENOSPC');
      expect(err.syscall).toBe('pwrite');
      expect(err.offset).toBeTypeOf('number');
      expect(errors).toBe(1);
      // The partial file was ours: it is gone, and the space is back.
      await expect(stat(path)).rejects.toMatchObject({ code: 'ENOENT' });
      expect(await freeBytes(mnt)).toBeGreaterThan(16 * MiB);
    });
    skipUnlessRan(ctx, result);
  });

  it("refuses at once with ENOSPC under preallocate 'space', consuming no input", async (ctx) => {
    const result = await withLoopFs({ sizeBytes: 32 * MiB, fsType: 'ext4' }, async (mnt) => {
      const path = join(mnt, 'state.bin');
      let pulled = 0;
      async function* source() {
        for (let i = 0; i < 64; i++) {
          pulled++;
          yield Buffer.alloc(MiB, 1);
        }
      }
      const out = createSnapshotStream(path, { preallocate: 'space', expectedSize: 64 * MiB });
      const err = await expectError(pipeline(source(), out));
      expect(err.code).toBe('ENOSPC');
      expect(err.syscall).toBe('fallocate');
      expect(out.bytesWritten).toBe(0);
      expect(pulled).toBeLessThanOrEqual(2); // at most what Writable buffers while the target opens
      await expect(stat(path)).rejects.toMatchObject({ code: 'ENOENT' });
    });
    skipUnlessRan(ctx, result);
  });
});

describe('block devices', () => {
  it('writes to a loop block device with O_DIRECT and reads back the same bytes', async (ctx) => {
    const result = await withLoopFs({ sizeBytes: 64 * MiB, fsType: 'ext4' }, async (mnt) => {
      const backing = join(mnt, 'disk.img');
      await runOk('truncate', ['-s', `${16 * MiB}`, backing]);
      const device = (await runOk('losetup', ['--find', '--show', backing])).stdout.trim();
      try {
        const data = pseudoRandom(5 * MiB + 100, 24);
        const out = createSnapshotStream(device, { direct: true, bufferSize: MiB });
        await pipeline(fromChunks([data]), out);
        expect(out.direct).toBe(true);
        const back = await readFile(device);
        expect(back.length).toBe(16 * MiB); // a device is not truncated
        expect(sha256(back.subarray(0, data.length))).toBe(sha256(data));
        expect(back.subarray(data.length, data.length + 412).every((b) => b === 0)).toBe(true); // zero padding
        const tooBig = await expectError(pipeline(fromChunks([Buffer.alloc(17 * MiB)]), createSnapshotStream(device)));
        expect(tooBig.code).toBe('ENOSPC');
      } finally {
        await runOk('losetup', ['-d', device]).catch(() => undefined);
      }
    });
    skipUnlessRan(ctx, result);
  });

  it('reports an I/O error from a device whose backing store is full as a coded error', async (ctx) => {
    const result = await withLoopFs({ sizeBytes: 16 * MiB, fsType: 'ext4' }, async (mnt) => {
      // A 64 MiB sparse device on a 16 MiB filesystem: writes past the
      // space that is left fail inside the loop driver.
      const backing = join(mnt, 'sparse.img');
      await runOk('truncate', ['-s', `${64 * MiB}`, backing]);
      const device = (await runOk('losetup', ['--find', '--show', backing])).stdout.trim();
      try {
        const out = createSnapshotStream(device, { direct: true, bufferSize: MiB });
        const err = await expectError(pipeline(fromChunks(chunked(pseudoRandom(48 * MiB, 25), () => MiB)), out));
        expect(['EIO', 'ENOSPC']).toContain(err.code);
        expect(err.path).toBe(device);
      } finally {
        await runOk('losetup', ['-d', device]).catch(() => undefined);
      }
    });
    skipUnlessRan(ctx, result);
  });
});

describe('memory', () => {
  it('stays within buffers x bufferSize + 32 MiB while writing 2 GiB (child process RSS)', async () => {
    const path = join(dir.path, 'rss.bin');
    const bufferSize = 4 * MiB;
    const buffers = 2;
    const { stdout } = await run(process.execPath, [
      join(import.meta.dirname, '../fixtures/rss-child.mjs'),
      path,
      String(2 * 1024 * MiB),
      String(bufferSize),
      String(buffers),
    ]);
    const report = JSON.parse(stdout) as { growth: number; bytesWritten: number };
    expect(report.bytesWritten).toBeGreaterThanOrEqual(2 * 1024 * MiB);
    expect(report.growth).toBeLessThanOrEqual(buffers * bufferSize + 32 * MiB);
    expect((await stat(path)).size).toBe(report.bytesWritten);
  });
});
