/**
 * Malformed qcow2 images, built from images qemu-img created, so that every
 * case differs from a valid image in exactly the way its name says.
 *
 * The header is parsed here independently of src/qcow2 (field offsets from
 * QEMU's docs/interop/qcow2.txt), so a decoder bug cannot hide itself by
 * building the test input too.
 *
 * `stage` says where a careful implementation must notice the damage:
 * - 'open': in the header, the active L1 or the snapshot table, all of which
 *   are read and validated when an image is opened;
 * - 'save': only in structures read later (L2 tables, refcount blocks). An
 *   open may succeed; a save must still refuse before writing anything.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { qemuImg, qemuIo } from '../helpers/tools.js';

/** qcow2.txt "Header": byte offsets of the fixed fields. */
export const H = {
  magic: 0,
  version: 4,
  backingFileOffset: 8,
  backingFileSize: 16,
  clusterBits: 20,
  size: 24,
  cryptMethod: 32,
  l1Size: 36,
  l1TableOffset: 40,
  refcountTableOffset: 48,
  refcountTableClusters: 56,
  nbSnapshots: 60,
  snapshotsOffset: 64,
  incompatibleFeatures: 72,
  compatibleFeatures: 80,
  autoclearFeatures: 88,
  refcountOrder: 96,
  headerLength: 100,
} as const;

/** qcow2.txt "Snapshot table": offsets inside one entry. */
export const S = { l1TableOffset: 0, l1Size: 8, idSize: 12, nameSize: 14, vmStateSize: 32, extraDataSize: 36 } as const;

export interface SeedImage {
  label: string;
  bytes: Buffer;
  version: number;
  clusterSize: number;
  headerLength: number;
  l1TableOffset: number;
  l1Size: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  /** Host offset of the first allocated L2 table (from active L1 entry 0). */
  firstL2Offset: number;
  /** Host offset of the first refcount block (refcount table entry 0). */
  firstRefblockOffset: number;
}

export interface HostileCase {
  name: string;
  stage: 'open' | 'save';
  bytes: Buffer;
}

const L1_OFFSET_MASK = 0x00fffffffffffe00n;

export function parseSeed(label: string, bytes: Buffer): SeedImage {
  const version = bytes.readUInt32BE(H.version);
  const l1TableOffset = Number(bytes.readBigUInt64BE(H.l1TableOffset));
  const refcountTableOffset = Number(bytes.readBigUInt64BE(H.refcountTableOffset));
  return {
    label,
    bytes,
    version,
    clusterSize: 2 ** bytes.readUInt32BE(H.clusterBits),
    headerLength: version === 3 ? bytes.readUInt32BE(H.headerLength) : 72,
    l1TableOffset,
    l1Size: bytes.readUInt32BE(H.l1Size),
    refcountTableOffset,
    refcountTableClusters: bytes.readUInt32BE(H.refcountTableClusters),
    nbSnapshots: bytes.readUInt32BE(H.nbSnapshots),
    snapshotsOffset: Number(bytes.readBigUInt64BE(H.snapshotsOffset)),
    firstL2Offset: Number(bytes.readBigUInt64BE(l1TableOffset) & L1_OFFSET_MASK),
    firstRefblockOffset: Number(bytes.readBigUInt64BE(refcountTableOffset)),
  };
}

/**
 * Seed images, made by qemu-img and qemu-io: guest data written, one
 * internal snapshot taken, more data written after it (so refcounts above 1
 * and cleared COPIED flags exist). v3 with 64 KiB clusters, v3 with 4 KiB
 * clusters, and v2 (compat=0.10).
 */
export async function makeSeeds(dir: string): Promise<SeedImage[]> {
  const specs: { label: string; options: Record<string, string | number> }[] = [
    { label: 'v3-64k', options: { cluster_size: 65536 } },
    { label: 'v3-4k', options: { cluster_size: 4096 } },
    { label: 'v2-64k', options: { cluster_size: 65536, compat: '0.10' } },
  ];
  const seeds: SeedImage[] = [];
  for (const spec of specs) {
    const path = join(dir, `seed-${spec.label}.qcow2`);
    await qemuImg.create(path, 64 << 20, spec.options);
    await qemuIo(path, ['write -P 0xab 0 1M', 'write -P 0xcd 8M 128k']);
    await qemuImg.snapshot(path, 'create', 's1');
    await qemuIo(path, ['write -P 0xef 0 64k']);
    seeds.push(parseSeed(spec.label, await readFile(path)));
  }
  return seeds;
}

