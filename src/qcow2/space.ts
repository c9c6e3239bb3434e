/**
 * Space after the commit point, and the space report.
 *
 *   - reclaim(): after a save or delete has committed, every cluster it freed
 *     is discarded (discard.ts), and free clusters at the end of the file are
 *     truncated away, so the file length follows the data.
 *   - scrubFreeSpace(): before the first write of an opening, every free cluster that still holds
 *     bytes is discarded, and the unreferenced tail past the image end is cut.
 *     A crash between a commit and its discard, or during a save's data
 *     phase, leaves readable free clusters; this closes that window.
 *   - spaceReport(): the figures `snapstream check` shows.
 *
 * Only clusters that the committed refcounts count as free are touched, and
 * only once the image has been checked for consistency (a refcount of 0 under
 * a live reference would otherwise lose data).
 */
import { ClusterAllocator, findFreeRuns, subtractExtents, type ByteExtent, type ClusterRun } from './allocator.js';
import { Discarder, findNonZero } from './discard.js';
import { loadRefcounts, type ImageState } from './image-state.js';
import type { RefcountStore } from './refcount.js';

export interface SpaceReport {
  /** File length in bytes (the device size for a block device). */
  fileLengthBytes: number;
  /** Bytes the filesystem holds for the file (stat blocks x 512); the device size for a block device. */
  allocatedBytes: number;
  /** Bytes in free clusters (refcount 0) below the image end. */
  freeBytes: number;
  /** Of freeBytes, those that are not all zero: not punched, their old contents readable. */
  freeDataBytes: number;
  /** Bytes past the image end: unreferenced clusters after the last one in use. */
  pastEndBytes: number;
  /** Of pastEndBytes, those that are not all zero (not scanned on a block device: undefined). */
  pastEndDataBytes: number | undefined;
}

export function runsToExtents(runs: readonly ClusterRun[], clusterSize: number): ByteExtent[] {
  return runs.map((r) => ({ offset: r.first * clusterSize, length: r.count * clusterSize }));
}

/** Clusters free in `after` that were not free in `before` (both sorted, disjoint). */
export function newlyFree(before: readonly ClusterRun[], after: readonly ClusterRun[], state: Pick<ImageState, 'layout'>): ClusterRun[] {
  return subtractExtents(after, runsToExtents(before, state.layout.clusterSize), state.layout);
}

/** Refcounts changed in memory by a commit that has happened: what they free below `endOffset`. */
export async function freedBy(rc: RefcountStore, committedFree: readonly ClusterRun[], endOffset: number, state: Pick<ImageState, 'layout'>): Promise<ClusterRun[]> {
  const after = await findFreeRuns(rc, state.layout.clustersFor(endOffset));
  return newlyFree(committedFree, after, state);
}

/** Reports a discard that failed after a commit: the operation stands, the next write retries. */
function warnDiscard(state: ImageState, err: unknown): void {
  const message = err instanceof Error ? err.message : String(err);
  process.emitWarning(`could not discard freed clusters of '${state.file.path}': ${message}; the next write retries`, {
    code: 'SNAPSTREAM_DISCARD_FAILED',
  });
}

/**
 * After the commit point: discards `freed` and truncates the file after the
 * last cluster in use (a save still streaming cannot run beside it: the
 * image's operation queue holds deletes until the save ends).
 * `rc` holds the committed refcounts. Never throws: a failure only leaves
 * free clusters with their old bytes, which the next write discards.
 */
export async function reclaim(state: ImageState, rc: RefcountStore, freed: readonly ByteExtent[]): Promise<void> {
  try {
    const end = await rc.allocationEnd();
    const device = state.file.isBlockDevice === true;
    await new Discarder(state.file).discard(freed, device ? state.fileSizeBytes : Math.min(end, state.fileSizeBytes));
    if (!device && state.fileSizeBytes > end) {
      await state.file.truncate(end);
      state.fileSizeBytes = end;
    }
    // No fdatasync: the filesystem's journal makes holes and length durable within seconds, and a
    // crash before that leaves only free clusters with old bytes, which the next write discards.
    // (One sync per save costs more than the rest of a small save; see test/qcow2/save.test.ts.)
  } catch (err) {
    warnDiscard(state, err);
  }
}

/**
 * Before the first write of an opening, on a consistent image: discards what free clusters still
 * hold and cuts the tail past the image end. Returns the bytes discarded.
 */
export async function scrubFreeSpace(state: ImageState): Promise<number> {
  const rc = await loadRefcounts(state);
  const end = await rc.allocationEnd();
  const free = runsToExtents(await findFreeRuns(rc, state.layout.clustersFor(end)), state.layout.clusterSize);
  const discarder = new Discarder(state.file);
  // Punching an existing hole is a cheap no-op; zeroing is a write, so only where bytes remain.
  const bytes = state.file.isBlockDevice === true ? await discarder.scrub(free, end) : await discarder.discard(free, end);
  if (state.fileSizeBytes > end && state.file.isBlockDevice !== true) {
    await state.file.truncate(end);
    state.fileSizeBytes = end;
  }
  // No fdatasync, as in reclaim(): a crash before the journal commits only leaves what this repeats next time.
  return bytes;
}

/** The space figures of an image (reads its free clusters to find the ones still holding data). */
export async function spaceReport(state: ImageState): Promise<SpaceReport> {
  const rc = await loadRefcounts(state);
  const end = Math.min(await rc.allocationEnd(), state.fileSizeBytes);
  const { layout, file } = state;
  const free = runsToExtents(await findFreeRuns(rc, layout.clustersFor(end)), layout.clusterSize);
  const st = await file.stat();
  const length = st.size;
  const pastEnd = length > end ? [{ offset: end, length: length - end }] : [];
  const sum = (extents: readonly ByteExtent[], limit: number): number =>
    extents.reduce((s, e) => s + Math.max(0, Math.min(e.offset + e.length, limit) - e.offset), 0);
  return {
    fileLengthBytes: length,
    allocatedBytes: file.isBlockDevice === true || st.blocks === undefined ? length : st.blocks * 512,
    freeBytes: sum(free, end),
    freeDataBytes: sum(await findNonZero(file, free, end), end),
    pastEndBytes: Math.max(0, length - end),
    // A device's space past the image is the rest of the device, not the image's: not read.
    pastEndDataBytes: file.isBlockDevice === true ? undefined : sum(await findNonZero(file, pastEnd, length), length),
  };
}

/** An allocator over the committed refcounts of `rc` (not yet changed in memory). */
export async function allocatorFor(
  rc: RefcountStore,
  options: { exclude?: readonly ByteExtent[]; endOnly?: boolean } = {},
): Promise<{ alloc: ClusterAllocator; committedFree: ClusterRun[]; endOffset: number }> {
  const endOffset = await rc.allocationEnd();
  const committedFree = await findFreeRuns(rc, rc.layout.clustersFor(endOffset));
  const alloc = new ClusterAllocator(rc.layout, committedFree, rc.layout.clustersFor(endOffset), options);
  return { alloc, committedFree, endOffset };
}
