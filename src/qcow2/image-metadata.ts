/**
 * The in-memory metadata of an open image and whether it can be trusted.
 * Our own complete commits keep it equal to the disk (we hold the write
 * lock). A write that fails midway may leave it unlike the disk: it is then
 * reloaded before the next operation, and checked again before the next write.
 */
import { refuseInconsistent } from './check.js';
import { loadImageState, loadRefcounts, type ImageState } from './image-state.js';
import type { RefcountStore } from './refcount.js';

export class ImageMetadata {
  private _state: ImageState;
  /** A write failed midway: reload before the next operation. */
  private _stale = false;
  /** refuseInconsistent() passed, and only our own complete commits wrote since. */
  private _verified = false;
  private readonly _path: string;

  constructor(state: ImageState, path: string) {
    this._state = state;
    this._path = path;
  }

  get state(): ImageState {
    return this._state;
  }

  /** At the start of every operation: reloads what a failed write may have left unlike the disk. */
  async refresh(): Promise<void> {
    if (!this._stale) return;
    this._state = await loadImageState(this._state.file);
    this._stale = false;
    this._verified = false;
  }

  /** Runs a write; if it fails, the metadata is reloaded before the next operation. */
  async writing<T>(task: () => Promise<T>): Promise<T> {
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
  async refcountsForWrite(): Promise<RefcountStore> {
    const rc = await loadRefcounts(this._state);
    if (!this._verified) {
      await refuseInconsistent(this._state, rc, this._path);
      this._verified = true;
    }
    return rc;
  }
}
