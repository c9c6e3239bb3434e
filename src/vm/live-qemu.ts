/**
 * The QMP steps of a live savevm that act on QEMU: the disk-only snapshots
 * (blockdev-snapshot-internal-sync, as one transaction), their deletion after
 * a failure, and the wait for QEMU's write tracking (docs/live-checkpoint.md).
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { ErrorCode, SnapshotError } from '../errors.js';
import type { VmDisk } from './inspect.js';
import { queryMigrate } from './migration.js';
import type { Monitor } from './monitor.js';
import type { QmpClient } from './qmp.js';

/**
 * From `migrate` to write tracking: QEMU populates every RAM page table
 * entry first (ram_write_tracking_prepare), milliseconds per GiB; a bound
 * far above that, for a loaded host.
 */
export const TRACKING_TIMEOUT_MS = 60_000;
/**
 * `stop` and the disk snapshots flush every disk; on a shared, loaded disk
 * one flush took seconds here. QMP's default 10 s bound would give up on a
 * command QEMU still completes.
 */
export const FLUSH_TIMEOUT_MS = 120_000;
/** query-migrate poll while waiting for tracking: small against the downtime we measure. */
const TRACKING_POLL_MS = 1;

/** QEMU's name for a disk in block commands: its node name, else its BlockBackend name. */
export function qemuDiskName(disk: VmDisk): string {
  return disk.nodeName !== '' ? disk.nodeName : disk.device;
}

/** One transaction: every disk gets its disk-only snapshot `name`, or none does (QEMU rolls back). */
export async function takeDiskSnapshots(qmp: QmpClient, disks: readonly VmDisk[], name: string): Promise<VmDisk[]> {
  const actions = disks.map((disk) => ({ type: 'blockdev-snapshot-internal-sync', data: { device: qemuDiskName(disk), name } }));
  await qmp.execute('transaction', { actions }, { timeoutMs: FLUSH_TIMEOUT_MS });
  return [...disks];
}

/** Deletes disk-only snapshot `name` from each disk; returns the disks where that failed. */
export async function deleteDiskSnapshots(monitor: Monitor, disks: readonly VmDisk[], name: string): Promise<VmDisk[]> {
  const left: VmDisk[] = [];
  for (const disk of disks) {
    try {
      const qmp = await monitor.revive();
      await qmp.execute('blockdev-snapshot-delete-internal-sync', { device: qemuDiskName(disk), name });
    } catch {
      left.push(disk);
    }
  }
  return left;
}

interface RamStats {
  normal?: number;
  duplicate?: number;
}

/**
 * Resolves with `now()` at the moment the VM runs again with its RAM
 * write-protected. QEMU 7.2 to 8.2 resume the VM themselves from a bottom
 * half scheduled after ram_write_tracking_start: the RESUME event is the
 * signal. QEMU 9.0+ leave a VM that was paused paused (vm_resume of the old
 * state); there the RAM iteration having counted pages proves the thread
 * passed ram_write_tracking_start, and we `cont`. A failed or cancelled
 * migration rejects (MIGRATION_FAILED).
 */
export async function waitWriteTracking(qmp: QmpClient, now: () => number, timeoutMs = TRACKING_TIMEOUT_MS): Promise<number> {
  let resumedAt: number | undefined;
  const resumed = qmp.waitEvent('RESUME', timeoutMs).then(() => {
    resumedAt ??= now();
  });
  resumed.catch(() => undefined);
  const deadline = Date.now() + timeoutMs;
  while (resumedAt === undefined) {
    const info = await queryMigrate(qmp);
    if (resumedAt !== undefined) break;
    if (info.status === 'failed' || info.status === 'cancelled' || info.status === 'cancelling') {
      throw new SnapshotError(ErrorCode.MIGRATION_FAILED, `the background snapshot ended '${info.status}' before write tracking started${info['error-desc'] === undefined ? '' : `: ${info['error-desc']}`}`);
    }
    const ram = info.ram as RamStats | undefined;
    if (info.status === 'completed' || (ram?.normal ?? 0) + (ram?.duplicate ?? 0) > 0) {
      const { status } = await qmp.execute<{ status: string }>('query-status');
      if (resumedAt !== undefined) break;
      if (status !== 'running') await qmp.execute('cont');
      resumedAt = now();
      break;
    }
    if (Date.now() > deadline) throw new SnapshotError(ErrorCode.MIGRATION_FAILED, `QEMU did not start write tracking within ${timeoutMs} ms (status '${info.status}')`);
    await sleep(TRACKING_POLL_MS);
  }
  return resumedAt;
}
