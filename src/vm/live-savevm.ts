/**
 * vm.savevm(name, { live: true, stateImage }): a checkpoint of a running VM
 * with milliseconds of downtime, whatever its RAM size. The order, and why
 * it is safe, is in docs/live-checkpoint.md; in short (QEMU 7.2,
 * migration/migration.c bg_migration_thread):
 *
 *   1. refuse before anything is stopped (live-inspect.ts), open the state
 *      image with its locks, enable `background-snapshot` (QEMU's own check
 *      of the RAM and the kernel);
 *   2. `stop`, then one `transaction` of blockdev-snapshot-internal-sync:
 *      QEMU takes a disk-only snapshot of every writable disk;
 *   3. `migrate` to our socket: QEMU's background-snapshot thread stops the
 *      VM (already stopped: nothing runs in between), captures the device
 *      state, write-protects guest RAM (ram_write_tracking_start) and only
 *      then resumes the VM from a bottom half: the RESUME event. Newer QEMUs
 *      leave a VM that was paused paused; then we `cont` once the RAM
 *      iteration has begun, which comes after write tracking started;
 *   4. the RAM, then the device state, stream into the state image; at
 *      `completed` the snapshot is committed there (one header write).
 *
 * Any failure before that commit deletes the disk-only snapshots again and
 * leaves the VM running; what could not be deleted is named in the error.
 */
import { performance } from 'node:perf_hooks';
import { ErrorCode, SnapshotError, toSnapshotError } from '../errors.js';
import { validateStreamOptions } from '../options.js';
import { SnapshotStream } from '../stream/snapshot-stream.js';
import { inspectVm, type VmDisk } from './inspect.js';
import { assertLiveSaveable, enableBackgroundSnapshot, vmImagePaths } from './live-inspect.js';
import { assertNotVmImage, StateImageSave } from './live-state.js';
import { LiveGuard } from './live-guard.js';
import { deleteDiskSnapshots, FLUSH_TIMEOUT_MS, qemuDiskName, takeDiskSnapshots, waitWriteTracking } from './live-qemu.js';
import { cancelMigration, MigrationListener, receiveMigration, UNLIMITED_BANDWIDTH_BYTES_PER_S, waitMigrationFinal } from './migration.js';
import type { Monitor } from './monitor.js';
import { findGlobalState, findVmClockNs, GLOBAL_STATE_SEARCH_BYTES, setGlobalState } from './runstate.js';
import type { SaveVmOptions, SaveVmResult } from './savevm.js';

/** After QEMU's last byte, 'completed' follows at once; anything slower is a fault. */
const COMPLETION_TIMEOUT_MS = 30_000;

/**
 * @internal Test hooks, never exported from the package. `resumeBeforeTracking`
 * is the wrong order on purpose: `cont` right after the disk snapshots, then
 * `beforeMigrate`, then `migrate`. The checkpoint-instant test proves that it
 * catches such a savevm.
 */
export interface LiveHooks {
  resumeBeforeTracking?: boolean;
  beforeMigrate?: () => Promise<void>;
}

interface LiveRun {
  monitor: Monitor;
  name: string;
  options: SaveVmOptions;
  hooks: LiveHooks;
  disks: VmDisk[];
  state: StateImageSave;
  listener: MigrationListener | undefined;
  /** The stream into the state image, once started: undo waits for it before anything is closed. */
  received?: Promise<number>;
  /** Disk-only snapshots QEMU took (to delete on failure). */
  taken: VmDisk[];
  stoppedAt: number;
  /** From `stop` to the VM running again with its RAM write-protected; undefined until then. */
  downtimeMs: number | undefined;
  /** True from our `stop` until the VM runs again. */
  stopped: boolean;
  restore: Array<() => Promise<unknown>>;
  /** Why receiving the stream failed, once it has. */
  streamError?: unknown;
  /** Cleans up after us if we die (kill -9) in the middle. */
  guard: LiveGuard | undefined;
}

