/**
 * vm.savevm(): QEMU's savevm at the speed QEMU produces the migration
 * stream. The hand-off (DESIGN.md "Checkpoint and restore of a running QEMU"):
 *
 *   1. inspect and refuse (inspect.ts, qcow2/handoff.ts), all before the VM
 *      is stopped;
 *   2. `stop` (QEMU drains and flushes its metadata caches), plan the
 *      vmstate placement from the image as it now is on disk, without locks;
 *      lift max-bandwidth, `migrate` to our unix socket;
 *   3. the stream goes through a SnapshotStream into the image QEMU has open,
 *      past its end plus a margin; no metadata is written;
 *   4. stream ended and QEMU says `completed` (it has inactivated its images
 *      and dropped its write locks): lock, re-read, verify, commit every disk;
 *   5. `cont` if the VM was running.
 *
 * Any failure before the commit point commits nothing, cancels a migration
 * still running, and resumes a VM that was running.
 */
import { performance } from 'node:perf_hooks';
import { ErrorCode, SnapshotError, toSnapshotError } from '../errors.js';
import { validateStreamOptions } from '../options.js';
import { HandoffSave, assertSnapshotable } from '../qcow2/handoff.js';
import { openImage, type Image } from '../qcow2/image.js';
import { SnapshotStream } from '../stream/snapshot-stream.js';
import { assertSaveable, inspectVm, pickVmStateDisk, vmStateError, type VmDisk } from './inspect.js';
import { cancelMigration, MigrationListener, receiveMigration, UNLIMITED_BANDWIDTH_BYTES_PER_S, waitMigrationFinal } from './migration.js';
import type { Monitor } from './monitor.js';
import { validateLiveOptions } from './live-options.js';
import { validateCommonVmOptions } from './options.js';
import { findGlobalState, findVmClockNs, GLOBAL_STATE_SEARCH_BYTES, setGlobalState } from './runstate.js';

/** After QEMU's last byte, 'completed' follows at once; anything slower is a fault. */
const COMPLETION_TIMEOUT_MS = 30_000;

export interface SaveVmProgress {
  phase: 'stream' | 'commit' | 'resume';
  /** vmstate bytes durable so far. */
  bytes: number;
  /** Milliseconds since the VM was stopped (since the start, for a paused VM). */
  downtimeMs: number;
}

export interface SaveVmOptions {
  signal?: AbortSignal;
  onProgress?: (progress: SaveVmProgress) => void;
  /** Disk (device, node name or path) that takes the vmstate; default the first writable disk, as savevm does. */
  vmstateDisk?: string;
  /** A live checkpoint (docs/live-checkpoint.md): the guest runs on while its RAM is saved; needs `stateImage`. */
  live?: boolean;
  /** With `live`: the qcow2 file (created if missing, open in no QEMU) that takes the vmstate as snapshot `name`. */
  stateImage?: string;
}

export interface SaveVmDisk {
  device: string;
  path: string;
  /** vmstate bytes in this disk's snapshot (0 for a disk-only entry). */
  vmStateBytes: number;
}

export interface SaveVmResult {
  name: string;
  /** From `stop` to `cont` for a running VM; from the start of the migration to the commit for a paused one. */
  downtimeMs: number;
  vmStateBytes: number;
  /** Average stream rate into the image, bytes per second. */
  rateBytesPerSec: number;
  disks: SaveVmDisk[];
  /** The VM's run state afterwards ('running', or 'postmigrate' for a VM that was paused). */
  status: string;
  /** A live savevm: the disks hold disk-only snapshots, the vmstate is in the state image. */
  live?: true;
  /**
   * A live savevm's downtime in parts: QEMU's `stop` (it flushes every disk),
   * the disk-only snapshots (each a qcow2 metadata update and flush), and from
   * `migrate` until write tracking is on and the VM runs (QEMU populates and
   * write-protects the page tables of guest RAM).
   *
   * `qemuPauseMs` is the part of `writeTrackingMs` that QEMU itself counts as
   * its background snapshot's downtime (query-migrate `downtime`: from its own
   * stop to its resume; device state and write protection). The rest of
   * `writeTrackingMs` is QEMU's setup, which reads every page of guest RAM
   * first. See docs/live-checkpoint.md, "Where the downtime goes".
   */
  downtimePhases?: { stopMs: number; diskSnapshotsMs: number; writeTrackingMs: number; qemuPauseMs?: number };
  stateImage?: { path: string; vmStateBytes: number; created: boolean };
}

