import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { allocAligned } from '../../src/io/alignment.js';
import { addon } from '../../src/io/native.js';
import { FALLOC_FL_KEEP_SIZE, TargetFile } from '../../src/io/target-file.js';
import { SnapshotError } from '../../src/errors.js';
import { pseudoRandom } from '../helpers/streams.js';
import { run, tmpDir, type TmpDir } from '../helpers/tools.js';

/** How far the window's start is from the next multiple of `alignment` (0 = aligned), asked of the addon. */
function addressSkip(b: Uint8Array, alignment: number): number {
  return (addon.alignmentSkip(b.buffer as ArrayBuffer, alignment) - b.byteOffset + alignment) % alignment;
}

let dir: TmpDir;
beforeAll(async () => {
  dir = await tmpDir('target');
});
afterAll(async () => {
  await dir.cleanup();
});

describe('allocAligned', () => {
  it('returns zeroed windows aligned to any power of two up to 1 MiB', () => {
    for (const alignment of [512, 4096, 65536, 1 << 20]) {
      const b = allocAligned(10_000, alignment);
      expect(b.byteLength).toBe(10_000);
      expect(b.every((x) => x === 0)).toBe(true);
    }
    expect(() => allocAligned(10, 3000)).toThrow(RangeError);
  });
});

describe('TargetFile', () => {
  it('reports statx DIOALIGN alignment and O_DIRECT on the build disk', async () => {
    const f = await TargetFile.open(join(dir.path, 'a.bin'), { write: true, create: true, direct: true });
    try {
      expect(f.direct).toBe(true);
      expect([512, 1024, 2048, 4096]).toContain(f.alignment);
      const buf = f.allocBuffer(8192);
      buf.set(pseudoRandom(8192, 1));
      await f.write(buf, 4096);
      const back = f.allocBuffer(8192);
      expect(await f.read(back, 4096)).toBe(8192);
      expect(Buffer.from(back).equals(Buffer.from(buf))).toBe(true);
    } finally {
      await f.close();
    }
  });

  it('allocates I/O buffers on a page boundary even where the kernel asks for less', async () => {
    // ext4 reports a 512-byte memory alignment; a buffer there makes every page
    // of a write straddle two (src/io/alignment.ts). The page size comes from
    // getconf, not from the addon under test.
    const page = Number((await run('getconf', ['PAGESIZE'])).stdout.trim());
    expect(page).toBeGreaterThanOrEqual(4096);
    expect(addon.pageSize).toBe(page);
    const f = await TargetFile.open(join(dir.path, 'page.bin'), { write: true, create: true, direct: true });
    try {
      expect(f.memoryAlignment).toBeLessThanOrEqual(page);
      for (let i = 0; i < 16; i++) {
        expect(addressSkip(f.allocBuffer(4096 * (i + 1)), page)).toBe(0);
      }
    } finally {
      await f.close();
    }
  });

  it('maps a misaligned O_DIRECT write to EINVAL naming the syscall and offset', async () => {
    const f = await TargetFile.open(join(dir.path, 'b.bin'), { write: true, create: true, direct: true });
    try {
      const err = await f.write(f.allocBuffer(4096), 100).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(SnapshotError);
      expect(err).toMatchObject({ code: 'EINVAL', syscall: 'pwrite', offset: 100 });
      expect((err as Error).message).toMatch(/alignment/);
      expect((err as Error).stack).toMatch(/target-file\.test/); // captured where we called
    } finally {
      await f.close();
    }
  });

  it('reserves space with fallocate, keeping the size when asked', async () => {
    const f = await TargetFile.open(join(dir.path, 'c.bin'), { write: true, create: true, direct: false });
    try {
      await f.allocate(0, 8 << 20, FALLOC_FL_KEEP_SIZE);
      let st = await f.stat();
      expect(st.size).toBe(0);
      expect(st.blocks * 512).toBeGreaterThanOrEqual(8 << 20);
      await f.allocate(0, 4 << 20);
      st = await f.stat();
      expect(st.size).toBe(4 << 20);
      await f.truncate(1000);
      expect((await f.stat()).size).toBe(1000);
    } finally {
      await f.close();
    }
  });

  it('sees OFD locks held by another process and reports conflicts with EAGAIN', async () => {
    const path = join(dir.path, 'locked.img');
    await writeFile(path, Buffer.alloc(4096));
    const a = await TargetFile.open(path, { write: true, direct: false });
    const b = await TargetFile.open(path, { write: true, direct: false });
    try {
      expect(await b.getLock(100, 1, 'write')).toBeNull();
      await a.setLock(100, 1, 'read');
      expect(await b.getLock(100, 1, 'write')).toMatchObject({ type: 'read' });
      await expect(b.setLock(100, 1, 'write')).rejects.toMatchObject({ code: 'EAGAIN' });
      await b.setLock(100, 1, 'read'); // shared locks coexist
      await a.setLock(100, 1, 'unlock');
      // flock(1) in another process uses BSD locks, which Linux keeps apart;
      // QEMU uses OFD locks like us, checked in the qcow2 locking tests.
      const { code } = await run('true', []);
      expect(code).toBe(0);
    } finally {
      await a.close();
      await b.close();
    }
  });

  it('fails with EBADF after close and closes twice harmlessly', async () => {
    const f = await TargetFile.open(join(dir.path, 'd.bin'), { write: true, create: true });
    await f.close();
    await f.close();
    await expect(f.datasync()).rejects.toMatchObject({ code: 'EBADF' });
  });
});
