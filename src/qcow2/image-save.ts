/**
 * Saving an internal snapshot exactly as QEMU's savevm leaves it, in two
 * halves around the vmstate stream:
 *
 *   begin():  choose where the vmstate goes: free runs of the committed
 *             image (vmstate-runs.ts), then the end of the file; the stream
 *             writes it there with O_DIRECT.
 *   commit(): after the vmstate is durable, build the snapshot around it and
 *             switch to it with one header write (shadow-commit.ts): no live
 *             metadata cluster is modified in place, so a crash at any moment
 *             leaves either the old image or the new snapshot, with neither
 *             corruption nor leaks. Metadata goes to free clusters too
 *             (allocator.ts); after the commit point what the save freed is
 *             discarded and the free tail of the file cut (space.ts).
 *
 * The committed result matches QEMU 7.2's savevm (qcow2_snapshot_create):
 * the snapshot's L1 is a verbatim copy of the active L1 (COPIED bits
 * included, as QEMU copies before updating them) plus L2 tables mapping the
 * vmstate area; every cluster the active L1 reaches gains a reference; COPIED
 * is then cleared where refcounts exceed 1. Where QEMU clears COPIED in a
 * live L2 table T, we write a copy T' with the bits cleared and point the new
 * active L1 at it; the snapshot's L1 keeps T (refcount 1, its stale COPIED
 * bits are ignored by qemu-img check and rewritten by loadvm, as QEMU's own
 * verbatim L1 copy is). The data under T is reached through T and T', so its
 * refcount rises by one exactly as in QEMU. The vmstate clusters and their L2
 * tables have refcount 1 and belong to the snapshot alone, which is where
 * QEMU ends up too after it discards the vmstate from the active L1. (QEMU
 * also leaves a private, all-zero L2 table in the active L1 for that range;
 * it is an artifact of writing through the active image, reads the same as
 * no table, and we do not create it. `loadvm` grows the active L1 itself.)
 */
import { ErrorCode, SnapshotError } from '../errors.js';
import { L1Table, L2Table, QCOW_MAX_L1_SIZE_BYTES } from './cluster-map.js';
import { invariant, unsupported } from './fail.js';
import type { ImageState } from './image-state.js';
import { forEachReachedTable } from './reach.js';
import type { RefcountStore } from './refcount.js';
import { findFreeRuns, type ByteExtent, type ClusterAllocator, type ClusterRun } from './allocator.js';
import { Discarder } from './discard.js';
import { allocatorFor, freedBy, reclaim, runsToExtents } from './space.js';
import { VmStateRuns } from './vmstate-runs.js';
import type { WritePiece } from '../stream/sink.js';
import { commitShadow, shadowActiveTables, type ActiveShadow, type FreshWrite, type MetadataPointers } from './shadow-commit.js';
import { saveReservationBytes } from './save-preallocate.js';
import {
  asWritten,
  encodeSnapshotTable,
  ICOUNT_DISABLED,
  nextSnapshotId,
  QCOW_MAX_SNAPSHOTS,
  QCOW_MAX_SNAPSHOTS_SIZE_BYTES,
  snapshotTableBytesWithNew,
  type SnapshotEntry,
} from './snapshot-table.js';

export interface SaveReservation {
  /**
   * File offset of the vmstate's first byte; cluster aligned (the stream
   * sink's baseOffset). Without `chunkBytes` at begin the vmstate is
   * contiguous from here; with it, SaveTransaction.place() says where.
   */
  baseOffset: number;
  /** The most vmstate bytes the image can describe (QEMU's 32 MiB L1 limit). */
  maxLength: number;
}

export interface SaveMetadata {
  /** Exact vmstate length in bytes, already written at baseOffset and fdatasync'ed. */
  vmStateSize: number;
  /** Guest clock at the save, nanoseconds (QEMU's vm_clock_nsec). Default 0. */
  vmClockNs?: bigint | number;
  /** Wall-clock time of the save. Default: now. */
  date?: Date;
  /** Record/replay instruction count; default -1 (replay off), as savevm writes. */
  icount?: bigint;
}

