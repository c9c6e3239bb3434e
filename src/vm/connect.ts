/**
 * connectVm(socketPath): snapstream's handle on a running QEMU. Operations
 * are serialised: one savevm or loadvm at a time, in call order.
 */
import { ErrorCode, SnapshotError } from '../errors.js';
import { validatePath, validateSnapshotName, validateSnapshotRef } from '../validate.js';
import { saveVmLive } from './live-savevm.js';
import { loadVm, validateLoadVmOptions, type LoadVmOptions, type LoadVmResult } from './loadvm.js';
import { Monitor } from './monitor.js';
import { saveVm, validateSaveVmOptions, type SaveVmOptions, type SaveVmResult } from './savevm.js';

export interface ConnectVmOptions {
  /** Bound for connecting and the QMP greeting. Default 5000. */
  timeoutMs?: number;
}

export class VmConnection {
  private readonly _monitor: Monitor;
  private _queue: Promise<unknown> = Promise.resolve();
  private _closed = false;

  private constructor(monitor: Monitor) {
    this._monitor = monitor;
  }

  /** @internal use connectVm() */
  static async connect(socketPath: string, options: ConnectVmOptions): Promise<VmConnection> {
    return new VmConnection(await Monitor.connect(socketPath, options.timeoutMs));
  }

  /** The QMP socket this connection talks to. */
  get socketPath(): string {
    return this._monitor.path;
  }

  /** QEMU's version from the QMP greeting, [major, minor, micro]. */
  get qemuVersion(): [number, number, number] {
    return this._monitor.client.version;
  }

  /**
   * Like HMP savevm: snapshot `name` of every writable disk, the vmstate in
   * one of them. Stops the VM for as long as QEMU takes to produce its
   * state, and resumes it if it was running. With `{ live: true, stateImage }`
   * the VM is stopped for milliseconds only: QEMU takes disk-only snapshots
   * and the vmstate goes to the state image (docs/live-checkpoint.md).
   */
  savevm(name: string, options?: SaveVmOptions): Promise<SaveVmResult> {
    validateSnapshotName(name, 'name');
    const opts = validateSaveVmOptions(options);
    return this.exclusive(() => (opts.live === true ? saveVmLive(this._monitor, name, opts) : saveVm(this._monitor, name, opts)));
  }

  /** Restores snapshot `name` into a QEMU started with `-incoming defer` and the same configuration. */
  loadvm(name: string, options?: LoadVmOptions): Promise<LoadVmResult> {
    validateSnapshotRef(name, 'name');
    const opts = validateLoadVmOptions(options);
    return this.exclusive(() => loadVm(this._monitor, name, opts));
  }

  /** Closes the QMP connection after any running operation; the VM runs on. */
  async close(): Promise<void> {
    if (this._closed) return;
    this._closed = true;
    await this._queue.catch(() => undefined);
    this._monitor.close();
  }

  private exclusive<T>(task: () => Promise<T>): Promise<T> {
    if (this._closed) return Promise.reject(new SnapshotError(ErrorCode.QMP_CLOSED, `the connection to '${this.socketPath}' is closed`));
    const run = this._queue.then(task, task);
    this._queue = run.catch(() => undefined);
    return run;
  }
}

export function connectVm(socketPath: string, options: ConnectVmOptions = {}): Promise<VmConnection> {
  validatePath(socketPath, 'socketPath');
  if (options === null || typeof options !== 'object') throw new TypeError(`Expected an object for options, received ${String(options)}`);
  if (options.timeoutMs !== undefined && (!Number.isInteger(options.timeoutMs) || options.timeoutMs < 1)) {
    throw new RangeError(`Expected a positive integer for options.timeoutMs, received ${String(options.timeoutMs)}`);
  }
  return VmConnection.connect(socketPath, options);
}
