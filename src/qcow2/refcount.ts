/**
 * Refcount table and refcount blocks (qcow2.txt "Host cluster management"),
 * for every entry width from 1 to 64 bits.
 *
 * Changes are made in memory first and written by the caller in an explicit
 * order: fresh structures (new blocks, a grown table) go to never-referenced
 * clusters and must be durable before anything points at them; existing
 * blocks are then updated in place. See image-save.ts for the sequence.
 *
 * Allocation is append-only: while snapstream holds the image's write lock
 * nothing else allocates, so new clusters are taken from the cluster-aligned
 * end of the file (EndAllocator). Their refcounts must be 0 beforehand, which
 * is checked rather than assumed.
 */
import { corrupt, invariant, unsupported } from './fail.js';
import { readExact, type MetaFile } from './file.js';
import type { Layout } from './layout.js';

/** QEMU refuses refcount tables above 8 MiB (QCOW_MAX_REFTABLE_SIZE). */
export const QCOW_MAX_REFTABLE_SIZE_BYTES = 8 * 1024 * 1024;
/** Bits 0-8 of a refcount table entry are reserved. */
const REFTABLE_RESERVED_MASK = 0x1ffn;

/** Hands out contiguous clusters from the end of the file. */
export class EndAllocator {
  /** First byte handed out (cluster aligned). */
  readonly startOffset: number;
  private _endOffset: number;
  private readonly _layout: Layout;

  constructor(startOffset: number, layout: Layout) {
    invariant(layout.isAligned(startOffset), 'allocation starts on a cluster boundary');
    this.startOffset = startOffset;
    this._endOffset = startOffset;
    this._layout = layout;
  }

  get endOffset(): number {
    return this._endOffset;
  }

  /** Reserves `clusters` contiguous clusters and returns the first one's offset. */
  allocClusters(clusters: number): number {
    invariant(Number.isInteger(clusters) && clusters >= 0, 'cluster count');
    const offset = this._endOffset;
    this._endOffset += clusters * this._layout.clusterSize;
    return offset;
  }

  allocBytes(bytes: number): number {
    return this.allocClusters(this._layout.clustersFor(bytes));
  }
}

/** Reads refcount entry `index` of a block of any width. */
export function getRefcountEntry(block: Buffer, index: number, order: number): number {
  switch (order) {
    case 4:
      return block.readUInt16BE(index * 2);
    case 3:
      return block[index]!;
    case 5:
      return block.readUInt32BE(index * 4);
    case 6: {
      const value = block.readBigUInt64BE(index * 8);
      if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`refcount ${value} is absurd`);
      return Number(value);
    }
    default: {
      const bits = 2 ** order; // 1, 2 or 4 bits; bit 0 is the least significant (qcow2.txt)
      const bitIndex = index * bits;
      return (block[bitIndex >> 3]! >> (bitIndex & 7)) & (2 ** bits - 1);
    }
  }
}

export function setRefcountEntry(block: Buffer, index: number, order: number, value: number): void {
  switch (order) {
    case 4:
      block.writeUInt16BE(value, index * 2);
      return;
    case 3:
      block[index] = value;
      return;
    case 5:
      block.writeUInt32BE(value, index * 4);
      return;
    case 6:
      block.writeBigUInt64BE(BigInt(value), index * 8);
      return;
    default: {
      const bits = 2 ** order;
      const bitIndex = index * bits;
      const mask = (2 ** bits - 1) << (bitIndex & 7);
      const byte = bitIndex >> 3;
      block[byte] = (block[byte]! & ~mask) | ((value << (bitIndex & 7)) & mask);
    }
  }
}

