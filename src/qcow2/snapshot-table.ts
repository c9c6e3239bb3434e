/**
 * The snapshot table (qcow2.txt "Snapshots"): variable-length entries, each
 * starting on an 8-byte boundary. One decode/encode pair; limits are QEMU's
 * (block/qcow2.h) so that every table we write is one QEMU reads.
 *
 * Encoding follows qcow2_write_snapshots(): the extra data is always at least
 * 24 bytes (vm_state_size_large, disk_size, icount), unknown trailing extra
 * bytes are kept verbatim, and the 32-bit vm_state_size is 0 when the size
 * does not fit, so older readers see a disk-only snapshot rather than a
 * truncated one.
 */
import { corrupt, invariant } from './fail.js';
import type { Layout } from './layout.js';
import { QCOW_MAX_L1_SIZE_BYTES } from './cluster-map.js';

/** QEMU's QCOW_MAX_SNAPSHOTS. */
export const QCOW_MAX_SNAPSHOTS = 65536;
/** QEMU's QCOW_MAX_SNAPSHOTS_SIZE: 1 KiB per snapshot on average. */
export const QCOW_MAX_SNAPSHOTS_SIZE_BYTES = 1024 * QCOW_MAX_SNAPSHOTS;
/** QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA. */
export const QCOW_MAX_SNAPSHOT_EXTRA_DATA_BYTES = 1024;
/** Fixed part of an entry (QCowSnapshotHeader). */
export const SNAPSHOT_HEADER_BYTES = 40;
/** Extra data QEMU 7.2 writes: vm_state_size_large (8), disk_size (8), icount (8). */
export const KNOWN_EXTRA_DATA_BYTES = 24;
/** qcow2.txt: version 3 images must include extra data up to disk_size. */
export const V3_MIN_EXTRA_DATA_BYTES = 16;
/** icount value meaning "record/replay was off" (QEMU writes -1). */
export const ICOUNT_DISABLED = -1n;

export interface SnapshotEntry {
  /** Byte offset of the snapshot's L1 table. */
  l1TableOffset: number;
  /** Entries in the snapshot's L1 table. */
  l1Size: number;
  /** Unique ID string, decimal by convention ("1", "2", ...). */
  id: string;
  name: string;
  /** Seconds since the Epoch. */
  dateSec: number;
  /** Sub-second part, nanoseconds. */
  dateNsec: number;
  /** Guest run time, nanoseconds. */
  vmClockNs: bigint;
  /** VM state size in bytes (vm_state_size_large when present). */
  vmStateSize: number;
  /** Virtual disk size in bytes when the snapshot was taken. */
  diskSize: number;
  /** Record/replay instruction count; -1 when disabled or absent. */
  icount: bigint;
  /** extra_data_size as found on disk (0 for a new entry). */
  extraDataSize: number;
  /** Extra data beyond the 24 known bytes, verbatim. */
  unknownExtraData: Uint8Array;
  /** id and name as on disk (QEMU treats them as bytes). */
  idBytes: Uint8Array;
  nameBytes: Uint8Array;
}

export type DecodeResult = { entries: SnapshotEntry[]; tableBytes: number } | { needBytes: number };

function safeU64(value: bigint, field: string, offset: number): number {
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`snapshot ${field} ${value} is absurd`, { offset });
  return Number(value);
}

/**
 * Decodes `count` entries from `buf` (bytes starting at the table offset).
 * Returns `needBytes` when `buf` is too short, so the caller can read more,
 * never beyond QCOW_MAX_SNAPSHOTS_SIZE_BYTES.
 */
