/**
 * QEMU's limits on internal snapshots, at the limit itself, checked against
 * qemu-img:
 *
 * - 65536 snapshots (QCOW_MAX_SNAPSHOTS): the next save fails with
 *   SNAPSHOT_LIMIT and the image is byte-for-byte unchanged; qemu-img's own
 *   `snapshot -c` refuses the same image ("Too many snapshots");
 * - names: QEMU keeps at most 255 bytes (qemu-img truncates longer names
 *   silently); snapstream takes exactly 255 UTF-8 bytes and refuses 256 with
 *   a RangeError naming the option, before touching the image;
 * - a snapshot table that the new entry would push past 64 MiB
 *   (QCOW_MAX_SNAPSHOTS_SIZE): SNAPSHOT_LIMIT before the vmstate is
 *   streamed, image unchanged; qemu-img refuses the same image too;
 * - Unicode names round-trip through save, `qemu-img snapshot -l`,
 *   `qemu-img info --output=json`, openImage, export and delete.
 *
 * Building 65535 snapshots with real saves would take hours, so they are
 * crafted: qemu-img makes one snapshot, then its entry is cloned N times, all
 * clones sharing its L1 copy, and every cluster that L1 reaches gets the
 * refcount N + 1 (refcount_bits=64, so nothing overflows). qemu-img check
 * finds the result clean once our own 65536th save is added.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream, openImage } from '../../src/index.js';
import { randomBytesFromSeed } from '../helpers/qemu.js';
import { qemuImg, qemuIo, requireTool, run, tmpDir, type TmpDir } from '../helpers/tools.js';
import { H, S } from './hostile-images.js';
import { exportVmState, sha256 } from '../fault/vmstate-export.js';

const MiB = 1 << 20;
/** QEMU's QCOW_MAX_SNAPSHOTS and QCOW_MAX_SNAPSHOTS_SIZE (block/qcow2.h). */
const QCOW_MAX_SNAPSHOTS = 65536;
const QCOW_MAX_SNAPSHOTS_SIZE = 64 * MiB;
/** QEMU's QEMUSnapshotInfo.name is char[256]: 255 bytes and a NUL. */
const MAX_NAME_BYTES = 255;
const L1_OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;
const L2_COMPRESSED = 1n << 62n;
/** Fixed part of a snapshot entry, and the extra data QEMU 7.2 writes (vm_state_size_large, disk_size, icount). */
const ENTRY_FIXED_BYTES = 40;
const EXTRA_BYTES = 24;

const skip = requireTool('qemu-img', 'qemu-io');


function entryBytes(id: string, name: string): number {
  return ENTRY_FIXED_BYTES + EXTRA_BYTES + Buffer.byteLength(id) + Buffer.byteLength(name);
}

/**
 * Replaces the image's single snapshot by `names.length` clones of it (ids
 * 1..N), all sharing its L1 copy, with refcounts to match: every cluster the
 * L1 copy reaches is referenced once by the active image and once per clone.
 * The new table goes to the end of the file; the old one's clusters are freed.
 */