/**
 * reserved -> committing -> pastCommitPoint -> committed, or -> aborted.
 * pastCommitPoint: the header write was issued and may have reached the
 * disk, so the point of no return is passed: a failure from here on must not
 * truncate the file back.
 */
type Phase = 'reserved' | 'committing' | 'pastCommitPoint' | 'committed' | 'aborted';

export interface SaveBeginOptions {
  /** A power of two (the O_DIRECT alignment); every vmstate run starts and ends on it. */
  alignmentBytes?: number;
  /** The writer's buffer size: free runs of at least this much are reused. Without it the vmstate goes to the end, contiguous. */
  chunkBytes?: number;
  /** Expected vmstate length (a best-fit hint). */
  expectedBytes?: number;
  /** The vmstate is already written, contiguous, at this offset past the end (the savevm hand-off, qcow2/handoff.ts). */
  atOffset?: number;
}

interface SavePlan {
  rc: RefcountStore;
  /** Runs the committed refcounts counted as free, and the allocated end, before this commit. */
  committedFree: ClusterRun[];
  endOffset: number;
  entry: SnapshotEntry;
  table: Buffer;
  active: ActiveShadow;
  writes: FreshWrite[];
  pointers: MetadataPointers;
}

export class SaveTransaction implements SaveReservation {
  readonly name: string;
  readonly baseOffset: number;
  readonly maxLength: number;
  /** Where each logical byte of the vmstate goes. */
  readonly runs: VmStateRuns;
  private readonly _state: ImageState;
  /** The refcounts, loaded once for the whole save (the caller's check used the same store). */
  private readonly _rc: RefcountStore;
  private readonly _fileSizeAtBegin: number;
  /** The allocated end at begin(): the reservation of preallocate 'space' starts here. */
  private readonly _endAtBegin: number;
  /** Refcount blocks in the image at begin() (they may all be copied; reservation bound). */
  private readonly _refcountBlocks: number;
  private _phase: Phase = 'reserved';
  /** Space was reserved with fallocate (preallocate 'space'): metadata goes to the reserved end, not to punched runs. */
  private _reserved = false;
  /** Logical bytes handed to place() so far: what an abort must discard. */
  private _placedEnd = 0;
  /** Metadata written before the commit point (discarded by an abort). */
  private _freshWrites: ByteExtent[] = [];

  private constructor(state: ImageState, rc: RefcountStore, name: string, runs: VmStateRuns, endAtBegin: number) {
    const { layout, header } = state;
    this._state = state;
    this._rc = rc;
    this._refcountBlocks = rc.blockCount;
    this.name = name;
    this.runs = runs;
    this.baseOffset = runs.hostOffset(0);
    const l1Room = QCOW_MAX_L1_SIZE_BYTES / 8 - layout.vmStateL1Index(header.size);
    this.maxLength = Math.max(0, Math.min(l1Room * layout.l2CoverageBytes, 2 ** 52 - runs.tailOffset + runs.tailLogical));
    this._fileSizeAtBegin = state.fileSizeBytes;
    this._endAtBegin = endAtBegin;
  }

  /**
   * Chooses where the vmstate goes. The caller has checked the name, holds
   * the write lock, and passes the image's refcounts, freshly loaded and not
   * yet changed; the save keeps them until it commits. Alignment may push the
   * tail past the end of file; the clusters skipped stay free.
   */
  static async begin(state: ImageState, rc: RefcountStore, name: string, options: SaveBeginOptions = {}): Promise<SaveTransaction> {
    const { layout } = state;
    const end = await rc.allocationEnd();
    const alignBytes = options.alignmentBytes ?? 1;
    const step = Math.max(layout.clusterSize, alignBytes);
    const atOffset = options.atOffset;
    // A hand-off (src/vm) wrote the vmstate at `atOffset` while QEMU still had the image: it must
    // still lie past everything allocated now, or QEMU allocated into it meanwhile.
    if (atOffset !== undefined && (atOffset < end || atOffset % step !== 0)) {
      throw new SnapshotError(
        ErrorCode.VM_STATE,
        `the image changed while the vmstate was written: clusters up to offset ${end} are in use, overlapping the vmstate written at ${atOffset}; nothing was committed`,
        { path: state.file.path, offset: atOffset },
      );
    }
    let runs = new VmStateRuns([], atOffset ?? Math.ceil(end / step) * step, layout.clusterSize);
    if (options.chunkBytes !== undefined && atOffset === undefined) {
      const free = await findFreeRuns(rc, layout.clustersFor(end));
      runs = VmStateRuns.plan(free, end, layout, { chunkBytes: options.chunkBytes, alignBytes, expectedBytes: options.expectedBytes });
    }
    return new SaveTransaction(state, rc, name, runs, end);
  }

