/**
 * Deleting an internal snapshot with the meaning of QEMU's
 * qcow2_snapshot_delete(): -1 for every cluster the snapshot's L1 reaches
 * (its L2 tables and their clusters), its L1 table and the old snapshot
 * table are freed, and COPIED is set again in the active tables where a
 * refcount fell back to 1.
 *
 * QEMU drops the entry first and then decrements and restores COPIED in
 * place; a crash in between leaves leaks and COPIED mismatches. Here nothing
 * live is modified: the new snapshot table, the active L2 tables whose COPIED
 * bits change, the active L1 and every changed refcount block are fresh
 * copies, and one header write switches to them (shadow-commit.ts). A crash
 * before that write leaves the snapshot in place, after it the snapshot is
 * gone; either way qemu-img check finds neither corruption nor leaks.
 *
 * The fresh copies go to clusters the committed refcounts count as free
 * (allocator.ts), never to one this delete frees. After the commit point,
 * every cluster the delete freed (the snapshot's vmstate, tables and L1, the
 * replaced L1, refcount blocks and tables) is discarded and the free tail of
 * the file is cut (space.ts), so the snapshot's bytes cannot be read back.
 */
import { readSnapshotL1, type ImageState } from './image-state.js';
import { invariant } from './fail.js';
import { forEachReachedTable } from './reach.js';
import type { RefcountStore } from './refcount.js';
import { allocatorFor, freedBy, reclaim, runsToExtents } from './space.js';
import { commitShadow, shadowActiveTables, type FreshWrite } from './shadow-commit.js';
import { asWritten, encodeSnapshotTable, type SnapshotEntry } from './snapshot-table.js';

/** `rc`: the image's refcounts as committed, loaded for this delete and changed only by it. */
export async function deleteSnapshotAt(state: ImageState, rc: RefcountStore, index: number): Promise<SnapshotEntry> {
  const { layout, header, file } = state;
  const victim = state.snapshots[index];
  invariant(victim !== undefined, 'snapshot index in range');
  // Free runs as committed, before any refcount changes in memory: nothing this delete frees can be handed out.
  const { alloc, committedFree, endOffset } = await allocatorFor(rc);
  await dropSnapshotReferences(state, rc, victim);
  const remaining = state.snapshots.filter((_, i) => i !== index);
  const table = remaining.length > 0 ? encodeSnapshotTable(remaining) : Buffer.alloc(0);
  const tableOffset = table.length > 0 ? alloc.allocBytes(table.length) : 0;
  const active = await shadowActiveTables(state, rc, alloc);
  await rc.release(header.snapshotsOffset, state.snapshotTableBytes);
  const refcountTable = await rc.relocate(alloc);
  const writes: FreshWrite[] = [
    ...(table.length > 0 ? [{ offset: tableOffset, bytes: table }] : []),
    ...active.writes,
    ...rc.freshWrites(),
  ];
  const pointers = {
    l1Size: active.l1.entries,
    l1TableOffset: active.l1Offset,
    refcountTableOffset: refcountTable.offset,
    refcountTableClusters: refcountTable.clusters,
    nbSnapshots: remaining.length,
    snapshotsOffset: tableOffset,
  };
  await commitShadow(state, writes, pointers, () => undefined);
  state.snapshots = remaining.map(asWritten);
  state.snapshotTableBytes = table.length;
  state.l1 = active.l1;
  state.fileSizeBytes = (await file.stat()).size;
  const freed = await freedBy(rc, committedFree, endOffset, state);
  await reclaim(state, rc, runsToExtents(freed, layout.clusterSize));
  return victim;
}

/** -1 for everything the victim's L1 reaches, in QEMU's order (each L2's clusters, then the L2), and for the L1 itself. */
async function dropSnapshotReferences(state: ImageState, rc: RefcountStore, victim: SnapshotEntry): Promise<void> {
  const { layout } = state;
  const victimL1 = await readSnapshotL1(state, victim);
  await forEachReachedTable(state, victimL1, async ({ l2, dataClusters }) => {
    const l2Cluster = layout.clusterIndex(l2.hostOffset);
    await rc.preload([l2Cluster]);
    await rc.preload(dataClusters);
    for (const cluster of dataClusters) rc.add(cluster, -1);
    rc.add(l2Cluster, -1);
  });
  await rc.release(victim.l1TableOffset, victim.l1Size * 8);
}
