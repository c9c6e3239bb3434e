/**
 * QEMU's image locking protocol (block/file-posix.c raw_apply_lock_bytes /
 * raw_check_lock_bytes), so that snapstream and QEMU never write one image at
 * the same time.
 *
 * QEMU holds a shared OFD lock on byte 100+i for each permission i it holds
 * and on byte 200+i for each permission it refuses to share. A process may
 * take permission i only when nobody holds byte 200+i, and may refuse to
 * share i only when nobody holds byte 100+i. Like QEMU we take our locks
 * first and test second, so two openers racing cannot both succeed.
 */
import { ErrorCode, SnapshotError, isSnapshotError } from '../errors.js';
import type { MetaFile } from './file.js';
import { describeHolder, findLockHolders } from '../io/lock-holder.js';

export const LOCK_PERM_BASE = 100;
export const LOCK_SHARED_BASE = 200;

/** QEMU's BLK_PERM_* bit numbers (7.2). */
export const Permission = { CONSISTENT_READ: 0, WRITE: 1, WRITE_UNCHANGED: 2, RESIZE: 3 } as const;
const NAMES = ['consistent read', 'write', 'write unchanged', 'resize'];

export interface LockPlan {
  /** Permissions we use. */
  held: number[];
  /** Permissions we refuse to share. */
  unshared: number[];
}

/** What a QEMU writer (a running VM) holds: everything, refusing to share write and resize. */
export const WRITER_LOCKS: LockPlan = {
  held: [Permission.CONSISTENT_READ, Permission.WRITE, Permission.WRITE_UNCHANGED, Permission.RESIZE],
  unshared: [Permission.WRITE, Permission.RESIZE],
};

/** What `qemu-img info` without -U holds: consistent read, refusing to share write and resize. */
export const READER_LOCKS: LockPlan = {
  held: [Permission.CONSISTENT_READ],
  unshared: [Permission.WRITE, Permission.RESIZE],
};

/** A lock byte someone else holds: which permission, and whether we wanted to use it or to refuse sharing it. */
class LockConflict {
  constructor(
    readonly permission: number,
    readonly ours: 'use' | 'unshare',
  ) {}
}

/** IMAGE_LOCKED naming the holder where /proc tells it (OFD locks report no pid to F_OFD_GETLK). */
function lockedError(file: MetaFile, conflict: LockConflict): SnapshotError {
  const { permission, ours } = conflict;
  const holder = findLockHolders(file.path)[0];
  const who = holder === undefined ? 'another process' : `process ${holder.pid} (${holder.comm}, ${describeHolder(holder)})`;
  const what =
    ours === 'use'
      ? `${who} does not share the "${NAMES[permission]}" permission`
      : `${who} holds the "${NAMES[permission]}" permission we must not share`;
  const advice = holder === undefined ? ' (is a QEMU using it? stop it or use its own savevm)' : '';
  return new SnapshotError(ErrorCode.IMAGE_LOCKED, `image '${file.path}' is locked: ${what}${advice}`, {
    path: file.path,
    syscall: 'fcntl(F_OFD_GETLK)',
    offset: (ours === 'use' ? LOCK_SHARED_BASE : LOCK_PERM_BASE) + permission,
  });
}

/** Takes the lock bytes of `plan`, then verifies nobody conflicts; on conflict drops them and throws IMAGE_LOCKED. */
export async function acquireImageLocks(file: MetaFile, plan: LockPlan): Promise<void> {
  const bytes = [...plan.held.map((p) => LOCK_PERM_BASE + p), ...plan.unshared.map((p) => LOCK_SHARED_BASE + p)];
  try {
    for (const byte of bytes) {
      try {
        await file.setLock(byte, 1, 'read');
      } catch (err) {
        // Only a foreign write lock can refuse a shared lock; QEMU never takes one, so report it as held.
        if (isSnapshotError(err, ErrorCode.EAGAIN)) throw new LockConflict(byte % 100, 'use');
        throw err;
      }
    }
    for (const permission of plan.held) {
      if ((await file.getLock(LOCK_SHARED_BASE + permission, 1, 'write')) !== null) throw new LockConflict(permission, 'use');
    }
    for (const permission of plan.unshared) {
      if ((await file.getLock(LOCK_PERM_BASE + permission, 1, 'write')) !== null) throw new LockConflict(permission, 'unshare');
    }
  } catch (err) {
    await releaseImageLocks(file, plan).catch(() => undefined);
    // Our own bytes are released now, so /proc shows only the holders that conflict.
    throw err instanceof LockConflict ? lockedError(file, err) : err;
  }
}

export async function releaseImageLocks(file: MetaFile, plan: LockPlan): Promise<void> {
  for (const p of plan.held) await file.setLock(LOCK_PERM_BASE + p, 1, 'unlock');
  for (const p of plan.unshared) await file.setLock(LOCK_SHARED_BASE + p, 1, 'unlock');
}
