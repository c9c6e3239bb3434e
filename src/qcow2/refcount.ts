/**
 * Refcount table and refcount blocks (qcow2.txt "Host cluster management"),
 * for every entry width from 1 to 64 bits.
 *
 * Changes are made in memory only. A block that changes is never rewritten
 * in place: relocate() moves it to a fresh cluster and builds a fresh table,
 * which the header switches to in one write (shadow-commit.ts).
 *
 * New clusters come from a ClusterAllocator (allocator.ts): free runs of the
 * committed refcounts first, then the end of the file. Their refcounts must
 * be 0 beforehand, which is checked rather than assumed.
 */
import { corrupt, invariant, unsupported } from './fail.js';
import { readExact, type MetaFile } from './file.js';
import type { ClusterAllocator } from './allocator.js';
import type { Layout } from './layout.js';

/** QEMU refuses refcount tables above 8 MiB (QCOW_MAX_REFTABLE_SIZE). */
export const QCOW_MAX_REFTABLE_SIZE_BYTES = 8 * 1024 * 1024;
/** Bits 0-8 of a refcount table entry are reserved. */
const REFTABLE_RESERVED_MASK = 0x1ffn;

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

/** Where relocate() put the fresh refcount table. */
export interface ShadowTable {
  offset: number;
  clusters: number;
}

