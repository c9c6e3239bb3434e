/**
 * L1 and L2 tables (qcow2.txt "Cluster mapping"): guest cluster -> host
 * cluster. Tables stay in their on-disk big-endian bytes; the helpers below
 * decode one entry at a time by index, so scanning a large image allocates
 * nothing per entry. Each entry is read as two 32-bit halves so that offsets
 * stay exact JavaScript numbers without BigInt.
 *
 * Every accessor that returns an offset rejects reserved bits and misaligned
 * offsets; `classifyL2` reports problems without throwing, for check().
 */
import { corrupt } from './fail.js';
import { COMPRESSED_SECTOR_BYTES, type Layout } from './layout.js';

/** QEMU refuses L1 tables above 32 MiB (QCOW_MAX_L1_SIZE). */
export const QCOW_MAX_L1_SIZE_BYTES = 32 * 1024 * 1024;

const HI_COPIED = 0x80000000; // bit 63
const HI_COMPRESSED = 0x40000000; // bit 62
const LO_ZERO = 0x1; // bit 0 (standard L2 descriptor)
/** Bits 9..55 hold the offset: the low 24 bits of the high word and bits 9..31 of the low word. */
const HI_OFFSET_MASK = 0x00ffffff;
const LO_OFFSET_MASK = 0xfffffe00;
/** L1: bits 0-8 and 56-62 are reserved. */
const L1_LO_RESERVED = 0x1ff;
const L1_HI_RESERVED = 0x7f000000;
/** Standard L2: bits 1-8 and 56-61 are reserved. */
const L2_LO_RESERVED = 0x1fe;
const L2_HI_RESERVED = 0x3f000000;
const TWO_32 = 2 ** 32;

export type ClusterKind = 'unallocated' | 'zero-plain' | 'zero-alloc' | 'normal' | 'compressed';

/** One L2 entry, decoded without throwing. */
export interface L2Classification {
  kind: ClusterKind | 'invalid';
  /** What the entry would be without its problem (check() still counts its clusters, like QEMU). */
  baseKind: ClusterKind;
  /** Host offset for normal / zero-alloc; start of compressed data for compressed. */
  hostOffset: number;
  /** Bytes of compressed data counted from hostOffset (compressed only). */
  compressedBytes: number;
  copied: boolean;
  /** Why the entry is invalid. */
  problem?: string;
}

function offsetOf(hi: number, lo: number): number {
  return (hi & HI_OFFSET_MASK) * TWO_32 + ((lo & LO_OFFSET_MASK) >>> 0);
}

function encodeEntry(buf: Uint8Array, index: number, offset: number, hiFlags: number, loFlags: number): void {
  const view = new DataView(buf.buffer, buf.byteOffset + index * 8, 8);
  view.setUint32(0, (Math.floor(offset / TWO_32) | hiFlags) >>> 0);
  view.setUint32(4, ((offset % TWO_32) | loFlags) >>> 0);
}

/** The active or a snapshot L1 table, in on-disk bytes. */
export class L1Table {
  readonly bytes: Buffer;
  readonly entries: number;
  private readonly _layout: Layout;

  constructor(bytes: Buffer, layout: Layout) {
    if (bytes.length % 8 !== 0) throw corrupt(`L1 table length ${bytes.length} is not a multiple of 8`);
    this.bytes = bytes;
    this.entries = bytes.length / 8;
    this._layout = layout;
  }

  static empty(entries: number, layout: Layout): L1Table {
    return new L1Table(Buffer.alloc(entries * 8), layout);
  }

  private hi(i: number): number {
    return this.bytes.readUInt32BE(i * 8);
  }

  private lo(i: number): number {
    return this.bytes.readUInt32BE(i * 8 + 4);
  }

  /** Raw 64-bit entry, for copying verbatim. */
  raw(i: number): bigint {
    return this.bytes.readBigUInt64BE(i * 8);
  }

  /** Host offset of the L2 table, or 0 when unallocated. Throws on reserved bits or misalignment. */
  l2Offset(i: number): number {
    const problem = this.problem(i);
    if (problem !== undefined) throw corrupt(`L1 entry ${i}: ${problem}`);
    return offsetOf(this.hi(i), this.lo(i));
  }

  /** What is wrong with entry `i`, or undefined. */
  problem(i: number): string | undefined {
    const hi = this.hi(i);
    const lo = this.lo(i);
    if ((lo & L1_LO_RESERVED) !== 0 || (hi & L1_HI_RESERVED) !== 0) return 'reserved bits set';
    const offset = offsetOf(hi, lo);
    if (!this._layout.isAligned(offset)) return `L2 table offset ${offset} is not cluster aligned`;
    return undefined;
  }

  /** Bits 9-55 without validation (check() wants the value even when flags are bad). */
  rawOffset(i: number): number {
    return offsetOf(this.hi(i), this.lo(i));
  }

  isCopied(i: number): boolean {
    return (this.hi(i) & HI_COPIED) !== 0;
  }

  set(i: number, l2Offset: number, copied: boolean): void {
    if (!this._layout.isAligned(l2Offset)) throw corrupt(`refusing to store unaligned L2 offset ${l2Offset}`);
    encodeEntry(this.bytes, i, l2Offset, copied ? HI_COPIED : 0, 0);
  }

