/**
 * createImage's preallocation modes and backing files against qemu-img 7.2:
 * for the same options our image and qemu-img's must check clean, describe
 * the same disk, map every guest byte to the same host offset with the same
 * data/zero flags, and behave alike under qemu-io.
 */
import { access, readFile, stat } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, type Preallocation } from '../../src/qcow2/create.js';
import { qemuImg, qemuIo } from '../helpers/tools.js';
import { qemuMissing, Workdir } from './fixtures.js';

const MiB = 1 << 20;

describe.skipIf(qemuMissing)('createImage preallocation modes', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-create-prealloc');
  });
  afterAll(async () => work.cleanup());

  async function pair(size: number, preallocation: Preallocation, clusterSize = 65536, refcountBits = 16): Promise<[string, string]> {
    const ours = work.path(`ours-${preallocation}`);
    const theirs = work.path(`theirs-${preallocation}`);
    await createImage(ours, { size, clusterSize, refcountBits, preallocation });
    await qemuImg.create(theirs, size, { preallocation, cluster_size: clusterSize, refcount_bits: refcountBits });
    return [ours, theirs];
  }

  const cases: Array<{ mode: Preallocation; size: number; clusterSize?: number; refcountBits?: number }> = [
    { mode: 'metadata', size: 100 * MiB },
    // Three L2 tables: QEMU interleaves them with the data runs.
    { mode: 'metadata', size: 1536 * MiB },
    // 512-byte clusters: refcount blocks and a growing refcount table in between.
    { mode: 'metadata', size: 20 * MiB, clusterSize: 512 },
    { mode: 'metadata', size: 4 * MiB, clusterSize: 512, refcountBits: 1 },
    { mode: 'falloc', size: 100 * MiB },
    { mode: 'falloc', size: 1536 * MiB },
    { mode: 'falloc', size: 20 * MiB, clusterSize: 512 },
    { mode: 'falloc', size: 64 * MiB, clusterSize: 4096, refcountBits: 64 },
    { mode: 'full', size: 64 * MiB },
    { mode: 'full', size: 8 * MiB, clusterSize: 512 },
    { mode: 'falloc', size: 0 },
  ];
  for (const c of cases) {
    it(`maps every guest byte like qemu-img (${JSON.stringify(c)})`, async () => {
      const [ours, theirs] = await pair(c.size, c.mode, c.clusterSize, c.refcountBits);
      const [a, b] = await Promise.all([qemuImg.check(ours), qemuImg.check(theirs)]);
      expect(a.exitCode, JSON.stringify(a)).toBe(0);
      expect(a['image-end-offset']).toBe(b['image-end-offset']);
      expect(a['allocated-clusters']).toBe(b['allocated-clusters']);
      expect(await qemuImg.map(ours)).toEqual(await qemuImg.map(theirs));
      const [ia, ib] = await Promise.all([qemuImg.info(ours), qemuImg.info(theirs)]);
      expect(ia['virtual-size']).toBe(c.size);
      expect(ia['cluster-size']).toBe(ib['cluster-size']);
      expect(ia['format-specific']?.data).toEqual(ib['format-specific']?.data);
      const st = await stat(ours);
      expect(st.size).toBe((await stat(theirs)).size);
      if (c.mode !== 'metadata') expect(st.blocks * 512).toBeGreaterThanOrEqual(c.size); // the data area is on disk
      else expect(st.blocks * 512).toBeLessThan(c.size / 2 + 4 * MiB); // sparse
      // qemu-img's mode: 0644 less the umask (a new image holds no VM memory).
      expect(st.mode & 0o777).toBe((await stat(theirs)).mode & 0o777);
    });
  }

  it('is byte-identical to qemu-img for metadata preallocation (32 L2 tables interleaved with data)', async () => {
    const [ours, theirs] = await pair(64 * MiB, 'metadata', 4096);
    const [x, y] = await Promise.all([readFile(ours), readFile(theirs)]);
    expect(x.length).toBeGreaterThan(64 * MiB);
    expect(x.equals(y)).toBe(true);
  });

  for (const mode of ['metadata', 'falloc', 'full'] as const) {
    it(`behaves like qemu-img's image under qemu-io writes (${mode})`, async () => {
      const [ours, theirs] = await pair(32 * MiB, mode);
      const cmds = ['write -P 0x5a 1M 3M', 'write -P 0xa5 31M 1M', 'read -P 0x5a 1M 3M', 'read -P 0xa5 31M 1M', 'read -P 0 0 1M', 'read -P 0 4M 27M'];
      const [outA, outB] = await Promise.all([qemuIo(ours, cmds), qemuIo(theirs, cmds)]);
      const results = (out: string): string[] => out.split('\n').filter((l) => /^(wrote|read) /.test(l));
      expect(results(outA)).toEqual(results(outB));
      expect(results(outA)).toHaveLength(cmds.length);
      expect((await qemuImg.check(ours)).exitCode).toBe(0);
      expect(await qemuImg.map(ours)).toEqual(await qemuImg.map(theirs));
    });
  }

  it('writes the backing file and its format as qemu-img does, and reads through it', async () => {
    const base = await work.image({ sizeBytes: 8 * MiB });
    await qemuIo(base, ['write -P 0x11 0 1M']);
    const ours = work.path('overlay');
    const theirs = work.path('overlay-qemu');
    await createImage(ours, { size: 8 * MiB, backingFile: base, backingFormat: 'qcow2' });
    await qemuImg.create(theirs, 8 * MiB, { backing_file: base, backing_fmt: 'qcow2' });
    const info = await qemuImg.info(ours);
    expect(info['backing-filename']).toBe(base);
    expect(info['backing-filename-format']).toBe('qcow2');
    expect((await readFile(ours)).equals(await readFile(theirs))).toBe(true);
    await qemuIo(ours, ['read -P 0x11 0 1M', 'write -P 0x22 512k 64k', 'read -P 0x22 512k 64k', 'read -P 0x11 576k 448k']);
    expect((await qemuImg.check(ours)).exitCode).toBe(0);
  });

  it('refuses preallocation with a backing file, as qemu-img does without extended_l2', () => {
    for (const preallocation of ['metadata', 'falloc', 'full'] as const) {
      expect(() => createImage(work.path('x'), { size: MiB, backingFile: 'b.qcow2', backingFormat: 'qcow2', preallocation })).toThrow(
        /Backing file and preallocation can only be used at the same time if extended_l2 is on/,
      );
    }
    expect(() => createImage(work.path('x'), { size: MiB, backingFile: 'b.qcow2' })).toThrow(/options.backingFormat/);
  });

  it('reports progress up to the total and stops within one chunk when aborted, leaving no file', async () => {
    const path = work.path('aborted');
    const ac = new AbortController();
    const seen: number[] = [];
    const chunkBytes = 4 * MiB;
    const run = createImage(path, {
      size: 256 * MiB,
      preallocation: 'falloc',
      chunkBytes,
      signal: ac.signal,
      onProgress: ({ bytesDone, bytesTotal }) => {
        seen.push(bytesDone);
        expect(bytesDone).toBeLessThanOrEqual(bytesTotal);
        if (bytesDone >= 64 * MiB) ac.abort();
      },
    });
    await expect(run).rejects.toMatchObject({ code: 'ABORTED' });
    const aborted = seen.findIndex((b) => b >= 64 * MiB);
    expect(seen.length).toBe(aborted + 1); // nothing after the chunk that saw the abort
    await expect(access(path)).rejects.toMatchObject({ code: 'ENOENT' });

    const full = work.path('full-progress');
    let last = { bytesDone: 0, bytesTotal: 0 };
    await createImage(full, { size: 32 * MiB, preallocation: 'full', onProgress: (p) => (last = p) });
    expect(last.bytesDone).toBe(last.bytesTotal);
    expect(last.bytesTotal).toBeGreaterThan(32 * MiB);
  });

  it('leaves no file when aborted before it starts or during full zeroing', async () => {
    const path = work.path('pre-aborted');
    await expect(createImage(path, { size: MiB, signal: AbortSignal.abort() })).rejects.toMatchObject({ code: 'ABORTED' });
    await expect(access(path)).rejects.toMatchObject({ code: 'ENOENT' });
    const ac = new AbortController();
    const zeroing = work.path('zeroing');
    const run = createImage(zeroing, { size: 64 * MiB, preallocation: 'full', signal: ac.signal, onProgress: () => ac.abort() });
    await expect(run).rejects.toMatchObject({ code: 'ABORTED' });
    await expect(access(zeroing)).rejects.toMatchObject({ code: 'ENOENT' });
  });
});
