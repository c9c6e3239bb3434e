/**
 * The qcow2 header (qcow2.txt "Header", "Header extensions"): one typed
 * struct, one decode/encode pair, and the validation that runs right after
 * decoding. Big-endian conversion happens here and nowhere else for the
 * header. Header extensions, including unknown ones, are kept byte-for-byte.
 */
import { corrupt, invariant, notQcow2 } from './fail.js';
import { Layout } from './layout.js';
import { QCOW_MAGIC } from '../qcow2-magic.js';

export const MIN_CLUSTER_BITS = 9;
/** QEMU cannot open images with clusters above 2 MiB. */
export const MAX_CLUSTER_BITS = 21;
export const V2_HEADER_LENGTH = 72;
/** v3 headers end at header_length (>= 104, a multiple of 8). */
export const V3_MIN_HEADER_LENGTH = 104;
/** Byte offset of compression_type, present when header_length > 104. */
const COMPRESSION_TYPE_OFFSET = 104;
/** QEMU refuses backing file names longer than this (qcow2.txt "backing_file_size"). */
export const MAX_BACKING_FILE_NAME_BYTES = 1023;

export const IncompatibleFeature = {
  DIRTY: 1n << 0n,
  CORRUPT: 1n << 1n,
  EXTERNAL_DATA_FILE: 1n << 2n,
  COMPRESSION_TYPE: 1n << 3n,
  EXTENDED_L2: 1n << 4n,
} as const;
/** Every incompatible bit qcow2.txt defines (bits 0-4); any other one is refused. */
export const KNOWN_INCOMPATIBLE = 0x1fn;

export const CompatibleFeature = { LAZY_REFCOUNTS: 1n << 0n } as const;
export const AutoclearFeature = { BITMAPS: 1n << 0n, RAW_EXTERNAL_DATA: 1n << 1n } as const;
/** Autoclear bits we keep when writing: our writes never touch guest data, so bitmaps stay consistent. */
export const KNOWN_AUTOCLEAR = AutoclearFeature.BITMAPS | AutoclearFeature.RAW_EXTERNAL_DATA;

export const CompressionType = { ZLIB: 0, ZSTD: 1 } as const;

export const HeaderExtensionType = {
  END: 0x00000000,
  BACKING_FORMAT: 0xe2792aca,
  FEATURE_NAME_TABLE: 0x6803f857,
  BITMAPS: 0x23852875,
  FULL_DISK_ENCRYPTION: 0x0537be77,
  EXTERNAL_DATA_FILE: 0x44415441,
} as const;

export interface HeaderExtension {
  type: number;
  /** The extension data without its padding, exactly as on disk. */
  data: Uint8Array;
}

/** The header fields, in on-disk order, units in the comments. */
export interface Qcow2Header {
  version: 2 | 3;
  /** Byte offset of the backing file name in cluster 0; 0 when there is none. */
  backingFileOffset: number;
  /** Length of the backing file name in bytes. */
  backingFileSize: number;
  /** log2(cluster size in bytes), 9..21. */
  clusterBits: number;
  /** Virtual disk size in bytes. */
  size: number;
  /** 0 none, 1 AES, 2 LUKS. */
  cryptMethod: number;
  /** Entries (8 bytes each) in the active L1 table. */
  l1Size: number;
  /** Byte offset of the active L1 table, cluster aligned. */
  l1TableOffset: number;
  /** Byte offset of the refcount table, cluster aligned. */
  refcountTableOffset: number;
  /** Clusters the refcount table occupies. */
  refcountTableClusters: number;
  /** Entries in the snapshot table. */
  nbSnapshots: number;
  /** Byte offset of the snapshot table, cluster aligned; 0 without snapshots. */
  snapshotsOffset: number;
  /** v3 only from here on; v2 reads them as 0 / 4 / 72. */
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  /** log2(refcount width in bits), 0..6. */
  refcountOrder: number;
  /** Bytes of the fixed header: 72 for v2, >= 104 for v3. */
  headerLength: number;
  /** 0 zlib, 1 zstd. */
  compressionType: number;
  /** Header bytes 105..headerLength (padding and future fields), kept verbatim. */
  trailingHeaderBytes: Uint8Array;
  extensions: HeaderExtension[];
  /** Backing file name bytes (not NUL terminated), when backingFileOffset != 0. */
  backingFileName: Uint8Array | undefined;
}

/** Bytes to read before anything else is known: the largest fixed header field set. */
export const HEADER_PROBE_BYTES = V3_MIN_HEADER_LENGTH;

function u64(buf: Buffer, offset: number, field: string): number {
  const value = buf.readBigUInt64BE(offset);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`${field} ${value} is beyond any file size`, { offset });
  return Number(value);
}

