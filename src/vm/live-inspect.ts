/**
 * Refusals of a live savevm, all before the VM is stopped: run state,
 * non-qcow2 disks, a running migration, a name already taken, and RAM that
 * QEMU cannot write-protect (QEMU's own check: migrate-set-capabilities
 * background-snapshot=on consults ram_write_tracking_available, the
 * kernel's userfaultfd write-protect, and ram_write_tracking_compatible,
 * the guest memory configuration).
 */
import { ErrorCode, SnapshotError } from '../errors.js';
import { vmStateError, vmUnsupported, type VmInfo } from './inspect.js';
import { QmpError, type QmpClient } from './qmp.js';

/** Migration statuses of an idle VM. */
const IDLE_MIGRATION = new Set(['none', 'completed', 'failed', 'cancelled']);

interface BlockInfo {
  device: string;
  inserted?: { file: string; image?: { filename?: string; snapshots?: Array<{ name: string; id: string }> }; 'node-name'?: string };
}

export async function assertLiveSaveable(qmp: QmpClient, info: VmInfo, name: string): Promise<void> {
  if (info.status !== 'running') {
    throw vmStateError(
      `a live savevm needs a running VM; this one is '${info.status}' (QEMU 7.2 resumes the guest itself once its RAM is write-protected). ` +
        'Use savevm without live for a paused VM',
    );
  }
  if (info.disks.length === 0) throw vmStateError('the VM has no writable disk to snapshot');
  for (const disk of info.disks) {
    if (disk.format !== 'qcow2') {
      throw new SnapshotError(ErrorCode.VM_UNSUPPORTED, `disk '${disk.device}' (${disk.path}) is ${disk.format}, not qcow2: a live savevm takes an internal snapshot of every writable disk (or attach it read-only)`, {
        path: disk.path,
      });
    }
  }
  const migration = await qmp.execute<{ status?: string }>('query-migrate');
  if (migration.status !== undefined && !IDLE_MIGRATION.has(migration.status)) {
    throw vmStateError(`a migration is already running (status '${migration.status}'); wait for it or migrate_cancel it`);
  }
  const blocks = await qmp.execute<BlockInfo[]>('query-block');
  for (const block of blocks) {
    const taken = block.inserted?.image?.snapshots?.find((s) => s.name === name);
    if (taken !== undefined) {
      throw new SnapshotError(ErrorCode.SNAPSHOT_EXISTS, `disk '${block.device || block.inserted?.['node-name']}' already has snapshot '${name}' (id ${taken.id})`, {
        path: block.inserted?.image?.filename ?? block.inserted?.file,
      });
    }
  }
}

/** Every image file the VM has attached, writable or not. */
export async function vmImagePaths(qmp: QmpClient): Promise<string[]> {
  const blocks = await qmp.execute<BlockInfo[]>('query-block');
  return blocks.flatMap((b) => (b.inserted === undefined ? [] : [b.inserted.image?.filename ?? b.inserted.file]));
}

/**
 * Turns `background-snapshot` on, letting QEMU refuse RAM it cannot
 * write-protect (VM_UNSUPPORTED, with QEMU's reason). True when it was off
 * (the caller turns it off again: a non-live savevm refuses it).
 */
export async function enableBackgroundSnapshot(qmp: QmpClient): Promise<boolean> {
  const capabilities = await qmp.execute<Array<{ capability: string; state: boolean }>>('query-migrate-capabilities');
  const known = capabilities.find((c) => c.capability === 'background-snapshot');
  if (known === undefined) throw vmUnsupported(`QEMU ${qmp.version.join('.')} has no background-snapshot migration capability (QEMU 6.0 or later has)`);
  if (known.state) return false;
  try {
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'background-snapshot', state: true }] });
  } catch (err) {
    if (!(err instanceof QmpError) || err.desc === undefined) throw err;
    throw new SnapshotError(ErrorCode.VM_UNSUPPORTED, `QEMU cannot write-protect this VM's RAM for a live snapshot: ${err.desc}`, { cause: err });
  }
  return true;
}
