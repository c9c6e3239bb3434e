/**
 * An open qcow2 image: list, export, delete, check and save internal
 * snapshots. The facade only: each operation delegates to the file that owns
 * it (image-save.ts, image-delete.ts, check.ts, vmstate-reader.ts,
 * snapshot-sink.ts). Opening validates everything before any write, and a
 * writable image holds QEMU's lock bytes for as long as it is open (lock.ts).
 *
 * Operations are serialised (operation-queue.ts): save, delete and check
 * run one at a time, in call order, and a save holds the queue from its
 * reservation to its commit or abort, so a delete called while a save
 * streams waits for the save's end. Exports read only committed, immutable
 * data and run beside everything; deleting a snapshot that an open export
 * stream reads is refused (SNAPSHOT_IN_USE). close() stops open exports and
 * a save still streaming (its stream fails with IMAGE_CLOSED and the image
 * keeps its old meaning), waits for the operation running, and refuses what
 * was still waiting with IMAGE_CLOSED.
 */
import { ErrorCode, SnapshotError } from '../errors.js';
import { TargetFile } from '../io/target-file.js';
import { SnapshotStream } from '../stream/snapshot-stream.js';
import { validatePath, validatePowerOfTwo, validateSnapshotName, validateSnapshotRef, type PathLike } from '../validate.js';
import { checkImage, type CheckResult } from './check.js';
import { scrubFreeSpace, spaceReport } from './space.js';
import type { WritePiece } from '../stream/sink.js';
import type { MetaFile } from './file.js';
import type { RefcountStore } from './refcount.js';
import { deleteSnapshotAt } from './image-delete.js';
import { revertToSnapshotAt } from './image-revert.js';
import { refuseNewSnapshot, SaveTransaction, type SaveMetadata, type SaveReservation } from './image-save.js';
import { OpenExports } from './open-exports.js';
import { OperationQueue } from './operation-queue.js';
import { SaveSlot } from './save-session.js';
import { ImageMetadata } from './image-metadata.js';
import { openImageState, type ImageState } from './image-state.js';
import { releaseImageLocks, type LockPlan } from './lock.js';
import { preallocateSave } from './save-preallocate.js';
import {
  validateOpenImageOptions,
  validateSaveStreamOptions,
  type BeginSaveOptions,
  type OpenImageConfig,
  type OpenImageOptions,
  type SaveStreamOptions,
  type SnapshotSinkConfig,
} from './image-options.js';
import { toSnapshotInfo, type SnapshotInfo } from './snapshot-info.js';
import { snapshotSinkFactory, SnapshotSink } from './snapshot-sink.js';
import { findById, findByIdThenName, findByName } from './snapshot-lookup.js';
import { createVmStateReadStream, validateVmStateReadOptions, type VmStateReadOptions, type VmStateReadStream } from './vmstate-reader.js';

export type { CheckResult } from './check.js';
export type { SaveMetadata, SaveReservation } from './image-save.js';
export type { OpenImageOptions, SaveStreamOptions } from './image-options.js';
export type { SnapshotInfo } from './snapshot-info.js';

const DEFAULT_OPEN: OpenImageConfig = { readOnly: false, forceShare: false };

/** @internal */
export interface WriteOpenOptions {
  /**
   * Discard free clusters and cut the unreferenced tail before the first
   * write of this opening (space.ts scrubFreeSpace). Default true. The savevm hand-off opens with
   * false: its vmstate lies past the image end, unreferenced until it commits.
   */
  scrub?: boolean;
}

/** Largest alignment a save's vmstate run may be asked to start on (the largest DIO alignment we accept). */
const MAX_SAVE_ALIGNMENT_BYTES = 1 << 20;


export class Image {
  readonly path: string;
  readonly readOnly: boolean;
  private readonly _meta: ImageMetadata;
  private readonly _locks: LockPlan | undefined;
  private readonly _ops = new OperationQueue();
  private readonly _saves = new SaveSlot(this._ops);
  private readonly _exports = new OpenExports();
  private _closing: Promise<void> | undefined;
  /** The first write of this opening discards free clusters first (refcountsForWrite). */
  private _scrubPending = false;