export async function saveVmLive(monitor: Monitor, name: string, options: SaveVmOptions, hooks: LiveHooks = {}): Promise<SaveVmResult> {
  const qmp = monitor.client;
  const info = await inspectVm(qmp);
  await assertLiveSaveable(qmp, info, name);
  const stateImage = options.stateImage as string;
  await assertNotVmImage(stateImage, await vmImagePaths(qmp));
  if (options.signal?.aborted === true) throw abortedError();
  const state = await StateImageSave.begin(stateImage, name);
  const run: LiveRun = { monitor, name, options, hooks, disks: info.disks, state, listener: undefined, taken: [], stoppedAt: 0, downtimeMs: undefined, stopped: false, restore: [], guard: undefined };
  try {
    const capabilityWasOff = await enableBackgroundSnapshot(qmp);
    if (capabilityWasOff) {
      run.restore.push(() => run.monitor.client.execute('migrate-set-capabilities', { capabilities: [{ capability: 'background-snapshot', state: false }] }));
    }
    run.guard = await LiveGuard.start({ socketPath: monitor.path, name, disks: info.disks.map(qemuDiskName), stateImage, capabilityWasOff });
    return await checkpoint(run);
  } finally {
    for (const undo of run.restore.reverse()) await undo().catch(() => undefined);
    await run.listener?.close().catch(() => undefined);
    await state.close().catch(() => undefined);
    run.guard?.dismiss();
  }
}

async function checkpoint(run: LiveRun): Promise<SaveVmResult> {
  const qmp = run.monitor.client;
  run.listener = await MigrationListener.listen();
  const { 'max-bandwidth': oldBandwidth } = await qmp.execute<{ 'max-bandwidth'?: number }>('query-migrate-parameters');
  await qmp.execute('migrate-set-parameters', { 'max-bandwidth': UNLIMITED_BANDWIDTH_BYTES_PER_S });
  if (oldBandwidth !== undefined) run.restore.push(() => run.monitor.client.execute('migrate-set-parameters', { 'max-bandwidth': oldBandwidth }));
  await drainEvents(run, 'RESUME');
  try {
    run.guard?.step('stopped');
    // Before the transaction: if we die inside it, the guard finds out by trying (the name was free before).
    run.guard?.step('taken');
    run.stoppedAt = performance.now();
    run.stopped = true;
    await qmp.execute('stop', undefined, { timeoutMs: FLUSH_TIMEOUT_MS });
    const stoppedMs = performance.now();
    run.taken = await takeDiskSnapshots(qmp, run.disks, run.name);
    const snapshotsMs = performance.now();
    if (run.hooks.resumeBeforeTracking === true) await resume(run);
    await run.hooks.beforeMigrate?.();
    await qmp.execute('migrate', { uri: run.listener.uri });
    const received = receiveStream(run);
    run.received = received;
    received.catch((err: unknown) => {
      run.streamError = err;
    });
    const resumedAt = await waitWriteTracking(qmp, () => performance.now());
    run.stopped = false;
    run.guard?.step('resumed');
    const downtimeMs = resumedAt - run.stoppedAt;
    run.downtimeMs = downtimeMs;
    const downtimePhases: NonNullable<SaveVmResult['downtimePhases']> = { stopMs: stoppedMs - run.stoppedAt, diskSnapshotsMs: snapshotsMs - stoppedMs, writeTrackingMs: resumedAt - snapshotsMs };
    progress(run, 'stream', 0);
    const vmStateBytes = await received;
    const final = await waitMigrationFinal(qmp, COMPLETION_TIMEOUT_MS);
    if (final.status !== 'completed') {
      throw new SnapshotError(ErrorCode.MIGRATION_FAILED, `the background snapshot ended '${final.status}'${final['error-desc'] === undefined ? '' : `: ${final['error-desc']}`}`);
    }
    if (typeof final.downtime === 'number') downtimePhases.qemuPauseMs = final.downtime;
    if (run.options.signal?.aborted === true) throw abortedError();
    const streamMs = performance.now() - resumedAt;
    progress(run, 'commit', vmStateBytes);
    const vmClockNs = await readTail(run, vmStateBytes);
    await run.state.commit(vmStateBytes, vmClockNs, new Date());
    const status = (await qmp.execute<{ status: string }>('query-status')).status;
    return {
      name: run.name,
      live: true,
      downtimeMs,
      downtimePhases,
      vmStateBytes,
      rateBytesPerSec: (vmStateBytes * 1000) / Math.max(1, streamMs),
      disks: run.disks.map((d) => ({ device: d.device, path: d.path, vmStateBytes: 0 })),
      stateImage: { path: run.state.path, vmStateBytes, created: run.state.created },
      status,
    };
  } catch (err) {
    // The stream's own failure (ENOSPC, an abort) is the cause; QEMU's failed migration only follows from it.
    throw await undo(run, toSnapshotError(run.streamError ?? err));
  }
}