async function cloneOnlySnapshot(path: string, names: readonly string[]): Promise<void> {
  const img = await readFile(path);
  const clusterSize = 2 ** img.readUInt32BE(H.clusterBits);
  const refcountBits = 2 ** img.readUInt32BE(H.refcountOrder);
  expect(img.readUInt32BE(H.nbSnapshots)).toBe(1);
  const oldTable = Number(img.readBigUInt64BE(H.snapshotsOffset));
  const l1Offset = Number(img.readBigUInt64BE(oldTable + S.l1TableOffset));
  const l1Size = img.readUInt32BE(oldTable + S.l1Size);
  expect(img.readUInt32BE(oldTable + S.extraDataSize)).toBe(EXTRA_BYTES);

  const refcountAt = (cluster: number): { offset: number } => {
    const perBlock = (clusterSize * 8) / refcountBits;
    const table = Number(img.readBigUInt64BE(H.refcountTableOffset));
    const block = Number(img.readBigUInt64BE(table + 8 * Math.floor(cluster / perBlock)));
    expect(block, `refcount block for cluster ${cluster}`).toBeGreaterThan(0);
    return { offset: block + ((cluster % perBlock) * refcountBits) / 8 };
  };
  const addRefcount = (cluster: number, delta: number): void => {
    const { offset } = refcountAt(cluster);
    if (refcountBits === 64) img.writeBigUInt64BE(img.readBigUInt64BE(offset) + BigInt(delta), offset);
    else img.writeUInt16BE(img.readUInt16BE(offset) + delta, offset);
  };

  const clones = names.length;
  const shared: number[] = [];
  for (let c = 0; c < Math.ceil((l1Size * 8) / clusterSize); c++) addRefcount(l1Offset / clusterSize + c, clones - 1);
  for (let i = 0; i < l1Size; i++) {
    const l2 = Number(img.readBigUInt64BE(l1Offset + 8 * i) & L1_OFFSET_MASK);
    if (l2 === 0) continue;
    shared.push(l2 / clusterSize);
    for (let j = 0; j < clusterSize / 8; j++) {
      const entry = img.readBigUInt64BE(l2 + 8 * j);
      expect(entry & L2_COMPRESSED).toBe(0n);
      const data = Number(entry & L1_OFFSET_MASK);
      if (data !== 0) shared.push(data / clusterSize);
    }
  }
  for (const cluster of shared) addRefcount(cluster, clones - 1); // from 2 (active + the original) to 1 + clones

  const template = img.subarray(oldTable, oldTable + ENTRY_FIXED_BYTES + EXTRA_BYTES);
  const parts: Buffer[] = [];
  let length = 0;
  names.forEach((name, i) => {
    const id = String(i + 1);
    const pad = (8 - (length % 8)) % 8;
    const entry = Buffer.alloc(pad + entryBytes(id, name));
    template.copy(entry, pad);
    entry.writeUInt16BE(Buffer.byteLength(id), pad + S.idSize);
    entry.writeUInt16BE(Buffer.byteLength(name), pad + S.nameSize);
    entry.write(id + name, pad + ENTRY_FIXED_BYTES + EXTRA_BYTES, 'utf8');
    parts.push(entry);
    length += entry.length;
  });
  expect(length).toBeLessThanOrEqual(QCOW_MAX_SNAPSHOTS_SIZE);
  const tableOffset = Math.ceil(img.length / clusterSize) * clusterSize;
  const tableClusters = Math.ceil(length / clusterSize);
  for (let c = 0; c < tableClusters; c++) addRefcount(tableOffset / clusterSize + c, 1);
  addRefcount(oldTable / clusterSize, -1);
  img.writeUInt32BE(clones, H.nbSnapshots);
  img.writeBigUInt64BE(BigInt(tableOffset), H.snapshotsOffset);
  const table = Buffer.concat(parts);
  await writeFile(path, Buffer.concat([img, Buffer.alloc(tableOffset - img.length), table, Buffer.alloc(tableClusters * clusterSize - length)]));
}

async function save(path: string, name: string, data: Buffer): Promise<void> {
  await pipeline(Readable.from([data]), createSnapshotStream(path, { snapshot: name }));
}


