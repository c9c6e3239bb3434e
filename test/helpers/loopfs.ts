/**
 * Real filesystems for fault tests: a small loop-mounted ext4/xfs (to run out
 * of space for real) and a ramfs (which refuses O_DIRECT).
 *
 * Why ramfs and not tmpfs: tmpfs accepts O_DIRECT since Linux 6.6, ramfs
 * still fails the open with EINVAL. Both need root to mount; without root the
 * helpers print a reason and return a `Skipped` instead of running `fn`;
 * the test hands it to `skipUnlessRan`, so vitest reports it as skipped.
 * CI runs as root; on CI a missing mkfs/losetup or a missing root throws
 * (see requireTool), so nothing that must run there is skipped.
 *
 * Cleanup always runs, in reverse order, even when `fn` throws: umount
 * (retried, then lazy), losetup -d, remove the backing file and mount point.
 */
import { constants as fsConstants } from 'node:fs';
import { mkdir, open, rm, statfs, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { isCi, isRoot, requireTool, runOk, tmpDir, type ToolName } from './tools.js';

/** Returned instead of running `fn` when the machine cannot provide the filesystem. */
export class Skipped {
  constructor(readonly reason: string) {}
}

export interface LoopFsOptions {
  sizeBytes: number;
  fsType: 'ext4' | 'xfs';
}

/** mkfs.xfs (xfsprogs >= 5.19) refuses filesystems smaller than 300 MiB. */
export const XFS_MIN_BYTES = 300 << 20;
/** Small ext4 filesystems work; below this mkfs has no room for a journal. */
export const EXT4_MIN_BYTES = 4 << 20;

const UMOUNT_ATTEMPTS = 10;
const UMOUNT_RETRY_MS = 100;

/** Why loop filesystems cannot be used here, or undefined when they can. */
export function loopFsSkipReason(fsType: LoopFsOptions['fsType'] = 'ext4'): string | undefined {
  const tools: ToolName[] = [fsType === 'ext4' ? 'mkfs.ext4' : 'mkfs.xfs', 'losetup', 'mount', 'umount'];
  const missing = requireTool(...tools); // throws on CI
  if (missing !== undefined) return missing;
  return rootSkipReason('loop mounts');
}

/** Why ramfs cannot be used here, or undefined when it can. */
export function ramfsSkipReason(): string | undefined {
  const missing = requireTool('mount', 'umount');
  if (missing !== undefined) return missing;
  return rootSkipReason('mounting ramfs');
}

/**
 * Why `what` cannot run without root, or undefined as root. On CI, which
 * runs as root, a missing root is a broken set-up: it throws.
 */
export function rootSkipReason(what: string): string | undefined {
  if (isRoot()) return undefined;
  const reason = `${what} need(s) root`;
  if (isCi()) throw new Error(`${reason} (CI is set: integration tests must not be skipped)`);
  console.warn(`[skip] ${reason}`);
  return reason;
}

/** The part of vitest's test context that skips at run time. */
export interface SkipContext {
  skip(note?: string): never;
}

/**
 * Hands a helper's `Skipped` to vitest, so the report counts the test as
 * skipped (with the reason) instead of as a pass that asserted nothing.
 */
export function skipUnlessRan<T>(ctx: SkipContext, result: T | Skipped): T {
  if (result instanceof Skipped) ctx.skip(result.reason);
  return result as T;
}

/**
 * Creates a sparse file of `sizeBytes`, makes a filesystem on a loop device,
 * mounts it, runs `fn(mountDir)` and always tears everything down.
 */
export async function withLoopFs<T>(
  options: LoopFsOptions,
  fn: (mountDir: string) => Promise<T>,
): Promise<T | Skipped> {
  const minBytes = options.fsType === 'xfs' ? XFS_MIN_BYTES : EXT4_MIN_BYTES;
  if (!Number.isSafeInteger(options.sizeBytes) || options.sizeBytes < minBytes) {
    throw new RangeError(`Expected at least ${minBytes} for sizeBytes (${options.fsType}), received ${options.sizeBytes}`);
  }
  const skip = loopFsSkipReason(options.fsType);
  if (skip !== undefined) return new Skipped(skip);

  const dir = await tmpDir(`loop-${options.fsType}`);
  const backing = join(dir.path, 'backing.img');
  const mountDir = join(dir.path, 'mnt');
  let device: string | undefined;
  let mounted = false;
  try {
    await (await open(backing, 'w')).close();
    await truncate(backing, options.sizeBytes);
    await mkdir(mountDir);
    device = (await runOk('losetup', ['--find', '--show', backing])).stdout.trim();
    await runOk(options.fsType === 'ext4' ? 'mkfs.ext4' : 'mkfs.xfs', mkfsArgs(options.fsType, device), {
      timeoutMs: 60_000,
    });
    await runOk('mount', [device, mountDir]);
    mounted = true;
    return await fn(mountDir);
  } finally {
    if (mounted) await unmount(mountDir);
    if (device !== undefined) await runOk('losetup', ['-d', device]).catch(() => undefined);
    await dir.cleanup();
  }
}

function mkfsArgs(fsType: LoopFsOptions['fsType'], device: string): string[] {
  // ext4: -m 0 so root has no reserved blocks and "free" means "available";
  // lazy init off so no background writes change free space during a test.
  if (fsType === 'ext4') return ['-q', '-F', '-m', '0', '-E', 'lazy_itable_init=0,lazy_journal_init=0,nodiscard', device];
  return ['-q', '-f', '-K', device];
}

/** umount, retried while busy (a test's fd may close a moment late), then lazily. */
async function unmount(mountDir: string): Promise<void> {
  for (let attempt = 1; attempt <= UMOUNT_ATTEMPTS; attempt++) {
    try {
      await runOk('umount', [mountDir]);
      return;
    } catch (error) {
      if (attempt === UMOUNT_ATTEMPTS) {
        await runOk('umount', ['-l', mountDir]).catch(() => undefined);
        console.warn(`[loopfs] ${mountDir} was busy; lazily unmounted: ${(error as Error).message}`);
        return;
      }
      await sleep(UMOUNT_RETRY_MS);
    }
  }
}

/**
 * A bare loop block device over a sparse file of `sizeBytes` (no filesystem):
 * runs `fn(devicePath, backingPath)`, then detaches it and deletes the file.
 * The backing file shows what reached the "disk" under the device.
 */
export async function withLoopDevice<T>(
  options: { sizeBytes: number },
  fn: (device: string, backing: string) => Promise<T>,
): Promise<T | Skipped> {
  const skip = loopFsSkipReason('ext4');
  if (skip !== undefined) return new Skipped(skip);
  const dir = await tmpDir('loopdev');
  const backing = join(dir.path, 'backing.img');
  let device: string | undefined;
  try {
    await (await open(backing, 'w')).close();
    await truncate(backing, options.sizeBytes);
    device = (await runOk('losetup', ['--find', '--show', backing])).stdout.trim();
    return await fn(device, backing);
  } finally {
    if (device !== undefined) await runOk('losetup', ['-d', device]).catch(() => undefined);
    await dir.cleanup();
  }
}

/** Mounts a fresh ramfs (no O_DIRECT, no size limit: keep writes small), runs `fn`, unmounts. */
export async function withRamfs<T>(fn: (dir: string) => Promise<T>): Promise<T | Skipped> {
  const skip = ramfsSkipReason();
  if (skip !== undefined) return new Skipped(skip);
  const dir = await tmpDir('ramfs');
  const mountDir = join(dir.path, 'mnt');
  let mounted = false;
  try {
    await mkdir(mountDir);
    await runOk('mount', ['-t', 'ramfs', '-o', 'mode=0755', 'snapstream-ramfs', mountDir]);
    mounted = true;
    return await fn(mountDir);
  } finally {
    if (mounted) await unmount(mountDir);
    await dir.cleanup();
  }
}

/** Free bytes an unprivileged writer could use (f_bavail × f_bsize). */
export async function freeBytes(dir: string): Promise<number> {
  const stats = await statfs(dir);
  return stats.bavail * stats.bsize;
}

/** Granularity of fillFs writes; the last ones shrink to land on target. */
const FILL_CHUNK_BYTES = 1 << 20;
/** Below this much excess, fillFs fsyncs before each measurement. */
const FILL_SYNC_BELOW_BYTES = 8 * FILL_CHUNK_BYTES;

/**
 * Fills the filesystem holding `dir` with a file so that about `leaveBytes`
 * stay free (within one filesystem block, metadata permitting). The data is
 * fsynced so delayed allocation cannot release or claim space later.
 * Returns the filler's path and the free bytes actually left.
 */
export async function fillFs(dir: string, leaveBytes: number): Promise<{ path: string; freeBytes: number }> {
  if (!Number.isSafeInteger(leaveBytes) || leaveBytes < 0) {
    throw new RangeError(`Expected a byte count for leaveBytes, received ${leaveBytes}`);
  }
  const path = join(dir, `fill-${process.pid}-${Date.now()}.bin`);
  const chunk = Buffer.alloc(FILL_CHUNK_BYTES, 0x5a); // non-zero: no filesystem may elide it
  const file = await open(path, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL, 0o644);
  let position = 0;
  try {
    for (;;) {
      const stats = await statfs(dir);
      const blockBytes = stats.bsize;
      let excess = stats.bavail * blockBytes - leaveBytes;
      if (excess < FILL_SYNC_BELOW_BYTES) {
        // Near the target, make the free count honest (no pending delayed allocation).
        await file.sync();
        excess = (await freeBytes(dir)) - leaveBytes;
      }
      if (excess < blockBytes) break;
      const length = Math.min(FILL_CHUNK_BYTES, Math.floor(excess / blockBytes) * blockBytes);
      try {
        const { bytesWritten } = await file.write(chunk, 0, length, position);
        position += bytesWritten;
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'ENOSPC') break; // metadata took the rest
        throw error;
      }
    }
    await file.sync();
  } finally {
    await file.close();
  }
  return { path, freeBytes: await freeBytes(dir) };
}

/**
 * Tries to open a new file in `dir` with O_DIRECT. Returns 'ok' or the errno
 * code (EINVAL on ramfs). The probe file is removed.
 */
export async function probeODirect(dir: string): Promise<'ok' | string> {
  const path = join(dir, `.odirect-probe-${process.pid}`);
  try {
    const file = await open(path, fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_DIRECT, 0o644);
    await file.close();
    return 'ok';
  } catch (error) {
    return (error as NodeJS.ErrnoException).code ?? String(error);
  } finally {
    await rm(path, { force: true });
  }
}
