/**
 * A deliberately tiny, independent qcow2 reader for tests: it extracts the
 * vmstate bytes of an internal snapshot (no qemu tool exports them) and can
 * overwrite them in place, so tests can check snapstream's reader and writer
 * against bytes QEMU itself produced, and feed QEMU's loadvm arbitrary streams.
 *
 * Spec: QEMU docs/interop/qcow2.txt ("Header", "Snapshots", "Cluster
 * mapping"). Only what savevm produces is supported: no backing file,
 * no encryption, no compressed or external-data clusters in the vmstate,
 * standard (not extended) L2 entries.
 */
import { open, type FileHandle } from 'node:fs/promises';

const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
const OFFSET_MASK = 0x00ff_ffff_ffff_fe00n; // bits 9-55 of L1/L2 entries
const L2_COMPRESSED = 1n << 62n;
const L2_ZERO = 1n; // bit 0 of a standard cluster descriptor (v3)
const SNAPSHOT_FIXED_BYTES = 40;
/** incompatible_features bit 4: extended L2 entries (128-bit). */
const INCOMPAT_EXTL2 = 1n << 4n;

export interface SnapshotEntryInfo {
  index: number;
  id: string;
  name: string;
  l1TableOffset: number;
  l1Size: number;
  vmStateSize: number;
  /** File offset of this entry, and of its 32-bit vm_state_size field. */
  entryOffset: number;
  /** File offset of the 64-bit vm_state_size_large in extra data, if present. */
  vmStateSizeLargeOffset?: number;
}

export interface VmStateLayout {
  clusterSize: number;
  /** Guest offset of the vmstate area: virtual size rounded up to an L2's coverage. */
  vmStateGuestOffset: number;
  snapshot: SnapshotEntryInfo;
  /** Host offset of each vmstate cluster in order; 0 = unallocated/zero. */
  hostClusters: number[];
}

interface Header {
  clusterBits: number;
  size: bigint;
  nbSnapshots: number;
  snapshotsOffset: number;
  version: number;
  incompatible: bigint;
}

async function readAt(file: FileHandle, offset: number, length: number): Promise<Buffer> {
  const buffer = Buffer.alloc(length);
  const { bytesRead } = await file.read(buffer, 0, length, offset);
  if (bytesRead !== length) throw new Error(`qcow2: short read of ${length} bytes at ${offset}`);
  return buffer;
}

async function readHeader(file: FileHandle): Promise<Header> {
  const h = await readAt(file, 0, 104);
  if (h.readUInt32BE(0) !== QCOW2_MAGIC) throw new Error('qcow2: bad magic');
  const version = h.readUInt32BE(4);
  const header: Header = {
    version,
    clusterBits: h.readUInt32BE(20),
    size: h.readBigUInt64BE(24),
    nbSnapshots: h.readUInt32BE(60),
    snapshotsOffset: Number(h.readBigUInt64BE(64)),
    incompatible: version >= 3 ? h.readBigUInt64BE(72) : 0n,
  };
  if (header.clusterBits < 9 || header.clusterBits > 21) throw new Error(`qcow2: cluster_bits ${header.clusterBits}`);
  if ((header.incompatible & INCOMPAT_EXTL2) !== 0n) throw new Error('qcow2: extended L2 entries not supported here');
  return header;
}

async function readSnapshotTable(file: FileHandle, header: Header): Promise<SnapshotEntryInfo[]> {
  const entries: SnapshotEntryInfo[] = [];
  let offset = header.snapshotsOffset;
  for (let index = 0; index < header.nbSnapshots; index++) {
    const fixed = await readAt(file, offset, SNAPSHOT_FIXED_BYTES);
    const idSize = fixed.readUInt16BE(12);
    const nameSize = fixed.readUInt16BE(14);
    const extraSize = fixed.readUInt32BE(36);
    const variable = await readAt(file, offset + SNAPSHOT_FIXED_BYTES, extraSize + idSize + nameSize);
    const hasLarge = extraSize >= 8;
    const entry: SnapshotEntryInfo = {
      index,
      id: variable.toString('utf8', extraSize, extraSize + idSize),
      name: variable.toString('utf8', extraSize + idSize, extraSize + idSize + nameSize),
      l1TableOffset: Number(fixed.readBigUInt64BE(0)),
      l1Size: fixed.readUInt32BE(8),
      vmStateSize: hasLarge ? Number(variable.readBigUInt64BE(0)) : fixed.readUInt32BE(32),
      entryOffset: offset,
      ...(hasLarge ? { vmStateSizeLargeOffset: offset + SNAPSHOT_FIXED_BYTES } : {}),
    };
    entries.push(entry);
    const length = SNAPSHOT_FIXED_BYTES + extraSize + idSize + nameSize;
    offset += length + ((8 - (length % 8)) % 8);
  }
  return entries;
}

