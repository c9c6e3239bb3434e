/**
 * An open qcow2 image: list, export, delete, check and save internal
 * snapshots. The facade only: each operation delegates to the file that owns
 * it (image-save.ts, image-delete.ts, check.ts, vmstate-reader.ts,
 * snapshot-sink.ts). Opening validates everything before any write, and a
 * writable image holds QEMU's lock bytes for as long as it is open (lock.ts).
 *
 * Operations are serialised: one runs at a time, in call order.
 */
import { ErrorCode, isSnapshotError, SnapshotError } from '../errors.js';
import { TargetFile } from '../io/target-file.js';
import { SnapshotStream } from '../stream/snapshot-stream.js';
import { validatePath, validatePowerOfTwo, validateSnapshotName, validateSnapshotRef } from '../validate.js';
import { checkImage, refuseInconsistent, type CheckResult } from './check.js';
import { scrubFreeSpace, spaceReport } from './space.js';
import type { WritePiece } from '../stream/sink.js';
import type { MetaFile } from './file.js';
import { deleteSnapshotAt } from './image-delete.js';
import { revertToSnapshotAt } from './image-revert.js';
import { refuseNewSnapshot, SaveTransaction, type SaveMetadata, type SaveReservation } from './image-save.js';
import { loadImageState, loadRefcounts, openImageState, type ImageState } from './image-state.js';
import { releaseImageLocks, type LockPlan } from './lock.js';
import type { RefcountStore } from './refcount.js';
import { preallocateSave } from './save-preallocate.js';
import {
  validateOpenImageOptions,
  validateSaveStreamOptions,
  type OpenImageConfig,
  type OpenImageOptions,
  type SaveStreamOptions,
  type SnapshotSinkConfig,
} from './image-options.js';
import { toSnapshotInfo, type SnapshotInfo } from './snapshot-info.js';
import { snapshotSinkFactory, SnapshotSink } from './snapshot-sink.js';
import { requireSnapshot } from './snapshot-table.js';
import { createVmStateReadStream, validateVmStateReadOptions, type VmStateReadOptions, type VmStateReadStream } from './vmstate-reader.js';

export type { CheckResult } from './check.js';
export type { SaveMetadata, SaveReservation } from './image-save.js';
export type { OpenImageOptions, SaveStreamOptions } from './image-options.js';
export type { SnapshotInfo } from './snapshot-info.js';

const DEFAULT_OPEN: OpenImageConfig = { readOnly: false, forceShare: false };

/** @internal */
export interface WriteOpenOptions {
  /**
   * Discard free clusters and cut the unreferenced tail at a write-open
   * (space.ts scrubFreeSpace). Default true. The savevm hand-off opens with
   * false: its vmstate lies past the image end, unreferenced until it commits.
   */
  scrub?: boolean;
}

/** Largest alignment a save's vmstate run may be asked to start on (the largest DIO alignment we accept). */
const MAX_SAVE_ALIGNMENT_BYTES = 1 << 20;

export class Image {
  readonly path: string;
  readonly readOnly: boolean;
  private _state: ImageState;
  /** A write failed midway: the in-memory metadata may differ from the disk; reload before the next operation. */
  private _stale = false;
  /** The consistency check passed, and only our own complete commits wrote since (we hold the lock). */
  private _verified = false;
  private readonly _locks: LockPlan | undefined;
  private _queue: Promise<unknown> = Promise.resolve();
  private _save: SaveTransaction | undefined;
  private _closed = false;

  private constructor(path: string, readOnly: boolean, state: ImageState, locks: LockPlan | undefined) {
    this.path = path;
    this.readOnly = readOnly;
    this._state = state;
    this._locks = locks;
  }

  /** @internal use openImage() */
  static async open(path: string, config: OpenImageConfig = DEFAULT_OPEN, writeOpen: WriteOpenOptions = {}): Promise<Image> {
    const file = await TargetFile.open(path, { write: !config.readOnly, create: false, direct: false });
    return Image.fromFile(file, config, writeOpen);
  }

  /**
   * @internal Opens an image on an already open metadata file (tests wrap it
   * to record or fail writes). Takes ownership of `file`.
   */
  static async fromFile(file: MetaFile, config: OpenImageConfig = DEFAULT_OPEN, writeOpen: WriteOpenOptions = {}): Promise<Image> {
    try {
      const { state, locks } = await openImageState(file, config);
      const image = new Image(file.path, config.readOnly, state, locks);
      if (!config.readOnly && writeOpen.scrub !== false) await image.scrubFreeSpace();
      return image;
    } catch (err) {
      await file.close().catch(() => undefined);
      if (err instanceof SnapshotError && err.path === undefined) Object.assign(err, { path: file.path });
      throw err;
    }
  }

