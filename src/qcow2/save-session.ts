/**
 * One save in progress on an open image, from its reservation to its commit
 * or abort. It holds the image's operation queue all that time (the release
 * callback gives it back), and it makes commit and abort exclusive: an abort
 * that arrives while the commit runs (a stream destroyed during its
 * finalize, close() of the image) waits for the commit instead of
 * truncating the file under it.
 */
import { ErrorCode, SnapshotError } from '../errors.js';
import { invariant } from './fail.js';
import type { SaveMetadata, SaveTransaction } from './image-save.js';
import type { OperationQueue } from './operation-queue.js';
import type { SnapshotEntry } from './snapshot-table.js';

export class SaveSession {
  readonly tx: SaveTransaction;
  /** Stops the stream that writes this save (set by the sink); close() of the image calls it. */
  readonly cancel: ((error: SnapshotError) => void) | undefined;
  private readonly _release: () => void;
  private _ending: Promise<unknown> | undefined;
  private _released = false;

  constructor(tx: SaveTransaction, release: () => void, cancel: ((error: SnapshotError) => void) | undefined) {
    this.tx = tx;
    this._release = release;
    this.cancel = cancel;
  }

  /** A commit or abort has started: nothing else may touch the reservation. */
  get ending(): boolean {
    return this._ending !== undefined;
  }

  /** Commits; on failure the transaction is aborted. Either way the queue is released. */
  commit(meta: SaveMetadata): Promise<SnapshotEntry> {
    if (this._ending !== undefined) {
      return Promise.reject(new SnapshotError(ErrorCode.EINVAL, 'the save is already being committed or aborted'));
    }
    const committing = this.tx
      .commit(meta)
      .catch(async (err: unknown) => {
        await this.tx.abort().catch(() => undefined);
        throw err;
      })
      .finally(() => this.end());
    this._ending = committing;
    return committing;
  }

  /** Aborts, or waits for a commit already running (which then stands or has aborted itself). */
  async abort(): Promise<void> {
    if (this._ending !== undefined) {
      await this._ending.catch(() => undefined);
      return;
    }
    this._ending = this.tx.abort().finally(() => this.end());
    await this._ending;
  }

  private end(): void {
    if (this._released) return;
    this._released = true;
    this._release();
  }
}

/** The one save an image may have in progress, holding the operation queue from its reservation to its end. */
export class SaveSlot {
  private _session: SaveSession | undefined;
  private readonly _ops: OperationQueue;

  constructor(ops: OperationQueue) {
    this._ops = ops;
  }

  get session(): SaveSession | undefined {
    return this._session;
  }

  /** Runs `reserve` alone in the queue, then keeps the queue held until the save commits or aborts. */
  async begin(reserve: () => Promise<SaveTransaction>, cancel: ((error: SnapshotError) => void) | undefined): Promise<SaveTransaction> {
    const { value: tx, release } = await this._ops.hold(async () => {
      invariant(this._session === undefined, 'one save at a time holds the queue');
      return reserve();
    });
    this._session = new SaveSession(tx, () => {
      this._session = undefined;
      release();
    }, cancel);
    return tx;
  }

  /** The save in progress, for `what` (a commit, an abort, a preallocation); EINVAL without one. */
  running(what: string): SaveSession {
    const save = this._session;
    if (save === undefined || save.ending) throw new SnapshotError(ErrorCode.EINVAL, `${what}() without a save in progress (beginSave())`);
    return save;
  }

  /** close(): a save not yet ending is stopped through its writer (which then aborts it), or aborted here. */
  async stop(error: SnapshotError): Promise<void> {
    const save = this._session;
    if (save === undefined || save.ending) return;
    if (save.cancel !== undefined) save.cancel(error);
    else await save.abort().catch(() => undefined);
  }
}
