/**
 * snapstream's QMP connection to one QEMU, able to come back: when the
 * connection drops in the middle of a savevm, the VM is stopped and only a
 * `cont` on a new connection can resume it.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { ErrorCode } from '../errors.js';
import { QmpClient, QmpError } from './qmp.js';

/** How long revive() keeps trying to reconnect. */
export const REVIVE_TIMEOUT_MS = 10_000;
const REVIVE_RETRY_MS = 100;

export class Monitor {
  readonly path: string;
  private _client: QmpClient;

  private constructor(path: string, client: QmpClient) {
    this.path = path;
    this._client = client;
  }

  static async connect(path: string, timeoutMs?: number): Promise<Monitor> {
    return new Monitor(path, await QmpClient.connect(path, { timeoutMs }));
  }

  get client(): QmpClient {
    return this._client;
  }

  /** A working client: the current one, or a new connection to the same socket. */
  async revive(timeoutMs = REVIVE_TIMEOUT_MS): Promise<QmpClient> {
    if (!this._client.closed) return this._client;
    const deadline = Date.now() + timeoutMs;
    let last: unknown;
    while (Date.now() < deadline) {
      try {
        this._client = await QmpClient.connect(this.path, { timeoutMs: Math.max(500, deadline - Date.now()) });
        return this._client;
      } catch (err) {
        last = err;
        await sleep(REVIVE_RETRY_MS);
      }
    }
    throw new QmpError(`lost the QMP connection to '${this.path}' and could not reconnect within ${timeoutMs} ms`, {
      code: ErrorCode.QMP_CLOSED,
      path: this.path,
      cause: last,
    });
  }

  close(): void {
    this._client.close();
  }
}