interface Run {
  monitor: Monitor;
  name: string;
  options: SaveVmOptions;
  disks: VmDisk[];
  vmDisk: VmDisk;
  wasRunning: boolean;
  handoff: HandoffSave | undefined;
  startedMs: number;
}

export function validateSaveVmOptions(options: SaveVmOptions | undefined): SaveVmOptions {
  return validateLiveOptions(validateCommonVmOptions(options));
}

export async function saveVm(monitor: Monitor, name: string, options: SaveVmOptions): Promise<SaveVmResult> {
  const qmp = monitor.client;
  const info = await inspectVm(qmp);
  await assertSaveable(qmp, info);
  const vmDisk = pickVmStateDisk(info.disks, options.vmstateDisk);
  for (const disk of info.disks) await assertSnapshotable(disk.path, name);
  if (options.signal?.aborted === true) throw abortedError();
  const run: Run = { monitor, name, options, disks: info.disks, vmDisk, wasRunning: info.status === 'running', handoff: undefined, startedMs: 0 };
  try {
    return await handOff(run);
  } finally {
    await run.handoff?.close().catch(() => undefined);
  }
}

async function handOff(run: Run): Promise<SaveVmResult> {
  const qmp = run.monitor.client;
  const listener = await MigrationListener.listen();
  const { 'max-bandwidth': oldBandwidth } = await qmp.execute<{ 'max-bandwidth'?: number }>('query-migrate-parameters').catch(async (err: unknown) => {
    await listener.close();
    throw err;
  });
  run.startedMs = performance.now();
  let committed = false;
  try {
    if (run.wasRunning) await qmp.execute('stop');
    run.handoff = await HandoffSave.begin(run.vmDisk.path, run.name, { direct: 'auto' });
    await qmp.execute('migrate-set-parameters', { 'max-bandwidth': UNLIMITED_BANDWIDTH_BYTES_PER_S });
    await qmp.execute('migrate', { uri: listener.uri });
    const vmStateBytes = await receiveStream(run, listener);
    const final = await waitMigrationFinal(run.monitor.client, COMPLETION_TIMEOUT_MS);
    if (final.status !== 'completed') {
      throw new SnapshotError(ErrorCode.MIGRATION_FAILED, `the migration ended '${final.status}'${final['error-desc'] === undefined ? '' : `: ${final['error-desc']}`}; nothing was committed`);
    }
    if (run.options.signal?.aborted === true) throw abortedError();
    const vmClockNs = await readTail(run, vmStateBytes);
    progress(run, 'commit', vmStateBytes);
    const disks = await commitAll(run, vmStateBytes, vmClockNs);
    committed = true;
    const streamMs = performance.now() - run.startedMs;
    await finish(run, listener, oldBandwidth, false);
    const downtimeMs = performance.now() - run.startedMs;
    progress(run, 'resume', vmStateBytes);
    const status = (await run.monitor.client.execute<{ status: string }>('query-status')).status;
    return { name: run.name, downtimeMs, vmStateBytes, rateBytesPerSec: (vmStateBytes * 1000) / Math.max(1, streamMs), disks, status };
  } catch (err) {
    const error = toSnapshotError(err);
    if (!committed) {
      await finish(run, listener, oldBandwidth, true).catch((resumeError: unknown) => {
        error.message += `; and the VM could not be resumed: ${(resumeError as Error).message}`;
      });
    }
    throw error;
  }
}

