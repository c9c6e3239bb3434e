/**
 * vm.loadvm(): restore a snapshot into a QEMU started with `-incoming defer`
 * and the same configuration. Such a QEMU has its images open but inactive,
 * without lock bytes, and re-reads them (header, L1, refcounts) when the
 * incoming migration activates them. So:
 *
 *   1. the snapshot must exist on every writable disk, with a vmstate on the
 *      vmstate disk (checked before anything changes);
 *   2. every disk is reverted to it (Image.revertSnapshot, crash-safe),
 *      while
 *   3. `migrate-incoming` on a unix socket is fed with the exported vmstate
 *      (O_DIRECT reads into reused slots, sent on a native thread); its last
 *      chunk waits until every disk is reverted and closed;
 *   4. `completed`, then `cont` if the saved run state says the VM was
 *      running (options.resume overrides).
 */
import { rm } from 'node:fs/promises';
import { performance } from 'node:perf_hooks';
import { ErrorCode, SnapshotError, toSnapshotError } from '../errors.js';
import { validatePath } from '../validate.js';
import { openImage, type Image, type SnapshotInfo } from '../qcow2/image.js';
import { assertQcow2File, inspectVm, pickVmStateDisk, vmStateError, type VmDisk } from './inspect.js';
import type { StreamSocket } from '../io/stream-socket.js';
import { connectIncoming, makeSocketDir, STALL_TIMEOUT_MS, waitMigrationFinal } from './migration.js';
import type { Monitor } from './monitor.js';
import { findStateSnapshot } from './live-state.js';
import { validateCommonVmOptions } from './options.js';
import { findGlobalState, GLOBAL_STATE_SEARCH_BYTES } from './runstate.js';

/**
 * Read-ahead for the vmstate fed to QEMU: 4 x 8 MiB, read from before
 * `migrate-incoming` on, keeps the disk busy while QEMU parses; 32 MiB of
 * memory. Measured here (docs/performance.md): 2 to 4 slots of 4 or 8 MiB
 * load alike within the noise; 16 x 8 MiB was slower (0.82-1.12 s against
 * 0.61-0.81 s for 1 GiB), as every slot is fresh memory the host must fault in.
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
  const { images, found } = await checkDisks(info.disks, vmDisk, name);
  const snapshot = found ?? (stateSnapshot as SnapshotInfo);
  if (options.signal?.aborted === true) {
    await closeAll(images);
    throw new SnapshotError(ErrorCode.ABORTED, 'loadvm aborted before any disk was reverted');
  }
  // Read without lock bytes: QEMU must be able to take its own when it activates the image at the end.
  // Opened before the revert starts, which rewrites the header this reads.
  const vmStatePath = options.stateImage ?? (vmDisk as VmDisk).path;
  const stateImage = await openImage(vmStatePath, { forceShare: true }).catch(async (err: unknown) => {
    await closeAll(images);
    throw err;
  });
  // The revert runs while the stream starts: QEMU reads the images only when
  // the incoming migration activates them, after the stream's last byte, and
  // feedIncoming sends that last chunk only once every disk is reverted.
  const reverted = revertAll(images, name).then(() => {
    options.onProgress?.({ phase: 'revert', bytes: 0, totalBytes: snapshot.vmStateSize, elapsedMs: performance.now() - started });
  });
  reverted.catch(() => undefined); // awaited below, whichever way the stream ends
  const { savedRunState, streamMs } = await feedIncoming(monitor, stateImage, snapshot, options, started, reverted)
    .catch(async (err: unknown) => {
      // A revert that failed is the cause, whatever the stream then saw; never return while it still runs.
      await reverted;
      throw err;
    })
    .finally(() => stateImage.close().catch(() => undefined));
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
 * Opens every disk and checks that it has the snapshot, with a vmstate on the
 * vmstate disk: nothing changes when one lacks it. Resolves with the open
 * images (write-locked) and the vmstate disk's snapshot (undefined without a
 * vmstate disk: a live snapshot's disk-only halves).
 */
async function checkDisks(disks: readonly VmDisk[], vmDisk: VmDisk | undefined, name: string): Promise<{ images: Image[]; found: SnapshotInfo | undefined }> {
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
    return { images, found };
  } catch (err) {
    await closeAll(images);
    throw err;
  }
}

/** Reverts every disk (Image.revertSnapshot, crash-safe each), then closes them all. */
async function revertAll(images: readonly Image[], name: string): Promise<void> {
  try {
    for (const image of images) {
      await image.revertSnapshot(name).catch((err: unknown) => {
        const error = toSnapshotError(err);
        error.message = `reverting '${image.path}' to '${name}' failed: ${error.message}; the incoming migration is abandoned, and QEMU must be restarted with -incoming`;
        throw error;
      });
    }
  } finally {
    await closeAll(images);
  }
}

/** Closing releases the lock bytes: QEMU takes them when it activates the images. */
async function closeAll(images: readonly Image[]): Promise<void> {
  for (const image of images) await image.close().catch(() => undefined);
}

/**
 * Streams the vmstate into `migrate-incoming`; resolves once QEMU reports
 * `completed`. The last chunk waits for `reverted`. The bytes go from O_DIRECT reads into reused aligned slots and
 * from there to QEMU's socket on a native thread (VmStateReadStream.pumpTo,
 * StreamSocket): no chunk allocated per read and no JS per socket write.
 */
