/**
 * An open qcow2 image: list, export, delete, check and save internal
 * snapshots. Opening validates everything before any write, and a writable
 * image holds QEMU's lock bytes for as long as it is open (lock.ts).
 *
 * Operations are serialised: one runs at a time, in call order.
 */
import { ErrorCode, isSnapshotError, SnapshotError } from '../errors.js';
import { reserveSpace } from '../io/preallocate.js';
import { TargetFile } from '../io/target-file.js';
import { DEFAULT_BUFFER_SIZE, validateStreamOptions, type ResolvedStreamOptions, type StreamOptions } from '../options.js';
import { STREAM_IO_THREADS, type SinkFactory, type StreamSink } from '../stream/sink.js';
import { SnapshotStream } from '../stream/snapshot-stream.js';
import { checkImage, type CheckResult } from './check.js';
import { scrubFreeSpace, spaceReport } from './space.js';
import { corrupt } from './fail.js';
import type { MetaFile } from './file.js';
import { deleteSnapshotAt } from './image-delete.js';
import { SaveTransaction, snapshotExistsError, type SaveMetadata, type SaveReservation } from './image-save.js';
import { loadImageState, type ImageState } from './image-state.js';
import { acquireImageLocks, READER_LOCKS, releaseImageLocks, WRITER_LOCKS, type LockPlan } from './lock.js';
import {
  findSnapshot,
  MAX_SNAPSHOT_NAME_BYTES,
  QCOW_MAX_SNAPSHOTS,
  QCOW_MAX_SNAPSHOTS_SIZE_BYTES,
  snapshotTableBytesWithNew,
  type SnapshotEntry,
} from './snapshot-table.js';
import {
  createVmStateReadStream,
  validateVmStateReadOptions,
  type VmStateReadOptions,
  type VmStateReadStream,
} from './vmstate-reader.js';

export type { CheckResult } from './check.js';
export type { SaveMetadata, SaveReservation } from './image-save.js';

export interface OpenImageOptions {
  /** Only read: list, export, check. Default false. */
  readOnly?: boolean;
  /** Read-only without taking QEMU's lock bytes, like `qemu-img -U`. The image may change underneath. */
  forceShare?: boolean;
}

/** One internal snapshot, as `qemu-img snapshot -l` shows it. */
export interface SnapshotInfo {
  id: string;
  name: string;
  /** Saved VM state in bytes; 0 for a disk-only snapshot. */
  vmStateSize: number;
  /** Wall-clock time of the snapshot (millisecond precision; see dateNsec). */
  date: Date;
  dateSec: number;
  dateNsec: number;
  /** Guest clock in nanoseconds. A bigint: a guest running 105 days passes 2^53 ns. */
  vmClockNs: bigint;
  /** Virtual disk size in bytes when the snapshot was taken. */
  diskSize: number;
  /** Record/replay instruction count; -1n when replay was off (what savevm records). */
  icount: bigint;
}

function toInfo(entry: SnapshotEntry): SnapshotInfo {
  return {
    id: entry.id,
    name: entry.name,
    vmStateSize: entry.vmStateSize,
    date: new Date(entry.dateSec * 1000 + Math.floor(entry.dateNsec / 1_000_000)),
    dateSec: entry.dateSec,
    dateNsec: entry.dateNsec,
    vmClockNs: entry.vmClockNs,
    diskSize: entry.diskSize,
    icount: entry.icount,
  };
}

function notFound(idOrName: string): SnapshotError {
  return new SnapshotError(ErrorCode.SNAPSHOT_NOT_FOUND, `no snapshot with id or name '${idOrName}'`);
}

/** Checks a new snapshot name synchronously: option mistakes are TypeError/RangeError. */
export function validateNewSnapshotName(name: unknown, option = 'name'): string {
  if (typeof name !== 'string' || name.length === 0 || name.includes('\0')) {
    throw new TypeError(`Expected a non-empty snapshot name without NUL bytes for ${option}, received ${String(name)}`);
  }
  if (Buffer.byteLength(name, 'utf8') > MAX_SNAPSHOT_NAME_BYTES) {
    // QEMU keeps names in a 256-byte C string; longer ones could not be addressed by `loadvm`.
    throw new RangeError(`Expected a snapshot name of at most ${MAX_SNAPSHOT_NAME_BYTES} UTF-8 bytes for ${option}`);
  }
  return name;
}

export class Image {
  readonly path: string;
  readonly readOnly: boolean;
  private _state: ImageState;
  /** A write failed midway: the in-memory metadata may differ from the disk; reload before the next operation. */
  private _stale = false;
  /** assertConsistent() passed, and only our own complete commits wrote since (we hold the lock). */
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
  static async open(path: string, options: OpenImageOptions = {}): Promise<Image> {
    const readOnly = options.readOnly === true || options.forceShare === true;
    const file = await TargetFile.open(path, { write: !readOnly, create: false, direct: false });
    return Image.fromFile(file, options);
  }

