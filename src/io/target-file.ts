/**
 * TargetFile: a typed, promise-based facade over one NativeFile.
 *
 * It decides the O_DIRECT policy (true / false / 'auto'), discovers the
 * alignment, and turns every errno into a coded SnapshotError that names the
 * syscall, the path and the offset. All I/O runs on the file's own native
 * threads; nothing here blocks the event loop.
 */
import { ErrorCode, SnapshotError } from '../errors.js';
import { addon, type LockFacts, type NativeFileHandle, type OpenFacts, type StatFacts } from './native.js';
import { call, closeHandle } from './native-call.js';
import { allocAligned, DEFAULT_ALIGNMENT, directAlignment, directUnsupportedReason, ioBufferAlignment } from './alignment.js';
import { takeZeroedBuffer } from './buffer-pool.js';

export type DirectMode = boolean | 'auto';
export type LockKind = 'read' | 'write' | 'unlock';

export interface TargetOpenOptions {
  write: boolean;
  create?: boolean;
  exclusive?: boolean;
  truncate?: boolean;
  direct?: DirectMode;
  /** Permission bits for a created file; 0o600 because files hold VM memory. */
  mode?: number;
  /** Native I/O threads for this file (1..4). */
  threads?: number;
}

export interface LockHolder {
  type: 'read' | 'write';
  pid: number;
}

const EINVAL = 22;
const LOCK_TYPES: Record<LockKind, number> = { unlock: 0, read: 1, write: 2 };

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;

export class TargetFile {
  readonly path: string;
  readonly fd: number;
  /** O_DIRECT is in effect on this descriptor. */
  readonly direct: boolean;
  /** File offsets and lengths of direct I/O must be multiples of this. */
  readonly alignment: number;
  /** Buffer addresses for direct I/O must be multiples of this. */
  readonly memoryAlignment: number;
  readonly isBlockDevice: boolean;
  /** Size in bytes when opened. */
  readonly size: number;
  /** Why O_DIRECT was not used, when it was not. */
  readonly directFallbackReason: string | undefined;
  /** Native I/O threads: the most operations that can run at once. */
  readonly threads: number;
  private readonly _native: NativeFileHandle;
  private _closed = false;

  private constructor(path: string, native: NativeFileHandle, facts: OpenFacts, fallbackReason: string | undefined, threads: number) {
    this.path = path;
    this.threads = threads;
    this._native = native;
    this.fd = facts.fd;
    this.direct = facts.directInEffect;
    const align = directAlignment(facts);
    this.alignment = this.direct ? align.offsetBytes : DEFAULT_ALIGNMENT;
    this.memoryAlignment = this.direct ? Math.max(align.memoryBytes, 1) : DEFAULT_ALIGNMENT;
    this.isBlockDevice = facts.isBlockDevice;
    this.size = facts.size;
    this.directFallbackReason = fallbackReason;
  }

  static async open(path: string, options: TargetOpenOptions): Promise<TargetFile> {
    const direct = options.direct ?? 'auto';
    const flags = {
      write: options.write,
      create: options.create ?? false,
      exclusive: options.exclusive ?? false,
      truncate: options.truncate ?? false,
      direct: direct !== false,
      mode: options.mode ?? 0o600,
    };
    const threads = options.threads ?? 1;
    let reason: string | undefined;
    if (flags.direct) {
      const attempt = await TargetFile.openOnce(path, flags, threads).catch((err: unknown) => {
        if (err instanceof SnapshotError && err.errno === EINVAL) return undefined; // the filesystem refused O_DIRECT
        throw err;
      });
      if (attempt !== undefined) {
        reason = directUnsupportedReason(attempt.facts);
        if (reason === undefined) return new TargetFile(path, attempt.native, attempt.facts, undefined, threads);
        await TargetFile.closeNative(attempt.native, path);
      } else {
        reason = 'the filesystem refused O_DIRECT (EINVAL)';
      }
      if (direct === true) {
        throw new SnapshotError(ErrorCode.DIRECT_IO_UNSUPPORTED, `O_DIRECT is not supported for '${path}': ${reason}`, {
          syscall: 'open',
          path,
        });
      }
      // The first attempt may already have created or truncated the file.
      flags.exclusive = false;
      flags.truncate = false;
    }
    flags.direct = false;
    const plain = await TargetFile.openOnce(path, flags, threads);
    return new TargetFile(path, plain.native, plain.facts, reason ?? 'direct I/O not requested', threads);
  }