  private constructor(path: string, readOnly: boolean, state: ImageState, locks: LockPlan | undefined) {
    this.path = path;
    this.readOnly = readOnly;
    this._meta = new ImageMetadata(state, path);
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
      image._scrubPending = !config.readOnly && writeOpen.scrub !== false;
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
   * The saved VM state of the snapshot named `name` (by name, as loadvm
   * finds it: snapshot-lookup.ts; with `{ by: 'id' }` the snapshot with that
   * id), byte for byte. The stream reads lazily; the
   * snapshot cannot be deleted while it is open, and close() stops it.
   */
  createVmStateReadStream(name: string, options?: VmStateReadOptions): VmStateReadStream {
    validateSnapshotRef(name, 'name');
    const resolved = validateVmStateReadOptions(options);
    this.assertOpen();
    const { snapshots } = this._state;
    const entry = snapshots[resolved.by === 'id' ? findById(snapshots, name) : findByName(snapshots, name)]!;
    this._exports.refuseExport(entry, this.path);
    return this._exports.add(createVmStateReadStream(this._state, entry, resolved), entry.id);
  }

  /** Deletes the snapshot named `name` (by name, as `qemu-img snapshot -d`: snapshot-lookup.ts); resolves to what was deleted. */
  async deleteSnapshot(name: string): Promise<SnapshotInfo> {
    validateSnapshotRef(name, 'name');
    return this.exclusive(async () => {
      this.assertWritable();
      const index = findByName(this._state.snapshots, name);
      const deleted = this._exports.beginDelete(this._state.snapshots[index]!, this.path);
      try {
        const rc = await this.refcountsForWrite();
        return await this._meta.writing(async () => toSnapshotInfo(await deleteSnapshotAt(this._state, rc, index)));
      } finally {
        deleted();
      }
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
      const index = findByIdThenName(this._state.snapshots, idOrName);
      const rc = await this.refcountsForWrite();
      return this._meta.writing(async () => toSnapshotInfo(await revertToSnapshotAt(this._state, rc, index)));
    });
  }

  /** qemu-img check's figures, and the space report (space.ts). */
  async check(): Promise<CheckResult> {
    return this.exclusive(async () => ({ ...(await checkImage(this._state)), space: await spaceReport(this._state) }));
  }

  /**
   * First half of a save: checks the name, then reserves the vmstate run at
   * the end of the file and holds the image's operations until the save
   * ends. Write the vmstate at `baseOffset`, fdatasync it, then call
   * commitSave() (or abortSave()). `cancel` stops whatever writes the
   * vmstate, should the image be closed first. `baseOffset`: a vmstate
   * already written there while QEMU held the image (the savevm hand-off,
   * qcow2/handoff.ts); refused with VM_STATE when anything allocated now reaches it.
   */
  beginSave(name: string, options: BeginSaveOptions = {}): Promise<SaveReservation> {
    validateSnapshotName(name, 'name');
    const alignment = validatePowerOfTwo(options.alignment ?? 1, 'options.alignment', 1, MAX_SAVE_ALIGNMENT_BYTES);
    const reserve = () =>
      this.started(async () => {
        this.assertWritable();
        refuseNewSnapshot(this._state.snapshots, name);
        const begin = { alignmentBytes: alignment, chunkBytes: options.chunkBytes, expectedBytes: options.expectedBytes, atOffset: options.baseOffset };
        return SaveTransaction.begin(this._state, await this.refcountsForWrite(), name, begin);
      });
    return this._saves.begin(reserve, options.cancel).then((tx) => ({ baseOffset: tx.baseOffset, maxLength: tx.maxLength }));
  }

  /** @internal Reserves the disk space of the running save through the stream's descriptor (preallocate 'space'). */
  async preallocateSave(file: TargetFile, vmStateBytes: number, signal: AbortSignal | undefined): Promise<void> {
    await preallocateSave(this._saves.running('preallocateSave').tx, file, vmStateBytes, signal);
  }

  /** @internal Where the running save's stream puts a buffer (StreamSink.place; once per buffer). */
  placeSave(logical: number, length: number): number | WritePiece[] {
    return this._saves.running('placeSave').tx.place(logical, length);
  }

  /** Second half of a save; resolves once the snapshot exists durably. */
  async commitSave(meta: SaveMetadata): Promise<SnapshotInfo> {
    const save = this._saves.running('commitSave');
    return toSnapshotInfo(await this._meta.writing(() => save.commit(meta)));
  }

  /** Abandons a save: the image keeps its old meaning and, when possible, its old length. */
  async abortSave(): Promise<void> {
    await this._saves.session?.abort();
  }

  /** A Writable whose bytes become the vmstate of new snapshot `name`; the snapshot exists after 'finish'. */
  createSnapshotStream(name: string, options?: SaveStreamOptions): SnapshotStream {
    validateSnapshotName(name, 'name');
    const config = validateSaveStreamOptions(options);
    const stream: SnapshotStream = new SnapshotStream(config, () =>
      SnapshotSink.open(this, name, config, { cancel: (error) => stream.destroy(error) }),
    );
    return stream;
  }

  /**
   * Closes the image once the operation running has ended: open exports and
   * a save still streaming are stopped with IMAGE_CLOSED (the save leaves the
   * image as it was), operations still waiting are refused with IMAGE_CLOSED.
   */
  close(): Promise<void> {
    this._closing ??= this.shutdown();
    return this._closing;
  }

  private async shutdown(): Promise<void> {
    const closed = new SnapshotError(ErrorCode.IMAGE_CLOSED, `image '${this.path}' was closed`, { path: this.path });
    await this._exports.stopAll(closed);
    await this._saves.stop(closed);
    await this._ops.idle();
    const file = this._state.file as MetaFile;
    if (this._locks !== undefined) await releaseImageLocks(file, this._locks).catch(() => undefined);
    await file.close();
  }

  private exclusive<T>(task: () => Promise<T>): Promise<T> {
    return this._ops.run(() => this.started(task));
  }

  /** An operation's start: the image is still open, and metadata a failed write left unlike the disk is reloaded. */
  private async started<T>(task: () => Promise<T>): Promise<T> {
    this.assertOpen();
    await this._meta.refresh();
    return task();
  }

  private get _state(): ImageState {
    return this._meta.state;
  }

  /**
   * The refcounts for a write (ImageMetadata.refcountsForWrite: checked for
   * consistency the first time). The first write of an opening also discards
   * the free clusters that still hold bytes (a crash between a commit and its
   * discard, or during a save's data phase) and cuts the unreferenced tail:
   * only once the image has checked consistent, and only for an operation
   * that passed its own refusals, so a refused operation changes no byte.
   */
  private async refcountsForWrite(): Promise<RefcountStore> {
    const rc = await this._meta.refcountsForWrite();
    if (this._scrubPending) {
      this._scrubPending = false;
      await scrubFreeSpace(this._state);
    }
    return rc;
  }

  private assertOpen(): void {
    if (this._closing !== undefined) throw new SnapshotError(ErrorCode.IMAGE_CLOSED, `image '${this.path}' is closed`, { path: this.path });
  }

  private assertWritable(): void {
    if (this.readOnly) {
      throw new SnapshotError(ErrorCode.IMAGE_READ_ONLY, `image '${this.path}' was opened read-only`, { path: this.path });
    }
  }
}

export function openImage(path: PathLike, options?: OpenImageOptions): Promise<Image> {
  return Image.open(validatePath(path, 'path'), validateOpenImageOptions(options));
}

/** The sink behind `createSnapshotStream(path, { snapshot })`: the image is opened and closed with the stream. */
export function qcow2SinkFactory(path: string, name: string, config: SnapshotSinkConfig) {
  return snapshotSinkFactory(() => Image.open(path), name, config);
}
