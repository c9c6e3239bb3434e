import { writeFile } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compressedClusterSpan, L1Table, L2Table } from '../../src/qcow2/cluster-map.js';
import { openImage } from '../../src/qcow2/image.js';
import { Layout } from '../../src/qcow2/layout.js';
import { TargetFile } from '../../src/io/target-file.js';
import { pseudoRandom } from '../helpers/streams.js';
import { qemuImg, qemuIo, runOk } from '../helpers/tools.js';
import { qemuMissing, Workdir } from './fixtures.js';

const layout = new Layout(16, 4);

function l2With(hi: number, lo: number): L2Table {
  const t = L2Table.empty(0x10000, layout);
  t.bytes.writeUInt32BE(hi >>> 0, 0);
  t.bytes.writeUInt32BE(lo >>> 0, 4);
  return t;
}

describe('L1 and L2 entries', () => {
  it('decodes a standard entry: offset, COPIED, zero flag', () => {
    expect(l2With(0x80000000, 0x00050000).entry(0)).toMatchObject({ kind: 'normal', hostOffset: 0x50000, copied: true });
    expect(l2With(0, 0x00050001).entry(0)).toMatchObject({ kind: 'zero-alloc', hostOffset: 0x50000 });
    expect(l2With(0, 1).entry(0)).toMatchObject({ kind: 'zero-plain' });
    expect(l2With(0, 0).entry(0)).toMatchObject({ kind: 'unallocated' });
    expect(l2With(0x00000001, 0).entry(0)).toMatchObject({ kind: 'normal', hostOffset: 2 ** 32 });
  });

  it('rejects L2 entries with reserved bits or a misaligned offset', () => {
    expect(() => l2With(0, 0x00050002).entry(0)).toThrow(/reserved/);
    expect(() => l2With(0x01000000, 0x00050000).entry(0)).toThrow(/reserved/);
    expect(() => l2With(0, 0x00050200).entry(0)).toThrow(/not cluster aligned/);
  });

  it('rejects L1 entries with reserved bits or a misaligned L2 offset', () => {
    const l1 = L1Table.empty(2, layout);
    l1.bytes.writeUInt32BE(0x02000000, 0);
    expect(() => l1.l2Offset(0)).toThrow(/reserved/);
    l1.bytes.writeUInt32BE(0, 8);
    l1.bytes.writeUInt32BE(0x00030200, 12);
    expect(() => l1.l2Offset(1)).toThrow(/not cluster aligned/);
    l1.set(1, 0x30000, true);
    expect([l1.l2Offset(1), l1.isCopied(1)]).toEqual([0x30000, true]);
    expect(l1.setCopied(1, false)).toBe(true);
    expect(l1.raw(1)).toBe(0x30000n);
  });

  it('computes the host clusters a compressed cluster touches, like qcow2_parse_compressed_l2_entry', () => {
    // 64 KiB clusters: x = 62 - 8 = 54; sector count in bits 54..61.
    const offset = 0x2fe00 + 0x1a0; // 416 bytes into the last sector of cluster 2
    const extraSectors = 2;
    const hi = 0x40000000 | (extraSectors << (54 - 32));
    const entry = l2With(hi, offset).entry(0);
    expect(entry.kind).toBe('compressed');
    expect(entry.hostOffset).toBe(offset);
    expect(entry.compressedBytes).toBe(3 * 512 - 0x1a0);
    expect(compressedClusterSpan(entry, layout)).toEqual({ first: 2, last: 3 });
    expect(() => l2With(hi | 0x80000000, offset).entry(0)).toThrow(/COPIED/);
  });
});

describe.skipIf(qemuMissing)('compressed clusters in real images', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-compressed');
  });
  afterAll(async () => work.cleanup());

  it('counts every host cluster a compressed cluster spans when saving and deleting (qemu-img check clean)', async () => {
    const raw = work.path('raw');
    const clusterSize = 4096;
    const data = Buffer.alloc(4 << 20);
    for (let c = 0; c < data.length / clusterSize; c++) {
      pseudoRandom(1500 + (c % 7) * 100, c).copy(data, c * clusterSize);
    }
    await writeFile(raw, data);
    const path = work.path('compressed');
    await runOk('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${clusterSize}`, raw, path]);
    const before = await qemuImg.check(path);
    expect(before['compressed-clusters']).toBeGreaterThan(0);
    const img = await openImage(path);
    try {
      const ours = await img.check();
      expect(ours.compressedClusters).toBe(before['compressed-clusters']);
      expect(ours.allocatedClusters).toBe(before['allocated-clusters']);
      const { baseOffset } = await img.beginSave('over-compressed');
      const f = await TargetFile.open(path, { write: true, direct: false });
      await f.write(pseudoRandom(100_000, 1), baseOffset);
      await f.datasync();
      await f.close();
      await img.commitSave({ vmStateSize: 100_000 });
      const mid = await qemuImg.check(path, { forceShare: true });
      expect(mid.exitCode, JSON.stringify(mid)).toBe(0);
      const afterSave = await img.check();
      expect(afterSave, afterSave.messages.join('\n')).toMatchObject({ corruptions: 0, leaks: 0 });
      await img.deleteSnapshot('over-compressed');
    } finally {
      await img.close();
    }
    expect((await qemuImg.check(path)).exitCode).toBe(0);
    await qemuIo(path, [`read -v 0 512`]);
    const roundTrip = work.path('back');
    await runOk('qemu-img', ['convert', '-O', 'raw', path, roundTrip]);
    const { readFile } = await import('node:fs/promises');
    expect((await readFile(roundTrip)).equals(data)).toBe(true);
  });
});
