/**
 * The order of operations on one open image. Every operation that reads or
 * changes the image's metadata (save, delete, revert, check) runs alone, in
 * call order. A save is long-lived: it holds the queue from its reservation
 * (beginSave) until its commit or abort, so a delete, revert, check or a
 * second save called meanwhile waits for it instead of allocating inside the
 * run the save has reserved. Built on p-queue with concurrency 1; the queue
 * is where the waiting happens, so it is also where close() waits.
 */
import PQueue from 'p-queue';

export class OperationQueue {
  private readonly _queue = new PQueue({ concurrency: 1 });

  /** Runs `task` after every operation queued before it, alone. */
  run<T>(task: () => Promise<T>): Promise<T> {
    return this._queue.add(task);
  }

  /**
   * Runs `task` alone like run(), then keeps the queue held until the
   * returned release() is called: what the task reserved stays reserved for
   * the operations that end the hold (commitSave/abortSave), which run
   * directly. Release exactly once, whatever happens.
   */
  async hold<T>(task: () => Promise<T>): Promise<{ value: T; release: () => void }> {
    let release!: () => void;
    const released = new Promise<void>((resolve) => {
      release = resolve;
    });
    let ready!: (outcome: { value: T } | { error: unknown }) => void;
    const started = new Promise<{ value: T } | { error: unknown }>((resolve) => {
      ready = resolve;
    });
    void this._queue.add(async () => {
      try {
        ready({ value: await task() });
      } catch (error) {
        ready({ error });
        return;
      }
      await released;
    });
    const outcome = await started;
    if ('error' in outcome) throw outcome.error;
    return { value: outcome.value, release };
  }

  /** Resolves once nothing runs or waits. */
  idle(): Promise<void> {
    return this._queue.onIdle();
  }
}