/** QEMU's stream into the state image, received natively; resolves with the vmstate length once it is durable. */
async function receiveStream(run: LiveRun): Promise<number> {
  const open = (): SnapshotStream => {
    const stream = new SnapshotStream(validateStreamOptions({ signal: run.options.signal }), async () => run.state.sink());
    stream.on('progress', ({ bytesWritten }: { bytesWritten: number }) => progress(run, 'stream', bytesWritten));
    return stream;
  };
  return receiveMigration(run.listener as MigrationListener, open);
}

/**
 * Reads the guest clock from the stream's tail and records 'running' as the
 * run state: QEMU stores the state it found when its thread stopped the VM,
 * which was 'paused' by our own `stop`; the VM was running before it.
 */
async function readTail(run: LiveRun, vmStateBytes: number): Promise<bigint> {
  let vmClockNs = 0n;
  await run.state.editTail(vmStateBytes, GLOBAL_STATE_SEARCH_BYTES, (tail) => {
    vmClockNs = findVmClockNs(tail) ?? 0n;
    const field = findGlobalState(tail);
    if (field === undefined || field.runState !== 'paused') return false;
    setGlobalState(tail, field, 'running');
    return true;
  });
  return vmClockNs;
}

/**
 * After a failure: cancels the migration, resumes a VM we still hold
 * stopped, deletes the disk-only snapshots QEMU took. The error says what
 * could not be undone, by name.
 */
async function undo(run: LiveRun, error: SnapshotError): Promise<SnapshotError> {
  // Closing the listener shuts the socket: a receive still running ends (ECANCELED, never a
  // clean end of stream) and is waited for, so nothing writes the state image after this.
  const closing = run.listener?.close().catch(() => undefined);
  await run.received?.catch(() => undefined);
  await closing;
  let qmp = run.monitor.client;
  try {
    if (qmp.closed) qmp = await run.monitor.revive();
    await cancelMigration(qmp);
    if (run.stopped) await resume(run);
  } catch (resumeError) {
    error.message += `; and the VM could not be resumed: ${(resumeError as Error).message}`;
  }
  const left = await deleteDiskSnapshots(run.monitor, run.taken, run.name);
  if (left.length > 0) {
    error.message += `; the disk-only snapshot '${run.name}' is left on ${left.map((d) => `'${d.device}' (${d.path})`).join(', ')}: delete it with blockdev-snapshot-delete-internal-sync`;
    Object.assign(error, { halfSnapshots: left.map((d) => ({ device: d.device, path: d.path, name: run.name })) });
  }
  return error;
}

async function resume(run: LiveRun): Promise<void> {
  const qmp = run.monitor.client;
  const { status } = await qmp.execute<{ status: string }>('query-status');
  if (status !== 'running') await qmp.execute('cont');
  run.stopped = false;
}

/** Consumes queued events named `name`, so that a wait that follows sees only new ones. */
async function drainEvents(run: LiveRun, name: string): Promise<void> {
  const qmp = run.monitor.client;
  while (qmp.events.some((e) => e.event === name)) await qmp.waitEvent(name, 1);
}

function progress(run: LiveRun, phase: 'stream' | 'commit', bytes: number): void {
  run.options.onProgress?.({ phase, bytes, downtimeMs: run.downtimeMs ?? performance.now() - run.stoppedAt });
}

function abortedError(): SnapshotError {
  return new SnapshotError(ErrorCode.ABORTED, 'savevm aborted; nothing was committed');
}