/**
 * Reads the cluster size from the first bytes so the caller can read all of
 * cluster 0 (header + extensions), bounded by MAX_CLUSTER_BITS.
 */
export function probeClusterBits(probe: Buffer): number {
  if (probe.length < 4 || probe.readUInt32BE(0) !== QCOW_MAGIC) {
    throw notQcow2(probe.length < 4 ? `it holds ${probe.length} bytes` : `its first bytes are not the qcow2 magic "QFI\\xfb"`);
  }
  if (probe.length < V2_HEADER_LENGTH) throw corrupt(`file is too short for a qcow2 header (${probe.length} bytes)`);
  const version = probe.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw corrupt(`version ${version} (only 2 and 3 exist)`, { offset: 4 });
  const clusterBits = probe.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw corrupt(`cluster_bits ${clusterBits} is outside ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS}`, { offset: 20 });
  }
  return clusterBits;
}

/** Decodes the fixed header and its extensions from `cluster0` (all of cluster 0, or the whole file if shorter). */
export function decodeHeader(cluster0: Buffer): Qcow2Header {
  const clusterBits = probeClusterBits(cluster0);
  const version = cluster0.readUInt32BE(4) as 2 | 3;
  const header = decodeFixedFields(cluster0, version, clusterBits);
  const extensionsEnd = Math.min(
    cluster0.length,
    header.backingFileOffset === 0 ? 2 ** clusterBits : header.backingFileOffset,
  );
  header.extensions = decodeExtensions(cluster0, header.headerLength, extensionsEnd);
  if (header.backingFileOffset !== 0) {
    const end = header.backingFileOffset + header.backingFileSize;
    if (header.backingFileSize > MAX_BACKING_FILE_NAME_BYTES || end > Math.min(cluster0.length, 2 ** clusterBits)) {
      throw corrupt(`backing file name (${header.backingFileSize} bytes at ${header.backingFileOffset}) is outside cluster 0`);
    }
    header.backingFileName = Uint8Array.prototype.slice.call(cluster0, header.backingFileOffset, end);
  }
  return header;
}

function decodeFixedFields(buf: Buffer, version: 2 | 3, clusterBits: number): Qcow2Header {
  const v3 = version === 3;
  if (v3 && buf.length < V3_MIN_HEADER_LENGTH) throw corrupt('v3 header is truncated');
  const headerLength = v3 ? buf.readUInt32BE(100) : V2_HEADER_LENGTH;
  if (v3 && (headerLength < V3_MIN_HEADER_LENGTH || headerLength % 8 !== 0 || headerLength > buf.length)) {
    throw corrupt(`header_length ${headerLength} must be >= 104, a multiple of 8 and inside cluster 0`, { offset: 100 });
  }
  return {
    version,
    backingFileOffset: u64(buf, 8, 'backing_file_offset'),
    backingFileSize: buf.readUInt32BE(16),
    clusterBits,
    size: u64(buf, 24, 'size'),
    cryptMethod: buf.readUInt32BE(32),
    l1Size: buf.readUInt32BE(36),
    l1TableOffset: u64(buf, 40, 'l1_table_offset'),
    refcountTableOffset: u64(buf, 48, 'refcount_table_offset'),
    refcountTableClusters: buf.readUInt32BE(56),
    nbSnapshots: buf.readUInt32BE(60),
    snapshotsOffset: u64(buf, 64, 'snapshots_offset'),
    incompatibleFeatures: v3 ? buf.readBigUInt64BE(72) : 0n,
    compatibleFeatures: v3 ? buf.readBigUInt64BE(80) : 0n,
    autoclearFeatures: v3 ? buf.readBigUInt64BE(88) : 0n,
    refcountOrder: v3 ? buf.readUInt32BE(96) : 4,
    headerLength,
    compressionType: headerLength > COMPRESSION_TYPE_OFFSET ? buf.readUInt8(COMPRESSION_TYPE_OFFSET) : 0,
    trailingHeaderBytes: headerLength > COMPRESSION_TYPE_OFFSET
      ? Uint8Array.prototype.slice.call(buf, COMPRESSION_TYPE_OFFSET + 1, headerLength)
      : new Uint8Array(0),
    extensions: [],
    backingFileName: undefined,
  };
}

function decodeExtensions(buf: Buffer, start: number, end: number): HeaderExtension[] {
  const extensions: HeaderExtension[] = [];
  let offset = start;
  for (;;) {
    if (offset + 8 > end) throw corrupt('header extension area runs past its end (no end marker)', { offset });
    const type = buf.readUInt32BE(offset);
    const length = buf.readUInt32BE(offset + 4);
    if (type === HeaderExtensionType.END) return extensions;
    const dataStart = offset + 8;
    if (length > end - dataStart) {
      throw corrupt(`header extension 0x${type.toString(16)} length ${length} overruns cluster 0`, { offset });
    }
    extensions.push({ type, data: Uint8Array.prototype.slice.call(buf, dataStart, dataStart + length) });
    offset = dataStart + Math.ceil(length / 8) * 8;
  }
}