  /** Where a buffer of the stream goes (StreamSink.place); remembers how far the vmstate reached. */
  place(logical: number, length: number): number | WritePiece[] {
    this._placedEnd = Math.max(this._placedEnd, logical + length);
    return this.runs.place(logical, length);
  }

  async commit(meta: SaveMetadata): Promise<SnapshotEntry> {
    invariant(this._phase === 'reserved', `commit in phase ${this._phase}`);
    validateSaveMetadata(meta, this.maxLength);
    this._phase = 'committing';
    const plan = await this.plan(meta);
    await commitShadow(this._state, plan.writes, plan.pointers, () => {
      this._phase = 'pastCommitPoint';
    });
    this.committed(plan);
    this._state.fileSizeBytes = (await this._state.file.stat()).size;
    // After the commit point: discard what the save freed, cut the free tail (also an unused reservation).
    const freed = await freedBy(plan.rc, plan.committedFree, plan.endOffset, this._state);
    await reclaim(this._state, plan.rc, runsToExtents(freed, this._state.layout.clusterSize));
    return plan.entry;
  }

  /**
   * The byte ranges a save of up to `vmStateBytes` can occupy, to reserve
   * with preallocate 'space': the vmstate's runs inside the file (punched
   * holes need their blocks back), then from the allocated end the vmstate's
   * tail and a bound of the metadata (save-preallocate.ts). Metadata then goes
   * only to that reserved end; commit() cuts what the save did not use.
   */
  reservationExtents(vmStateBytes: number): ByteExtent[] {
    const { layout } = this._state;
    const expected = Math.min(vmStateBytes, this.maxLength);
    const metadataBytes = this.reservationBytes(expected) - layout.clustersFor(expected) * layout.clusterSize;
    this._reserved = true;
    const inside = this.runs.usedExtents(Math.min(expected, this.runs.tailLogical));
    const tailBytes = Math.max(0, expected - this.runs.tailLogical);
    const end = this.runs.tailOffset + layout.clustersFor(tailBytes) * layout.clusterSize + metadataBytes;
    return [...inside, { offset: this._endAtBegin, length: end - this._endAtBegin }];
  }

  /** Bytes past the tail that a contiguous save of up to `vmStateBytes` can occupy (save-preallocate.ts); a pure query. */
  reservationBytes(vmStateBytes: number): number {
    return saveReservationBytes(this._state, { baseOffset: this.runs.tailOffset, maxLength: this.maxLength }, this._refcountBlocks, vmStateBytes);
  }

  /**
   * Leaves the image as before. Until the header write, everything we wrote
   * lies in clusters the committed refcounts call free and nothing references
   * it: the vmstate and metadata written into free runs are discarded (so the
   * vmstate cannot be read back), and the file is truncated back to its old
   * length. Once the header write was issued it may have reached the disk:
   * the file is left alone (the new clusters are then either in use or free,
   * never leaked; the next write discards free clusters).
   */
  async abort(): Promise<void> {
    if (this._phase === 'committed' || this._phase === 'aborted') return;
    const undo = this._phase === 'reserved' || this._phase === 'committing';
    this._phase = 'aborted';
    if (!undo) return;
    const { file } = this._state;
    const written = [...this.runs.usedExtents(this._placedEnd), ...this._freshWrites];
    const device = file.isBlockDevice === true;
    // A regular file is cut back below the tail; a device keeps its length, so the tail is zeroed too.
    const size = device ? this._state.fileSizeBytes : Math.min(this._fileSizeAtBegin, (await file.stat()).size);
    await new Discarder(file).discard(written, size);
    if (!device) {
      await file.truncate(this._fileSizeAtBegin);
      this._state.fileSizeBytes = this._fileSizeAtBegin;
    }
    // fdatasync: the discarded vmstate and the old length are durable.
    await file.datasync();
  }

