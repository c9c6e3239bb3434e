/**
 * The stream sink of a save: a SnapshotStream's bytes land in the vmstate
 * run an image reserved (Image#beginSave), and the stream's end commits the
 * snapshot (Image#commitSave). Opened on an image the caller holds open, or,
 * for createSnapshotStream(path, { snapshot }), on one it opens and closes
 * with the stream.
 */
import { ErrorCode, SnapshotError } from '../errors.js';
import { TargetFile } from '../io/target-file.js';
import { STREAM_IO_THREADS, type SinkFactory, type StreamSink } from '../stream/sink.js';
import type { Image } from './image.js';
import type { SnapshotSinkConfig } from './image-options.js';

export interface SinkHooks {
  /** Stops the stream that writes into the sink (the image is being closed). */
  cancel?: (error: SnapshotError) => void;
  /** Runs after the sink's file is closed: closes an image the sink opened itself. */
  afterClose?: () => Promise<void>;
}

export class SnapshotSink implements StreamSink {
  readonly file: TargetFile;
  readonly baseOffset: number;
  readonly maxLength: number;
  private readonly _image: Image;
  private readonly _vmClockNs: bigint;
  /** Runs after the file is closed: closes an image the sink opened itself. */
  private readonly _afterClose: (() => Promise<void>) | undefined;

  private constructor(image: Image, file: TargetFile, reservation: { baseOffset: number; maxLength: number }, vmClockNs: bigint, afterClose?: () => Promise<void>) {
    this._image = image;
    this.file = file;
    this.baseOffset = reservation.baseOffset;
    this.maxLength = reservation.maxLength;
    this._vmClockNs = vmClockNs;
    this._afterClose = afterClose;
  }

  /**
   * Opens the stream's own descriptor on the image (O_DIRECT per config),
   * reserves the vmstate run at its alignment and, with preallocate 'space',
   * the disk space for all of the save: a full disk fails here, image untouched.
   */
  static async open(image: Image, name: string, config: SnapshotSinkConfig, hooks: SinkHooks = {}): Promise<SnapshotSink> {
    const file = await TargetFile.open(image.path, { write: true, create: false, direct: config.direct, threads: STREAM_IO_THREADS });
    try {
      const reservation = await image.beginSave(name, { alignment: file.alignment, cancel: hooks.cancel });
      if (config.preallocate === 'space' && config.expectedSize !== undefined && config.expectedSize > 0) {
        await image.preallocateSave(file, config.expectedSize, config.signal).catch(async (err: unknown) => {
          await image.abortSave().catch(() => undefined);
          throw err;
        });
      }
      return new SnapshotSink(image, file, reservation, config.vmClockNs, hooks.afterClose);
    } catch (err) {
      await file.close().catch(() => undefined);
      throw err;
    }
  }

  async finalize(logicalLength: number): Promise<void> {
    if (logicalLength === 0) {
      // QEMU reads a snapshot with vm_state_size 0 as disk-only: loadvm would refuse it.
      throw new SnapshotError(ErrorCode.SNAPSHOT_EMPTY, `the vmstate for the new snapshot is empty; nothing was saved`, {
        path: this.file.path,
      });
    }
    // fdatasync: the vmstate is durable before any metadata can point at it (commit step 1).
    await this.file.datasync();
    await this._image.commitSave({ vmStateSize: logicalLength, vmClockNs: this._vmClockNs });
  }

  async abort(): Promise<void> {
    await this._image.abortSave();
  }

  async close(): Promise<void> {
    try {
      await this.file.close();
    } finally {
      await this._afterClose?.();
    }
  }
}

/**
 * The sink behind `createSnapshotStream(path, { snapshot })`: opens the image
 * for writing (taking QEMU's locks) when the stream opens, and closes it
 * after the stream is done, committed or not.
 */
export function snapshotSinkFactory(open: () => Promise<Image>, name: string, config: SnapshotSinkConfig): SinkFactory {
  return async () => {
    const image = await open();
    try {
      return await SnapshotSink.open(image, name, config, { afterClose: () => image.close() });
    } catch (err) {
      await image.close().catch(() => undefined);
      throw err;
    }
  };
}