  private static async openOnce(
    path: string,
    flags: Parameters<NativeFileHandle['open']>[1],
    threads: number,
  ): Promise<{ native: NativeFileHandle; facts: OpenFacts }> {
    const native = new addon.NativeFile(threads);
    try {
      const { details } = await call<OpenFacts>(undefined, 'open', undefined, (cb) => native.open(path, flags, cb), path);
      return { native, facts: details };
    } catch (err) {
      native.dispose();
      throw err;
    }
  }

  private static async closeNative(native: NativeFileHandle, path: string): Promise<void> {
    try {
      await call(undefined, 'close', undefined, (cb) => native.close(cb), path);
    } finally {
      native.dispose();
    }
  }

  get closed(): boolean {
    return this._closed;
  }

  /** A zeroed buffer aligned for this file's direct I/O (on a page boundary at least, see PAGE_BYTES). */
  allocBuffer(length: number): Uint8Array {
    return allocAligned(length, ioBufferAlignment(this.memoryAlignment, this.alignment));
  }

  /**
   * A zeroed aligned buffer from the process's pool when one fits (src/io/buffer-pool.ts);
   * give it back with returnZeroedBuffer, all zero and unused, or drop it.
   */
  takePooledBuffer(length: number): Uint8Array {
    return takeZeroedBuffer(length, ioBufferAlignment(this.memoryAlignment, this.alignment));
  }

  /** Writes all of `buffer` at `position`, or rejects with a coded error. */
  async write(buffer: Uint8Array, position: number): Promise<void> {
    this.assertOpen();
    await call(this, 'pwrite', position, (cb) => this._native.write(buffer, position, cb));
  }

  /**
   * How many operations may run at once, 1..threads; queued ones keep their
   * order. Takes effect from the next operation a native thread picks up.
   */
  setConcurrency(n: number): void {
    if (!Number.isInteger(n) || n < 1 || n > this.threads) {
      throw new RangeError(`Expected an integer from 1 to ${this.threads} for concurrency, received ${n}`);
    }
    this.assertOpen();
    this._native.setConcurrency(n);
  }

  /** Reads into `buffer`; the count is short only at end of file. */
  async read(buffer: Uint8Array, position: number): Promise<number> {
    this.assertOpen();
    const { bytes } = await call(this, 'pread', position, (cb) => this._native.read(buffer, position, cb));
    return bytes;
  }

  async datasync(): Promise<void> {
    this.assertOpen();
    await call(this, 'fdatasync', undefined, (cb) => this._native.datasync(cb));
  }

  async truncate(length: number): Promise<void> {
    this.assertOpen();
    await call(this, 'ftruncate', length, (cb) => this._native.truncate(length, cb));
  }

  /** fallocate(2); `mode` is a mask of the FALLOC_FL_* constants above. */
  async allocate(position: number, length: number, mode = 0): Promise<void> {
    this.assertOpen();
    await call(this, 'fallocate', position, (cb) => this._native.fallocate(mode, position, length, cb));
  }

  async stat(): Promise<StatFacts> {
    this.assertOpen();
    const { details } = await call<StatFacts>(this, 'fstat', undefined, (cb) => this._native.fstat(cb));
    return details;
  }

  /** The lock that would conflict with taking `kind` on the range, or null. */
  async getLock(start: number, length: number, kind: 'read' | 'write'): Promise<LockHolder | null> {
    this.assertOpen();
    const { details } = await call<LockFacts>(this, 'fcntl(F_OFD_GETLK)', start, (cb) =>
      this._native.getlk(start, length, LOCK_TYPES[kind], cb),
    );
    if (details.type === 0) return null;
    return { type: details.type === 2 ? 'write' : 'read', pid: details.pid };
  }

  /** Takes or drops an OFD lock without waiting; a conflict rejects with EAGAIN. */
  async setLock(start: number, length: number, kind: LockKind): Promise<void> {
    this.assertOpen();
    await call(this, 'fcntl(F_OFD_SETLK)', start, (cb) => this._native.setlk(start, length, LOCK_TYPES[kind], cb));
  }

  /**
   * Closes the descriptor. Callers must have awaited every operation first:
   * closing under a running write would let the fd number be reused while the
   * kernel still writes through it.
   */
  async close(): Promise<void> {
    if (this._closed) return;
    await closeHandle(this._native, this, () => {
      this._closed = true;
    });
  }

  private assertOpen(): void {
    if (this._closed) {
      throw new SnapshotError(ErrorCode.EBADF, `'${this.path}' is closed`, { path: this.path });
    }
  }
}
