/**
 * The migration channel between QEMU and snapstream: a unix socket in a
 * private directory (never `exec:` through a shell), and the QMP calls that
 * start, watch and cancel a migration.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ErrorCode, SnapshotError } from '../errors.js';
import type { QmpClient } from './qmp.js';

/** query-migrate poll interval: small against the downtime we measure, cheap for QEMU. */
export const MIGRATION_POLL_MS = 10;
/** QEMU's default max-bandwidth is 128 MiB/s, 8 s per GiB; the VM is stopped, so take all the disk gives. */
export const UNLIMITED_BANDWIDTH_BYTES_PER_S = 2 ** 50;
/** How long QEMU may take to connect to our socket after `migrate` returns. */
const CONNECT_TIMEOUT_MS = 10_000;

export interface MigrationStatus {
  status: string;
  'error-desc'?: string;
  ram?: { transferred?: number; total?: number };
  /** Milliseconds QEMU itself held the guest stopped (a background snapshot: from its own stop to its resume). */
  downtime?: number;
}

const FINAL = new Set(['completed', 'failed', 'cancelled']);

/** A listening unix socket for one incoming QEMU connection. */
export class MigrationListener {
  readonly socketPath: string;
  private readonly _dir: string;
  private readonly _server: Server;
  private readonly _connection: Promise<Socket>;

  private constructor(dir: string, server: Server, connection: Promise<Socket>) {
    this._dir = dir;
    this.socketPath = join(dir, 'migration.sock');
    this._server = server;
    this._connection = connection;
  }

  static async listen(): Promise<MigrationListener> {
    // A directory only we can enter: nobody else can connect to the socket and feed us a stream.
    const dir = await mkdtemp(join(tmpdir(), 'snapstream-'));
    const server = createServer();
    const connection = new Promise<Socket>((resolve, reject) => {
      server.once('connection', (socket) => {
        server.close();
        resolve(socket);
      });
      server.once('error', reject);
    });
    connection.catch(() => undefined);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(join(dir, 'migration.sock'), () => {
        server.off('error', reject);
        resolve();
      });
    });
    return new MigrationListener(dir, server, connection);
  }

  get uri(): string {
    return `unix:${this.socketPath}`;
  }

  /** QEMU's connection; rejects after `timeoutMs`. */
  async accept(timeoutMs = CONNECT_TIMEOUT_MS): Promise<Socket> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new SnapshotError(ErrorCode.MIGRATION_FAILED, `QEMU did not connect to the migration socket within ${timeoutMs} ms`)), timeoutMs);
    });
    try {
      return await Promise.race([this._connection, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  async close(): Promise<void> {
    this._server.close();
    await rm(this._dir, { recursive: true, force: true });
  }
}

/** Connects to the socket QEMU listens on after `migrate-incoming unix:PATH`, retrying until it exists. */
export async function connectIncoming(path: string, timeoutMs = CONNECT_TIMEOUT_MS): Promise<Socket> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await new Promise<Socket>((resolve, reject) => {
        const socket = connect(path);
        socket.once('connect', () => {
          socket.off('error', reject);
          resolve(socket);
        });
        socket.once('error', reject);
      });
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if ((code !== 'ENOENT' && code !== 'ECONNREFUSED') || Date.now() > deadline) {
        throw new SnapshotError(ErrorCode.MIGRATION_FAILED, `cannot connect to QEMU's incoming migration socket: ${code ?? String(err)}`, { cause: err });
      }
      await sleep(MIGRATION_POLL_MS);
    }
  }
}

export function queryMigrate(qmp: QmpClient): Promise<MigrationStatus> {
  return qmp.execute<MigrationStatus>('query-migrate');
}

/**
 * Polls until the migration reaches completed, failed or cancelled. Rejects
 * with a QmpError when that does not happen within `timeoutMs`.
 */
export async function waitMigrationFinal(qmp: QmpClient, timeoutMs: number): Promise<MigrationStatus> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await queryMigrate(qmp);
    if (FINAL.has(info.status)) return info;
    if (Date.now() > deadline) {
      throw new SnapshotError(ErrorCode.MIGRATION_FAILED, `the migration did not finish within ${timeoutMs} ms (status '${info.status}')`);
    }
    await sleep(MIGRATION_POLL_MS);
  }
}

/** Cancels a migration that may still run, and waits until QEMU has left 'cancelling'. Best effort. */
export async function cancelMigration(qmp: QmpClient, timeoutMs = 10_000): Promise<MigrationStatus | undefined> {
  try {
    const info = await queryMigrate(qmp);
    if (info.status === undefined || info.status === 'none' || FINAL.has(info.status)) return info;
    await qmp.execute('migrate_cancel');
    return await waitMigrationFinal(qmp, timeoutMs);
  } catch {
    return undefined;
  }
}
