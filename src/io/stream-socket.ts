/**
 * StreamSocket: a connected unix stream socket whose bytes move on a native
 * thread, straight between the socket and the caller's (aligned, reused)
 * buffers. QEMU's migration stream goes through it: no net.Socket, no chunk
 * allocated per read, no JS callback per 64 KiB.
 *
 * Either end may start it: connect() to a listening peer, or listen() and
 * accept() the one peer that connects (QEMU's outgoing migration).
 *
 * send() and recv() queue in order on the socket's one thread. A peer that
 * stops reading or writing for `timeoutMs` fails the call with EAGAIN
 * (SO_SNDTIMEO/SO_RCVTIMEO); shutdown() wakes a call that is blocked now.
 */
import assert from 'node:assert/strict';
import { ErrorCode, SnapshotError } from '../errors.js';
import { addon, type NativeFileHandle } from './native.js';
import { call, closeHandle } from './native-call.js';

export interface StreamSocketOptions {
  /** A send or recv that moves no byte for this long fails with EAGAIN; 0 waits forever. */
  timeoutMs: number;
}

export class StreamSocket {
  /** The socket's path, named in errors. */
  readonly path: string;
  private readonly _native: NativeFileHandle;
  private _closed = false;
  /** shutdown() was called here: a short recv is our end, not the peer's. */
  private _shutDown = false;

  private constructor(path: string, native: NativeFileHandle) {
    this.path = path;
    this._native = native;
  }

  /** Connects to `path`; rejects with the coded errno (ENOENT, ECONNREFUSED, ...). */
  static async connect(path: string, options: StreamSocketOptions): Promise<StreamSocket> {
    const native = new addon.NativeFile(1);
    try {
      await call(undefined, 'connect', undefined, (cb) => native.connect(path, options.timeoutMs, cb), path);
    } catch (err) {
      native.dispose();
      throw err;
    }
    return new StreamSocket(path, native);
  }

  /**
   * A socket listening at `path` (which must not exist yet: EADDRINUSE) for
   * one peer; accept() turns it into the connection to that peer.
   */
  static async listen(path: string): Promise<StreamSocket> {
    const native = new addon.NativeFile(1);
    try {
      await call(undefined, 'bind', undefined, (cb) => native.listen(path, cb), path);
    } catch (err) {
      native.dispose();
      throw err;
    }
    return new StreamSocket(path, native);
  }

  /**
   * Waits for the peer of a listening socket (at most `waitMs`: ETIMEDOUT;
   * shutdown() ends the wait: ECANCELED); from then on this socket is the
   * connection, and the listening socket is closed.
   */
  async accept(waitMs: number, options: StreamSocketOptions): Promise<void> {
    this.assertOpen();
    await call(this, 'accept', undefined, (cb) => this._native.accept(waitMs, options.timeoutMs, cb));
  }

  /**
   * Writes all of `buffer`. The buffer must stay untouched until this
   * settles. The first failure shuts the socket down, so sends queued behind
   * it fail at once (EPIPE) instead of each waiting out the stall timeout, and
   * nothing after a gap reaches the peer.
   */
  async send(buffer: Uint8Array): Promise<void> {
    this.assertOpen();
    try {
      await call(this, 'send', undefined, (cb) => this._native.send(buffer, cb));
    } catch (err) {
      this.shutdown();
      throw err;
    }
  }

  /**
   * Fills `buffer`; fewer bytes only when the peer ended the stream. After our
   * own shutdown() a short read is ECANCELED, never a clean end. A failure
   * shuts the socket down, as for send.
   */
  async recv(buffer: Uint8Array): Promise<number> {
    this.assertOpen();
    let bytes: number;
    try {
      ({ bytes } = await call(this, 'recv', undefined, (cb) => this._native.recv(buffer, cb)));
    } catch (err) {
      this.shutdown();
      throw err;
    }
    if (bytes < buffer.length && this._shutDown) {
      throw new SnapshotError(ErrorCode.ECANCELED, `recv on '${this.path}' ended: the socket was shut down here`, { syscall: 'recv', path: this.path });
    }
    return bytes;
  }

  /** Ends both directions now: queued and blocked calls fail (EPIPE) or see the end of the stream. */
  shutdown(): void {
    this._shutDown = true;
    if (!this._closed) this._native.shutdown();
  }

  /** Operations still queued or running. */
  get pending(): number {
    return this._closed ? 0 : this._native.pending();
  }

  /** Closes the descriptor; every send and recv must have settled (shutdown() first to hurry them). */
  async close(): Promise<void> {
    if (this._closed) return;
    await closeHandle(this._native, this, () => {
      this._closed = true;
    });
  }

  private assertOpen(): void {
    assert.ok(!this._closed, 'socket I/O after close()');
  }
}