export function decodeSnapshotTable(buf: Buffer, count: number, defaultDiskSize: number): DecodeResult {
  const entries: SnapshotEntry[] = [];
  let offset = 0;
  for (let i = 0; i < count; i++) {
    offset = Math.ceil(offset / 8) * 8;
    if (offset + SNAPSHOT_HEADER_BYTES > buf.length) return { needBytes: offset + SNAPSHOT_HEADER_BYTES };
    const extraDataSize = buf.readUInt32BE(offset + 36);
    if (extraDataSize > QCOW_MAX_SNAPSHOT_EXTRA_DATA_BYTES) {
      throw corrupt(`snapshot ${i} has ${extraDataSize} bytes of extra data (QEMU's limit is 1024)`, { offset });
    }
    const end =
      offset + SNAPSHOT_HEADER_BYTES + extraDataSize + buf.readUInt16BE(offset + 12) + buf.readUInt16BE(offset + 14);
    if (end > QCOW_MAX_SNAPSHOTS_SIZE_BYTES) throw corrupt('snapshot table exceeds QEMU\'s 64 MiB limit');
    if (end > buf.length) return { needBytes: end };
    entries.push(decodeEntry(buf, offset, defaultDiskSize));
    offset = end;
  }
  return { entries, tableBytes: offset };
}

function decodeEntry(buf: Buffer, offset: number, defaultDiskSize: number): SnapshotEntry {
  const idSize = buf.readUInt16BE(offset + 12);
  const nameSize = buf.readUInt16BE(offset + 14);
  const extraDataSize = buf.readUInt32BE(offset + 36);
  const extra = offset + SNAPSHOT_HEADER_BYTES;
  const idStart = extra + extraDataSize;
  const idBytes = Uint8Array.prototype.slice.call(buf, idStart, idStart + idSize);
  const nameBytes = Uint8Array.prototype.slice.call(buf, idStart + idSize, idStart + idSize + nameSize);
  return {
    l1TableOffset: safeU64(buf.readBigUInt64BE(offset), 'l1_table_offset', offset),
    l1Size: buf.readUInt32BE(offset + 8),
    id: Buffer.from(idBytes).toString('utf8'),
    name: Buffer.from(nameBytes).toString('utf8'),
    dateSec: buf.readUInt32BE(offset + 16),
    dateNsec: buf.readUInt32BE(offset + 20),
    vmClockNs: buf.readBigUInt64BE(offset + 24),
    vmStateSize:
      extraDataSize >= 8
        ? safeU64(buf.readBigUInt64BE(extra), 'vm_state_size_large', extra)
        : buf.readUInt32BE(offset + 32),
    diskSize: extraDataSize >= 16 ? safeU64(buf.readBigUInt64BE(extra + 8), 'disk_size', extra) : defaultDiskSize,
    icount: extraDataSize >= KNOWN_EXTRA_DATA_BYTES ? buf.readBigInt64BE(extra + 16) : ICOUNT_DISABLED,
    extraDataSize,
    unknownExtraData:
      extraDataSize > KNOWN_EXTRA_DATA_BYTES
        ? Uint8Array.prototype.slice.call(buf, extra + KNOWN_EXTRA_DATA_BYTES, idStart)
        : new Uint8Array(0),
    idBytes,
    nameBytes,
  };
}

/** Bytes of extra data an entry is written with (QEMU: at least the known 24). */
function encodedExtraBytes(entry: SnapshotEntry): number {
  return KNOWN_EXTRA_DATA_BYTES + entry.unknownExtraData.length;
}

/** The entry as encodeSnapshotTable() writes it (extra data widened to at least 24 bytes). */
export function asWritten(entry: SnapshotEntry): SnapshotEntry {
  return { ...entry, extraDataSize: encodedExtraBytes(entry) };
}

/** Exact byte length of the encoded table (no padding after the last entry, like QEMU). */
export function snapshotTableBytes(entries: readonly SnapshotEntry[]): number {
  let offset = 0;
  for (const entry of entries) {
    offset = Math.ceil(offset / 8) * 8;
    offset += SNAPSHOT_HEADER_BYTES + encodedExtraBytes(entry) + entry.idBytes.length + entry.nameBytes.length;
  }
  return offset;
}

export function encodeSnapshotTable(entries: readonly SnapshotEntry[]): Buffer {
  const length = snapshotTableBytes(entries);
  invariant(length <= QCOW_MAX_SNAPSHOTS_SIZE_BYTES, 'snapshot table within 64 MiB');
  const buf = Buffer.alloc(length);
  let offset = 0;
  for (const entry of entries) {
    offset = Math.ceil(offset / 8) * 8;
    offset = encodeEntry(buf, offset, entry);
  }
  invariant(offset === length, 'encoded length matches');
  return buf;
}

