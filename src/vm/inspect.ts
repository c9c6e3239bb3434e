/**
 * What a QEMU looks like over QMP before snapstream stops it: run state,
 * disks, jobs, exports, bitmaps, migration. Every refusal happens here,
 * before the VM is stopped, with a code and a message that names the cause.
 *
 * Facts from QEMU 7.2 this rests on (tried by hand, see README "Running VMs"):
 * - after a completed migration the VM is in `postmigrate` and QEMU refuses
 *   another `migrate` ("Can't migrate the vm that was paused due to previous
 *   migration") until a `cont`; a paused VM saved by snapstream ends there;
 * - a VM started with `-incoming defer` is in `inmigrate`, its images open
 *   but inactive (no lock bytes held);
 * - QEMU writes persistent dirty bitmaps into new clusters when it hands an
 *   image over (qcow2_inactivate), which would race the vmstate we write.
 */
import { ErrorCode, SnapshotError } from '../errors.js';
import type { QmpClient } from './qmp.js';

/** One writable disk as QEMU sees it. */
export interface VmDisk {
  /** BlockBackend name (`-drive id=`), or '' for a -device drive=node without one. */
  device: string;
  /** The format node's name (QEMU auto-names nodes it is not given a name for). */
  nodeName: string;
  /** Host path of the image file. */
  path: string;
  format: string;
}

export interface VmInfo {
  status: string;
  running: boolean;
  /** Writable disks, in QEMU's order (query-block). */
  disks: VmDisk[];
  version: [number, number, number];
}

interface BlockInfo {
  device: string;
  qdev?: string;
  inserted?: { 'node-name'?: string; ro: boolean; drv: string; file: string; image?: { filename?: string } };
}

interface NamedNode {
  'node-name': string;
  drv: string;
  file: string;
  ro: boolean;
  'dirty-bitmaps'?: Array<{ name: string; persistent?: boolean }>;
}

/** Run states in which savevm may start: QEMU can migrate from them and they are not faults. */
const SAVE_STATES = new Set(['running', 'paused', 'prelaunch']);

/** Migration statuses of an idle VM. */
const IDLE_MIGRATION = new Set(['none', 'completed', 'failed', 'cancelled']);

/** Capabilities that change how the stream flows or what it holds; a one-socket, one-file save cannot honour them. */
const UNSUPPORTED_CAPABILITIES = ['multifd', 'postcopy-ram', 'x-colo', 'background-snapshot', 'return-path', 'compress', 'release-ram'];

export function vmStateError(message: string): SnapshotError {
  return new SnapshotError(ErrorCode.VM_STATE, message);
}

export async function inspectVm(qmp: QmpClient): Promise<VmInfo> {
  const status = await qmp.execute<{ status: string; running: boolean }>('query-status');
  const blocks = await qmp.execute<BlockInfo[]>('query-block');
  const disks: VmDisk[] = [];
  for (const block of blocks) {
    const inserted = block.inserted;
    if (inserted === undefined || inserted.ro) continue;
    const name = block.device !== '' ? block.device : (block.qdev ?? inserted['node-name'] ?? '?');
    disks.push({
      device: name,
      nodeName: inserted['node-name'] ?? '',
      path: inserted.image?.filename ?? inserted.file,
      format: inserted.drv,
    });
  }
  return { status: status.status, running: status.running, disks, version: qmp.version };
}

export function vmUnsupported(message: string): SnapshotError {
  return new SnapshotError(ErrorCode.VM_UNSUPPORTED, message);
}

