/**
 * Reverting the disk to an internal snapshot, with the meaning of QEMU 7.2's
 * qcow2_snapshot_goto() (`qemu-img snapshot -a`, the disk half of loadvm):
 *
 *   - the active L1 becomes a copy of the snapshot's L1 (all of it, vmstate
 *     area included), zero-padded to the larger of the two sizes;
 *   - every cluster the snapshot's L1 reaches gains a reference, every
 *     cluster the old active L1 reached loses one;
 *   - COPIED is recomputed for the active tables from the final refcounts.
 *
 * QEMU overwrites the live L1 in place between two refcount passes, so a
 * crash in between leaves leaks or worse. Here nothing live changes before
 * the commit point: the new active L1, the L2 tables whose COPIED bits
 * change and the changed refcount blocks are fresh copies, and one header
 * write switches to them (shadow-commit.ts). A crash before it leaves the
 * disk as it was; after it, reverted; never leaked. The fresh copies go to
 * free clusters (allocator.ts); after the commit point the clusters the
 * revert freed (guest data only the old active tables held) are discarded
 * and the free tail is cut (space.ts).
 */
import { unsupported, invariant } from './fail.js';
import { readSnapshotL1, type ImageState } from './image-state.js';
import { L1Table } from './cluster-map.js';
import { forEachReachedTable } from './reach.js';
import type { RefcountStore } from './refcount.js';
import { allocatorFor, freedBy, reclaim, runsToExtents } from './space.js';
import { commitShadow, shadowL2Tables, type FreshWrite } from './shadow-commit.js';
import type { SnapshotEntry } from './snapshot-table.js';

/** `rc`: the image's refcounts as committed, loaded for this revert and changed only by it. */
export async function revertToSnapshotAt(state: ImageState, rc: RefcountStore, index: number): Promise<SnapshotEntry> {
  const { layout, header, file, l1 } = state;
  const target = state.snapshots[index];
  invariant(target !== undefined, 'snapshot index in range');
  if (target.diskSize !== header.size) {
    throw unsupported(
      `snapshot '${target.name}' was taken at a disk size of ${target.diskSize} bytes, the disk now has ${header.size}; ` +
        'resize the disk back first (qemu-img resize)',
    );
  }
  // Free runs as committed, before any refcount changes in memory: nothing this revert frees can be handed out.
  const { alloc, committedFree, endOffset } = await allocatorFor(rc);
  const snapshotL1 = await readSnapshotL1(state, target);
  await addReferences(state, rc, snapshotL1, +1);
  await addReferences(state, rc, l1, -1);
  const entries = Math.max(l1.entries, target.l1Size);
  const copy = L1Table.empty(entries, layout);
  snapshotL1.bytes.copy(copy.bytes, 0, 0, target.l1Size * 8);
  const { next, writes } = await shadowL2Tables(state, copy, rc, alloc);
  const l1Offset = entries > 0 ? alloc.allocBytes(entries * 8) : 0;
  if (header.l1TableOffset !== 0) await rc.release(header.l1TableOffset, l1.entries * 8);
  const refcountTable = await rc.relocate(alloc);
  const fresh: FreshWrite[] = [...writes, ...(entries > 0 ? [{ offset: l1Offset, bytes: next.bytes }] : []), ...rc.freshWrites()];
  await commitShadow(state, fresh, {
    l1Size: entries,
    l1TableOffset: l1Offset,
    refcountTableOffset: refcountTable.offset,
    refcountTableClusters: refcountTable.clusters,
    nbSnapshots: header.nbSnapshots,
    snapshotsOffset: header.snapshotsOffset,
  }, () => undefined);
  state.l1 = next;
  state.fileSizeBytes = (await file.stat()).size;
  await reclaim(state, rc, runsToExtents(await freedBy(rc, committedFree, endOffset, state), layout.clusterSize));
  return target;
}

/** `delta` for every cluster `table` reaches: its L2 tables and the clusters their entries use. */
async function addReferences(state: ImageState, rc: RefcountStore, table: L1Table, delta: number): Promise<void> {
  const { layout } = state;
  await forEachReachedTable(state, table, async ({ l2, dataClusters }) => {
    const l2Cluster = layout.clusterIndex(l2.hostOffset);
    await rc.preload([l2Cluster]);
    await rc.preload(dataClusters);
    for (const cluster of dataClusters) rc.add(cluster, delta);
    rc.add(l2Cluster, delta);
  });
}
