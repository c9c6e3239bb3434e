/**
 * Validation that runs right after the header is decoded and before any
 * other structure is read, so that no later read or allocation is sized by an
 * unchecked field (DESIGN.md "qcow2 rules"). Limits are QEMU's, so an image
 * we accept is one QEMU opens too.
 */
import { corrupt, unsupported } from './fail.js';
import {
  AutoclearFeature,
  CompressionType,
  HeaderExtensionType,
  IncompatibleFeature,
  KNOWN_INCOMPATIBLE,
  layoutOf,
  type Qcow2Header,
} from './header.js';
import type { Layout } from './layout.js';
import { QCOW_MAX_L1_SIZE_BYTES } from './cluster-map.js';
import { QCOW_MAX_REFTABLE_SIZE_BYTES } from './refcount.js';
import { QCOW_MAX_SNAPSHOTS } from './snapshot-table.js';

/** Length of the bitmaps header extension (qcow2.txt "Bitmaps extension"). */
const BITMAPS_EXTENSION_BYTES = 24;

export interface HeaderFacts {
  layout: Layout;
  /** Incompatible bit 0: refcounts may be stale (lazy refcounts). */
  dirty: boolean;
  /**
   * A feature the image may be listed with but not written, checked or
   * exported (encryption, extended L2 entries, an external data file), as
   * `qemu-img snapshot -l` lists such images; undefined when there is none.
   */
  listOnly: string | undefined;
}

/** A byte range of metadata, for overlap checks. */
export interface MetadataRange {
  what: string;
  offset: number;
  length: number;
}

export function validateHeader(header: Qcow2Header, fileSizeBytes: number): HeaderFacts {
  if (header.refcountOrder > 6) throw corrupt(`refcount_order ${header.refcountOrder} exceeds 6`, { offset: 96 });
  const listOnly = validateFeatures(header);
  const layout = layoutOf(header);
  validateL1(header, layout, fileSizeBytes);
  validateRefcountTable(header, layout, fileSizeBytes);
  validateSnapshotPointer(header, layout, fileSizeBytes);
  validateExtensions(header);
  assertNoOverlap(headerRanges(header, layout), layout);
  return { layout, dirty: (header.incompatibleFeatures & IncompatibleFeature.DIRTY) !== 0n, listOnly };
}

/** Refuses what no access can handle; returns what only listing can (HeaderFacts.listOnly). */
function validateFeatures(header: Qcow2Header): string | undefined {
  const incompatible = header.incompatibleFeatures;
  const unknown = incompatible & ~KNOWN_INCOMPATIBLE;
  if (unknown !== 0n) throw unsupported(`unknown incompatible feature bits 0x${unknown.toString(16)}`, { offset: 72 });
  if (incompatible & IncompatibleFeature.CORRUPT) {
    throw corrupt('the corrupt bit is set (QEMU found an inconsistency); repair it with `qemu-img check -r all`', {
      offset: 72,
    });
  }
  const typeBit = (incompatible & IncompatibleFeature.COMPRESSION_TYPE) !== 0n;
  if (typeBit !== (header.compressionType !== CompressionType.ZLIB)) {
    throw corrupt(`compression_type ${header.compressionType} disagrees with the compression type feature bit`, {
      offset: 104,
    });
  }
  if (header.compressionType > CompressionType.ZSTD) {
    throw unsupported(`compression_type ${header.compressionType}`, { offset: 104 });
  }
  if (incompatible & IncompatibleFeature.EXTERNAL_DATA_FILE) return 'an external data file (internal snapshots are impossible with one)';
  if (incompatible & IncompatibleFeature.EXTENDED_L2) return 'extended L2 entries (subclusters)';
  if (header.cryptMethod !== 0) return `encryption (crypt_method ${header.cryptMethod})`;
  return undefined;
}

function validateL1(header: Qcow2Header, layout: Layout, fileSizeBytes: number): void {
  if (header.l1Size > QCOW_MAX_L1_SIZE_BYTES / 8) {
    throw corrupt(`active L1 table has ${header.l1Size} entries, above QEMU's 32 MiB limit`, { offset: 36 });
  }
  if (header.l1Size < layout.l1EntriesFor(header.size)) {
    throw corrupt(`active L1 table (${header.l1Size} entries) is too small for a ${header.size}-byte disk`, {
      offset: 36,
    });
  }
  validateTableOffset('active L1 table', header.l1TableOffset, header.l1Size * 8, layout, fileSizeBytes);
}

