/**
 * Every failure snapstream reports is a SnapshotError with a stable `code`.
 * The codes are one closed table, here, so that callers can switch on them,
 * the CLI can attach hints, and a misspelt code does not compile.
 */
import { getSystemErrorName } from 'node:util';

/**
 * The errno names a system call can surface as a code of its own. Any other
 * errno becomes EIO; the real name stays in the message and in `errno`.
 */
const ERRNO_CODES = {
  EACCES: 'EACCES',
  EAGAIN: 'EAGAIN',
  EBADF: 'EBADF',
  EADDRINUSE: 'EADDRINUSE',
  EBUSY: 'EBUSY',
  ECANCELED: 'ECANCELED',
  ECONNREFUSED: 'ECONNREFUSED',
  ECONNRESET: 'ECONNRESET',
  EDQUOT: 'EDQUOT',
  EEXIST: 'EEXIST',
  EFBIG: 'EFBIG',
  EINTR: 'EINTR',
  EINVAL: 'EINVAL',
  EIO: 'EIO',
  EISDIR: 'EISDIR',
  ELOOP: 'ELOOP',
  EMFILE: 'EMFILE',
  ENAMETOOLONG: 'ENAMETOOLONG',
  ENFILE: 'ENFILE',
  ENODEV: 'ENODEV',
  ENOENT: 'ENOENT',
  ENOMEM: 'ENOMEM',
  ENOSPC: 'ENOSPC',
  ENOTDIR: 'ENOTDIR',
  ENXIO: 'ENXIO',
  EOPNOTSUPP: 'EOPNOTSUPP',
  EOVERFLOW: 'EOVERFLOW',
  EPERM: 'EPERM',
  EPIPE: 'EPIPE',
  EROFS: 'EROFS',
  ESPIPE: 'ESPIPE',
  ETIMEDOUT: 'ETIMEDOUT',
  ETXTBSY: 'ETXTBSY',
  EXDEV: 'EXDEV',
} as const;

export const ErrorCode = {
  ...ERRNO_CODES,
  /** O_DIRECT was required (`direct: true`) and the filesystem refuses it. */
  DIRECT_IO_UNSUPPORTED: 'DIRECT_IO_UNSUPPORTED',
  /** A QEMU or another snapstream holds the image's lock bytes. */
  IMAGE_LOCKED: 'IMAGE_LOCKED',
  /** A raw target is being written by another stream (its OFD lock is held). */
  TARGET_LOCKED: 'TARGET_LOCKED',
  /** A write was asked of an image opened with `readOnly`. */
  IMAGE_READ_ONLY: 'IMAGE_READ_ONLY',
  /** An operation was asked of an image after close(). */
  IMAGE_CLOSED: 'IMAGE_CLOSED',
  /** The dirty bit is set (lazy refcounts not written back): repairable with `qemu-img check -r all`. */
  IMAGE_DIRTY: 'IMAGE_DIRTY',
  /** The file is not a qcow2 image at all (no qcow2 magic). */
  NOT_QCOW2: 'NOT_QCOW2',
  /** A qcow2 image breaks the format or QEMU's limits. */
  QCOW2_CORRUPT: 'QCOW2_CORRUPT',
  /** A valid qcow2 image uses something snapstream does not implement. */
  QCOW2_UNSUPPORTED: 'QCOW2_UNSUPPORTED',
  /** A raw write would overwrite something that looks like a disk image. */
  NOT_RAW: 'NOT_RAW',
  /** The source of a save or write is the target itself. */
  SAME_FILE: 'SAME_FILE',
  SNAPSHOT_EXISTS: 'SNAPSHOT_EXISTS',
  SNAPSHOT_NOT_FOUND: 'SNAPSHOT_NOT_FOUND',
  /** The snapshot is being read (an export stream is open on it): it cannot be deleted until the reads end. */
  SNAPSHOT_IN_USE: 'SNAPSHOT_IN_USE',
  /** QEMU's limits on the number of snapshots or the snapshot table size. */
  SNAPSHOT_LIMIT: 'SNAPSHOT_LIMIT',
  /** A save ended with no vmstate bytes: QEMU would read it as a disk-only snapshot. */
  SNAPSHOT_EMPTY: 'SNAPSHOT_EMPTY',
  /** The snapshot has no saved VM state (a disk-only snapshot), so there is nothing to export or load. */
  SNAPSHOT_DISK_ONLY: 'SNAPSHOT_DISK_ONLY',
  /** A stream was given something other than a Buffer or Uint8Array. */
  INVALID_CHUNK: 'INVALID_CHUNK',
  /** An export stream was consumed twice: read as a Readable and through pumpTo(), or pumped twice. */
  STREAM_CONSUMED: 'STREAM_CONSUMED',
  ABORTED: 'ABORTED',
  /** QEMU answered a QMP command with an error. */
  QMP_ERROR: 'QMP_ERROR',
  /** The QMP connection closed or could not be made. */
  QMP_CLOSED: 'QMP_CLOSED',
  /** The VM is in a state the operation cannot start from (runstate, block jobs, ...). */
  VM_STATE: 'VM_STATE',
  /** The VM's configuration is outside what the operation supports (non-qcow2 disk, ...). */
  VM_UNSUPPORTED: 'VM_UNSUPPORTED',
  /** The migration stream QEMU produced or read failed. */
  MIGRATION_FAILED: 'MIGRATION_FAILED',
  /** What was read back after a write differs from what was written (the demo's self-check). */
  VERIFY_FAILED: 'VERIFY_FAILED',
  /** A bug in snapstream, never bad input. */
  INTERNAL: 'INTERNAL',
} as const;

