/**
 * vm.loadvm(): restore a snapshot into a QEMU started with `-incoming defer`
 * and the same configuration. Such a QEMU has its images open but inactive,
 * without lock bytes, and re-reads them (header, L1, refcounts) when the
 * incoming migration activates them. So:
 *
 *   1. the snapshot must exist on every writable disk, with a vmstate on the
 *      vmstate disk (checked before anything changes);
 *   2. every disk is reverted to it (Image.revertSnapshot, crash-safe);
 *   3. `migrate-incoming` on a unix socket, fed with the exported vmstate
 *      (O_DIRECT, read-ahead);
 *   4. `completed`, then `cont` if the saved run state says the VM was
 *      running (options.resume overrides).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { ErrorCode, SnapshotError, toSnapshotError } from '../errors.js';
import { validatePath } from '../validate.js';
import { openImage, type Image, type SnapshotInfo } from '../qcow2/image.js';
import { assertQcow2File, inspectVm, pickVmStateDisk, vmStateError, type VmDisk } from './inspect.js';
import { connectIncoming, waitMigrationFinal } from './migration.js';
import type { Monitor } from './monitor.js';
import { findStateSnapshot } from './live-state.js';
import { validateCommonVmOptions } from './options.js';
import { findGlobalState, GLOBAL_STATE_SEARCH_BYTES } from './runstate.js';

/**
 * Read-ahead for the vmstate fed to QEMU: 4 x 8 MiB in flight keeps the
 * disk busy while QEMU parses (it consumes ~1 GB/s here, about what one
 * O_DIRECT reader gets from the disk); 32 MiB of memory.
 */
const LOAD_CHUNK_BYTES = 8 << 20;
const LOAD_READ_AHEAD = 4;

/** After our last byte QEMU loads the device state and activates the disks; seconds at most. */
const COMPLETION_TIMEOUT_MS = 60_000;

export interface LoadVmProgress {
  phase: 'revert' | 'stream' | 'resume';
  /** vmstate bytes sent so far. */
  bytes: number;
  totalBytes: number;
  elapsedMs: number;
}

export interface LoadVmOptions {
  signal?: AbortSignal;
  onProgress?: (progress: LoadVmProgress) => void;
  /** Start the guest afterwards: default as the snapshot's saved run state says. */
  resume?: boolean;
  /** Disk (device, node name or path) that holds the vmstate; default the first writable disk, as loadvm does. */
  vmstateDisk?: string;
  /** A live snapshot (savevm with `live`): the disks hold disk-only snapshots, the vmstate is in this state image. */
  stateImage?: string;
}

export interface LoadVmResult {
  name: string;
  /** From the start of the revert to the VM running (or ready, when it stays paused). */
  durationMs: number;
  vmStateBytes: number;
  rateBytesPerSec: number;
  disks: Array<{ device: string; path: string }>;
  /** The run state the snapshot recorded ('running', 'paused', or undefined when the stream has none). */
  savedRunState: string | undefined;
  status: string;
}

export function validateLoadVmOptions(options: LoadVmOptions | undefined): LoadVmOptions {
  const resolved = validateCommonVmOptions(options);
  if (resolved.resume !== undefined && typeof resolved.resume !== 'boolean') {
    throw new TypeError(`Expected a boolean for options.resume, received ${String(resolved.resume)}`);
  }
  if (resolved.stateImage !== undefined) validatePath(resolved.stateImage, 'options.stateImage');
  return resolved;
}

export async function loadVm(monitor: Monitor, name: string, options: LoadVmOptions): Promise<LoadVmResult> {
  const qmp = monitor.client;
  const info = await inspectVm(qmp);
  if (info.status !== 'inmigrate') {
    throw vmStateError(`loadvm needs a QEMU started with '-incoming defer' and the same configuration; this one is '${info.status}'`);
  }
  const incoming = await qmp.execute<{ status?: string }>('query-migrate');
  if (incoming.status !== undefined && incoming.status !== 'none') {
    throw vmStateError(`an incoming migration was already started (status '${incoming.status}')`);
  }
  if (info.disks.length === 0) throw vmStateError('the VM has no writable disk that could hold the snapshot');
  for (const disk of info.disks) assertQcow2File(disk);
  // A live snapshot: its vmstate is in the state image, every disk holds a disk-only half.
  const stateSnapshot = options.stateImage === undefined ? undefined : await findStateSnapshot(options.stateImage, name);
  const vmDisk = stateSnapshot === undefined ? pickVmStateDisk(info.disks, options.vmstateDisk) : undefined;
  const started = performance.now();
  const snapshot = (await revertAll(info.disks, vmDisk, name, options.signal)) ?? (stateSnapshot as SnapshotInfo);
  options.onProgress?.({ phase: 'revert', bytes: 0, totalBytes: snapshot.vmStateSize, elapsedMs: performance.now() - started });
  const vmStatePath = options.stateImage ?? (vmDisk as VmDisk).path;
  const { savedRunState, streamMs } = await feedIncoming(monitor, vmStatePath, snapshot, options, started);
  // QEMU's own rule for -incoming (process_incoming_migration_bh): start when the stream says running or says nothing.
  const resume = options.resume ?? (savedRunState === undefined || savedRunState === 'running');
  const { status } = await monitor.client.execute<{ status: string }>('query-status');
  if (resume && status !== 'running') await monitor.client.execute('cont');
  if (!resume && status === 'running') await monitor.client.execute('stop');
  const durationMs = performance.now() - started;
  options.onProgress?.({ phase: 'resume', bytes: snapshot.vmStateSize, totalBytes: snapshot.vmStateSize, elapsedMs: durationMs });
  return {
    name,
    durationMs,
    vmStateBytes: snapshot.vmStateSize,
    rateBytesPerSec: (snapshot.vmStateSize * 1000) / Math.max(1, streamMs),
    disks: info.disks.map((d) => ({ device: d.device, path: d.path })),
    savedRunState,
    status: (await monitor.client.execute<{ status: string }>('query-status')).status,
  };
}

