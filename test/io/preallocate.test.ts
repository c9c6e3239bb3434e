import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SnapshotError } from '../../src/errors.js';
import { reserveSpace, type PreallocateProgress } from '../../src/io/preallocate.js';
import { TargetFile } from '../../src/io/target-file.js';
import { freeBytes, skipUnlessRan, withLoopFs, withRamfs } from '../helpers/loopfs.js';
import { tmpDir, type TmpDir } from '../helpers/tools.js';

const MiB = 1 << 20;
let dir: TmpDir;
beforeAll(async () => {
  dir = await tmpDir('prealloc');
});
afterAll(async () => {
  await dir.cleanup();
});

async function withFile<T>(path: string, fn: (f: TargetFile) => Promise<T>): Promise<T> {
  const f = await TargetFile.open(path, { write: true, create: true, direct: 'auto' });
  try {
    return await fn(f);
  } finally {
    await f.close();
  }
}

describe('reserveSpace', () => {
  it('reserves in chunks with progress when watched, and the blocks are really allocated', async () => {
    await withFile(join(dir.path, 'chunked.bin'), async (f) => {
      const events: PreallocateProgress[] = [];
      await reserveSpace(f, 0, 8 * MiB, { chunkBytes: MiB, onProgress: (p) => events.push(p) });
      expect(events.map((e) => e.bytesDone)).toEqual([1, 2, 3, 4, 5, 6, 7, 8].map((n) => n * MiB));
      expect(events.every((e) => e.method === 'fallocate' && e.bytesTotal === 8 * MiB)).toBe(true);
      const st = await f.stat();
      expect(st.size).toBe(8 * MiB);
      expect(st.blocks * 512).toBeGreaterThanOrEqual(8 * MiB);
    });
  });

  it('stops within one chunk when aborted and puts the file size back', async () => {
    await withFile(join(dir.path, 'abort.bin'), async (f) => {
      const ac = new AbortController();
      let chunks = 0;
      const err = await reserveSpace(f, 0, 64 * MiB, {
        chunkBytes: 4 * MiB,
        signal: ac.signal,
        onProgress: () => {
          if (++chunks === 3) ac.abort();
        },
      }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(SnapshotError);
      expect((err as SnapshotError).code).toBe('ABORTED');
      expect(chunks).toBe(3);
      expect((await f.stat()).size).toBe(0);
    });
  });

  it('keeps the size with keepSize while reserving blocks', async () => {
    await withFile(join(dir.path, 'keep.bin'), async (f) => {
      await reserveSpace(f, 0, 4 * MiB, { keepSize: true });
      const st = await f.stat();
      expect(st.size).toBe(0);
      expect(st.blocks * 512).toBeGreaterThanOrEqual(4 * MiB);
    });
  });

  it('falls back to writing zeros where the filesystem has no fallocate (ramfs)', async (ctx) => {
    skipUnlessRan(
      ctx,
      await withRamfs(async (mnt) => {
        await withFile(join(mnt, 'zeros.bin'), async (f) => {
          const events: PreallocateProgress[] = [];
          await reserveSpace(f, 0, 20 * MiB, { onProgress: (p) => events.push(p) });
          expect(events.at(-1)).toMatchObject({ bytesDone: 20 * MiB, method: 'zero-fill' });
          expect(events.length).toBeGreaterThan(1);
          expect((await f.stat()).size).toBe(20 * MiB);
        });
      }),
    );
  });

  it('fails with ENOSPC on a full filesystem and leaves the file and the free space as they were', async (ctx) => {
    skipUnlessRan(
      ctx,
      await withLoopFs({ sizeBytes: 32 * MiB, fsType: 'ext4' }, async (mnt) => {
        const before = await freeBytes(mnt);
        await withFile(join(mnt, 'big.bin'), async (f) => {
          const err = await reserveSpace(f, 0, 64 * MiB).catch((e: unknown) => e);
          expect(err).toMatchObject({ code: 'ENOSPC', syscall: 'fallocate' });
          expect((await f.stat()).size).toBe(0);
        });
        expect(await freeBytes(mnt)).toBeGreaterThanOrEqual(before - MiB);
      }),
    );
  });
});