export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

const KNOWN_CODES: ReadonlySet<string> = new Set(Object.values(ErrorCode));

export function isErrorCode(value: unknown): value is ErrorCode {
  return typeof value === 'string' && KNOWN_CODES.has(value);
}

export interface SnapshotErrorDetails {
  syscall?: string;
  path?: string;
  offset?: number;
  errno?: number;
  cause?: unknown;
}

export class SnapshotError extends Error {
  readonly code: ErrorCode;
  readonly syscall: string | undefined;
  readonly path: string | undefined;
  readonly offset: number | undefined;
  readonly errno: number | undefined;

  constructor(code: ErrorCode, message: string, details: SnapshotErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = 'SnapshotError';
    this.code = code;
    this.syscall = details.syscall;
    this.path = details.path;
    this.offset = details.offset;
    this.errno = details.errno;
  }
}

/** The code for a positive C errno: its name where the table has it, else EIO. */
function errnoName(errno: number): string {
  try {
    const name = getSystemErrorName(-Math.abs(errno));
    // Linux gives EOPNOTSUPP and ENOTSUP one number; libuv names it ENOTSUP.
    return name === 'ENOTSUP' ? ErrorCode.EOPNOTSUPP : name;
  } catch {
    return `errno ${errno}`;
  }
}

/**
 * Builds a SnapshotError from an errno reported by the addon. `errno` is the
 * positive C errno value. EINVAL from a write on an O_DIRECT descriptor almost
 * always means misalignment, so the caller passes `direct` to say so.
 */
export function errnoError(
  errno: number,
  syscall: string,
  details: { path?: string; offset?: number; direct?: boolean } = {},
): SnapshotError {
  const name = errnoName(errno);
  const code: ErrorCode = isErrorCode(name) ? name : ErrorCode.EIO;
  const where = details.offset === undefined ? '' : ` at offset ${details.offset}`;
  const subject = details.path === undefined ? '' : ` '${details.path}'`;
  let message = `${syscall}${subject}${where} failed: ${name}`;
  if (code === ErrorCode.EINVAL && details.direct === true && /write|read/.test(syscall)) {
    message += ' (O_DIRECT alignment violated)';
  }
  return new SnapshotError(code, message, {
    syscall,
    path: details.path,
    offset: details.offset,
    errno: Math.abs(errno),
  });
}

export function isSnapshotError(err: unknown, code?: ErrorCode): err is SnapshotError {
  return err instanceof SnapshotError && (code === undefined || err.code === code);
}

/** Wraps anything thrown into a SnapshotError without losing the original. */
export function toSnapshotError(err: unknown, fallbackCode: ErrorCode = ErrorCode.INTERNAL): SnapshotError {
  if (err instanceof SnapshotError) return err;
  const e = err as { code?: unknown; message?: unknown; syscall?: unknown; path?: unknown; errno?: unknown };
  const code = isErrorCode(e?.code) ? e.code : fallbackCode;
  const message = typeof e?.message === 'string' ? e.message : String(err);
  return new SnapshotError(code, message, {
    syscall: typeof e?.syscall === 'string' ? e.syscall : undefined,
    path: typeof e?.path === 'string' ? e.path : undefined,
    errno: typeof e?.errno === 'number' ? Math.abs(e.errno) : undefined,
    cause: err,
  });
}