/** Size in bytes of the encoded header plus extensions and end marker (backing name excluded). */
export function encodedHeaderLength(header: Qcow2Header): number {
  let length = header.headerLength + 8;
  for (const ext of header.extensions) length += 8 + Math.ceil(ext.data.length / 8) * 8;
  return length;
}

/**
 * Encodes header + extensions (+ backing name at its offset) into a buffer of
 * `clusterSize` bytes, ready to be written at offset 0.
 */
export function encodeHeader(header: Qcow2Header): Buffer {
  const clusterSize = 2 ** header.clusterBits;
  const used = encodedHeaderLength(header);
  invariant(used <= clusterSize, 'header and extensions fit in cluster 0');
  const buf = Buffer.alloc(clusterSize);
  encodeFixedFields(header, buf);
  let offset = header.headerLength;
  for (const ext of header.extensions) {
    buf.writeUInt32BE(ext.type, offset);
    buf.writeUInt32BE(ext.data.length, offset + 4);
    buf.set(ext.data, offset + 8);
    offset += 8 + Math.ceil(ext.data.length / 8) * 8;
  }
  offset += 8; // end marker: type 0, length 0 (already zero)
  if (header.backingFileName !== undefined) {
    invariant(header.backingFileOffset >= offset, 'backing file name follows the extensions');
    buf.set(header.backingFileName, header.backingFileOffset);
  }
  return buf;
}

function encodeFixedFields(header: Qcow2Header, buf: Buffer): void {
  buf.writeUInt32BE(QCOW_MAGIC, 0);
  buf.writeUInt32BE(header.version, 4);
  buf.writeBigUInt64BE(BigInt(header.backingFileOffset), 8);
  buf.writeUInt32BE(header.backingFileSize, 16);
  buf.writeUInt32BE(header.clusterBits, 20);
  buf.writeBigUInt64BE(BigInt(header.size), 24);
  buf.writeUInt32BE(header.cryptMethod, 32);
  buf.set(encodeMetadataPointers(header), HEADER_POINTERS_OFFSET);
  if (header.version === 2) {
    invariant(header.headerLength === V2_HEADER_LENGTH && header.refcountOrder === 4, 'v2 header shape');
    return;
  }
  buf.writeBigUInt64BE(header.incompatibleFeatures, 72);
  buf.writeBigUInt64BE(header.compatibleFeatures, 80);
  buf.writeBigUInt64BE(header.autoclearFeatures, 88);
  buf.writeUInt32BE(header.refcountOrder, 96);
  buf.writeUInt32BE(header.headerLength, 100);
  if (header.headerLength > COMPRESSION_TYPE_OFFSET) {
    buf.writeUInt8(header.compressionType, COMPRESSION_TYPE_OFFSET);
    buf.set(header.trailingHeaderBytes, COMPRESSION_TYPE_OFFSET + 1);
  }
}

/** Byte offset of l1_size, the first of the header fields a commit switches (qcow2.txt "Header"). */
export const HEADER_POINTERS_OFFSET = 36;
/** l1_size (4) + l1_table_offset (8) + refcount_table_offset (8) + refcount_table_clusters (4) + nb_snapshots (4) + snapshots_offset (8). */
export const HEADER_POINTERS_BYTES = 36;

/** The header fields a commit switches in one write (header bytes 36..72, shadow-commit.ts). */
export type MetadataPointers = Pick<
  Qcow2Header,
  'l1Size' | 'l1TableOffset' | 'refcountTableOffset' | 'refcountTableClusters' | 'nbSnapshots' | 'snapshotsOffset'
>;

export function encodeMetadataPointers(p: MetadataPointers): Buffer {
  const buf = Buffer.alloc(HEADER_POINTERS_BYTES);
  buf.writeUInt32BE(p.l1Size, 0);
  buf.writeBigUInt64BE(BigInt(p.l1TableOffset), 4);
  buf.writeBigUInt64BE(BigInt(p.refcountTableOffset), 12);
  buf.writeUInt32BE(p.refcountTableClusters, 20);
  buf.writeUInt32BE(p.nbSnapshots, 24);
  buf.writeBigUInt64BE(BigInt(p.snapshotsOffset), 28);
  return buf;
}

/** The Layout implied by a decoded header. */
export function layoutOf(header: Qcow2Header): Layout {
  return new Layout(header.clusterBits, header.refcountOrder);
}
