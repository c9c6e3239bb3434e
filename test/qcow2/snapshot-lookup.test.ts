/**
 * Which snapshot a reference means, checked against QEMU 7.2 on the same
 * images: `qemu-img snapshot -d`, HMP `delvm` and `loadvm` look names up
 * only; `qemu-img snapshot -a` an id first, then a name.
 */
import { copyFile } from 'node:fs/promises';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openImage } from '../../src/index.js';
import { findByIdThenName, findByName } from '../../src/qcow2/snapshot-lookup.js';
import type { SnapshotEntry } from '../../src/qcow2/snapshot-table.js';
import { readSnapshotVmState } from '../helpers/qcow2-vmstate.js';
import { killAllVms, withPausedVm } from '../helpers/qemu.js';
import { fromChunks, pseudoRandom, sha256 } from '../helpers/streams.js';
import { qemuImg, qemuIo, requireTool } from '../helpers/tools.js';
import { guestWrite, qemuMissing, Workdir } from './fixtures.js';

const MiB = 1 << 20;
const ALL = [['1', '2'], ['2', '3'], ['3', 'foo']];
const noQemu = requireTool('qemu-system-x86_64');

function entry(id: string, name: string | Buffer): SnapshotEntry {
  const nameBytes = typeof name === 'string' ? Buffer.from(name) : name;
  return { id, name: nameBytes.toString(), idBytes: Buffer.from(id), nameBytes } as SnapshotEntry;
}

describe('snapshot lookup (QEMU 7.2 rules)', () => {
  const entries = [entry('1', 'foo'), entry('2', '1'), entry('3', '2')];

  it('delete and export look names up only (bdrv_snapshot_find), naming the snapshot an id would have meant', () => {
    expect(findByName(entries, '1')).toBe(1);
    expect(findByName(entries, '2')).toBe(2);
    expect(findByName(entries, 'foo')).toBe(0);
    expect(() => findByName(entries, '3')).toThrow(/no snapshot named '3'; snapshot id 3 is named '2'/);
  });

  it('revert looks an id up first, then a name (find_snapshot_by_id_or_name)', () => {
    expect(findByIdThenName(entries, '1')).toBe(0);
    expect(findByIdThenName(entries, '2')).toBe(1);
    expect(findByIdThenName(entries, 'foo')).toBe(0);
  });

  it('matches names as QEMU lists them: cut at 255 bytes and at a NUL', () => {
    const long = 'n'.repeat(300);
    const withNul = Buffer.concat([Buffer.from('ab'), Buffer.from([0]), Buffer.from('cd')]);
    const odd = [entry('1', long), entry('2', withNul)];
    expect(findByName(odd, long.slice(0, 255))).toBe(0);
    expect(() => findByName(odd, long)).toThrow(expect.objectContaining({ code: 'SNAPSHOT_NOT_FOUND' }));
    expect(findByName(odd, 'ab')).toBe(1);
  });

  it('says SNAPSHOT_NOT_FOUND with the reference it looked for', () => {
    expect(() => findByName(entries, 'nope')).toThrow(/^no snapshot named 'nope'$/);
    expect(() => findByIdThenName(entries, 'nope')).toThrow(expect.objectContaining({ code: 'SNAPSHOT_NOT_FOUND' }));
  });
});