/** Where a snapshot's vmstate lives (by name, or by id when no name matches). */
export async function vmStateLayout(path: string, nameOrId: string): Promise<VmStateLayout> {
  const file = await open(path, 'r');
  try {
    const header = await readHeader(file);
    const snapshots = await readSnapshotTable(file, header);
    const snapshot = snapshots.find((s) => s.name === nameOrId) ?? snapshots.find((s) => s.id === nameOrId);
    if (snapshot === undefined) throw new Error(`qcow2: no snapshot ${nameOrId} in ${path}`);
    const clusterSize = 2 ** header.clusterBits;
    const l2Entries = clusterSize / 8;
    const l2CoverageBytes = BigInt(clusterSize) * BigInt(l2Entries);
    const vmStateGuestOffset = Number(((header.size + l2CoverageBytes - 1n) / l2CoverageBytes) * l2CoverageBytes);
    const l1 = await readAt(file, snapshot.l1TableOffset, snapshot.l1Size * 8);
    const hostClusters: number[] = [];
    const clusters = Math.ceil(snapshot.vmStateSize / clusterSize);
    const l2Cache = new Map<number, Buffer>();
    for (let i = 0; i < clusters; i++) {
      const guestCluster = vmStateGuestOffset / clusterSize + i;
      const l1Index = Math.floor(guestCluster / l2Entries);
      if (l1Index >= snapshot.l1Size) throw new Error(`qcow2: vmstate beyond snapshot L1 (index ${l1Index})`);
      const l2Offset = Number(l1.readBigUInt64BE(l1Index * 8) & OFFSET_MASK);
      if (l2Offset === 0) {
        hostClusters.push(0);
        continue;
      }
      let l2 = l2Cache.get(l2Offset);
      if (l2 === undefined) {
        l2 = await readAt(file, l2Offset, clusterSize);
        l2Cache.set(l2Offset, l2);
      }
      const l2Entry = l2.readBigUInt64BE((guestCluster % l2Entries) * 8);
      if ((l2Entry & L2_COMPRESSED) !== 0n) throw new Error('qcow2: compressed vmstate cluster not supported here');
      hostClusters.push((l2Entry & L2_ZERO) !== 0n ? 0 : Number(l2Entry & OFFSET_MASK));
    }
    return { clusterSize, vmStateGuestOffset, snapshot, hostClusters };
  } finally {
    await file.close();
  }
}

/** The vmstate bytes of a snapshot, exactly `vm_state_size` long. */
export async function readSnapshotVmState(path: string, nameOrId: string): Promise<Buffer> {
  const layout = await vmStateLayout(path, nameOrId);
  const out = Buffer.alloc(layout.snapshot.vmStateSize);
  const file = await open(path, 'r');
  try {
    for (const [i, host] of layout.hostClusters.entries()) {
      const start = i * layout.clusterSize;
      const length = Math.min(layout.clusterSize, out.length - start);
      if (host !== 0) await file.read(out, start, length, host);
    }
  } finally {
    await file.close();
  }
  return out;
}

/**
 * Replaces a snapshot's vmstate with `data` in place: writes it through the
 * snapshot's existing cluster mapping and sets vm_state_size (both the 32-bit
 * field and vm_state_size_large). `data` must fit in the allocated clusters.
 * Test-only surgery, not crash-safe; the image must not be open elsewhere.
 */
export async function overwriteSnapshotVmState(path: string, nameOrId: string, data: Buffer): Promise<void> {
  const layout = await vmStateLayout(path, nameOrId);
  const needed = Math.ceil(data.length / layout.clusterSize);
  const usable = layout.hostClusters.slice(0, needed);
  if (needed > layout.hostClusters.length || usable.includes(0)) {
    throw new Error(
      `qcow2: ${data.length} bytes need ${needed} allocated clusters, snapshot has ${layout.hostClusters.filter((h) => h !== 0).length}`,
    );
  }
  const file = await open(path, 'r+');
  try {
    for (const [i, host] of usable.entries()) {
      const start = i * layout.clusterSize;
      const chunk = data.subarray(start, Math.min(start + layout.clusterSize, data.length));
      await file.write(chunk, 0, chunk.length, host);
    }
    const size32 = Buffer.alloc(4);
    size32.writeUInt32BE(data.length >= 2 ** 32 ? 0 : data.length);
    await file.write(size32, 0, 4, layout.snapshot.entryOffset + 32);
    if (layout.snapshot.vmStateSizeLargeOffset !== undefined) {
      const size64 = Buffer.alloc(8);
      size64.writeBigUInt64BE(BigInt(data.length));
      await file.write(size64, 0, 8, layout.snapshot.vmStateSizeLargeOffset);
    }
    await file.sync();
  } finally {
    await file.close();
  }
}
