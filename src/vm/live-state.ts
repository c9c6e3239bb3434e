/**
 * The state image of a live savevm: a qcow2 file that no QEMU has open,
 * holding the vmstate as an internal snapshot named like the disk-only
 * snapshots QEMU took of the VM's disks (docs/live-checkpoint.md).
 *
 * It is opened, and created when missing, before the VM is stopped, and its
 * lock bytes are held from then until the end, so a QEMU started meanwhile
 * refuses it. The vmstate is written into the run Image#beginSave reserved;
 * nothing references it until commit() (the shadow commit, one header
 * write), so any failure or a kill -9 leaves the image meaning what it meant.
 */
import { stat } from 'node:fs/promises';
import { ErrorCode, SnapshotError } from '../errors.js';
import { TargetFile } from '../io/target-file.js';
import { createImage } from '../qcow2/create.js';
import { editVmStateTail } from '../qcow2/handoff.js';
import { openImage, type Image, type SnapshotInfo } from '../qcow2/image.js';
import { STREAM_IO_THREADS, type StreamSink } from '../stream/sink.js';

/**
 * Virtual size of a state image snapstream creates. Its disk is never used;
 * the vmstate area starts at the first L2 boundary past it (512 MiB with
 * 64 KiB clusters), so the size only has to be non-zero.
 */
export const STATE_IMAGE_SIZE_BYTES = 1 << 20;

export class StateImageSave {
  readonly path: string;
  readonly name: string;
  /** True when this save created the file (a failure removes nothing else). */
  readonly created: boolean;
  private readonly _image: Image;
  private readonly _data: TargetFile;
  private readonly _reservation: { baseOffset: number; maxLength: number };
  private _done = false;

  private constructor(path: string, name: string, created: boolean, image: Image, data: TargetFile, reservation: { baseOffset: number; maxLength: number }) {
    this.path = path;
    this.name = name;
    this.created = created;
    this._image = image;
    this._data = data;
    this._reservation = reservation;
  }

  /**
   * Opens (or creates) the state image with its locks, and reserves the
   * vmstate run for snapshot `name`: IMAGE_LOCKED when a QEMU has it open,
   * SNAPSHOT_EXISTS when the name is taken. Call before the VM stops.
   */
  static async begin(path: string, name: string): Promise<StateImageSave> {
    const created = await createIfMissing(path);
    const image = await openImage(path);
    let data: TargetFile | undefined;
    try {
      data = await TargetFile.open(path, { write: true, create: false, direct: 'auto', threads: STREAM_IO_THREADS });
      const reservation = await image.beginSave(name, { alignment: data.alignment });
      return new StateImageSave(path, name, created, image, data, reservation);
    } catch (err) {
      await data?.close().catch(() => undefined);
      await image.close().catch(() => undefined);
      throw err;
    }
  }

  /** The sink of the SnapshotStream that takes QEMU's migration stream; finalize only makes it durable. */
  sink(): StreamSink {
    const data = this._data;
    return {
      file: data,
      baseOffset: this._reservation.baseOffset,
      maxLength: this._reservation.maxLength,
      // fdatasync: the vmstate is durable before any metadata can point at it (commit step 1).
      finalize: async () => data.datasync(),
      abort: async () => undefined,
      close: async () => undefined,
    };
  }

  /** See HandoffSave#editTail: the run state and guest clock live in the stream's tail. */
  editTail(length: number, tailBytes: number, edit: (tail: Buffer) => boolean): Promise<void> {
    return editVmStateTail(this.path, this._reservation.baseOffset, length, tailBytes, edit);
  }

  /** The commit point: after this the state image holds snapshot `name`. */
  async commit(vmStateSize: number, vmClockNs: bigint, date: Date): Promise<SnapshotInfo> {
    if (vmStateSize === 0) throw new SnapshotError(ErrorCode.SNAPSHOT_EMPTY, 'QEMU sent no vmstate bytes; nothing was committed', { path: this.path });
    const info = await this._image.commitSave({ vmStateSize, vmClockNs, date });
    this._done = true;
    return info;
  }

  /** Abandons an uncommitted save (the file keeps its old meaning and length), then closes. Idempotent. */
  async close(): Promise<void> {
    if (!this._done) await this._image.abortSave().catch(() => undefined);
    this._done = true;
    await this._data.close().catch(() => undefined);
    await this._image.close();
  }
}

/** Refuses a state image that is one of the VM's own images (same inode), whatever path names it. */
export async function assertNotVmImage(stateImage: string, vmImages: readonly string[]): Promise<void> {
  const state = await stat(stateImage).catch(() => undefined);
  if (state === undefined) return;
  for (const path of vmImages) {
    const other = await stat(path).catch(() => undefined);
    if (other !== undefined && other.dev === state.dev && other.ino === state.ino) {
      throw new SnapshotError(ErrorCode.SAME_FILE, `the state image '${stateImage}' is the VM's own image '${path}'; give a separate file that no QEMU has open`, {
        path: stateImage,
      });
    }
  }
}

async function createIfMissing(path: string): Promise<boolean> {
  const existing = await stat(path).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return undefined;
    throw err;
  });
  if (existing !== undefined) return false;
  await createImage(path, { size: STATE_IMAGE_SIZE_BYTES });
  return true;
}

/** The live snapshot `name` (or id) in a state image, with its vmstate; refuses one that is missing or has none. */
export async function findStateSnapshot(path: string, name: string): Promise<SnapshotInfo> {
  const image = await openImage(path, { readOnly: true });
  try {
    const snapshots = image.snapshots();
    const found = snapshots.find((s) => s.id === name) ?? snapshots.find((s) => s.name === name);
    if (found === undefined) throw new SnapshotError(ErrorCode.SNAPSHOT_NOT_FOUND, `the state image '${path}' has no snapshot '${name}'`, { path });
    if (found.vmStateSize === 0) throw new SnapshotError(ErrorCode.SNAPSHOT_DISK_ONLY, `snapshot '${name}' in the state image '${path}' has no vmstate`, { path });
    return found;
  } finally {
    await image.close();
  }
}