  private async plan(meta: SaveMetadata): Promise<SavePlan> {
    const { layout, header, l1 } = this._state;
    const vmClusters = layout.clustersFor(meta.vmStateSize);
    const rc = this._rc;
    // Free runs as committed, before any refcount changes in memory: nothing this save frees can be handed out.
    const { alloc, committedFree, endOffset } = await allocatorFor(rc, { endOnly: this._reserved });
    for (const e of this.runs.usedExtents(meta.vmStateSize)) alloc.takeRange(layout.clusterIndex(e.offset), e.length / layout.clusterSize);
    const vmIndex = layout.vmStateL1Index(header.size);
    const vmL2s = buildVmStateL2s(alloc, this.runs, vmClusters);
    const l1Entries = Math.max(l1.entries, vmL2s.length > 0 ? vmIndex + vmL2s.length : 0);
    if (l1Entries > QCOW_MAX_L1_SIZE_BYTES / 8) throw unsupported('the vmstate needs an L1 table above 32 MiB');
    // Verbatim copy of the live L1, COPIED bits included: QEMU copies the L1 before updating refcounts.
    const snapshotL1 = L1Table.empty(l1Entries, layout);
    l1.bytes.copy(snapshotL1.bytes, 0, 0, l1.entries * 8);
    vmL2s.forEach((table, j) => snapshotL1.set(vmIndex + j, table.hostOffset, true));
    const snapshotL1Offset = l1Entries > 0 ? alloc.allocBytes(l1Entries * 8) : 0;
    const entry = this.makeEntry(meta, snapshotL1Offset, l1Entries);
    const table = encodeSnapshotTable([...this._state.snapshots, entry]);
    const tableOffset = alloc.allocBytes(table.length);
    await addSnapshotReferences(this._state, rc, (i) => i >= vmIndex && i < vmIndex + vmL2s.length);
    const active = await shadowActiveTables(this._state, rc, alloc);
    await rc.release(header.snapshotsOffset, this._state.snapshotTableBytes);
    const refcountTable = await rc.relocate(alloc);
    const writes: FreshWrite[] = [
      ...vmL2s.map((t) => ({ offset: t.hostOffset, bytes: t.bytes })),
      ...(l1Entries > 0 ? [{ offset: snapshotL1Offset, bytes: snapshotL1.bytes }] : []),
      { offset: tableOffset, bytes: table },
      ...active.writes,
      ...rc.freshWrites(),
    ];
    const pointers: MetadataPointers = {
      l1Size: active.l1.entries,
      l1TableOffset: active.l1Offset,
      refcountTableOffset: refcountTable.offset,
      refcountTableClusters: refcountTable.clusters,
      nbSnapshots: this._state.snapshots.length + 1,
      snapshotsOffset: tableOffset,
    };
    this._freshWrites = writes.map((w) => ({ offset: w.offset, length: w.bytes.length }));
    return { rc, committedFree, endOffset, entry, table, active, writes, pointers };
  }

  private makeEntry(meta: SaveMetadata, l1TableOffset: number, l1Size: number): SnapshotEntry {
    const dateMs = (meta.date ?? new Date()).getTime();
    const id = nextSnapshotId(this._state.snapshots);
    return {
      l1TableOffset,
      l1Size,
      id,
      name: this.name,
      dateSec: Math.floor(dateMs / 1000),
      dateNsec: (((dateMs % 1000) + 1000) % 1000) * 1_000_000,
      vmClockNs: BigInt(meta.vmClockNs ?? 0n),
      vmStateSize: meta.vmStateSize,
      diskSize: this._state.header.size,
      icount: meta.icount ?? ICOUNT_DISABLED,
      extraDataSize: 0,
      unknownExtraData: new Uint8Array(0),
      idBytes: Buffer.from(id, 'utf8'),
      nameBytes: Buffer.from(this.name, 'utf8'),
    };
  }

  /** The header now points at the new metadata: bring the in-memory state along. */
  private committed(plan: SavePlan): void {
    const state = this._state;
    this._phase = 'committed';
    state.snapshots = [...state.snapshots, plan.entry].map(asWritten);
    state.snapshotTableBytes = plan.table.length;
    state.l1 = plan.active.l1;
  }
}