/** Refuses, before anything is stopped, a VM that savevm cannot hand off safely. */
export async function assertSaveable(qmp: QmpClient, info: VmInfo): Promise<void> {
  assertSaveRunState(info.status);
  if (info.disks.length === 0) throw vmStateError('the VM has no writable disk to hold the snapshot');
  for (const disk of info.disks) assertQcow2File(disk);
  const migration = await qmp.execute<{ status?: string }>('query-migrate');
  if (migration.status !== undefined && !IDLE_MIGRATION.has(migration.status)) {
    throw vmStateError(`a migration is already running (status '${migration.status}'); wait for it or migrate_cancel it`);
  }
  const capabilities = await qmp.execute<Array<{ capability: string; state: boolean }>>('query-migrate-capabilities');
  const enabled = capabilities.filter((c) => c.state && UNSUPPORTED_CAPABILITIES.includes(c.capability)).map((c) => c.capability);
  if (enabled.length > 0) {
    throw vmUnsupported(`migration capabilit${enabled.length === 1 ? 'y' : 'ies'} ${enabled.join(', ')} enabled; snapstream takes one plain stream, turn ${enabled.length === 1 ? 'it' : 'them'} off first`);
  }
  await assertNoBlockActivity(qmp);
}

export function assertSaveRunState(status: string): void {
  if (SAVE_STATES.has(status)) return;
  if (status === 'postmigrate') {
    throw vmStateError(
      "the VM is in 'postmigrate' (after a migration, or a savevm of a paused VM): QEMU refuses a second migration " +
        "until the VM has run again; 'cont' it first",
    );
  }
  if (status === 'inmigrate') throw vmStateError("the VM is waiting for an incoming migration ('inmigrate'): use loadvm, not savevm");
  throw vmStateError(`the VM is in state '${status}'; savevm needs it running, paused or in prelaunch`);
}

/** savevm's own rule: every writable disk must take an internal snapshot, so it must be qcow2 (here: a local qcow2 file). */
export function assertQcow2File(disk: VmDisk): void {
  if (disk.format !== 'qcow2') {
    throw new SnapshotError(
      ErrorCode.VM_UNSUPPORTED,
      `disk '${disk.device}' (${disk.path}) is ${disk.format}, not qcow2: savevm snapshots every writable disk, so every one must be qcow2 (or attach it read-only)`,
      { path: disk.path },
    );
  }
  if (!disk.path.startsWith('/')) {
    throw new SnapshotError(ErrorCode.VM_UNSUPPORTED, `disk '${disk.device}' is not a local file ('${disk.path}'); snapstream writes the image file itself`, {
      path: disk.path,
    });
  }
}

async function assertNoBlockActivity(qmp: QmpClient): Promise<void> {
  const jobs = await qmp.execute<Array<{ id: string; type: string; status: string }>>('query-jobs');
  const active = jobs.filter((j) => j.status !== 'concluded' && j.status !== 'null');
  if (active.length > 0) {
    const job = active[0]!;
    throw vmStateError(`a ${job.type} job ('${job.id}', ${job.status}) is active; let it finish or cancel it first`);
  }
  const exports = await qmp.execute<Array<{ id: string; 'node-name': string }>>('query-block-exports');
  if (exports.length > 0) {
    throw vmStateError(`block export '${exports[0]!.id}' (node '${exports[0]!['node-name']}') is active; remove it first (block-export-del)`);
  }
  const nodes = await qmp.execute<NamedNode[]>('query-named-block-nodes', { flat: true });
  for (const node of nodes) {
    const persistent = (node['dirty-bitmaps'] ?? []).filter((b) => b.persistent === true);
    if (persistent.length === 0) continue;
    throw vmUnsupported(
      `disk node '${node['node-name']}' has persistent dirty bitmap '${persistent[0]!.name}': QEMU writes it into new clusters ` +
        'when it hands the image over; remove it (block-dirty-bitmap-remove) or use QEMU savevm',
    );
  }
}

/** The disk that holds the vmstate: `wanted` by device, node name or path, else the first. */
export function pickVmStateDisk(disks: readonly VmDisk[], wanted: string | undefined): VmDisk {
  if (wanted === undefined) return disks[0]!;
  const disk = disks.find((d) => d.device === wanted || d.nodeName === wanted || d.path === wanted);
  if (disk === undefined) {
    const names = disks.map((d) => d.device).join(', ');
    throw new RangeError(`Expected one of the VM's writable disks (${names}) for options.vmstateDisk, received '${wanted}'`);
  }
  return disk;
}
