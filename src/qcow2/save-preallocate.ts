/**
 * Preallocation for a save (`preallocate: 'space'`): before the first
 * vmstate byte, reserve on disk everything the save can occupy, so that a
 * full disk is an ENOSPC up front with the image untouched, never a failure
 * after gigabytes of streaming. The save gives back what it did not use when
 * it commits (space.ts reclaim cuts the free tail).
 */
import { reserveSpace } from '../io/preallocate.js';
import type { TargetFile } from '../io/target-file.js';
import type { ImageState } from './image-state.js';
import type { SaveReservation, SaveTransaction } from './image-save.js';
import { KNOWN_EXTRA_DATA_BYTES, SNAPSHOT_HEADER_BYTES } from './snapshot-table.js';
import { MAX_SNAPSHOT_NAME_BYTES } from '../validate.js';

/**
 * Bytes from baseOffset that a save of up to `vmStateBytes` can occupy: the
 * vmstate run plus an upper bound of its metadata (vmstate L2 tables, the L1
 * copy, the new snapshot table, copies of the active L1 and of every active
 * L2 table, a copy of every refcount block plus new ones, and a fresh,
 * possibly grown refcount table). A pure function of the image as it was at
 * the save's begin.
 */
export function saveReservationBytes(
  state: Pick<ImageState, 'layout' | 'l1' | 'header' | 'snapshotTableBytes'>,
  reservation: SaveReservation,
  refcountBlocks: number,
  vmStateBytes: number,
): number {
  const { layout, l1, header } = state;
  const vmClusters = layout.clustersFor(Math.min(vmStateBytes, reservation.maxLength));
  const l2Tables = Math.ceil(vmClusters / layout.l2Entries);
  const l1Entries = Math.max(l1.entries, layout.vmStateL1Index(header.size) + l2Tables);
  let activeL2Tables = 0;
  for (let i = 0; i < l1.entries; i++) if (l1.rawOffset(i) !== 0) activeL2Tables++;
  // Our entry: fixed part, extra data, an id of at most 20 digits, the longest name, 8-byte alignment.
  const entryBytes = SNAPSHOT_HEADER_BYTES + KNOWN_EXTRA_DATA_BYTES + 20 + MAX_SNAPSHOT_NAME_BYTES + 8;
  const fresh =
    vmClusters +
    l2Tables +
    layout.clustersFor(l1Entries * 8) +
    layout.clustersFor(state.snapshotTableBytes + entryBytes) +
    layout.clustersFor(l1.entries * 8) +
    activeL2Tables;
  const newBlocks = Math.ceil((fresh + refcountBlocks) / layout.refblockEntries) + 2;
  const endCluster = layout.clusterIndex(reservation.baseOffset) + fresh + refcountBlocks + newBlocks;
  // RefcountStore.relocate asks for 1.5 x the entries in use when it grows; bound it by the whole end of file.
  const tableClusters = Math.max(
    header.refcountTableClusters,
    layout.clustersFor(Math.ceil((endCluster / layout.refblockEntries + 4) * 1.5) * 8),
  );
  // Every existing block may be copied; new ones cover the fresh clusters, the copies and the table.
  const blocks = refcountBlocks + newBlocks + Math.ceil(tableClusters / layout.refblockEntries) + 1;
  return (fresh + blocks + tableClusters) * layout.clusterSize;
}

/**
 * Reserves the save's space through `file` (the stream's descriptor). On
 * failure the file is truncated back to its length at open: nothing was
 * written, and the caller aborts the save.
 */
export async function preallocateSave(
  save: SaveTransaction,
  file: TargetFile,
  vmStateBytes: number,
  signal: AbortSignal | undefined,
): Promise<void> {
  // The runs inside the file (punched holes) and the end: one reservation each, all before the first byte.
  for (const e of save.reservationExtents(vmStateBytes)) await reserveSpace(file, e.offset, e.length, { signal });
}