async function feedIncoming(
  monitor: Monitor,
  image: Image,
  snapshot: SnapshotInfo,
  options: LoadVmOptions,
  started: number,
  reverted: Promise<void>,
): Promise<{ savedRunState: string | undefined; streamMs: number }> {
  if (options.signal?.aborted === true) {
    throw new SnapshotError(ErrorCode.ABORTED, 'loadvm aborted before the stream began: QEMU is untouched and can still load a snapshot; the disks may already be reverted');
  }
  const { dir, path } = await makeSocketDir('incoming.sock');
  let socket: StreamSocket | undefined;
  const connection = deferred<StreamSocket>();
  const abort = (): void => {
    connection.reject(new SnapshotError(ErrorCode.ABORTED, 'loadvm aborted'));
    socket?.shutdown();
  };
  options.signal?.addEventListener('abort', abort, { once: true });
  const tail = new StreamTail(snapshot.vmStateSize);
  let sent = 0;
  let streamStart = performance.now();
  let pumped: Promise<void> | undefined;
  try {
    // The reads start now, while QEMU sets up its incoming side (tens of ms
    // before it takes the first byte): the first LOAD_READ_AHEAD chunks are
    // ready when it does. The sink waits for the connection.
    const reader = image.createVmStateReadStream(snapshot.id, { by: 'id', chunkBytes: LOAD_CHUNK_BYTES, readAhead: LOAD_READ_AHEAD });
    pumped = reader.pumpTo(async (chunk) => {
      const out = await connection.promise;
      tail.take(chunk);
      // QEMU activates the images right after the last byte: not before every disk is reverted.
      if (tail.position === snapshot.vmStateSize) await reverted;
      await out.send(chunk);
      sent += chunk.length;
      options.onProgress?.({ phase: 'stream', bytes: sent, totalBytes: snapshot.vmStateSize, elapsedMs: performance.now() - started });
    });
    pumped.catch(() => undefined); // awaited below on every path
    try {
      await monitor.client.execute('migrate-incoming', { uri: `unix:${path}` });
      socket = await connectIncoming(path, STALL_TIMEOUT_MS);
    } catch (err) {
      connection.reject(err);
      throw err;
    }
    // An abort during migrate-incoming or the connect came before the listener could act on the socket.
    if (isAborted(options.signal)) abort();
    streamStart = performance.now();
    connection.resolve(socket);
    await pumped.catch(async (err: unknown) => {
      throw await streamError(monitor, err, options.signal);
    });
    const final = await waitMigrationFinal(monitor.client, COMPLETION_TIMEOUT_MS);
    if (final.status !== 'completed') {
      throw new SnapshotError(ErrorCode.MIGRATION_FAILED, `QEMU did not accept the vmstate: migration '${final.status}'${final['error-desc'] === undefined ? '' : `: ${final['error-desc']}`}`);
    }
    return { savedRunState: findGlobalState(tail.tail)?.runState, streamMs: performance.now() - streamStart };
  } catch (err) {
    throw toSnapshotError(err);
  } finally {
    options.signal?.removeEventListener('abort', abort);
    // No read may still run into the reader's slots when the image closes.
    await pumped?.catch(() => undefined);
    if (socket !== undefined) {
      socket.shutdown();
      await socket.close().catch(() => undefined);
    }
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * Why feeding the stream stopped: our abort, QEMU's refusal (it closes the
 * socket when it cannot load the stream: its own description), or the error
 * itself (a read of the image, a stalled QEMU).
 */
async function streamError(monitor: Monitor, err: unknown, signal: AbortSignal | undefined): Promise<SnapshotError> {
  if (signal?.aborted === true) {
    return new SnapshotError(ErrorCode.ABORTED, 'loadvm aborted while streaming the vmstate; the disks are reverted, and QEMU must be restarted with -incoming to try again', { cause: err });
  }
  const error = toSnapshotError(err);
  if (error.syscall === 'send' && error.code === ErrorCode.EAGAIN) {
    return new SnapshotError(ErrorCode.MIGRATION_FAILED, `QEMU read no vmstate for ${STALL_TIMEOUT_MS} ms; it stalled`, { cause: err });
  }
  if (error.syscall === 'send') {
    const info = await waitMigrationFinal(monitor.client, COMPLETION_TIMEOUT_MS).catch(() => undefined);
    const gone = monitor.client.closed ? "; QEMU's monitor closed too: QEMU exits when an incoming migration fails, and its stderr says why" : '';
    const why = info?.['error-desc'] ?? `the connection ended (${error.code})${gone}`;
    return new SnapshotError(ErrorCode.MIGRATION_FAILED, `QEMU did not accept the vmstate: ${why}`, { cause: err });
  }
  return error;
}

/** Read through a call, so that checks after an await are not narrowed away by an earlier one. */
function isAborted(signal: AbortSignal | undefined): boolean {
  return signal?.aborted === true;
}

/** Keeps a copy of the last GLOBAL_STATE_SEARCH_BYTES of the stream as its chunks go by. */
class StreamTail {
  readonly tail: Buffer;
  /** Stream bytes seen so far. */
  position = 0;
  private readonly _tailStart: number;

  constructor(totalBytes: number) {
    this._tailStart = Math.max(0, totalBytes - GLOBAL_STATE_SEARCH_BYTES);
    this.tail = Buffer.alloc(totalBytes - this._tailStart);
  }

  take(chunk: Uint8Array): void {
    const end = this.position + chunk.length;
    if (end > this._tailStart) {
      const from = Math.max(0, this._tailStart - this.position);
      this.tail.set(chunk.subarray(from), this.position + from - this._tailStart);
    }
    this.position = end;
  }
}

/** A promise settled from outside (Promise.withResolvers needs Node 22); settling twice is a no-op. */
function deferred<T>(): { promise: Promise<T>; resolve: (value: T) => void; reject: (reason: unknown) => void } {
  let resolve!: (value: T) => void;
  let reject!: (reason: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(() => undefined); // a rejection nobody waits for (the pump already stopped) is not unhandled
  return { promise, resolve, reject };
}
