/**
 * Deleting an internal snapshot as QEMU's qcow2_snapshot_delete() does:
 * first drop the entry (the commit point), then release what it referenced.
 *
 *   1. new snapshot table without the entry, in fresh clusters, refcount 1;
 *   2. header nb_snapshots + snapshots_offset in one write: THE COMMIT POINT;
 *   3. -1 for every cluster the snapshot's L1 reaches, its L1 table and the
 *      old snapshot table;
 *   4. COPIED restored in the active L1/L2 where a refcount fell back to 1.
 *
 * A crash before 2 leaves the snapshot in place (the new table only leaks);
 * after 2 it is gone and a crash can only leak clusters.
 */
import { encodeSnapshotPointer, SNAPSHOT_POINTER_OFFSET } from './header.js';
import { readSnapshotL1, type ImageState } from './image-state.js';
import { switchRefcountTable, updateCopiedFlags } from './image-save.js';
import { forEachReachedTable } from './reach.js';
import { EndAllocator, RefcountStore } from './refcount.js';
import { asWritten, encodeSnapshotTable, type SnapshotEntry } from './snapshot-table.js';
import { invariant } from './fail.js';

export async function deleteSnapshotAt(state: ImageState, index: number): Promise<SnapshotEntry> {
  const { layout, header, file } = state;
  const victim = state.snapshots[index];
  invariant(victim !== undefined, 'snapshot index in range');
  const victimL1 = await readSnapshotL1(state, victim);
  const rc = await RefcountStore.load(
    file,
    layout,
    header.refcountTableOffset,
    header.refcountTableClusters,
    state.fileSizeBytes,
  );
  const remaining = state.snapshots.filter((_, i) => i !== index);
  const table = remaining.length > 0 ? encodeSnapshotTable(remaining) : Buffer.alloc(0);
  const alloc = new EndAllocator(await rc.allocationEnd(), layout);
  const tableOffset = table.length > 0 ? alloc.allocBytes(table.length) : 0;
  await rc.coverAllocation(alloc);
  if (table.length > 0) await file.write(table, tableOffset);
  await rc.writeFreshStructures();
  // fdatasync: the new table (and any new refcount block) is durable before anything refers to it.
  await file.datasync();
  await rc.writeInPlace();
  // fdatasync: the new table's refcount is durable before the header points at it.
  await file.datasync();
  await switchRefcountTable(state, rc);
  const oldTable = { offset: header.snapshotsOffset, bytes: state.snapshotTableBytes };
  // THE COMMIT POINT: after this write the snapshot no longer exists.
  await file.write(encodeSnapshotPointer(remaining.length, tableOffset), SNAPSHOT_POINTER_OFFSET);
  // fdatasync: the snapshot is gone for good before its clusters are released.
  await file.datasync();
  state.snapshots = remaining.map(asWritten);
  state.snapshotTableBytes = table.length;
  header.nbSnapshots = remaining.length;
  header.snapshotsOffset = tableOffset;
  await releaseSnapshot(state, rc, victim, victimL1, oldTable);
  return victim;
}

async function releaseSnapshot(
  state: ImageState,
  rc: RefcountStore,
  victim: SnapshotEntry,
  victimL1: Awaited<ReturnType<typeof readSnapshotL1>>,
  oldTable: { offset: number; bytes: number },
): Promise<void> {
  const { layout, file } = state;
  await forEachReachedTable(state, victimL1, async ({ l2, dataClusters }) => {
    const l2Cluster = layout.clusterIndex(l2.hostOffset);
    await rc.preload([l2Cluster]);
    await rc.preload(dataClusters);
    for (const cluster of dataClusters) rc.add(cluster, -1);
    rc.add(l2Cluster, -1);
  });
  await rc.release(victim.l1TableOffset, victim.l1Size * 8);
  await rc.release(oldTable.offset, oldTable.bytes);
  await rc.writeInPlace();
  // fdatasync: refcounts dropped before COPIED is set again, so no cluster is ever marked exclusively
  // owned while the disk still says it is shared (QEMU orders its caches the same way).
  await file.datasync();
  await updateCopiedFlags(state, rc);
  // fdatasync: COPIED restored; writes after a crash before this only COW unnecessarily.
  await file.datasync();
}