export class RefcountStore {
  readonly layout: Layout;
  /** Block host offsets by table index; 0 = no block. Includes blocks created in this transaction. */
  private _table: number[];
  private _tableOffset: number;
  private _tableClusters: number;
  private readonly _blocks = new Map<number, Buffer>();
  /** Existing blocks changed in memory, to be written in place. */
  private readonly _dirtyBlocks = new Set<number>();
  /** Blocks created in this transaction (table index), written to fresh clusters. */
  private readonly _newBlocks = new Set<number>();
  /** A grown table waiting to be written and switched to, if any. */
  private _pendingTable: { offset: number; clusters: number } | undefined;
  private readonly _file: MetaFile;

  private constructor(file: MetaFile, layout: Layout, table: number[], offset: number, clusters: number) {
    this._file = file;
    this.layout = layout;
    this._table = table;
    this._tableOffset = offset;
    this._tableClusters = clusters;
  }

  /** Reads and validates the refcount table (its offset and size were validated with the header). */
  static async load(
    file: MetaFile,
    layout: Layout,
    tableOffset: number,
    tableClusters: number,
    fileSizeBytes: number,
  ): Promise<RefcountStore> {
    const bytes = await readPadded(file, tableOffset, tableClusters * layout.clusterSize, fileSizeBytes);
    const table: number[] = [];
    for (let i = 0; i < bytes.length / 8; i++) {
      const raw = bytes.readBigUInt64BE(i * 8);
      if ((raw & REFTABLE_RESERVED_MASK) !== 0n) throw corrupt(`refcount table entry ${i} has reserved bits set`);
      const offset = Number(raw);
      if (offset !== 0 && offset + layout.clusterSize > layout.alignUp(fileSizeBytes)) {
        throw corrupt(`refcount block ${i} at ${offset} is past the end of the file`, { offset });
      }
      table.push(offset);
    }
    return new RefcountStore(file, layout, table, tableOffset, tableClusters);
  }

  get tableOffset(): number {
    return this._tableOffset;
  }

  get tableClusters(): number {
    return this._tableClusters;
  }

  /** Host offsets of all refcount blocks (for check and overlap tests). */
  blockOffsets(): number[] {
    return this._table.filter((offset) => offset !== 0);
  }

  /** Entries the table can hold (the grown one, if a growth is pending). */
  get tableCapacity(): number {
    return ((this._pendingTable?.clusters ?? this._tableClusters) * this.layout.clusterSize) / 8;
  }

  blockIndexOf(cluster: number): number {
    return Math.floor(cluster / this.layout.refblockEntries);
  }

  /** Loads the blocks covering `clusters` so that get/add can run synchronously. */
  async preload(clusters: Iterable<number>): Promise<void> {
    const wanted = new Set<number>();
    for (const cluster of clusters) wanted.add(this.blockIndexOf(cluster));
    for (const index of wanted) await this.loadBlock(index);
  }

  async preloadRange(firstCluster: number, endCluster: number): Promise<void> {
    if (endCluster <= firstCluster) return;
    for (let index = this.blockIndexOf(firstCluster); index <= this.blockIndexOf(endCluster - 1); index++) {
      await this.loadBlock(index);
    }
  }

  private async loadBlock(index: number): Promise<void> {
    if (this._blocks.has(index)) return;
    const offset = this._table[index] ?? 0;
    if (offset === 0) return;
    this._blocks.set(index, await readExact(this._file, offset, this.layout.clusterSize, `refcount block ${index}`));
  }

  /** Refcount of `cluster`; its block must have been preloaded. */
  get(cluster: number): number {
    const index = this.blockIndexOf(cluster);
    const offset = this._table[index] ?? 0;
    if (offset === 0) return 0;
    const block = this._blocks.get(index);
    invariant(block !== undefined, `refcount block ${index} preloaded`);
    return getRefcountEntry(block, cluster % this.layout.refblockEntries, this.layout.refcountOrder);
  }

  async getAsync(cluster: number): Promise<number> {
    await this.loadBlock(this.blockIndexOf(cluster));
    return this.get(cluster);
  }