/**
 * Checks every disk first (nothing changes if one lacks the snapshot), then
 * reverts them all. Resolves with the vmstate disk's snapshot; without a
 * vmstate disk (a live snapshot's disk-only halves), with undefined.
 */
async function revertAll(disks: readonly VmDisk[], vmDisk: VmDisk | undefined, name: string, signal: AbortSignal | undefined): Promise<SnapshotInfo | undefined> {
  const images: Image[] = [];
  try {
    let found: SnapshotInfo | undefined;
    for (const disk of disks) {
      const image = await openImage(disk.path);
      images.push(image);
      const snapshot = image.snapshots().find((s) => s.id === name) ?? image.snapshots().find((s) => s.name === name);
      if (snapshot === undefined) {
        throw new SnapshotError(ErrorCode.SNAPSHOT_NOT_FOUND, `disk '${disk.device}' (${disk.path}) has no snapshot '${name}'`, { path: disk.path });
      }
      if (disk === vmDisk) found = snapshot;
    }
    if (vmDisk !== undefined && (found === undefined || found.vmStateSize === 0)) {
      throw new SnapshotError(ErrorCode.SNAPSHOT_DISK_ONLY, `snapshot '${name}' on disk '${vmDisk.device}' is disk-only (no vmstate); revert it offline with 'snapstream revert', or give the state image of a live snapshot`);
    }
    if (signal?.aborted === true) throw new SnapshotError(ErrorCode.ABORTED, 'loadvm aborted before any disk was reverted');
    for (const image of images) await image.revertSnapshot(name);
    return found;
  } finally {
    // Closing releases the lock bytes: QEMU takes them when it activates the images.
    for (const image of images) await image.close().catch(() => undefined);
  }
}

/** Streams the vmstate into `migrate-incoming`; resolves once QEMU reports `completed`. */
async function feedIncoming(
  monitor: Monitor,
  vmStatePath: string,
  snapshot: SnapshotInfo,
  options: LoadVmOptions,
  started: number,
): Promise<{ savedRunState: string | undefined; streamMs: number }> {
  const dir = await mkdtemp(join(tmpdir(), 'snapstream-'));
  // Read without lock bytes: QEMU must be able to take its own when it activates the image at the end.
  const image = await openImage(vmStatePath, { forceShare: true });
  try {
    const path = join(dir, 'incoming.sock');
    await monitor.client.execute('migrate-incoming', { uri: `unix:${path}` });
    const socket = await connectIncoming(path);
    const streamStart = performance.now();
    const tail = new TailTap(snapshot.vmStateSize, (bytes) =>
      options.onProgress?.({ phase: 'stream', bytes, totalBytes: snapshot.vmStateSize, elapsedMs: performance.now() - started }),
    );
    const reader = image.createVmStateReadStream(snapshot.id, { by: 'id', chunkBytes: LOAD_CHUNK_BYTES, readAhead: LOAD_READ_AHEAD });
    await pipeline(reader, tail, socket, { signal: options.signal });
    const final = await waitMigrationFinal(monitor.client, COMPLETION_TIMEOUT_MS);
    if (final.status !== 'completed') {
      throw new SnapshotError(ErrorCode.MIGRATION_FAILED, `QEMU did not accept the vmstate: migration '${final.status}'${final['error-desc'] === undefined ? '' : `: ${final['error-desc']}`}`);
    }
    return { savedRunState: findGlobalState(tail.tail)?.runState, streamMs: performance.now() - streamStart };
  } catch (err) {
    throw toSnapshotError(err);
  } finally {
    await image.close().catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  }
}

/** Passes chunks through untouched, keeping a copy of the last GLOBAL_STATE_SEARCH_BYTES of the stream. */
class TailTap extends Transform {
  readonly tail: Buffer;
  private readonly _tailStart: number;
  private _position = 0;
  private readonly _onBytes: (bytes: number) => void;

  constructor(totalBytes: number, onBytes: (bytes: number) => void) {
    super();
    this._tailStart = Math.max(0, totalBytes - GLOBAL_STATE_SEARCH_BYTES);
    this.tail = Buffer.alloc(totalBytes - this._tailStart);
    this._onBytes = onBytes;
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    const end = this._position + chunk.length;
    if (end > this._tailStart) {
      const from = Math.max(0, this._tailStart - this._position);
      chunk.copy(this.tail, this._position + from - this._tailStart, from);
    }
    this._position = end;
    this._onBytes(end);
    callback(null, chunk);
  }
}