  /**
   * @internal Opens an image on an already open metadata file (tests wrap it
   * to record or fail writes). Takes ownership of `file`.
   */
  static async fromFile(file: MetaFile, options: OpenImageOptions = {}): Promise<Image> {
    const { path } = file;
    const readOnly = options.readOnly === true || options.forceShare === true;
    const locks = options.forceShare === true ? undefined : readOnly ? READER_LOCKS : WRITER_LOCKS;
    try {
      if (locks !== undefined) await acquireImageLocks(file, locks);
      const state = await loadImageState(file);
      if (state.dirty && !readOnly) {
        throw corrupt(
          'the dirty bit is set (lazy refcounts were not written back); refusing to write. ' +
            'Repair with `qemu-img check -r all`',
          { path, offset: 72 },
        );
      }
      const image = new Image(path, readOnly, state, locks);
      if (!readOnly) await image.scrubFreeSpace();
      return image;
    } catch (err) {
      await file.close().catch(() => undefined);
      if (err instanceof SnapshotError && err.path === undefined) Object.assign(err, { path });
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
    return this._state.snapshots.map(toInfo);
  }

  /**
   * The saved VM state of a snapshot (by id, else by name), byte for byte.
   * The stream reads lazily: do not delete that snapshot or close the image
   * before it ends.
   */
  createVmStateReadStream(idOrName: string, options: VmStateReadOptions = {}): VmStateReadStream {
    const resolved = validateVmStateReadOptions(options);
    this.assertOpen();
    const entry = this._state.snapshots[findSnapshot(this._state.snapshots, idOrName)];
    if (entry === undefined) throw notFound(idOrName);
    return createVmStateReadStream(this._state, entry, resolved);
  }

  async deleteSnapshot(idOrName: string): Promise<SnapshotInfo> {
    return this.exclusive(async () => {
      this.assertWritable();
      const index = findSnapshot(this._state.snapshots, idOrName);
      if (index < 0) throw notFound(idOrName);
      await this.assertConsistent();
      // A save streaming meanwhile keeps its runs and its tail.
      const keep = { extents: this._save?.heldExtents() ?? [], endOffset: this._save?.heldEndOffset ?? 0 };
      try {
        return toInfo(await deleteSnapshotAt(this._state, index, keep));
      } catch (err) {
        this._stale = true;
        throw err;
      }
    });
  }

  /** qemu-img check's figures, and the space report (space.ts). */
  async check(): Promise<CheckResult> {
    return this.exclusive(async () => ({ ...(await checkImage(this._state)), space: await spaceReport(this._state) }));
  }

  /**
   * First half of a save: checks the name, then reserves the vmstate run at
   * the end of the file. Write the vmstate at `hostOffset`, fdatasync it,
   * then call commitSave() (or abortSave()).
   */
  beginSave(name: string, options: { alignment?: number; chunkBytes?: number; expectedBytes?: number } = {}): Promise<SaveReservation> {
    validateNewSnapshotName(name);
    const alignment = options.alignment ?? 1;
    if (!Number.isInteger(alignment) || alignment < 1 || alignment > 1 << 20 || (alignment & (alignment - 1)) !== 0) {
      throw new RangeError(`Expected a power of two up to 1 MiB for options.alignment, received ${String(alignment)}`);
    }
    return this.exclusive(async () => {
      this.assertWritable();
      if (this._save !== undefined) throw new SnapshotError(ErrorCode.EINVAL, 'a save is already in progress');
      const { snapshots } = this._state;
      if (snapshots.some((s) => s.name === name || s.id === name)) throw snapshotExistsError(name);
      if (snapshots.length >= QCOW_MAX_SNAPSHOTS) {
        throw new SnapshotError(ErrorCode.SNAPSHOT_LIMIT, `the image already has ${QCOW_MAX_SNAPSHOTS} snapshots`);
      }
      if (snapshotTableBytesWithNew(snapshots, name) > QCOW_MAX_SNAPSHOTS_SIZE_BYTES) {
        throw new SnapshotError(ErrorCode.SNAPSHOT_LIMIT, `the snapshot table would exceed QEMU's limit of ${QCOW_MAX_SNAPSHOTS_SIZE_BYTES} bytes`);
      }
      await this.assertConsistent();
      this._save = await SaveTransaction.begin(this._state, name, {
        alignmentBytes: alignment,
        chunkBytes: options.chunkBytes,
        expectedBytes: options.expectedBytes,
      });
      return { hostOffset: this._save.hostOffset, maxLength: this._save.maxLength };
    });
  }

  /** Second half of a save; resolves once the snapshot exists durably. */
  commitSave(meta: SaveMetadata): Promise<SnapshotInfo> {
    return this.exclusive(async () => {
      const save = this._save;
      if (save === undefined) throw new SnapshotError(ErrorCode.EINVAL, 'commitSave() without beginSave()');
      try {
        const entry = await save.commit(meta);
        return toInfo(entry);
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

  /**
   * A StreamSink (src/stream/sink.ts) that saves into snapshot `name` of this
   * image. With preallocate 'space', the vmstate run and its metadata are
   * reserved before the first byte: a full disk fails here, image untouched.
   */
  async openSnapshotSink(
    name: string,
    options: Pick<ResolvedStreamOptions, 'direct' | 'vmClockNs'> &
      Partial<Pick<ResolvedStreamOptions, 'preallocate' | 'expectedSize' | 'signal' | 'bufferSize'>>,
  ): Promise<StreamSink> {
    const data = await TargetFile.open(this.path, { write: true, create: false, direct: options.direct, threads: STREAM_IO_THREADS });
    let reservation: SaveReservation;
    try {
      // The stream's buffer size: free runs holding at least one buffer are reused for the vmstate.
      reservation = await this.beginSave(name, {
        alignment: data.alignment,
        chunkBytes: options.bufferSize ?? DEFAULT_BUFFER_SIZE,
        expectedBytes: options.expectedSize,
      });
    } catch (err) {
      await data.close().catch(() => undefined);
      throw err;
    }
    const save = this._save!;
    if (options.preallocate === 'space' && options.expectedSize !== undefined && options.expectedSize > 0) {
      try {
        // Free runs inside the file (punched) and the end: ENOSPC here, before the first byte.
        // On failure abortSave() discards and truncates back to the length at open: nothing was written.
        for (const e of save.reservationExtents(options.expectedSize)) {
          await reserveSpace(data, e.offset, e.length, { signal: options.signal });
        }
      } catch (err) {
        await this.abortSave().catch(() => undefined);
        await data.close().catch(() => undefined);
        throw err;
      }
    }
    return {
      file: data,
      baseOffset: reservation.hostOffset,
      maxLength: reservation.maxLength,
      place: (logical, length) => save.place(logical, length),
      finalize: async (logicalLength) => {
        // fdatasync: the vmstate is durable before any metadata can point at it (commit step 1).
        await data.datasync();
        await this.commitSave({ vmStateSize: logicalLength, vmClockNs: options.vmClockNs });
      },
      abort: async () => this.abortSave(),
      close: async () => data.close(),
    };
  }

  /** A Writable whose bytes become the vmstate of new snapshot `name`; the snapshot exists after 'finish'. */
  createSnapshotStream(name: string, options?: StreamOptions): SnapshotStream {
    validateNewSnapshotName(name);
    const opts = validateStreamOptions(options);
    return new SnapshotStream(opts, () => this.openSnapshotSink(name, opts));
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

  /**
   * Refuses to write into an image whose metadata disagrees with itself
   * (refcounts below their references, overlapping or out-of-file
   * structures): QEMU's pre-write overlap checks, done once and completely
   * before the first byte is written. Leaks and COPIED mismatches are fine:
   * a save recomputes COPIED from the refcounts.
   */
  private async assertConsistent(): Promise<void> {
    if (this._verified) return;
    const result = await checkImage(this._state);
    const structural = result.corruptions - result.copiedFlagErrors + result.checkErrors;
    if (structural === 0) {
      this._verified = true;
      return;
    }
    const first = result.messages.find((m) => m.startsWith('ERROR') && !m.includes('OFLAG_COPIED')) ?? '';
    throw corrupt(
      `${structural} inconsistenc${structural === 1 ? 'y' : 'ies'} in the metadata (${first.replace(/^ERROR /, '')}); ` +
        'refusing to write. Inspect with `qemu-img check`, repair with `qemu-img check -r all`',
      { path: this.path },
    );
  }

  /**
   * At a write-open: free clusters that still hold bytes (a crash between a
   * commit and its discard, or during a save's data phase) are discarded,
   * and the unreferenced tail is cut. Only on an image that checks
   * consistent: an inconsistent one is refused at its first write instead.
   */
  private async scrubFreeSpace(): Promise<void> {
    try {
      await this.assertConsistent();
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

export function openImage(path: string, options: OpenImageOptions = {}): Promise<Image> {
  if (typeof path !== 'string' || path.length === 0) throw new TypeError(`Expected a non-empty path for path, received ${String(path)}`);
  if (options === null || typeof options !== 'object') throw new TypeError('Expected an object for options');
  return Image.open(path, options);
}

/**
 * The sink behind `createSnapshotStream(path, { snapshot })`: opens the image
 * for writing (taking QEMU's locks), reserves the vmstate run, and closes the
 * image after the stream is done, committed or not.
 */
export function qcow2SinkFactory(path: string, options: ResolvedStreamOptions): SinkFactory {
  const name = validateNewSnapshotName(options.snapshot, 'options.snapshot');
  return async () => {
    const img = await Image.open(path);
    let sink: StreamSink;
    try {
      sink = await img.openSnapshotSink(name, options);
    } catch (err) {
      await img.close().catch(() => undefined);
      throw err;
    }
    return {
      ...sink,
      close: async () => {
        try {
          await sink.close();
        } finally {
          await img.close();
        }
      },
    };
  };
}
