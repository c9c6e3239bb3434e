/**
 * Prefaulter: maps fresh buffers' pages in on a native thread of its own,
 * ahead of the I/O that will fill them.
 *
 * Why: a direct read into memory nobody has touched yet faults every page in
 * itself, on the I/O thread and before the device has anything to do. On
 * these virtual machines that is slow (docs/performance.md: about 1.6 ms per
 * fresh 4 MiB even on huge pages), and a consumer-owned chunk (the export's
 * Readable) is fresh memory every time. Populating it on another thread while
 * the previous chunk's read runs takes that work off the read's path.
 *
 * Advice only: the bytes are not touched. A kernel without
 * MADV_POPULATE_WRITE (before Linux 5.14) answers EINVAL; from then on this
 * prefaulter does nothing and the reads fault the pages as before. Any other
 * failure (ENOMEM) is left to the read, which meets it for real.
 */
import assert from 'node:assert/strict';
import { constants } from 'node:os';
import { addon, type NativeFileHandle } from './native.js';

export class Prefaulter {
  private readonly _native: NativeFileHandle = new addon.NativeFile(1);
  private _disposed = false;
  /** The kernel refused once (no MADV_POPULATE_WRITE): stop asking. */
  private _unsupported = false;
  private _pending = 0;

  /** Resolves once `buffer`'s pages are mapped, or when they cannot be; never rejects. */
  prefault(buffer: Uint8Array): Promise<void> {
    if (this._disposed || this._unsupported || buffer.length === 0) return Promise.resolve();
    this._pending++;
    return new Promise((resolve) => {
      this._native.prefault(buffer, (errno) => {
        this._pending--;
        // EINVAL: the advice is unknown to this kernel. Others (ENOMEM) are
        // not remembered: the read that follows reports them.
        if (errno === constants.errno.EINVAL) this._unsupported = true;
        resolve();
      });
    });
  }

  /** False once the kernel answered that it has no MADV_POPULATE_WRITE. */
  get supported(): boolean {
    return !this._unsupported;
  }

  /** Prefaults in flight (teardown waits for them through the reads that follow). */
  get pending(): number {
    return this._pending;
  }

  /** Stops the thread. Every prefault must have settled. Idempotent. */
  dispose(): void {
    if (this._disposed) return;
    assert.equal(this._pending, 0, 'Prefaulter.dispose() with a prefault in flight');
    this._disposed = true;
    this._native.dispose();
  }
}