describe.skipIf(skip !== undefined)('QEMU limits on internal snapshots', () => {
  let dir: TmpDir;
  let n = 0;
  beforeAll(async () => {
    dir = await tmpDir('limits');
  });
  afterAll(async () => dir?.cleanup());

  /**
   * A small image with guest data and, with `snapshot`, one qemu-img snapshot
   * (the entry cloneOnlySnapshot() clones) taken before or after the data.
   */
  async function image(options: Record<string, string | number> = {}, snapshot?: 'before-data' | 'after-data'): Promise<string> {
    const path = join(dir.path, `img-${++n}.qcow2`);
    await qemuImg.create(path, 16 * MiB, { cluster_size: 65536, ...options });
    if (snapshot === 'before-data') await qemuImg.snapshot(path, 'create', 'base');
    await qemuIo(path, ['write -P 0x61 0 192k', 'write -P 0x62 8M 64k']);
    if (snapshot === 'after-data') await qemuImg.snapshot(path, 'create', 'base');
    return path;
  }

  it(
    'saves the 65536th snapshot, then refuses the next with SNAPSHOT_LIMIT and leaves the image unchanged',
    async () => {
      // The clones share an all-zero L1 copy (snapshot taken before any data), so qemu-img check reads
      // one L1 per snapshot rather than its L2 tables too: 65535 of those took it 11 s here.
      const path = await image({ refcount_bits: 64 }, 'before-data');
      const t0 = performance.now();
      await cloneOnlySnapshot(path, Array.from({ length: QCOW_MAX_SNAPSHOTS - 1 }, (_, i) => `s${i + 1}`));
      // Every qemu-img run on this image takes ~4 s here (QEMU reads the table entry by entry), so the
      // crafting is checked with our own check() and qemu-img runs three times, two of them in parallel.
      const crafted = await openImage(path, { readOnly: true });
      try {
        expect(crafted.snapshots()).toHaveLength(QCOW_MAX_SNAPSHOTS - 1);
        expect(await crafted.check()).toMatchObject({ corruptions: 0, leaks: 0 });
      } finally {
        await crafted.close();
      }
      const tCrafted = performance.now();

      // One below the limit, a save still works, and qemu-img agrees with the result.
      const last = randomBytesFromSeed(MiB + 17, 5);
      await save(path, 'last', last);
      const tSaved = performance.now();
      const [listed, check] = await Promise.all([
        qemuImg.snapshotList(path, { timeoutMs: 60_000 }),
        qemuImg.check(path, { timeoutMs: 60_000 }),
      ]);
      expect(check.exitCode, JSON.stringify(check)).toBe(0);
      expect(listed).toHaveLength(QCOW_MAX_SNAPSHOTS);
      expect(listed[QCOW_MAX_SNAPSHOTS - 1]).toMatchObject({ id: '65536', name: 'last', vmStateSize: last.length });
      expect(sha256(await exportVmState(path, 'last'))).toBe(sha256(last));

      // At the limit: refused before anything is written, as QEMU refuses it.
      const before = await readFile(path);
      await expect(save(path, 'one-too-many', last)).rejects.toMatchObject({ name: 'SnapshotError', code: 'SNAPSHOT_LIMIT' });
      expect(sha256(await readFile(path))).toBe(sha256(before));
      const qemu = await run('qemu-img', ['snapshot', '-c', 'one-too-many', path], { timeoutMs: 60_000 });
      expect(qemu.code).not.toBe(0);
      expect(qemu.stderr).toMatch(/File too large/); // qcow2_snapshot_create: "Too many snapshots", -EFBIG
      expect(sha256(await readFile(path))).toBe(sha256(before));
      console.log(
        `[limits] 65535 snapshots crafted and checked in ${(tCrafted - t0).toFixed(0)} ms; ` +
          `the 65536th save took ${(tSaved - tCrafted).toFixed(0)} ms`,
      );
    },
    90_000,
  );

  it('takes names of exactly 255 UTF-8 bytes and refuses 256 with a RangeError naming the option, image unchanged', async () => {
    const path = await image();
    const longest = '✓'.repeat(85); // 3 bytes each: 255 bytes
    const tooLong = `${'✓'.repeat(85)}x`; // 256 bytes, 86 characters
    expect(Buffer.byteLength(longest)).toBe(MAX_NAME_BYTES);
    const before = await readFile(path);
    expect(() => createSnapshotStream(path, { snapshot: tooLong })).toThrow(RangeError);
    expect(() => createSnapshotStream(path, { snapshot: tooLong })).toThrow(/255 UTF-8 bytes for options\.snapshot/);
    const img = await openImage(path);
    try {
      expect(() => img.createSnapshotStream('n'.repeat(256))).toThrow(RangeError);
    } finally {
      await img.close();
    }
    expect((await readFile(path)).equals(before)).toBe(true);

    const data = randomBytesFromSeed(4096 + 3, 6);
    await save(path, longest, data);
    expect((await qemuImg.snapshotList(path)).map((s) => s.name)).toEqual([longest]);
    expect(sha256(await exportVmState(path, longest))).toBe(sha256(data));
    // QEMU cannot address a longer name: qemu-img truncates it to the same 255 bytes.
    await qemuImg.snapshot(path, 'create', 'q'.repeat(300));
    expect((await qemuImg.snapshotList(path)).map((s) => s.name)).toEqual([longest, 'q'.repeat(MAX_NAME_BYTES)]);
    expect((await qemuImg.check(path)).exitCode).toBe(0);
  });

  it('refuses, before streaming, a save whose entry would push the snapshot table past 64 MiB; image unchanged', async () => {
    const path = await image({}, 'after-data');
    // 1024 entries of 64 KiB each, the last 64 bytes shorter: the table ends 64 bytes below QEMU's
    // limit, and the smallest entry a save can add (id '1025', a 1-byte name) needs 69.
    const count = 1024;
    const names = Array.from({ length: count }, (_, i) => {
      const id = String(i + 1);
      const target = 64 * 1024 - (i === count - 1 ? 64 : 0);
      const prefix = `big-${id}-`;
      return prefix + 'n'.repeat(target - entryBytes(id, prefix));
    });
    await cloneOnlySnapshot(path, names);
    const crafted = await qemuImg.check(path);
    expect(crafted.exitCode, JSON.stringify(crafted)).toBe(0);
    const before = await readFile(path);

    const big = randomBytesFromSeed(8 * MiB, 8);
    const t0 = performance.now();
    let streamed = 0;
    const source = Readable.from(
      (function* () {
        for (let at = 0; at < big.length; at += MiB) {
          streamed = at + MiB;
          yield big.subarray(at, at + MiB);
        }
      })(),
    );
    await expect(pipeline(source, createSnapshotStream(path, { snapshot: 'x' }))).rejects.toMatchObject({
      name: 'SnapshotError',
      code: 'SNAPSHOT_LIMIT',
    });
    console.log(`[limits] table-size refusal after ${(performance.now() - t0).toFixed(0)} ms, ${streamed} bytes pulled from the source`);
    expect(streamed, 'refused before the vmstate is streamed').toBeLessThan(big.length);
    expect(sha256(await readFile(path))).toBe(sha256(before));
    expect((await qemuImg.check(path)).exitCode).toBe(0);
    // qemu-img refuses the same image, for the same reason, though only after it has written the
    // snapshot's L1 copy and refcounts (they stay behind as leaked clusters).
    const qemu = await run('qemu-img', ['snapshot', '-c', 'x', path]);
    expect(qemu.code).not.toBe(0);
    expect(qemu.stderr).toMatch(/File too large/); // qcow2_write_snapshots: "Snapshot table is too big", -EFBIG
    expect((await qemuImg.check(path)).corruptions ?? 0).toBe(0);
  });

  it('round-trips Unicode names through save, qemu-img, openImage, export and delete', async () => {
    const path = await image();
    const names = ['prüfung-✓', '快照', '🦀📸-snapshot', 'e\u0301-décomposé', 'Ελληνικά στιγμιότυπο'];
    const data = names.map((_, i) => randomBytesFromSeed(64 * 1024 + i, 20 + i));
    for (const [i, name] of names.entries()) await save(path, name, data[i] as Buffer);

    const json = await qemuImg.info(path);
    expect((json.snapshots ?? []).map((s) => s.name)).toEqual(names);
    const table = await run('qemu-img', ['snapshot', '-l', path]);
    for (const name of names) expect(table.stdout).toContain(name);
    const img = await openImage(path);
    try {
      expect(img.snapshots().map((s) => s.name)).toEqual(names);
      for (const [i, name] of names.entries()) {
        const parts: Buffer[] = [];
        for await (const chunk of img.createVmStateReadStream(name)) parts.push(chunk as Buffer);
        expect(sha256(Buffer.concat(parts)), name).toBe(sha256(data[i] as Buffer));
      }
      // The same name in another normalisation (NFC 'é' vs 'e' + U+0301) is a different name, as in QEMU.
      expect(() => img.createVmStateReadStream('\u00e9-décomposé')).toThrow(expect.objectContaining({ code: 'SNAPSHOT_NOT_FOUND' }));
      await img.deleteSnapshot('快照');
      await img.deleteSnapshot('🦀📸-snapshot');
    } finally {
      await img.close();
    }
    // qemu-img deletes by a Unicode name too.
    await qemuImg.snapshot(path, 'delete', 'prüfung-✓');
    expect((await qemuImg.snapshotList(path)).map((s) => s.name)).toEqual(['e\u0301-décomposé', 'Ελληνικά στιγμιότυπο']);
    expect((await qemuImg.check(path)).exitCode).toBe(0);
    expect(sha256(await exportVmState(path, 'Ελληνικά στιγμιότυπο'))).toBe(sha256(data[4] as Buffer));
  });
});
