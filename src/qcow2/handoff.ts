/**
 * Saving into an image that a paused QEMU still has open (the savevm
 * hand-off, DESIGN.md "Checkpoint and restore of a running QEMU").
 *
 * While QEMU holds the image, nothing here takes its lock bytes or writes
 * metadata: begin() reads the header and refcounts without locks and
 * places the vmstate past the end of the file plus a margin, in clusters
 * QEMU's allocator would only reach after allocating `marginBytes` more
 * (it takes free clusters from the lowest index up, and a stopped VM with
 * no jobs, exports or bitmaps allocates none: measured, the image does not
 * change by a byte between `stop` and the end of the migration). Once QEMU
 * has handed the image over (migration completed: its write locks are
 * gone), openForCommit() takes the locks and re-reads header, L1 and
 * refcounts, and beginSave(baseOffset) verifies that nothing allocated
 * reaches the vmstate before the shadow commit makes it a snapshot.
 *
 * Until that commit, the clusters written are referenced by nothing: a
 * failure, an abort or a kill -9 leaves the image meaning what it meant.
 */
import { ErrorCode, SnapshotError } from '../errors.js';
import { TargetFile, type DirectMode } from '../io/target-file.js';
import { STREAM_IO_THREADS, type StreamSink } from '../stream/sink.js';
import { QCOW_MAX_L1_SIZE_BYTES } from './cluster-map.js';
import { Image } from './image.js';
import { readExact } from './file.js';
import { loadImageState } from './image-state.js';
import { refuseNewSnapshot } from './image-save.js';
import { RefcountStore } from './refcount.js';

/**
 * Room left between the end of the image and the vmstate. QEMU allocates
 * nothing while stopped; the margin covers what it may still write when it
 * inactivates the image (its metadata caches are flushed at `stop` already).
 * It is a hole in a sparse file, so it costs no space.
 */
export const HANDOFF_MARGIN_BYTES = 64 << 20;

/** qcow2.txt compatible feature bit 0: lazy refcounts (the dirty bit is set while QEMU runs). */
const LAZY_REFCOUNTS = 1n;

export interface HandoffOptions {
  direct: DirectMode;
  marginBytes?: number;
}

export class HandoffSave {
  readonly path: string;
  readonly name: string;
  /** Where the vmstate's first byte goes. */
  readonly baseOffset: number;
  readonly maxLength: number;
  private readonly _data: TargetFile;

  private constructor(path: string, name: string, baseOffset: number, maxLength: number, data: TargetFile) {
    this.path = path;
    this.name = name;
    this.baseOffset = baseOffset;
    this.maxLength = maxLength;
    this._data = data;
  }

  /**
   * Plans the vmstate placement without locks (QEMU holds them) and opens
   * the data descriptor. Call with the VM stopped: QEMU has flushed its
   * metadata caches then. The vmstate goes past both the allocated end and
   * the end of the file (QEMU writes data before its refcounts reach the disk).
   */
  static async begin(path: string, name: string, options: HandoffOptions): Promise<HandoffSave> {
    const { end, maxLength, clusterSize } = await inspectUnlocked(path, name);
    const data = await TargetFile.open(path, { write: true, create: false, direct: options.direct, threads: STREAM_IO_THREADS });
    const step = Math.max(clusterSize, data.alignment);
    const baseOffset = Math.ceil((end + (options.marginBytes ?? HANDOFF_MARGIN_BYTES)) / step) * step;
    return new HandoffSave(path, name, baseOffset, maxLength, data);
  }

  /** A StreamSink writing the vmstate at baseOffset; finalize only makes it durable (no metadata). */
  sink(): StreamSink {
    const data = this._data;
    return {
      file: data,
      baseOffset: this.baseOffset,
      maxLength: this.maxLength,
      // fdatasync: the vmstate is durable before any metadata can point at it (commit step 1).
      finalize: async () => data.datasync(),
      abort: async () => undefined,
      close: async () => undefined,
    };
  }