function copy(seed: SeedImage): Buffer {
  return Buffer.from(seed.bytes);
}

function u32(seed: SeedImage, offset: number, value: number): Buffer {
  const b = copy(seed);
  b.writeUInt32BE(value >>> 0, offset);
  return b;
}

function u64(seed: SeedImage, offset: number, value: bigint | number): Buffer {
  const b = copy(seed);
  b.writeBigUInt64BE(BigInt(value), offset);
  return b;
}

/** A feature that allows listing only: a read-only open may accept it, a write must refuse it. */
function listOnly(name: string, bytes: Buffer): HostileCase {
  return { name, stage: 'save', bytes };
}

function orFeature(seed: SeedImage, bit: bigint): Buffer {
  const b = copy(seed);
  b.writeBigUInt64BE(b.readBigUInt64BE(H.incompatibleFeatures) | bit, H.incompatibleFeatures);
  return b;
}

/** End of the file rounded up to a cluster: the first offset no table may reach. */
function pastEnd(seed: SeedImage): number {
  return Math.ceil(seed.bytes.length / seed.clusterSize) * seed.clusterSize + seed.clusterSize;
}

function headerCases(seed: SeedImage): HostileCase[] {
  const c = seed.clusterSize;
  const open = (name: string, bytes: Buffer): HostileCase => ({ name, stage: 'open', bytes });
  const cases: HostileCase[] = [
    open('bad magic', u32(seed, H.magic, 0x514649fa)),
    open('version 0', u32(seed, H.version, 0)),
    open('version 1 (qcow, not qcow2)', u32(seed, H.version, 1)),
    open('version 4', u32(seed, H.version, 4)),
    open('version 0xffffffff', u32(seed, H.version, 0xffffffff)),
    open('cluster_bits 8 (below 512 bytes)', u32(seed, H.clusterBits, 8)),
    open('cluster_bits 22 (above 2 MiB)', u32(seed, H.clusterBits, 22)),
    open('cluster_bits 0xffffffff', u32(seed, H.clusterBits, 0xffffffff)),
    open('size 2^63 (beyond any file)', u64(seed, H.size, 1n << 63n)),
    open('size 2^53 (the active L1 is far too small for it)', u64(seed, H.size, 1n << 53n)),
    // Listed read-only, as qemu-img snapshot -l does; refused for writing (QCOW2_UNSUPPORTED).
    listOnly('crypt_method 1 (AES)', u32(seed, H.cryptMethod, 1)),
    listOnly('crypt_method 2 (LUKS)', u32(seed, H.cryptMethod, 2)),
    listOnly('crypt_method 0xffffffff', u32(seed, H.cryptMethod, 0xffffffff)),
    open('backing file name 0xffffffff bytes long', (() => {
      const b = u64(seed, H.backingFileOffset, seed.headerLength + 64);
      b.writeUInt32BE(0xffffffff, H.backingFileSize);
      return b;
    })()),
    open('backing file name offset past cluster 0', (() => {
      const b = u64(seed, H.backingFileOffset, c + 8);
      b.writeUInt32BE(16, H.backingFileSize);
      return b;
    })()),
    open('l1_size 0xffffffff', u32(seed, H.l1Size, 0xffffffff)),
    open('l1_size one above QEMU\'s 32 MiB limit', u32(seed, H.l1Size, (32 << 20) / 8 + 1)),
    open('l1_size 0 for a 64 MiB disk', u32(seed, H.l1Size, 0)),
    open('L1 table offset unaligned by 1', u64(seed, H.l1TableOffset, seed.l1TableOffset + 1)),
    open('L1 table offset unaligned by 512', u64(seed, H.l1TableOffset, seed.l1TableOffset + 512)),
    open('L1 table past end of file', u64(seed, H.l1TableOffset, pastEnd(seed))),
    open('L1 table at 2^56', u64(seed, H.l1TableOffset, 1n << 56n)),
    open('L1 table offset 2^63', u64(seed, H.l1TableOffset, 1n << 63n)),
    open('L1 table at offset 0 (inside the header)', u64(seed, H.l1TableOffset, 0)),
    open('L1 table overlapping the refcount table', u64(seed, H.l1TableOffset, seed.refcountTableOffset)),
    open('refcount table offset unaligned', u64(seed, H.refcountTableOffset, seed.refcountTableOffset + 8)),
    open('refcount table past end of file', u64(seed, H.refcountTableOffset, pastEnd(seed))),
    open('refcount table at offset 0 (inside the header)', u64(seed, H.refcountTableOffset, 0)),
    open('refcount table overlapping the L1 table', u64(seed, H.refcountTableOffset, seed.l1TableOffset)),
    open('refcount_table_clusters 0', u32(seed, H.refcountTableClusters, 0)),
    open('refcount_table_clusters 0xffffffff', u32(seed, H.refcountTableClusters, 0xffffffff)),
    open('refcount table one cluster above QEMU\'s 8 MiB limit', u32(seed, H.refcountTableClusters, (8 << 20) / c + 1)),
    open('nb_snapshots 65537 (above QEMU\'s limit)', u32(seed, H.nbSnapshots, 65537)),
    open('nb_snapshots 0xffffffff', u32(seed, H.nbSnapshots, 0xffffffff)),
    open('snapshot table offset unaligned', u64(seed, H.snapshotsOffset, seed.snapshotsOffset + 8)),
    open('snapshot table past end of file', u64(seed, H.snapshotsOffset, pastEnd(seed))),
    open('snapshot table at offset 0 (inside the header)', u64(seed, H.snapshotsOffset, 0)),
    open('snapshot table overlapping the L1 table', u64(seed, H.snapshotsOffset, seed.l1TableOffset)),
    open('snapshot table offset 2^63', u64(seed, H.snapshotsOffset, 1n << 63n)),
  ];
  if (seed.version === 3) {
    cases.push(
      // Reading a dirty image is safe (QEMU does it); writing through stale refcounts is not.
    { name: 'the dirty bit (lazy refcounts not replayed)', stage: 'save', bytes: orFeature(seed, 1n << 0n) },
      open('the corrupt bit', orFeature(seed, 1n << 1n)),
      listOnly('an external data file', orFeature(seed, 1n << 2n)),
      open('the compression type bit with compression_type zlib', orFeature(seed, 1n << 3n)),
      listOnly('extended L2 entries', orFeature(seed, 1n << 4n)),
      open('unknown incompatible bit 5', orFeature(seed, 1n << 5n)),
      open('unknown incompatible bit 63', orFeature(seed, 1n << 63n)),
      open('the bitmaps autoclear bit without a bitmaps extension', u64(seed, H.autoclearFeatures, 1n)),
      open('refcount_order 7', u32(seed, H.refcountOrder, 7)),
      open('refcount_order 0xffffffff', u32(seed, H.refcountOrder, 0xffffffff)),
      open('header_length 0', u32(seed, H.headerLength, 0)),
      open('header_length 100 (below 104)', u32(seed, H.headerLength, 100)),
      open('header_length 108 (not a multiple of 8)', u32(seed, H.headerLength, 108)),
      open('header_length 0xfffffff8', u32(seed, H.headerLength, 0xfffffff8)),
      open('header_length one cluster plus 8', u32(seed, H.headerLength, c + 8)),
      open('a header extension 0xffffffff bytes long', extension(seed, 0x12345678, 0xffffffff)),
      open('a header extension as long as a cluster', extension(seed, 0x12345678, c)),
      open('header extensions without an end marker', noEndMarker(seed)),
    );
  }
  return cases;
}