function encodeEntry(buf: Buffer, offset: number, entry: SnapshotEntry): number {
  invariant(entry.idBytes.length <= 0xffff && entry.nameBytes.length <= 0xffff, 'id and name fit 16 bits');
  const extraBytes = encodedExtraBytes(entry);
  buf.writeBigUInt64BE(BigInt(entry.l1TableOffset), offset);
  buf.writeUInt32BE(entry.l1Size, offset + 8);
  buf.writeUInt16BE(entry.idBytes.length, offset + 12);
  buf.writeUInt16BE(entry.nameBytes.length, offset + 14);
  buf.writeUInt32BE(entry.dateSec, offset + 16);
  buf.writeUInt32BE(entry.dateNsec, offset + 20);
  buf.writeBigUInt64BE(entry.vmClockNs, offset + 24);
  buf.writeUInt32BE(entry.vmStateSize <= 0xffffffff ? entry.vmStateSize : 0, offset + 32);
  buf.writeUInt32BE(extraBytes, offset + 36);
  const extra = offset + SNAPSHOT_HEADER_BYTES;
  buf.writeBigUInt64BE(BigInt(entry.vmStateSize), extra);
  buf.writeBigUInt64BE(BigInt(entry.diskSize), extra + 8);
  buf.writeBigInt64BE(entry.icount, extra + 16);
  buf.set(entry.unknownExtraData, extra + KNOWN_EXTRA_DATA_BYTES);
  const idStart = extra + extraBytes;
  buf.set(entry.idBytes, idStart);
  buf.set(entry.nameBytes, idStart + entry.idBytes.length);
  return idStart + entry.idBytes.length + entry.nameBytes.length;
}

/** Per-entry checks that need the cluster size and file size (run at open). */
export function validateSnapshotEntry(
  entry: SnapshotEntry,
  index: number,
  layout: Layout,
  fileSizeBytes: number,
): void {
  const where = `snapshot ${index} ('${entry.name}')`;
  if (entry.l1Size > QCOW_MAX_L1_SIZE_BYTES / 8) throw corrupt(`${where}: L1 table of ${entry.l1Size} entries is too large`);
  if (entry.l1Size > 0 && !layout.isAligned(entry.l1TableOffset)) {
    throw corrupt(`${where}: L1 table offset ${entry.l1TableOffset} is not cluster aligned`);
  }
  if (entry.l1Size > 0 && entry.l1TableOffset + entry.l1Size * 8 > layout.alignUp(fileSizeBytes)) {
    throw corrupt(`${where}: L1 table extends past the end of the file`, { offset: entry.l1TableOffset });
  }
}

/** qcow2.txt: v3 entries carry extra data up to disk_size. QEMU's check counts a shorter one as a corruption. */
export function isIncompleteV3Entry(entry: SnapshotEntry, version: number): boolean {
  return version >= 3 && entry.extraDataSize < V3_MIN_EXTRA_DATA_BYTES;
}

/** QEMU's find_new_snapshot_id(): one more than the largest numeric id (strtoul semantics). */
export function nextSnapshotId(entries: readonly SnapshotEntry[]): string {
  let max = 0n;
  for (const entry of entries) {
    const digits = /^\s*\+?(\d+)/.exec(entry.id)?.[1];
    if (digits !== undefined && BigInt(digits) > max) max = BigInt(digits);
  }
  return (max + 1n).toString();
}

/**
 * Length of the table once a save appends an entry named `name` (next id, the
 * 24 known extra bytes): what encodeSnapshotTable() will produce, so a save
 * can be refused before its vmstate is streamed when this exceeds QEMU's limit.
 */
export function snapshotTableBytesWithNew(entries: readonly SnapshotEntry[], name: string): number {
  const start = Math.ceil(snapshotTableBytes(entries) / 8) * 8;
  const idBytes = Buffer.byteLength(nextSnapshotId(entries), 'utf8');
  return start + SNAPSHOT_HEADER_BYTES + KNOWN_EXTRA_DATA_BYTES + idBytes + Buffer.byteLength(name, 'utf8');
}