  /** Virtual disk size in bytes. */
  get virtualSize(): number {
    return this._state.header.size;
  }

  get clusterSize(): number {
    return this._state.layout.clusterSize;
  }

  get version(): 2 | 3 {
    return this._state.header.version;
  }

  snapshots(): SnapshotInfo[] {
    this.assertOpen();
    return this._state.snapshots.map(toSnapshotInfo);
  }

  /**
   * The saved VM state of a snapshot (by id, else by name), byte for byte.
   * The stream reads lazily: do not delete that snapshot or close the image
   * before it ends.
   */
  createVmStateReadStream(idOrName: string, options?: VmStateReadOptions): VmStateReadStream {
    validateSnapshotRef(idOrName, 'idOrName');
    const resolved = validateVmStateReadOptions(options);
    this.assertOpen();
    const entry = this._state.snapshots[requireSnapshot(this._state.snapshots, idOrName)]!;
    return createVmStateReadStream(this._state, entry, resolved);
  }

  async deleteSnapshot(idOrName: string): Promise<SnapshotInfo> {
    validateSnapshotRef(idOrName, 'idOrName');
    return this.exclusive(async () => {
      this.assertWritable();
      const index = requireSnapshot(this._state.snapshots, idOrName);
      const rc = await this.consistentRefcounts();
      // A save streaming meanwhile keeps its runs and its tail.
      const keep = { extents: this._save?.heldExtents() ?? [], endOffset: this._save?.heldEndOffset ?? 0 };
      return this.writing(async () => toSnapshotInfo(await deleteSnapshotAt(this._state, rc, index, keep)));
    });
  }

  /**
   * The disk back to snapshot `idOrName`, as `qemu-img snapshot -a` does:
   * the active tables become the snapshot's, the snapshot stays. Crash-safe
   * through the shadow commit (image-revert.ts).
   */
  revertSnapshot(idOrName: string): Promise<SnapshotInfo> {
    validateSnapshotRef(idOrName, 'idOrName');
    return this.exclusive(async () => {
      this.assertWritable();
      const index = requireSnapshot(this._state.snapshots, idOrName);
      const rc = await this.consistentRefcounts();
      return this.writing(async () => toSnapshotInfo(await revertToSnapshotAt(this._state, rc, index)));
    });
  }

  /** qemu-img check's figures, and the space report (space.ts). */
  async check(): Promise<CheckResult> {
    return this.exclusive(async () => ({ ...(await checkImage(this._state)), space: await spaceReport(this._state) }));
  }

  /**
   * First half of a save: checks the name, then reserves the vmstate run at
   * the end of the file. Write the vmstate at `baseOffset`, fdatasync it,
   * then call commitSave() (or abortSave()). `baseOffset`: a vmstate
   * already written there while QEMU held the image (the savevm hand-off,
   * qcow2/handoff.ts); refused with VM_STATE when anything allocated now reaches it.
   */
  beginSave(
    name: string,
    options: { alignment?: number; baseOffset?: number; chunkBytes?: number; expectedBytes?: number } = {},
  ): Promise<SaveReservation> {
    validateSnapshotName(name, 'name');
    const alignment = validatePowerOfTwo(options.alignment ?? 1, 'options.alignment', 1, MAX_SAVE_ALIGNMENT_BYTES);
    const begin = { alignmentBytes: alignment, chunkBytes: options.chunkBytes, expectedBytes: options.expectedBytes, atOffset: options.baseOffset };
    return this.exclusive(async () => {
      this.assertWritable();
      if (this._save !== undefined) throw new SnapshotError(ErrorCode.EINVAL, 'a save is already in progress');
      refuseNewSnapshot(this._state.snapshots, name);
      this._save = await SaveTransaction.begin(this._state, await this.consistentRefcounts(), name, begin);
      return { baseOffset: this._save.baseOffset, maxLength: this._save.maxLength };
    });
  }

  /** @internal Reserves the disk space of the running save through the stream's descriptor (preallocate 'space'). */
  preallocateSave(file: TargetFile, vmStateBytes: number, signal: AbortSignal | undefined): Promise<void> {
    return this.exclusive(async () => {
      const save = this._save;
      if (save === undefined) throw new SnapshotError(ErrorCode.EINVAL, 'preallocateSave() without beginSave()');
      await preallocateSave(save, file, vmStateBytes, signal);
    });
  }

