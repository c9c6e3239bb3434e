import { readFile } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TargetFile } from '../../src/io/target-file.js';
import { decodeHeader } from '../../src/qcow2/header.js';
import { openImage } from '../../src/qcow2/image.js';
import { getRefcountEntry, setRefcountEntry } from '../../src/qcow2/refcount.js';
import { pseudoRandom } from '../helpers/streams.js';
import { qemuImg } from '../helpers/tools.js';
import { guestWrite, qemuMissing, Workdir } from './fixtures.js';

describe('refcount entries of every width', () => {
  for (let order = 0; order <= 6; order++) {
    const bits = 2 ** order;
    it(`stores and reads back ${bits}-bit refcounts without touching neighbours`, () => {
      const block = Buffer.alloc(512);
      const entries = (512 * 8) / bits;
      const max = bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
      const value = (i: number): number => (i * 2654435761) % (max + 1 > 2 ** 32 ? 2 ** 32 : max + 1);
      for (let i = 0; i < entries; i++) setRefcountEntry(block, i, order, value(i));
      for (let i = 0; i < entries; i++) expect(getRefcountEntry(block, i, order)).toBe(value(i));
      setRefcountEntry(block, 3, order, max);
      expect(getRefcountEntry(block, 3, order)).toBe(max);
      expect(getRefcountEntry(block, 2, order)).toBe(value(2));
      expect(getRefcountEntry(block, 4, order)).toBe(value(4));
    });
  }

  it('puts bit 0 of a sub-byte refcount in the least significant bit (qcow2.txt)', () => {
    const block = Buffer.alloc(1);
    setRefcountEntry(block, 0, 0, 1);
    expect(block[0]).toBe(0b1);
    setRefcountEntry(block, 1, 1, 3);
    expect(block[0]).toBe(0b1101);
  });
});

async function headerOf(path: string): Promise<ReturnType<typeof decodeHeader>> {
  return decodeHeader((await readFile(path)).subarray(0, 65536));
}

describe.skipIf(qemuMissing)('refcounts in real images', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-refcount');
  });
  afterAll(async () => work.cleanup());

  for (const refcountBits of [2, 4, 8, 16, 32, 64]) {
    it(`saves and deletes with ${refcountBits}-bit refcounts, and qemu-img agrees`, async () => {
      const path = await work.image({ sizeBytes: 32 << 20, clusterSize: 4096, refcountBits });
      await guestWrite(path, 'write -P 0x21 0 2M');
      const img = await openImage(path);
      try {
        const { baseOffset } = await img.beginSave('one');
        const f = await TargetFile.open(path, { write: true, direct: false });
        await f.write(pseudoRandom(300_000, refcountBits), baseOffset);
        await f.datasync();
        await f.close();
        await img.commitSave({ vmStateSize: 300_000 });
        expect((await qemuImg.check(path, { forceShare: true })).exitCode).toBe(0);
        await img.deleteSnapshot('one');
      } finally {
        await img.close();
      }
      expect((await qemuImg.check(path)).exitCode).toBe(0);
    });
  }

  it('grows the refcount table, switched by the same header write that commits the snapshot', async () => {
    // 512-byte clusters and 64-bit refcounts: a block covers 64 clusters, one table cluster 2 MiB.
    const path = await work.image({ sizeBytes: 1 << 20, clusterSize: 512, refcountBits: 64 });
    await guestWrite(path, 'write -P 0x44 0 256k');
    const before = await headerOf(path);
    const vmstate = pseudoRandom(6 << 20, 99);
    const img = await openImage(path);
    try {
      const { baseOffset } = await img.beginSave('grown');
      const f = await TargetFile.open(path, { write: true, direct: false });
      await f.write(vmstate, baseOffset);
      await f.datasync();
      await f.close();
      await img.commitSave({ vmStateSize: vmstate.length });
    } finally {
      await img.close();
    }
    const after = await headerOf(path);
    expect(after.refcountTableOffset).not.toBe(before.refcountTableOffset);
    expect(after.refcountTableClusters).toBeGreaterThan(before.refcountTableClusters);
    const check = await qemuImg.check(path);
    expect(check.exitCode, JSON.stringify(check)).toBe(0);
    const ours = await openImage(path, { readOnly: true });
    try {
      expect(await ours.check()).toMatchObject({ corruptions: 0, leaks: 0 });
    } finally {
      await ours.close();
    }
  });
});