  /**
   * Opens the image for the commit: takes QEMU's lock bytes (IMAGE_LOCKED
   * while QEMU still holds them) and re-reads header, L1 and snapshots.
   * Then reserves the vmstate where it was written; throws VM_STATE when
   * anything allocated meanwhile reaches it.
   */
  async openForCommit(): Promise<Image> {
    // Without the scrub before the first write: it would cut the vmstate, which lies past the image end until the commit.
    const image = await Image.open(this.path, { readOnly: false, forceShare: false }, { scrub: false });
    try {
      await image.beginSave(this.name, { alignment: this._data.alignment, baseOffset: this.baseOffset });
      return image;
    } catch (err) {
      await image.close().catch(() => undefined);
      throw err;
    }
  }

  /**
   * Lets `edit` change the last `tailBytes` of the vmstate written (up to
   * `length` bytes), before the commit; writes them back only when it
   * returns true. Reads and writes through the page cache: the O_DIRECT
   * writes are complete and durable, so the cache holds none of these pages.
   */
  async editTail(length: number, tailBytes: number, edit: (tail: Buffer) => boolean): Promise<void> {
    await editVmStateTail(this.path, this.baseOffset, length, tailBytes, edit);
  }

  /**
   * After a failure, before QEMU runs again: truncates the file back to
   * baseOffset (when it grew past it), giving back the space of the vmstate
   * written. Everything from baseOffset on is ours; QEMU, stopped, did not
   * write past the margin.
   */
  async discard(): Promise<void> {
    const size = (await this._data.stat()).size;
    if (size <= this.baseOffset) return;
    await this._data.truncate(this.baseOffset);
  }

  /** Closes the data descriptor. The clusters written stay unreferenced past the end; the next save reuses them. */
  async close(): Promise<void> {
    await this._data.close();
  }
}

/**
 * Lets `edit` change the last `tailBytes` of a vmstate of `length` bytes
 * written at `hostOffset` of `path`, before a commit makes it a snapshot;
 * writes them back only when it returns true. Reads and writes through the
 * page cache: the O_DIRECT writes are complete and durable, so the cache
 * holds none of these pages. Takes no locks: the caller holds the image.
 */
export async function editVmStateTail(path: string, hostOffset: number, length: number, tailBytes: number, edit: (tail: Buffer) => boolean): Promise<void> {
  const bytes = Math.min(length, tailBytes);
  if (bytes === 0) return;
  const start = hostOffset + length - bytes;
  const file = await TargetFile.open(path, { write: true, create: false, direct: false });
  try {
    const tail = await readExact(file, start, bytes, 'vmstate tail');
    if (!edit(tail)) return;
    await file.write(tail, start);
    // fdatasync: the edited vmstate is durable before the commit makes it a snapshot.
    await file.datasync();
  } finally {
    await file.close();
  }
}

/** Refuses, without locks and before the VM stops, an image that cannot take snapshot `name`. */
export async function assertSnapshotable(path: string, name: string): Promise<void> {
  await inspectUnlocked(path, name);
}

/** Reads header, snapshots and refcounts without taking locks; refuses what cannot be saved before the VM stops. */
async function inspectUnlocked(path: string, name: string): Promise<{ end: number; maxLength: number; clusterSize: number }> {
  const meta = await TargetFile.open(path, { write: false, create: false, direct: false });
  try {
    const state = await loadImageState(meta);
    const { header, layout } = state;
    if ((header.compatibleFeatures & LAZY_REFCOUNTS) !== 0n) {
      throw new SnapshotError(
        ErrorCode.QCOW2_UNSUPPORTED,
        `'${path}' uses lazy refcounts: its refcounts on disk are not current while QEMU runs; turn them off with qemu-img amend -o lazy_refcounts=off`,
        { path },
      );
    }
    refuseNewSnapshot(state.snapshots, name);
    const rc = await RefcountStore.load(meta, layout, header.refcountTableOffset, header.refcountTableClusters, state.fileSizeBytes);
    const end = Math.max(await rc.allocationEnd(), layout.alignUp(state.fileSizeBytes));
    const l1Room = QCOW_MAX_L1_SIZE_BYTES / 8 - layout.vmStateL1Index(header.size);
    return { end, maxLength: Math.max(0, l1Room * layout.l2CoverageBytes), clusterSize: layout.clusterSize };
  } catch (err) {
    if (err instanceof SnapshotError && err.path === undefined) Object.assign(err, { path });
    throw err;
  } finally {
    await meta.close().catch(() => undefined);
  }
}
