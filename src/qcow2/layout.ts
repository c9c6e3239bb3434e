/**
 * Sizes derived from the header: how many entries an L2 table or a refcount
 * block holds, how much guest space an L2 table covers, and where the vmstate
 * area begins. Everything here is a power of two, so the arithmetic on
 * JavaScript numbers stays exact below 2^53 bytes.
 */
import { invariant } from './fail.js';

/** Compressed clusters are addressed in 512-byte sectors (qcow2.txt "Compressed Clusters Descriptor"). */
export const COMPRESSED_SECTOR_BYTES = 512;

export class Layout {
  /** log2 of the cluster size. */
  readonly clusterBits: number;
  readonly clusterSize: number;
  /** Entries per L2 table (8 bytes each; extended L2 is refused at open). */
  readonly l2Entries: number;
  /** Guest bytes one L2 table maps. 64 KiB clusters: 512 MiB. */
  readonly l2CoverageBytes: number;
  /** log2 of the refcount width in bits (0..6). */
  readonly refcountOrder: number;
  readonly refcountBits: number;
  /** Largest refcount an entry can hold (2^bits - 1, capped at 2^53 - 1). */
  readonly refcountMax: number;
  /** Entries per refcount block. */
  readonly refblockEntries: number;
  /** Bit where the sector count of a compressed descriptor starts: 62 - (cluster_bits - 8). */
  readonly csizeShift: number;
  /** Mask for that sector count. */
  readonly csizeMask: number;

  constructor(clusterBits: number, refcountOrder: number) {
    invariant(clusterBits >= 9 && clusterBits <= 21, `cluster_bits ${clusterBits}`);
    invariant(refcountOrder >= 0 && refcountOrder <= 6, `refcount_order ${refcountOrder}`);
    this.clusterBits = clusterBits;
    this.clusterSize = 2 ** clusterBits;
    this.l2Entries = this.clusterSize / 8;
    this.l2CoverageBytes = this.clusterSize * this.l2Entries;
    this.refcountOrder = refcountOrder;
    this.refcountBits = 2 ** refcountOrder;
    this.refcountMax = refcountOrder === 6 ? Number.MAX_SAFE_INTEGER : 2 ** this.refcountBits - 1;
    this.refblockEntries = (this.clusterSize * 8) / this.refcountBits;
    this.csizeShift = 62 - (clusterBits - 8);
    this.csizeMask = 2 ** (clusterBits - 8) - 1;
  }

  /** Clusters needed to hold `bytes`. */
  clustersFor(bytes: number): number {
    return Math.ceil(bytes / this.clusterSize);
  }

  /** Index of the cluster containing byte `offset`. */
  clusterIndex(offset: number): number {
    return Math.floor(offset / this.clusterSize);
  }

  alignUp(offset: number): number {
    return this.clustersFor(offset) * this.clusterSize;
  }

  isAligned(offset: number): boolean {
    return offset % this.clusterSize === 0;
  }

  /** L1 entries needed to map a disk of `virtualSizeBytes`. */
  l1EntriesFor(virtualSizeBytes: number): number {
    return Math.ceil(virtualSizeBytes / this.l2CoverageBytes);
  }

  /**
   * First L1 index of the vmstate area: the vmstate starts at guest offset
   * ceil(virtual_size / L2 coverage) * L2 coverage (QEMU's qcow2_vm_state_offset).
   */
  vmStateL1Index(virtualSizeBytes: number): number {
    return this.l1EntriesFor(virtualSizeBytes);
  }
}