/** QEMU's stream into the image, received natively; resolves with the vmstate length once it is durable. */
async function receiveStream(run: Run, listener: MigrationListener): Promise<number> {
  const open = (): SnapshotStream => {
    const stream = new SnapshotStream(validateStreamOptions({ signal: run.options.signal }), async () => handoffOf(run).sink());
    stream.on('progress', ({ bytesWritten }: { bytesWritten: number }) => progress(run, 'stream', bytesWritten));
    return stream;
  };
  return receiveMigration(listener, open, run.monitor.client);
}

/**
 * Reads the guest clock from the stream's tail and, for a VM that was
 * running, records 'running' as its run state: savevm records the state from
 * before its stop, and we stopped the VM ourselves, so QEMU wrote 'paused'.
 */
async function readTail(run: Run, vmStateBytes: number): Promise<bigint> {
  let vmClockNs = 0n;
  await handoffOf(run).editTail(vmStateBytes, GLOBAL_STATE_SEARCH_BYTES, (tail) => {
    vmClockNs = findVmClockNs(tail) ?? 0n;
    const field = findGlobalState(tail);
    if (!run.wasRunning || field === undefined || field.runState !== 'paused') return false;
    setGlobalState(tail, field, 'running');
    return true;
  });
  return vmClockNs;
}

/**
 * Locks and re-reads every disk, then commits: disk-only entries first, the
 * vmstate disk last. Each commit is atomic on its own (one header write);
 * if one fails, the entries already made are deleted again, as QEMU's
 * savevm does, so no disk keeps a snapshot the others lack.
 */
async function commitAll(run: Run, vmStateBytes: number, vmClockNs: bigint): Promise<SaveVmDisk[]> {
  const images: Array<{ disk: VmDisk; image: Image }> = [];
  const done: Array<{ disk: VmDisk; image: Image }> = [];
  try {
    for (const disk of run.disks) {
      if (disk === run.vmDisk) continue;
      const image = await openImage(disk.path);
      images.push({ disk, image });
      await image.beginSave(run.name);
    }
    images.push({ disk: run.vmDisk, image: await handoffOf(run).openForCommit() });
    const date = new Date();
    for (const entry of images) {
      const vmStateSize = entry.disk === run.vmDisk ? vmStateBytes : 0;
      await entry.image.commitSave({ vmStateSize, date, vmClockNs });
      done.push(entry);
    }
    return run.disks.map((disk) => ({ device: disk.device, path: disk.path, vmStateBytes: disk === run.vmDisk ? vmStateBytes : 0 }));
  } catch (err) {
    for (const { image } of done) await image.deleteSnapshot(run.name).catch(() => undefined);
    throw err;
  } finally {
    // Closing releases the lock bytes: QEMU needs them back at `cont`.
    for (const { image } of images) await image.close().catch(() => undefined);
  }
}

/** Restores what we changed in QEMU: cancels a migration on failure, resumes a VM that ran, restores max-bandwidth. */
async function finish(run: Run, listener: MigrationListener, oldBandwidth: number | undefined, failed: boolean): Promise<void> {
  await listener.close().catch(() => undefined);
  let qmp = run.monitor.client;
  if (qmp.closed) qmp = await run.monitor.revive();
  if (failed) {
    await cancelMigration(qmp);
    // Before QEMU runs again: give back the space of the vmstate written (QEMU never writes past the margin).
    await run.handoff?.discard().catch(() => undefined);
  }
  if (run.wasRunning) {
    const { status } = await qmp.execute<{ status: string }>('query-status');
    if (status !== 'running') await qmp.execute('cont');
  }
  if (oldBandwidth !== undefined) await qmp.execute('migrate-set-parameters', { 'max-bandwidth': oldBandwidth }).catch(() => undefined);
}

function handoffOf(run: Run): HandoffSave {
  if (run.handoff === undefined) throw new SnapshotError(ErrorCode.INTERNAL, 'the hand-off was not planned');
  return run.handoff;
}

function progress(run: Run, phase: SaveVmProgress['phase'], bytes: number): void {
  run.options.onProgress?.({ phase, bytes, downtimeMs: performance.now() - run.startedMs });
}

function abortedError(): SnapshotError {
  return new SnapshotError(ErrorCode.ABORTED, 'savevm aborted; nothing was committed');
}
