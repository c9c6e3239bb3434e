/**
 * The commit shared by save and delete: shadow paging with one atomic header
 * write. No live metadata cluster is modified before the commit point:
 *
 *   1. every changed structure (active L2 tables whose COPIED bits change,
 *      the active L1, refcount blocks, the refcount table, the snapshot
 *      table) is written as a fresh copy into clusters past the allocated
 *      end, which the old metadata neither references nor counts;
 *   2. fdatasync;
 *   3. header bytes 36..72 (l1_size, l1_table_offset, refcount_table_offset,
 *      refcount_table_clusters, nb_snapshots, snapshots_offset) in one write:
 *      THE COMMIT POINT. They lie inside the first 512-byte sector, which the
 *      device writes atomically (the assumption QEMU's own header updates make);
 *   4. fdatasync.
 *
 * A crash before 3 leaves the old header over untouched old metadata, and the
 * new clusters have refcount 0: qemu-img check finds neither corruption nor
 * leaks. After 3 the new metadata is complete: the clusters it replaced already
 * have their final refcount (0 where nothing references them any more), so
 * there is nothing to free afterwards, and again no leaks.
 */
import { L1Table, L2Table } from './cluster-map.js';
import { invariant } from './fail.js';
import { encodeMetadataPointers, HEADER_POINTERS_BYTES, HEADER_POINTERS_OFFSET, type MetadataPointers } from './header.js';
import type { ImageState } from './image-state.js';
import { forEachReachedTable } from './reach.js';
import type { ClusterAllocator } from './allocator.js';
import type { RefcountStore } from './refcount.js';

export type { MetadataPointers } from './header.js';

export interface FreshWrite {
  offset: number;
  bytes: Buffer;
}

export interface ActiveShadow {
  /** The active L1 after the commit. */
  l1: L1Table;
  l1Offset: number;
  /** Fresh copies of the L2 tables whose COPIED bits changed, and of the L1 if it changed. */
  writes: FreshWrite[];
}

/**
 * COPIED for the active tables, recomputed from the refcounts the operation
 * leaves (set exactly where the refcount is 1, as
 * qcow2_update_snapshot_refcount() does), without touching the live tables:
 * an L2 table T whose bits change is copied to a fresh cluster T' and the
 * active L1 points at T' instead. T loses the active L1's reference (a
 * snapshot L1 may still hold it); T' gets refcount 1 when the allocation is
 * covered, so its L1 entry has COPIED set. The data under T is reached once
 * through T' instead of through T: its refcount does not change.
 *
 * Call after every data and L2 refcount change of the operation; the
 * refcounts of the L1 and of the tables replaced here change only clusters
 * that are not L2 tables or data.
 */
export async function shadowActiveTables(state: ImageState, rc: RefcountStore, alloc: ClusterAllocator): Promise<ActiveShadow> {
  const { l1, header } = state;
  const { next, writes } = await shadowL2Tables(state, l1, rc, alloc);
  if (next.bytes.equals(l1.bytes)) {
    return { l1, l1Offset: header.l1TableOffset, writes };
  }
  const l1Offset = alloc.allocBytes(l1.entries * 8);
  await rc.release(header.l1TableOffset, l1.entries * 8);
  writes.push({ offset: l1Offset, bytes: next.bytes });
  return { l1: next, l1Offset, writes };
}

/**
 * The L2 half of shadowActiveTables() for an active L1 `l1` that is about
 * to be written (the current one, or a snapshot's copy on revert): returns
 * that L1 with its entries pointing at the fresh L2 copies and COPIED set
 * from the final refcounts, and the fresh L2 writes. The caller places the L1.
 */
export async function shadowL2Tables(
  state: ImageState,
  l1: L1Table,
  rc: RefcountStore,
  alloc: ClusterAllocator,
): Promise<{ next: L1Table; writes: FreshWrite[] }> {
  const { layout } = state;
  const next = new L1Table(Buffer.from(l1.bytes), layout);
  const writes: FreshWrite[] = [];
  const moved = new Set<number>();
  await forEachReachedTable(state, l1, async ({ l1Index, l2, dataClusters }) => {
    await rc.preload(dataClusters);
    const draft = new L2Table(Buffer.from(l2.bytes), l2.hostOffset, layout);
    let changed = false;
    for (let i = 0; i < draft.entries; i++) {
      if (draft.isUnallocated(i)) continue;
      const entry = draft.entry(i);
      if (entry.kind !== 'normal' && entry.kind !== 'zero-alloc') continue;
      changed = draft.setCopied(i, rc.get(layout.clusterIndex(entry.hostOffset)) === 1) || changed;
    }
    if (!changed) return;
    const offset = alloc.allocClusters(1);
    writes.push({ offset, bytes: draft.bytes });
    await rc.preload([layout.clusterIndex(l2.hostOffset)]);
    rc.add(layout.clusterIndex(l2.hostOffset), -1);
    next.set(l1Index, offset, true);
    moved.add(l1Index);
  });
  // Tables that stay: COPIED from their final refcount (after every move above).
  for (let i = 0; i < l1.entries; i++) {
    const l2Offset = l1.l2Offset(i);
    if (l2Offset === 0 || moved.has(i)) continue;
    next.setCopied(i, (await rc.getAsync(layout.clusterIndex(l2Offset))) === 1);
  }
  return { next, writes };
}

/**
 * Steps 1-4 above. `beforeCommitPoint` runs once the fresh structures are
 * durable, just before the header write (from then on a failure may have
 * reached the disk, so the caller must not truncate the file back).
 */
export async function commitShadow(
  state: ImageState,
  writes: readonly FreshWrite[],
  pointers: MetadataPointers,
  beforeCommitPoint: () => void,
): Promise<void> {
  const { file, layout } = state;
  const headerEnd = HEADER_POINTERS_OFFSET + HEADER_POINTERS_BYTES;
  for (const w of writes) {
    invariant(w.offset >= layout.clusterSize && layout.isAligned(w.offset), 'fresh structures are cluster aligned, past the header');
    await file.write(w.bytes, w.offset);
  }
  // fdatasync: every structure the new header points at (directly or through the new refcount
  // table and L1) is durable before the header switches to it; a crash until then leaves only
  // unreferenced clusters with refcount 0.
  await file.datasync();
  beforeCommitPoint();
  invariant(headerEnd <= 512, 'the switched header fields share the first sector');
  // THE COMMIT POINT: one write inside sector 0 switches L1, refcount table and snapshot table together.
  await file.write(encodeMetadataPointers(pointers), HEADER_POINTERS_OFFSET);
  // fdatasync: the operation is durable; the replaced clusters already have refcount 0 in the new blocks.
  await file.datasync();
  Object.assign(state.header, pointers);
}