/**
 * +1 for every cluster the active L1 reaches (its L2 tables and the clusters
 * they use, compressed ones by every host cluster they touch), skipping the
 * L1 indices the snapshot maps to its own vmstate L2s instead. Overflow is
 * refused here, before any write.
 */
async function addSnapshotReferences(state: ImageState, rc: RefcountStore, replaced: (l1Index: number) => boolean): Promise<void> {
  const { layout, l1 } = state;
  await forEachReachedTable(state, l1, async ({ l2, dataClusters }) => {
    const l2Cluster = layout.clusterIndex(l2.hostOffset);
    await rc.preload([l2Cluster]);
    await rc.preload(dataClusters);
    rc.add(l2Cluster, 1);
    for (const cluster of dataClusters) rc.add(cluster, 1);
  }, replaced);
}

const MAX_U64 = (1n << 64n) - 1n;

/** Option mistakes become TypeError/RangeError naming the field, before anything is written. */
function validateSaveMetadata(meta: SaveMetadata, maxLength: number): void {
  if (!Number.isSafeInteger(meta.vmStateSize) || meta.vmStateSize < 0 || meta.vmStateSize > maxLength) {
    throw new RangeError(`Expected an integer 0..${maxLength} for vmStateSize, received ${String(meta.vmStateSize)}`);
  }
  const clock = meta.vmClockNs ?? 0n;
  if (!(typeof clock === 'bigint' || Number.isSafeInteger(clock)) || BigInt(clock) < 0n || BigInt(clock) > MAX_U64) {
    throw new RangeError(`Expected a non-negative 64-bit integer for vmClockNs, received ${String(clock)}`);
  }
  const ms = meta.date === undefined ? Date.now() : meta.date.getTime();
  if (!Number.isFinite(ms) || ms < 0 || ms >= 2 ** 32 * 1000) {
    throw new RangeError(`Expected a valid Date between 1970 and 2106 for date, received ${String(meta.date)}`);
  }
  if (meta.icount !== undefined && (meta.icount < -(1n << 63n) || meta.icount >= 1n << 63n)) {
    throw new RangeError(`Expected a signed 64-bit integer for icount, received ${meta.icount}`);
  }
}

/** L2 tables for the vmstate area: entry k maps vmstate cluster k to where the runs put it. */
function buildVmStateL2s(alloc: ClusterAllocator, runs: VmStateRuns, vmClusters: number): L2Table[] {
  const layout = alloc.layout;
  const count = Math.ceil(vmClusters / layout.l2Entries);
  const tables: L2Table[] = [];
  for (let t = 0; t < count; t++) tables.push(L2Table.empty(alloc.allocClusters(1), layout));
  for (let k = 0; k < vmClusters; k++) {
    // COPIED stays clear, as in the L2 QEMU's savevm leaves to the snapshot.
    tables[Math.floor(k / layout.l2Entries)]!.setStandard(k % layout.l2Entries, runs.hostOffset(k * layout.clusterSize), {
      copied: false,
    });
  }
  return tables;
}

/** A new snapshot named `name` must not clash with any id or name, and must fit QEMU's table limits. */
export function refuseNewSnapshot(snapshots: readonly SnapshotEntry[], name: string): void {
  if (snapshots.some((s) => s.name === name || s.id === name)) {
    throw new SnapshotError(ErrorCode.SNAPSHOT_EXISTS, `a snapshot named or numbered '${name}' already exists`);
  }
  if (snapshots.length >= QCOW_MAX_SNAPSHOTS) {
    throw new SnapshotError(ErrorCode.SNAPSHOT_LIMIT, `the image already has ${QCOW_MAX_SNAPSHOTS} snapshots`);
  }
  if (snapshotTableBytesWithNew(snapshots, name) > QCOW_MAX_SNAPSHOTS_SIZE_BYTES) {
    throw new SnapshotError(ErrorCode.SNAPSHOT_LIMIT, `the snapshot table would exceed QEMU's limit of ${QCOW_MAX_SNAPSHOTS_SIZE_BYTES} bytes`);
  }
}