function validateRefcountTable(header: Qcow2Header, layout: Layout, fileSizeBytes: number): void {
  const lengthBytes = header.refcountTableClusters * layout.clusterSize;
  if (header.refcountTableClusters === 0) throw corrupt('refcount table has 0 clusters', { offset: 56 });
  if (lengthBytes > QCOW_MAX_REFTABLE_SIZE_BYTES) {
    throw corrupt(`refcount table of ${lengthBytes} bytes exceeds QEMU's 8 MiB limit`, { offset: 56 });
  }
  validateTableOffset('refcount table', header.refcountTableOffset, lengthBytes, layout, fileSizeBytes);
}

function validateSnapshotPointer(header: Qcow2Header, layout: Layout, fileSizeBytes: number): void {
  if (header.nbSnapshots > QCOW_MAX_SNAPSHOTS) {
    throw corrupt(`${header.nbSnapshots} snapshots exceed QEMU's limit of ${QCOW_MAX_SNAPSHOTS}`, { offset: 60 });
  }
  if (header.nbSnapshots === 0) return;
  // The table's length is only known once parsed; here its first byte must be in the file.
  validateTableOffset('snapshot table', header.snapshotsOffset, 1, layout, fileSizeBytes);
}

/**
 * A table must be cluster aligned, must not start in the header cluster, and
 * must end inside the file. The file may end mid-cluster (qemu-img create
 * writes only the L1 bytes), so the check is against the cluster-aligned end.
 */
export function validateTableOffset(
  what: string,
  offset: number,
  lengthBytes: number,
  layout: Layout,
  fileSizeBytes: number,
): void {
  if (lengthBytes === 0) return;
  if (!layout.isAligned(offset)) throw corrupt(`${what} offset ${offset} is not cluster aligned`, { offset });
  if (offset === 0) throw corrupt(`${what} is at offset 0, inside the header cluster`, { offset });
  if (offset + lengthBytes > layout.alignUp(fileSizeBytes)) {
    throw corrupt(`${what} (${lengthBytes} bytes at ${offset}) extends past the end of the file (${fileSizeBytes})`, {
      offset,
    });
  }
}

function validateExtensions(header: Qcow2Header): void {
  const seen = new Set<number>();
  for (const ext of header.extensions) {
    if (seen.has(ext.type) && ext.type !== HeaderExtensionType.FEATURE_NAME_TABLE) {
      throw corrupt(`header extension 0x${ext.type.toString(16)} appears twice`);
    }
    seen.add(ext.type);
  }
  const bitmaps = header.extensions.find((e) => e.type === HeaderExtensionType.BITMAPS);
  if ((header.autoclearFeatures & AutoclearFeature.BITMAPS) !== 0n && bitmaps === undefined) {
    throw corrupt('the bitmaps autoclear bit is set without a bitmaps extension');
  }
  if (bitmaps !== undefined && bitmaps.data.length !== BITMAPS_EXTENSION_BYTES) {
    throw corrupt(`bitmaps extension has ${bitmaps.data.length} bytes, expected ${BITMAPS_EXTENSION_BYTES}`);
  }
}

/** The header cluster, the active L1 and the refcount table: what every image has. */
export function fixedMetadataRanges(header: Qcow2Header, layout: Layout): MetadataRange[] {
  return [
    { what: 'header', offset: 0, length: layout.clusterSize },
    { what: 'active L1 table', offset: header.l1TableOffset, length: header.l1Size * 8 },
    {
      what: 'refcount table',
      offset: header.refcountTableOffset,
      length: header.refcountTableClusters * layout.clusterSize,
    },
  ];
}

function headerRanges(header: Qcow2Header, layout: Layout): MetadataRange[] {
  const ranges = fixedMetadataRanges(header, layout);
  if (header.nbSnapshots > 0) ranges.push({ what: 'snapshot table', offset: header.snapshotsOffset, length: 1 });
  return ranges;
}

/** Refuses metadata ranges that share a cluster (QEMU's overlap check, at open). */
export function assertNoOverlap(ranges: readonly MetadataRange[], layout: Layout): void {
  const spans = ranges
    .filter((r) => r.length > 0)
    .map((r) => ({
      what: r.what,
      start: layout.clusterIndex(r.offset),
      end: layout.clustersFor(r.offset + r.length),
    }))
    .sort((a, b) => a.start - b.start);
  for (let i = 1; i < spans.length; i++) {
    const previous = spans[i - 1]!;
    const current = spans[i]!;
    if (current.start < previous.end) {
      throw corrupt(`${current.what} overlaps ${previous.what} (cluster ${current.start})`, {
        offset: current.start * layout.clusterSize,
      });
    }
  }
}