  /** Adds `delta` to a cluster's refcount in memory and returns the new value. */
  add(cluster: number, delta: number): number {
    const index = this.blockIndexOf(cluster);
    const block = this._blocks.get(index);
    if (block === undefined) {
      throw corrupt(`cluster ${cluster} is referenced but has no refcount block`, {
        offset: cluster * this.layout.clusterSize,
      });
    }
    const entry = cluster % this.layout.refblockEntries;
    const value = getRefcountEntry(block, entry, this.layout.refcountOrder) + delta;
    if (value < 0) {
      throw corrupt(`refcount of cluster ${cluster} would drop below 0`, { offset: cluster * this.layout.clusterSize });
    }
    if (value > this.layout.refcountMax) {
      throw unsupported(
        `refcount of cluster ${cluster} would exceed ${this.layout.refcountMax} (${this.layout.refcountBits}-bit ` +
          'refcounts); widen them with `qemu-img amend -o refcount_bits=16`',
      );
    }
    setRefcountEntry(block, entry, this.layout.refcountOrder, value);
    if (!this._newBlocks.has(index)) this._dirtyBlocks.add(index);
    return value;
  }

  /**
   * Gives every cluster in [alloc.startOffset, alloc.endOffset) refcount 1,
   * creating refcount blocks (and, when the table is full, a larger table)
   * from the same allocator until everything covers itself. In memory only.
   */
  async coverAllocation(alloc: EndAllocator): Promise<void> {
    const firstCluster = this.layout.clusterIndex(alloc.startOffset);
    for (let round = 0; ; round++) {
      invariant(round < 64, 'refcount structure allocation converges');
      const endCluster = this.layout.clusterIndex(alloc.endOffset);
      if (endCluster === firstCluster) return;
      await this.preloadRange(firstCluster, endCluster);
      const lastIndex = this.blockIndexOf(endCluster - 1);
      if (lastIndex >= this.tableCapacity) {
        this.growTable(alloc, lastIndex);
        continue;
      }
      let created = false;
      for (let index = this.blockIndexOf(firstCluster); index <= lastIndex; index++) {
        if ((this._table[index] ?? 0) !== 0) continue;
        this._table[index] = alloc.allocClusters(1);
        this._blocks.set(index, Buffer.alloc(this.layout.clusterSize));
        this._newBlocks.add(index);
        created = true;
      }
      if (!created) break;
    }
    const endCluster = this.layout.clusterIndex(alloc.endOffset);
    for (let cluster = firstCluster; cluster < endCluster; cluster++) {
      if (this.get(cluster) !== 0) {
        throw corrupt(`cluster ${cluster} past the allocated end already has refcount ${this.get(cluster)}`, {
          offset: cluster * this.layout.clusterSize,
        });
      }
      this.add(cluster, 1);
    }
  }

  private growTable(alloc: EndAllocator, lastIndex: number): void {
    // A second growth would leak the first new table; the headroom below makes it unreachable.
    invariant(this._pendingTable === undefined, 'the refcount table grows at most once per transaction');
    const entriesPerCluster = this.layout.clusterSize / 8;
    // Headroom: room for the table itself and its blocks, plus 50 % so growth stays rare.
    const wantedEntries = Math.ceil((lastIndex + 2) * 1.5);
    const clusters = Math.ceil(wantedEntries / entriesPerCluster);
    if (clusters * this.layout.clusterSize > QCOW_MAX_REFTABLE_SIZE_BYTES) {
      throw unsupported("the refcount table would grow beyond QEMU's 8 MiB limit");
    }
    this._pendingTable = { offset: alloc.allocClusters(clusters), clusters };
  }

  /** The grown table that the header must be switched to, if any. */
  get pendingTable(): { offset: number; clusters: number } | undefined {
    return this._pendingTable;
  }

