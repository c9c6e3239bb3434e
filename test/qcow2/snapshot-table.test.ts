import { readFile } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  decodeSnapshotTable,
  encodeSnapshotTable,
  nextSnapshotId,
  snapshotTableBytes,
  type SnapshotEntry,
} from '../../src/qcow2/snapshot-table.js';
import { openImage } from '../../src/qcow2/image.js';
import { qemuImg } from '../helpers/tools.js';
import { patchBytes, qemuMissing, Workdir } from './fixtures.js';

function entry(overrides: Partial<SnapshotEntry> = {}): SnapshotEntry {
  const id = overrides.id ?? '1';
  const name = overrides.name ?? 'snap';
  return {
    l1TableOffset: 0x50000,
    l1Size: 2,
    id,
    name,
    dateSec: 1_700_000_000,
    dateNsec: 5,
    vmClockNs: 123n,
    vmStateSize: 4096,
    diskSize: 1 << 30,
    icount: -1n,
    extraDataSize: 24,
    unknownExtraData: new Uint8Array(0),
    idBytes: Buffer.from(id),
    nameBytes: Buffer.from(name),
    ...overrides,
  };
}

function decoded(buf: Buffer, count: number): SnapshotEntry[] {
  const result = decodeSnapshotTable(buf, count, 1 << 30);
  if ('needBytes' in result) throw new Error('table truncated');
  return result.entries;
}

describe('snapshot table entries', () => {
  it('aligns every entry to 8 bytes and ends without padding, like qcow2_write_snapshots', () => {
    const table = encodeSnapshotTable([entry({ name: 'abc' }), entry({ id: '2', name: 'de' })]);
    expect(table.length).toBe(snapshotTableBytes([entry({ name: 'abc' }), entry({ id: '2', name: 'de' })]));
    // 40 + 24 + 1 + 3 = 68 -> next entry at 72; 72 + 40 + 24 + 1 + 2 = 139.
    expect(table.length).toBe(139);
    expect(table.readBigUInt64BE(72)).toBe(0x50000n);
  });

  it('writes 0 into the 32-bit vm_state_size when the size needs vm_state_size_large', () => {
    const big = 5 * 2 ** 30;
    const table = encodeSnapshotTable([entry({ vmStateSize: big })]);
    expect(table.readUInt32BE(32)).toBe(0);
    expect(Number(table.readBigUInt64BE(40))).toBe(big);
    expect(decoded(table, 1)[0]!.vmStateSize).toBe(big);
  });

  it('keeps unknown extra data byte for byte and reads icount', () => {
    const unknown = Buffer.from('future extension!');
    const table = encodeSnapshotTable([entry({ unknownExtraData: unknown, icount: 77n })]);
    const [back] = decoded(table, 1);
    expect(Buffer.from(back!.unknownExtraData).equals(unknown)).toBe(true);
    expect(back!.extraDataSize).toBe(24 + unknown.length);
    expect(back!.icount).toBe(77n);
    expect(encodeSnapshotTable([back!]).equals(table)).toBe(true);
  });

  it('falls back to the 32-bit size and the current disk size for entries without extra data', () => {
    const table = encodeSnapshotTable([entry({ vmStateSize: 1234 })]);
    const old = Buffer.concat([table.subarray(0, 36), Buffer.alloc(4), table.subarray(64)]);
    const [back] = decoded(old, 1);
    expect(back).toMatchObject({ vmStateSize: 1234, diskSize: 1 << 30, icount: -1n, extraDataSize: 0, name: 'snap' });
  });

  it('refuses an entry with more than 1024 bytes of extra data', () => {
    const table = encodeSnapshotTable([entry()]);
    table.writeUInt32BE(1025, 36);
    expect(() => decodeSnapshotTable(Buffer.concat([table, Buffer.alloc(2048)]), 1, 0)).toThrow(/1024/);
  });

  it('asks for more bytes instead of reading past a short buffer', () => {
    const table = encodeSnapshotTable([entry(), entry({ id: '2' })]);
    expect(decodeSnapshotTable(table.subarray(0, 50), 2, 0)).toEqual({ needBytes: 40 + 24 + 1 + 4 });
  });

  it('numbers a new snapshot max(id) + 1 with strtoul semantics', () => {
    const entries = [entry({ id: '1' }), entry({ id: '7', name: '1' }), entry({ id: 'x' }), entry({ id: '10abc' })];
    expect(nextSnapshotId(entries)).toBe('11');
    expect(nextSnapshotId([])).toBe('1');
  });
});

describe.skipIf(qemuMissing)('snapshot tables written by qemu-img', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-sntable');
  });
  afterAll(async () => work.cleanup());

  it('decodes and re-encodes the table byte for byte', async () => {
    const path = await work.image({ sizeBytes: 16 << 20 });
    for (const name of ['a', 'bb', 'a much longer snapshot name', 'ünïcödé']) await qemuImg.snapshot(path, 'create', name);
    const bytes = await readFile(path);
    const count = bytes.readUInt32BE(60);
    const offset = Number(bytes.readBigUInt64BE(64));
    const entries = decoded(bytes.subarray(offset), count);
    expect(entries.map((e) => e.name)).toEqual(['a', 'bb', 'a much longer snapshot name', 'ünïcödé']);
    const encoded = encodeSnapshotTable(entries);
    expect(encoded.equals(bytes.subarray(offset, offset + encoded.length))).toBe(true);
  });

  it('refuses an image whose snapshot L1 table is too large', async () => {
    const path = await work.image({ sizeBytes: 16 << 20 });
    await qemuImg.snapshot(path, 'create', 'a');
    const bytes = await readFile(path);
    const offset = Number(bytes.readBigUInt64BE(64));
    const l1Size = Buffer.alloc(4);
    l1Size.writeUInt32BE((32 << 20) / 8 + 1);
    await patchBytes(path, offset + 8, l1Size);
    await expect(openImage(path, { readOnly: true })).rejects.toMatchObject({ code: 'QCOW2_CORRUPT' });
  });
});
