/**
 * The submit queue: full ring buffers go here and are written in order of
 * submission, at most `concurrency` at a time, each on the target's own
 * native I/O threads. p-queue bounds how much is handed to the native layer;
 * the ring above bounds memory.
 */
import PQueue from 'p-queue';
import { toSnapshotError, type SnapshotError } from '../errors.js';
import type { TargetFile } from './target-file.js';

export type WriteDone = (error: SnapshotError | undefined) => void;

export class SubmitQueue {
  private readonly _file: TargetFile;
  private readonly _queue: PQueue;

  constructor(file: TargetFile, concurrency: number) {
    if (!Number.isInteger(concurrency) || concurrency < 1) throw new RangeError(`bad concurrency ${concurrency}`);
    this._file = file;
    this._queue = new PQueue({ concurrency });
  }

  /** Writes queued or running. */
  get size(): number {
    return this._queue.size + this._queue.pending;
  }

  /**
   * Queues `buffer` for `position`. `done` runs exactly once, on the JS
   * thread, after the write finished or failed; it is never called
   * synchronously, and this method never throws.
   */
  submit(buffer: Uint8Array, position: number, done: WriteDone): void {
    const file = this._file;
    this._queue.add(() => file.write(buffer, position)).then(
      () => done(undefined),
      (err: unknown) => done(toSnapshotError(err)),
    );
  }

  /**
   * Like submit(), for a buffer whose bytes go to several places (`pieces`,
   * in order): one queue slot, written piece by piece, `done` once.
   */
  submitPieces(buffer: Uint8Array, pieces: ReadonlyArray<{ from: number; to: number; position: number }>, done: WriteDone): void {
    const file = this._file;
    this._queue
      .add(async () => {
        for (const p of pieces) await file.write(buffer.subarray(p.from, p.to), p.position);
      })
      .then(
        () => done(undefined),
        (err: unknown) => done(toSnapshotError(err)),
      );
  }

  /** Resolves when nothing is queued or running. */
  async drain(): Promise<void> {
    await this._queue.onIdle();
  }
}