  /**
   * Writes structures that live in fresh clusters: new blocks and a grown
   * table. Nothing on disk references them yet, so no ordering is needed
   * among these writes; the caller syncs before referencing them.
   */
  async writeFreshStructures(): Promise<void> {
    for (const index of this._newBlocks) {
      await this._file.write(this._blocks.get(index)!, this._table[index]!);
    }
    if (this._pendingTable !== undefined) {
      await this._file.write(this.encodeTable(this._pendingTable.clusters), this._pendingTable.offset);
    }
  }

  /**
   * Writes modified existing blocks in place and, while the on-disk table is
   * still the current one, the entries for new blocks. New blocks must be
   * durable already (writeFreshStructures + fdatasync).
   */
  async writeInPlace(): Promise<void> {
    for (const index of [...this._dirtyBlocks].sort((a, b) => a - b)) {
      await this._file.write(this._blocks.get(index)!, this._table[index]!);
    }
    this._dirtyBlocks.clear();
    if (this._pendingTable !== undefined) return; // the grown table already holds them
    for (const index of this._newBlocks) {
      const entry = Buffer.alloc(8);
      entry.writeBigUInt64BE(BigInt(this._table[index]!));
      await this._file.write(entry, this._tableOffset + index * 8);
    }
    this._newBlocks.clear();
  }

  /**
   * Call once the header points at the grown table: the old table's clusters
   * lose their reference (in memory; written by the next writeInPlace).
   */
  async completeTableSwitch(): Promise<void> {
    const pending = this._pendingTable;
    invariant(pending !== undefined, 'a table switch happened');
    const first = this.layout.clusterIndex(this._tableOffset);
    const oldClusters = this._tableClusters;
    this._tableOffset = pending.offset;
    this._tableClusters = pending.clusters;
    this._pendingTable = undefined;
    this._newBlocks.clear();
    await this.preloadRange(first, first + oldClusters);
    for (let i = 0; i < oldClusters; i++) this.add(first + i, -1);
  }

  /** Frees (refcount -1) every cluster touched by [offset, offset + lengthBytes). */
  async release(offset: number, lengthBytes: number): Promise<void> {
    if (lengthBytes <= 0) return;
    const first = this.layout.clusterIndex(offset);
    const end = this.layout.clusterIndex(offset + lengthBytes - 1) + 1;
    await this.preloadRange(first, end);
    for (let cluster = first; cluster < end; cluster++) this.add(cluster, -1);
  }

  /**
   * End of the allocated area: just past the last cluster with a non-zero
   * refcount. Anything after it is free by definition, including the tail of
   * a save that crashed while streaming its vmstate, so that space is reused
   * instead of piling up. (The caller has verified that no referenced cluster
   * has refcount 0.)
   */
  async allocationEnd(): Promise<number> {
    for (let index = this._table.length - 1; index >= 0; index--) {
      if ((this._table[index] ?? 0) === 0) continue;
      await this.loadBlock(index);
      const base = index * this.layout.refblockEntries;
      for (let entry = this.layout.refblockEntries - 1; entry >= 0; entry--) {
        if (this.get(base + entry) !== 0) return (base + entry + 1) * this.layout.clusterSize;
      }
    }
    throw corrupt('no cluster has a non-zero refcount (not even the header)');
  }

  private encodeTable(clusters: number): Buffer {
    const bytes = Buffer.alloc(clusters * this.layout.clusterSize);
    this._table.forEach((offset, i) => bytes.writeBigUInt64BE(BigInt(offset), i * 8));
    return bytes;
  }
}

/**
 * Reads a table that may end in the file's last, partially written cluster;
 * bytes past the end of the file read as zero. `length` is validated already.
 */
export async function readPadded(file: MetaFile, offset: number, length: number, fileSizeBytes: number): Promise<Buffer> {
  const buffer = Buffer.alloc(length);
  const available = Math.max(0, Math.min(length, fileSizeBytes - offset));
  if (available > 0) buffer.set(await readExact(file, offset, available, 'metadata table'), 0);
  return buffer;
}