  setCopied(i: number, copied: boolean): boolean {
    const hi = this.hi(i);
    const next = copied ? (hi | HI_COPIED) >>> 0 : hi & ~HI_COPIED;
    if (next === hi) return false;
    this.bytes.writeUInt32BE(next >>> 0, i * 8);
    return true;
  }
}

/** One L2 table (one cluster) in on-disk bytes. */
export class L2Table {
  readonly bytes: Buffer;
  readonly hostOffset: number;
  private readonly _layout: Layout;

  constructor(bytes: Buffer, hostOffset: number, layout: Layout) {
    if (bytes.length !== layout.clusterSize) throw corrupt(`L2 table at ${hostOffset} is not one cluster`);
    this.bytes = bytes;
    this.hostOffset = hostOffset;
    this._layout = layout;
  }

  static empty(hostOffset: number, layout: Layout): L2Table {
    return new L2Table(Buffer.alloc(layout.clusterSize), hostOffset, layout);
  }

  get entries(): number {
    return this._layout.l2Entries;
  }

  /** True for an all-zero entry (unallocated): the common case, checked without decoding. */
  isUnallocated(i: number): boolean {
    return this.bytes.readUInt32BE(i * 8) === 0 && this.bytes.readUInt32BE(i * 8 + 4) === 0;
  }

  /** Decodes entry `i` without throwing; see L2Classification. */
  classify(i: number): L2Classification {
    const hi = this.bytes.readUInt32BE(i * 8);
    const lo = this.bytes.readUInt32BE(i * 8 + 4);
    const copied = (hi & HI_COPIED) !== 0;
    if ((hi & HI_COMPRESSED) !== 0) return this.classifyCompressed(hi, lo, copied);
    const hostOffset = offsetOf(hi, lo);
    const zero = (lo & LO_ZERO) !== 0;
    const kind: ClusterKind = hostOffset === 0 ? (zero ? 'zero-plain' : 'unallocated') : zero ? 'zero-alloc' : 'normal';
    let problem: string | undefined;
    if ((lo & L2_LO_RESERVED) !== 0 || (hi & L2_HI_RESERVED) !== 0) problem = 'reserved bits set';
    else if (!this._layout.isAligned(hostOffset)) problem = `cluster offset ${hostOffset} is not cluster aligned`;
    if (problem !== undefined) return { kind: 'invalid', baseKind: kind, hostOffset, compressedBytes: 0, copied, problem };
    return { kind, baseKind: kind, hostOffset, compressedBytes: 0, copied };
  }

  /**
   * Compressed descriptor (x = 62 - (cluster_bits - 8)): bits 0..x-1 host
   * offset, bits x..61 additional 512-byte sectors. The data ends at the end
   * of its last sector, counted from the sector holding the first byte,
   * exactly as qcow2_parse_compressed_l2_entry() computes it.
   */
  private classifyCompressed(hi: number, lo: number, copied: boolean): L2Classification {
    const descriptorHi = hi & 0x3fffffff;
    const offsetHiBits = this._layout.csizeShift - 32;
    const offsetHi = descriptorHi & (2 ** offsetHiBits - 1);
    const extraSectors = (descriptorHi >>> offsetHiBits) & this._layout.csizeMask;
    if (offsetHi >= 2 ** 21) {
      const problem = 'compressed offset beyond 2^53';
      return { kind: 'invalid', baseKind: 'unallocated', hostOffset: 0, compressedBytes: 0, copied, problem };
    }
    const hostOffset = offsetHi * TWO_32 + lo;
    const compressedBytes = (extraSectors + 1) * COMPRESSED_SECTOR_BYTES - (hostOffset % COMPRESSED_SECTOR_BYTES);
    if (copied) {
      const problem = 'COPIED flag set on a compressed cluster';
      return { kind: 'invalid', baseKind: 'compressed', hostOffset, compressedBytes, copied, problem };
    }
    return { kind: 'compressed', baseKind: 'compressed', hostOffset, compressedBytes, copied };
  }

  /** classify() that throws QCOW2_CORRUPT for invalid entries. */
  entry(i: number): L2Classification {
    const c = this.classify(i);
    if (c.kind === 'invalid') throw corrupt(`L2 table at ${this.hostOffset}, entry ${i}: ${c.problem}`);
    return c;
  }

  /** Stores a standard (uncompressed) descriptor. */
  setStandard(i: number, hostOffset: number, flags: { copied: boolean; zero?: boolean }): void {
    if (!this._layout.isAligned(hostOffset)) throw corrupt(`refusing to store unaligned cluster offset ${hostOffset}`);
    encodeEntry(this.bytes, i, hostOffset, flags.copied ? HI_COPIED : 0, flags.zero === true ? LO_ZERO : 0);
  }

  /** Sets or clears COPIED on a standard entry; returns whether the bytes changed. */
  setCopied(i: number, copied: boolean): boolean {
    const hi = this.bytes.readUInt32BE(i * 8);
    if ((hi & HI_COMPRESSED) !== 0) return false;
    const next = copied ? (hi | HI_COPIED) >>> 0 : hi & ~HI_COPIED;
    if (next === hi) return false;
    this.bytes.writeUInt32BE(next >>> 0, i * 8);
    return true;
  }
}

/** Host clusters (indices) touched by a compressed cluster's data; may be more than one. */
export function compressedClusterSpan(c: L2Classification, layout: Layout): { first: number; last: number } {
  return {
    first: layout.clusterIndex(c.hostOffset),
    last: layout.clusterIndex(c.hostOffset + c.compressedBytes - 1),
  };
}
