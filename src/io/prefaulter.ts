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
 * MADV_POPULATE_WRITE (before Linux 5.14) answers EINVAL, a seccomp filter
 * ENOSYS or EPERM; from then on this prefaulter does nothing and the reads
 * fault the pages as before. Any other failure (ENOMEM) is left to the read,
 * which meets it for real.
 */
import assert from 'node:assert/strict';
import { constants } from 'node:os';
import { addon, type NativeFileHandle } from './native.js';

/**
 * Answers that mean the kernel will never do it: EINVAL, the advice unknown
 * (before Linux 5.14); ENOSYS and EPERM, madvise refused (a seccomp filter).
 * Others (ENOMEM) are not remembered: the read that follows meets them.
 */
const UNSUPPORTED = new Set([constants.errno.EINVAL, constants.errno.ENOSYS, constants.errno.EPERM]);

export class Prefaulter {
  private readonly _native: NativeFileHandle = new addon.NativeFile(1);
  private _disposed = false;
  /** The kernel refused once (no MADV_POPULATE_WRITE): stop asking. */
  private _unsupported = false;
  private _pending = 0;

  /** Resolves once `buffer`'s pages are mapped, or when they cannot be; never rejects. */
  prefault(buffer: Uint8Array): Promise<void> {
    if (this._disposed || this._unsupported || buffer.length === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const done = (errno: number): void => {
        this._pending--;
        if (UNSUPPORTED.has(errno)) this._unsupported = true;
        resolve();
      };
      this._pending++;
      try {
        this._native.prefault(buffer, done);
      } catch {
        // Not submitted (nothing the library passes makes the addon throw here):
        // the read maps the pages itself, as without a prefaulter.
        done(0);
      }
    });
  }

  /** False once the kernel answered that it will not populate (EINVAL, ENOSYS, EPERM). */
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
