/**
 * Every failure snapstream reports is a SnapshotError with a stable `code`.
 * Codes live in this one table so that callers can switch on them and the CLI
 * can attach hints.
 */
import { getSystemErrorName } from 'node:util';

export const ErrorCode = {
  ENOSPC: 'ENOSPC',
  EIO: 'EIO',
  ENOENT: 'ENOENT',
  EINVAL: 'EINVAL',
  EISDIR: 'EISDIR',
  EACCES: 'EACCES',
  EFBIG: 'EFBIG',
  EBADF: 'EBADF',
  EROFS: 'EROFS',
  EDQUOT: 'EDQUOT',
  EOPNOTSUPP: 'EOPNOTSUPP',
  DIRECT_IO_UNSUPPORTED: 'DIRECT_IO_UNSUPPORTED',
  IMAGE_LOCKED: 'IMAGE_LOCKED',
  IMAGE_READ_ONLY: 'IMAGE_READ_ONLY',
  IMAGE_CLOSED: 'IMAGE_CLOSED',
  QCOW2_CORRUPT: 'QCOW2_CORRUPT',
  QCOW2_UNSUPPORTED: 'QCOW2_UNSUPPORTED',
  NOT_RAW: 'NOT_RAW',
  /** A raw target is being written by another stream (its OFD lock is held). */
  TARGET_LOCKED: 'TARGET_LOCKED',
  /** The source of a save or write is the target itself. */
  SAME_FILE: 'SAME_FILE',
  /** The snapshot has no saved VM state (a disk-only snapshot), so there is nothing to export or load. */
  SNAPSHOT_DISK_ONLY: 'SNAPSHOT_DISK_ONLY',
  SNAPSHOT_EXISTS: 'SNAPSHOT_EXISTS',
  SNAPSHOT_NOT_FOUND: 'SNAPSHOT_NOT_FOUND',
  SNAPSHOT_LIMIT: 'SNAPSHOT_LIMIT',
  INVALID_CHUNK: 'INVALID_CHUNK',
  ABORTED: 'ABORTED',
  INTERNAL: 'INTERNAL',
} as const;

export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode] | string;

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
  let code: string;
  try {
    code = getSystemErrorName(-Math.abs(errno));
  } catch {
    code = 'EIO';
  }
  // Linux gives EOPNOTSUPP and ENOTSUP one number; libuv names it ENOTSUP.
  if (code === 'ENOTSUP') code = ErrorCode.EOPNOTSUPP;
  const where = details.offset === undefined ? '' : ` at offset ${details.offset}`;
  const subject = details.path === undefined ? '' : ` '${details.path}'`;
  let message = `${syscall}${subject}${where} failed: ${code}`;
  if (code === 'EINVAL' && details.direct === true && /write|read/.test(syscall)) {
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
  const e = err as { code?: unknown; message?: unknown; syscall?: unknown; path?: unknown };
  const code = typeof e?.code === 'string' ? e.code : fallbackCode;
  const message = typeof e?.message === 'string' ? e.message : String(err);
  return new SnapshotError(code, message, {
    syscall: typeof e?.syscall === 'string' ? e.syscall : undefined,
    path: typeof e?.path === 'string' ? e.path : undefined,
    cause: err,
  });
}