describe.skipIf(qemuMissing)('snapshot lookup against qemu-img on the same image', () => {
  let work: Workdir;
  let path: string;
  const vmstates = [pseudoRandom(300_000, 1), pseudoRandom(200_000, 2), pseudoRandom(100_000, 3)];

  /**
   * id 1 named '2' (disk 0x11), id 2 named '3' (disk 0x22), id 3 'foo' (disk
   * 0x33), each with its own vmstate: '2' and '3' are each one snapshot's
   * name and another's id. (A save refuses a name that is already an id, so
   * the names come first.)
   */
  beforeAll(async () => {
    work = await Workdir.create('qcow2-lookup');
    path = await work.image({ sizeBytes: 16 * MiB });
    for (const [i, name] of ['2', '3', 'foo'].entries()) {
      await guestWrite(path, `write -P 0x${(i + 1) * 11} 0 64k`);
      const img = await openImage(path);
      try {
        await pipeline(fromChunks([vmstates[i]!]), img.createSnapshotStream(name));
      } finally {
        await img.close();
      }
    }
    expect((await qemuImg.snapshotList(path)).map((s) => [s.id, s.name])).toEqual(ALL);
  });
  afterAll(async () => {
    await killAllVms();
    await work?.cleanup();
  });

  /** The snapshot list of a copy after `deleteWith`, or 'not found' when it refused. */
  async function remainingAfter(deleteWith: (copy: string) => Promise<unknown>, ref: string): Promise<string[][] | 'not found'> {
    const copy = work.path(`delete-${ref}`);
    await copyFile(path, copy);
    const refused = await deleteWith(copy).then(
      () => false,
      (err: unknown) => /snapshot not found|SNAPSHOT_NOT_FOUND|no snapshot named/.test(`${String(err)} ${(err as { code?: string }).code}`),
    );
    expect((await qemuImg.check(copy)).exitCode).toBe(0);
    const list = (await qemuImg.snapshotList(copy)).map((s) => [s.id, s.name]);
    if (refused) {
      expect(list).toEqual(ALL);
      return 'not found';
    }
    return list;
  }

  async function deleteOurs(copy: string, ref: string): Promise<{ id: string; name: string }> {
    const img = await openImage(copy);
    try {
      return await img.deleteSnapshot(ref);
    } finally {
      await img.close();
    }
  }

  for (const ref of ['1', '2', '3', 'foo']) {
    it(`deletes what qemu-img snapshot -d ${ref} deletes (or refuses as it does), and says which`, async () => {
      const theirs = await remainingAfter((copy) => qemuImg.snapshot(copy, 'delete', ref), ref);
      let deleted: { id: string; name: string } | undefined;
      const ours = await remainingAfter(async (copy) => {
        deleted = await deleteOurs(copy, ref);
      }, ref);
      expect(ours).toEqual(theirs);
      if (ours !== 'not found') expect(ALL.filter((s) => !ours.some((o) => o[0] === s[0]))).toEqual([[deleted?.id, deleted?.name]]);
    });
  }

  it('exports the vmstate loadvm would read: a name match first (the independent reader agrees)', async () => {
    const img = await openImage(path, { readOnly: true });
    try {
      expect(() => img.createVmStateReadStream('1')).toThrow(expect.objectContaining({ code: 'SNAPSHOT_NOT_FOUND' }));
      for (const [ref, index] of [['2', 0], ['3', 1], ['foo', 2]] as const) {
        const chunks: Buffer[] = [];
        for await (const chunk of img.createVmStateReadStream(ref)) chunks.push(chunk as Buffer);
        expect(sha256(Buffer.concat(chunks)), `export ${ref}`).toBe(sha256(vmstates[index]!));
      }
    } finally {
      await img.close();
    }
    expect(sha256(await readSnapshotVmState(path, '2'))).toBe(sha256(vmstates[0]!));
  });

  it('resolves a revert reference to the snapshot qemu-img snapshot -a applies (an id match first)', async () => {
    const img = await openImage(path, { readOnly: true });
    const entries = img.snapshots();
    await img.close();
    for (const ref of ['1', '2', '3', 'foo']) {
      const copy = work.path(`apply-${ref}`);
      await copyFile(path, copy);
      await qemuImg.snapshot(copy, 'apply', ref);
      const expected = entries[findByIdThenName(entries.map((e) => entry(e.id, e.name)), ref)]!;
      const pattern = { '1': '0x11', '2': '0x22', '3': '0x33' }[expected.id]!;
      await qemuIo(copy, [`read -P ${pattern} 0 64k`]);
    }
  });

  it.skipIf(noQemu !== undefined)('deletes what HMP delvm deletes in a running QEMU (delvm of an id only deletes nothing)', async () => {
    for (const ref of ['1', '2', '3']) {
      const viaHmp = work.path(`delvm-${ref}`);
      await copyFile(path, viaHmp);
      await withPausedVm({ ramMiB: 16, image: viaHmp }, async (vm) => vm.hmpChecked(`delvm ${ref}`));
      const theirs = (await qemuImg.snapshotList(viaHmp)).map((s) => [s.id, s.name]);
      const ours = await remainingAfter((copy) => deleteOurs(copy, ref), ref);
      expect(ours === 'not found' ? ALL : ours, `delvm ${ref}`).toEqual(theirs);
    }
  });
});