/** Puts one extension header right after the fixed header (where the first one starts). */
function extension(seed: SeedImage, type: number, length: number): Buffer {
  const b = copy(seed);
  b.writeUInt32BE(type, seed.headerLength);
  b.writeUInt32BE(length >>> 0, seed.headerLength + 4);
  return b;
}

/** Fills the rest of cluster 0 with empty unknown extensions: thousands of them, and no end. */
function noEndMarker(seed: SeedImage): Buffer {
  const b = copy(seed);
  for (let at = seed.headerLength; at + 8 <= seed.clusterSize; at += 8) {
    b.writeUInt32BE(0x0badf00d, at);
    b.writeUInt32BE(0, at + 4);
  }
  return b;
}

function snapshotEntryCases(seed: SeedImage): HostileCase[] {
  const e = seed.snapshotsOffset;
  const open = (name: string, bytes: Buffer): HostileCase => ({ name, stage: 'open', bytes });
  return [
    // The u16 sizes are legal, so open (like QEMU's) accepts the entry; its
    // bytes run through clusters that L2 tables and data own, which only a
    // refcount/overlap pass sees. A save must not free that span.
    {
      name: 'snapshot id and name each 65535 bytes (the entry runs into other clusters or past the end)',
      stage: 'save',
      bytes: (() => {
      const b = copy(seed);
      b.writeUInt16BE(0xffff, e + S.idSize);
      b.writeUInt16BE(0xffff, e + S.nameSize);
      return b;
      })(),
    },
    open('snapshot extra data 0xffffffff bytes', u32(seed, e + S.extraDataSize, 0xffffffff)),
    open('snapshot extra data 1025 bytes (above QEMU\'s 1024)', u32(seed, e + S.extraDataSize, 1025)),
    open('snapshot L1 size 0xffffffff', u32(seed, e + S.l1Size, 0xffffffff)),
    open('snapshot L1 size one above the 32 MiB limit', u32(seed, e + S.l1Size, (32 << 20) / 8 + 1)),
    open('snapshot L1 offset unaligned', u64(seed, e + S.l1TableOffset, seed.firstL2Offset + 8)),
    open('snapshot L1 past end of file', u64(seed, e + S.l1TableOffset, pastEnd(seed))),
    open('snapshot L1 offset 2^63', u64(seed, e + S.l1TableOffset, 1n << 63n)),
  ];
}