export class RefcountStore {
  readonly layout: Layout;
  /** Block host offsets by table index; 0 = no block. Includes blocks created in this transaction. */
  private _table: number[];
  private _tableOffset: number;
  private _tableClusters: number;
  private readonly _blocks = new Map<number, Buffer>();
  /** Blocks (table index) changed in memory or created: each moves to a fresh cluster. */
  private readonly _dirty = new Set<number>();
  /** Dirty blocks already given their fresh cluster (this._table holds the new offset). */
  private readonly _relocated = new Set<number>();
  /** The fresh table planned by relocate(). */
  private _shadow: ShadowTable | undefined;
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
    const block = this._blocks.get(index);
    if (block === undefined) {
      invariant((this._table[index] ?? 0) === 0, `refcount block ${index} preloaded`);
      return 0;
    }
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
    this._dirty.add(index);
    return value;
  }

  /**
   * Moves every changed refcount block to a fresh cluster and builds a fresh
   * refcount table, in memory (shadow paging; see shadow-commit.ts). On return:
   *
   *   - every cluster the allocator handed out in this transaction has
   *     refcount 1, except the clusters of a table that had to be re-sized
   *     (0, free);
   *   - every block that differs from its on-disk copy has a new cluster, and
   *     its old cluster, which only the old table referenced, has refcount 0;
   *   - the old table's clusters have refcount 0.
   *
   * New blocks and the new table need refcounts themselves, so this iterates
   * to a fixpoint. Nothing on disk changes; `freshWrites()` lists the writes.
   */
  async relocate(alloc: ClusterAllocator): Promise<ShadowTable> {
    invariant(this._shadow === undefined, 'relocate runs once per transaction');
    const layout = this.layout;
    const oldTableFirst = layout.clusterIndex(this._tableOffset);
    await this.preloadRange(oldTableFirst, oldTableFirst + this._tableClusters);
    for (let i = 0; i < this._tableClusters; i++) this.add(oldTableFirst + i, -1);
    let counted = 0; // runs of alloc already given refcount 1
    let table: ShadowTable | undefined;
    for (let round = 0; ; round++) {
      invariant(round < 64, 'refcount structure allocation converges');
      for (const run of alloc.takenSince(counted)) await this.coverRange(run.first, run.first + run.count);
      counted = alloc.takenCount;
      let progress = await this.relocateDirtyBlocks(alloc);
      const neededEntries = this.lastBlockIndex() + 1;
      if (table === undefined || neededEntries > (table.clusters * layout.clusterSize) / 8) {
        // A table sized too small in an earlier round goes back to free (refcount 0, referenced by nothing).
        if (table !== undefined) await this.releaseClusters(layout.clusterIndex(table.offset), table.clusters);
        const clusters = this.tableClustersFor(neededEntries);
        table = { offset: alloc.allocClusters(clusters), clusters };
        progress = true;
      }
      if (!progress && alloc.takenCount === counted) break;
    }
    this._shadow = table;
    return table;
  }

  /** Blocks whose clusters [first, end) need, created empty; then refcount 1 for each of those clusters. */
  private async coverRange(first: number, end: number): Promise<void> {
    if (end <= first) return;
    await this.preloadRange(first, end);
    for (let index = this.blockIndexOf(first); index <= this.blockIndexOf(end - 1); index++) {
      if ((this._table[index] ?? 0) !== 0 || this._blocks.has(index)) continue;
      this._blocks.set(index, Buffer.alloc(this.layout.clusterSize));
      this._dirty.add(index);
    }
    for (let cluster = first; cluster < end; cluster++) {
      if (this.get(cluster) !== 0) {
        throw corrupt(`cluster ${cluster}, handed out as free, already has refcount ${this.get(cluster)}`, {
          offset: cluster * this.layout.clusterSize,
        });
      }
      this.add(cluster, 1);
    }
  }

  /** Gives each changed, not yet moved block a fresh cluster and frees its old one. Returns whether any moved. */
  private async relocateDirtyBlocks(alloc: ClusterAllocator): Promise<boolean> {
    let moved = false;
    for (const index of [...this._dirty].sort((a, b) => a - b)) {
      if (this._relocated.has(index)) continue;
      const oldOffset = this._table[index] ?? 0;
      this._relocated.add(index);
      while (this._table.length <= index) this._table.push(0);
      this._table[index] = alloc.allocClusters(1);
      moved = true;
      if (oldOffset !== 0) await this.releaseClusters(this.layout.clusterIndex(oldOffset), 1);
    }
    return moved;
  }

  /** Refcount -1 for every cluster touched by [offset, offset + lengthBytes): a structure nothing will reference. */
  async release(offset: number, lengthBytes: number): Promise<void> {
    if (lengthBytes <= 0) return;
    const first = this.layout.clusterIndex(offset);
    await this.releaseClusters(first, this.layout.clusterIndex(offset + lengthBytes - 1) + 1 - first);
  }

  private async releaseClusters(first: number, count: number): Promise<void> {
    await this.preloadRange(first, first + count);
    for (let i = 0; i < count; i++) this.add(first + i, -1);
  }

  private lastBlockIndex(): number {
    let last = this._table.length - 1;
    while (last >= 0 && (this._table[last] ?? 0) === 0) last--;
    for (const index of this._blocks.keys()) last = Math.max(last, index);
    return last;
  }

  /** The old size while it suffices; otherwise 50 % headroom so that growth stays rare. */
  private tableClustersFor(neededEntries: number): number {
    const entriesPerCluster = this.layout.clusterSize / 8;
    if (neededEntries <= this._tableClusters * entriesPerCluster) return this._tableClusters;
    const clusters = Math.ceil(Math.ceil((neededEntries + 1) * 1.5) / entriesPerCluster);
    if (clusters * this.layout.clusterSize > QCOW_MAX_REFTABLE_SIZE_BYTES) {
      throw unsupported("the refcount table would grow beyond QEMU's 8 MiB limit");
    }
    return clusters;
  }

  /**
   * The writes relocate() planned: every moved block at its new cluster and
   * the new table. All go to clusters nothing on disk references yet, so
   * their order does not matter; the caller syncs before the header switch.
   */
  freshWrites(): Array<{ offset: number; bytes: Buffer }> {
    const table = this._shadow;
    invariant(table !== undefined, 'relocate() ran');
    const writes = [...this._relocated].sort((a, b) => a - b).map((index) => ({
      offset: this._table[index]!,
      bytes: this._blocks.get(index)!,
    }));
    invariant(this.lastBlockIndex() < (table.clusters * this.layout.clusterSize) / 8, 'the new table holds every block');
    writes.push({ offset: table.offset, bytes: this.encodeTable(table.clusters) });
    return writes;
  }

  /** Number of refcount blocks in the table (reservation bounds). */
  get blockCount(): number {
    return this.blockOffsets().length;
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