  /** @internal Where the running save's stream puts a buffer (StreamSink.place; once per buffer). */
  placeSave(logical: number, length: number): number | WritePiece[] {
    const save = this._save;
    if (save === undefined) throw new SnapshotError(ErrorCode.EINVAL, 'placeSave() without beginSave()');
    return save.place(logical, length);
  }

  /** Second half of a save; resolves once the snapshot exists durably. */
  commitSave(meta: SaveMetadata): Promise<SnapshotInfo> {
    return this.exclusive(async () => {
      const save = this._save;
      if (save === undefined) throw new SnapshotError(ErrorCode.EINVAL, 'commitSave() without beginSave()');
      try {
        return toSnapshotInfo(await save.commit(meta));
      } catch (err) {
        this._stale = true;
        await save.abort().catch(() => undefined);
        throw err;
      } finally {
        this._save = undefined;
      }
    });
  }

  /** Abandons a save: the image keeps its old meaning and, when possible, its old length. */
  abortSave(): Promise<void> {
    return this.exclusive(async () => {
      const save = this._save;
      this._save = undefined;
      await save?.abort();
    });
  }

  /** A Writable whose bytes become the vmstate of new snapshot `name`; the snapshot exists after 'finish'. */
  createSnapshotStream(name: string, options?: SaveStreamOptions): SnapshotStream {
    validateSnapshotName(name, 'name');
    const config = validateSaveStreamOptions(options);
    return new SnapshotStream(config, () => SnapshotSink.open(this, name, config));
  }

  async close(): Promise<void> {
    if (this._closed) return;
    await this._queue.catch(() => undefined);
    if (this._save !== undefined) await this.abortSave().catch(() => undefined);
    this._closed = true;
    const file = this._state.file as MetaFile;
    if (this._locks !== undefined) await releaseImageLocks(file, this._locks).catch(() => undefined);
    await file.close();
  }

  private exclusive<T>(task: () => Promise<T>): Promise<T> {
    const start = async (): Promise<T> => {
      this.assertOpen();
      if (this._stale) {
        this._state = await loadImageState(this._state.file);
        this._stale = false;
        this._verified = false;
      }
      return task();
    };
    const run = this._queue.then(start, start);
    this._queue = run.catch(() => undefined);
    return run;
  }

  /** A write that fails midway leaves the in-memory metadata unlike the disk: reload it first next time. */
  private async writing<T>(task: () => Promise<T>): Promise<T> {
    try {
      return await task();
    } catch (err) {
      this._stale = true;
      throw err;
    }
  }

  /**
   * The refcounts for a write, loaded once for it. The first write after
   * open (or after a failed one) first checks the whole metadata with them
   * (check.ts refuseInconsistent); later ones trust our own commits.
   */
  private async consistentRefcounts(): Promise<RefcountStore> {
    const rc = await loadRefcounts(this._state);
    if (!this._verified) {
      await refuseInconsistent(this._state, rc, this.path);
      this._verified = true;
    }
    return rc;
  }

  /**
   * At a write-open: free clusters that still hold bytes (a crash between a
   * commit and its discard, or during a save's data phase) are discarded,
   * and the unreferenced tail is cut. Only on an image that checks
   * consistent: an inconsistent one is refused at its first write instead.
   */
  private async scrubFreeSpace(): Promise<void> {
    try {
      await this.consistentRefcounts();
    } catch (err) {
      if (isSnapshotError(err, ErrorCode.QCOW2_CORRUPT) || isSnapshotError(err, ErrorCode.QCOW2_UNSUPPORTED)) return;
      throw err;
    }
    await scrubFreeSpace(this._state);
  }

  private assertOpen(): void {
    if (this._closed) throw new SnapshotError(ErrorCode.IMAGE_CLOSED, `image '${this.path}' is closed`, { path: this.path });
  }

  private assertWritable(): void {
    if (this.readOnly) {
      throw new SnapshotError(ErrorCode.IMAGE_READ_ONLY, `image '${this.path}' was opened read-only`, { path: this.path });
    }
  }
}

export function openImage(path: string, options?: OpenImageOptions): Promise<Image> {
  return Image.open(validatePath(path, 'path'), validateOpenImageOptions(options));
}

/** The sink behind `createSnapshotStream(path, { snapshot })`: the image is opened and closed with the stream. */
export function qcow2SinkFactory(path: string, name: string, config: SnapshotSinkConfig) {
  return snapshotSinkFactory(() => Image.open(path), name, config);
}
