import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage } from '../../src/qcow2/create.js';
import { openImage } from '../../src/qcow2/image.js';
import { qemuImg, qemuIo } from '../helpers/tools.js';
import { qemuMissing, Workdir } from './fixtures.js';

describe.skipIf(qemuMissing)('createImage', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-create');
  });
  afterAll(async () => work.cleanup());

  const cases = [
    { clusterSize: 4096, version: 3 as const, refcountBits: 16, preallocation: 'off' as const },
    { clusterSize: 65536, version: 3 as const, refcountBits: 16, preallocation: 'off' as const },
    { clusterSize: 2 << 20, version: 3 as const, refcountBits: 64, preallocation: 'off' as const },
    { clusterSize: 65536, version: 2 as const, refcountBits: 16, preallocation: 'off' as const },
    { clusterSize: 4096, version: 3 as const, refcountBits: 8, preallocation: 'metadata' as const },
    { clusterSize: 65536, version: 2 as const, refcountBits: 16, preallocation: 'metadata' as const },
    { clusterSize: 512, version: 3 as const, refcountBits: 1, preallocation: 'metadata' as const },
  ];
  for (const c of cases) {
    it(`creates an image qemu-img checks clean and describes (${JSON.stringify(c)})`, async () => {
      const path = work.path('created');
      const size = 100 << 20;
      await createImage(path, { size, ...c });
      const check = await qemuImg.check(path);
      expect(check.exitCode, JSON.stringify(check)).toBe(0);
      if (c.preallocation === 'metadata') expect(check['allocated-clusters']).toBe(size / c.clusterSize);
      const info = await qemuImg.info(path);
      expect(info['virtual-size']).toBe(size);
      expect(info['cluster-size']).toBe(c.clusterSize);
      expect(info['format-specific']?.data).toMatchObject({
        compat: c.version === 3 ? '1.1' : '0.10',
        'refcount-bits': c.refcountBits,
      });
      await qemuIo(path, ['write -P 0x3c 1M 1M', 'read -P 0x3c 1M 1M', 'read -P 0 0 1M']);
      expect((await qemuImg.check(path)).exitCode).toBe(0);
      const img = await openImage(path, { readOnly: true });
      try {
        const ours = await img.check();
        expect([ours.corruptions, ours.leaks]).toEqual([0, 0]);
      } finally {
        await img.close();
      }
    });
  }

  it('lays out a 64 KiB-cluster image like qemu-img create', async () => {
    const ours = work.path('ours');
    await createImage(ours, { size: 1 << 30 });
    const theirs = await work.image({ sizeBytes: 1 << 30 });
    const [a, b] = await Promise.all([qemuImg.check(ours), qemuImg.check(theirs)]);
    expect(a['image-end-offset']).toBe(b['image-end-offset']);
    const { readFile } = await import('node:fs/promises');
    const [x, y] = await Promise.all([readFile(ours), readFile(theirs)]);
    expect(x.length).toBe(y.length);
    expect(x.equals(y)).toBe(true);
  });

  it("creates the file with qemu-img's mode (0644 less the umask), or options.mode", async () => {
    const { stat } = await import('node:fs/promises');
    const umask = process.umask();
    const ours = work.path('mode');
    const theirs = work.path('mode-qemu');
    await createImage(ours, { size: 1 << 20 });
    await qemuImg.create(theirs, 1 << 20);
    expect((await stat(ours)).mode & 0o7777).toBe(0o644 & ~umask);
    expect((await stat(ours)).mode & 0o7777).toBe((await stat(theirs)).mode & 0o7777);
    const strict = work.path('mode-600');
    await createImage(strict, { size: 1 << 20, mode: 0o600 });
    expect((await stat(strict)).mode & 0o7777).toBe(0o600 & ~umask);
    expect(() => createImage(work.path('x'), { size: 1, mode: 0o10000 })).toThrow(/options\.mode/);
  });

  it('refuses an existing file unless overwrite is set, and bad options synchronously', async () => {
    const path = await work.image({ sizeBytes: 1 << 20 });
    await expect(createImage(path, { size: 1 << 20 })).rejects.toMatchObject({ code: 'EEXIST' });
    await createImage(path, { size: 2 << 20, overwrite: true });
    expect((await qemuImg.info(path))['virtual-size']).toBe(2 << 20);
    expect(() => createImage(path, { size: -1 })).toThrow(RangeError);
    expect(() => createImage(path, { size: 1, clusterSize: 3000 })).toThrow(/options.clusterSize/);
    expect(() => createImage(path, { size: 1, version: 2, refcountBits: 8 })).toThrow(/options.refcountBits/);
    expect(() => createImage(path, { size: 1, preallocation: 'bogus' as 'off' })).toThrow(/options.preallocation/);
  });
});