function deepCases(seed: SeedImage): HostileCase[] {
  const save = (name: string, bytes: Buffer): HostileCase => ({ name, stage: 'save', bytes });
  const l1Entry = (value: bigint): Buffer => u64(seed, seed.l1TableOffset, value);
  const copied = 1n << 63n;
  return [
    save('active L1 entry: L2 table unaligned', l1Entry(copied | BigInt(seed.firstL2Offset + 512))),
    save('active L1 entry: L2 table past end of file', l1Entry(copied | BigInt(pastEnd(seed)))),
    save('active L1 entry: reserved bits set', l1Entry(copied | BigInt(seed.firstL2Offset) | 1n)),
    save('active L1 entry: L2 table is the refcount table', l1Entry(copied | BigInt(seed.refcountTableOffset))),
    save('refcount table entry: block unaligned', u64(seed, seed.refcountTableOffset, seed.firstRefblockOffset + 8)),
    save('refcount table entry: block past end of file', u64(seed, seed.refcountTableOffset, pastEnd(seed))),
    save('refcount table entry: block is the L1 table', u64(seed, seed.refcountTableOffset, seed.l1TableOffset)),
    save('refcount table entry: block missing (0) for the header\'s clusters', u64(seed, seed.refcountTableOffset, 0)),
    save('L2 entry: data cluster past end of file', u64(seed, seed.firstL2Offset, copied | BigInt(pastEnd(seed) * 4))),
    save('L2 entry: data cluster unaligned', u64(seed, seed.firstL2Offset, copied | BigInt(seed.clusterSize * 5 + 512))),
  ];
}

function truncations(seed: SeedImage): HostileCase[] {
  const cut = (name: string, length: number): HostileCase => ({
    name,
    stage: 'open',
    bytes: Buffer.from(seed.bytes.subarray(0, Math.max(0, length))),
  });
  return [
    cut('empty file', 0),
    cut('truncated to 4 bytes (magic only)', 4),
    cut('truncated to 71 bytes (inside the v2 header)', 71),
    cut('truncated to 103 bytes (inside the v3 header)', 103),
    cut('truncated to the header cluster', seed.clusterSize),
    cut('truncated inside the refcount table', seed.refcountTableOffset + 8),
    cut('truncated inside the L1 table', seed.l1TableOffset + 8),
    cut('truncated inside the snapshot table', seed.snapshotsOffset + 20),
  ].filter((c) => c.bytes.length < seed.bytes.length);
}

/** Every hostile case derived from `seed`; names are prefixed with the seed's label. */
export function hostileCases(seed: SeedImage): HostileCase[] {
  return [...headerCases(seed), ...snapshotEntryCases(seed), ...deepCases(seed), ...truncations(seed)].map((c) => ({
    ...c,
    name: `${seed.label}: ${c.name}`,
  }));
}
