/**
 * The migration channel between QEMU and snapstream: a unix socket in a
 * private directory (never `exec:` through a shell), and the QMP calls that
 * start, watch and cancel a migration.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ErrorCode, SnapshotError, toSnapshotError } from '../errors.js';
import { StreamSocket } from '../io/stream-socket.js';
import type { SnapshotStream } from '../stream/snapshot-stream.js';
import type { QmpClient } from './qmp.js';

/** query-migrate poll interval: small against the downtime we measure, cheap for QEMU. */
export const MIGRATION_POLL_MS = 10;
/** QEMU's default max-bandwidth is 128 MiB/s, 8 s per GiB; the VM is stopped, so take all the disk gives. */
export const UNLIMITED_BANDWIDTH_BYTES_PER_S = 2 ** 50;
/** No stream byte for this long while migrating: QEMU is stuck; give up (and resume a VM that ran). */
export const STALL_TIMEOUT_MS = 30_000;
/** How long QEMU may take to connect to our socket after `migrate` returns. */
const CONNECT_TIMEOUT_MS = 10_000;
/** The longest unix socket path Linux takes: sun_path holds 108 bytes with the terminating NUL. */
const MAX_SOCKET_PATH_BYTES = 107;
/** Where a socket's directory goes when the system temp directory's path is too long for one. */
const SHORT_TMP = '/tmp';

/**
 * A fresh private directory (0700: nobody else can connect to the socket and
 * feed us a stream, or read one) for the migration socket `name`, under the
 * system temp directory ($TMPDIR), or under /tmp when that path would be too
 * long for a unix socket. Resolves with the directory and the socket's path.
 */
export async function makeSocketDir(name: string): Promise<{ dir: string; path: string }> {
  // mkdtemp appends six characters to the prefix; under /tmp the path always fits.
  const fits = Buffer.byteLength(join(tmpdir(), 'snapstream-XXXXXX', name)) <= MAX_SOCKET_PATH_BYTES;
  const dir = await mkdtemp(join(fits ? tmpdir() : SHORT_TMP, 'snapstream-')).catch((err: unknown) => {
    throw toSnapshotError(err);
  });
  return { dir, path: join(dir, name) };
}

export interface MigrationStatus {
  status: string;
  'error-desc'?: string;
  ram?: { transferred?: number; total?: number };
  /** Milliseconds QEMU itself held the guest stopped (a background snapshot: from its own stop to its resume). */
  downtime?: number;
}

const FINAL = new Set(['completed', 'failed', 'cancelled']);

/**
 * A listening unix socket for QEMU's one outgoing migration connection,
 * native (StreamSocket): the stream is received on the socket's own thread
 * straight into the snapshot stream's ring (SnapshotStream.receiveFrom).
 */
export class MigrationListener {
  readonly socketPath: string;
  private readonly _dir: string;
  private readonly _socket: StreamSocket;

  private constructor(dir: string, socket: StreamSocket) {
    this._dir = dir;
    this.socketPath = socket.path;
    this._socket = socket;
  }

  static async listen(): Promise<MigrationListener> {
    const { dir, path } = await makeSocketDir('migration.sock');
    try {
      return new MigrationListener(dir, await StreamSocket.listen(path));
    } catch (err) {
      await rm(dir, { recursive: true, force: true });
      throw err;
    }
  }

  get uri(): string {
    return `unix:${this.socketPath}`;
  }

  /**
   * QEMU's connection; rejects after `timeoutMs`. A recv on it that gets no
   * byte for STALL_TIMEOUT_MS fails (EAGAIN: see receiveMigration).
   */
  async accept(timeoutMs = CONNECT_TIMEOUT_MS): Promise<StreamSocket> {
    try {
      await this._socket.accept(timeoutMs, { timeoutMs: STALL_TIMEOUT_MS });
    } catch (err) {
      if ((err as SnapshotError).code === ErrorCode.ETIMEDOUT) {
        throw new SnapshotError(ErrorCode.MIGRATION_FAILED, `QEMU did not connect to the migration socket within ${timeoutMs} ms`, { cause: err });
      }
      throw err;
    }
    return this._socket;
  }

  async close(): Promise<void> {
    // A pending accept gives up within 100 ms of the shutdown; a receive has settled before this is called.
    this._socket.shutdown();
    for (let i = 0; this._socket.pending > 0 && i < 100; i++) await sleep(MIGRATION_POLL_MS);
    await this._socket.close().catch(() => undefined);
    await rm(this._dir, { recursive: true, force: true });
  }
}

/**
 * QEMU's outgoing stream, from its connection to `listener`, into the stream
 * `open` makes once QEMU has connected (received on the socket's thread into
 * the ring). Resolves with the bytes written once they are durable. No byte
 * for STALL_TIMEOUT_MS is a stalled QEMU; with `qmp`, its connection closing
 * ends the stream too.
 */
export async function receiveMigration(listener: MigrationListener, open: () => SnapshotStream, qmp?: QmpClient): Promise<number> {
  // Accept first: a stream made before would hold its sink with nobody to end it if QEMU never came.
  const socket = qmp === undefined ? await listener.accept() : await acceptUnlessFailed(listener, qmp);
  const stream = open();
  const unsubscribe = qmp?.onClose(() => {
    stream.destroy(new SnapshotError(ErrorCode.QMP_CLOSED, 'the QMP connection closed during the migration'));
  });
  try {
    await stream.receiveFrom(socket);
    return stream.bytesWritten;
  } catch (err) {
    const error = toSnapshotError(err);
    if (error.code === ErrorCode.EAGAIN && error.syscall === 'recv') {
      throw new SnapshotError(ErrorCode.MIGRATION_FAILED, `no migration data for ${STALL_TIMEOUT_MS} ms; QEMU stalled`, { cause: err });
    }
    throw error;
  } finally {
    unsubscribe?.();
  }
}

/** How often the migration's status is polled while QEMU has not connected yet. */
const ACCEPT_POLL_MS = 50;

/**
 * QEMU's connection to `listener`, or, as soon as QEMU reports the migration
 * failed or cancelled before connecting (it could not reach the socket: a
 * QEMU running as another user cannot enter our 0700 directory), a
 * MIGRATION_FAILED with QEMU's own words, instead of the accept timeout.
 */
async function acceptUnlessFailed(listener: MigrationListener, qmp: QmpClient): Promise<StreamSocket> {
  const accepted = listener.accept();
  accepted.catch(() => undefined); // when QEMU's failure wins, the caller's close() ends this accept
  let waiting = true;
  const failed = (async (): Promise<MigrationStatus | undefined> => {
    while (waiting) {
      await sleep(ACCEPT_POLL_MS);
      if (!waiting) break;
      const info = await queryMigrate(qmp).catch(() => undefined);
      if (info !== undefined && (info.status === 'failed' || info.status === 'cancelled')) return info;
    }
    return undefined;
  })();
  try {
    const first = await Promise.race([accepted, failed]);
    if (first instanceof StreamSocket) return first;
    const info = first as MigrationStatus;
    throw new SnapshotError(
      ErrorCode.MIGRATION_FAILED,
      `QEMU's migration ended '${info.status}' before it connected to our socket${info['error-desc'] === undefined ? '' : `: ${info['error-desc']}`}; nothing was committed`,
    );
  } finally {
    waiting = false;
  }
}

/**
 * Connects to the socket QEMU listens on after `migrate-incoming unix:PATH`,
 * retrying until it exists. The stream then moves on the socket's native
 * thread (StreamSocket); a send that QEMU leaves unread for `stallMs` fails.
 */
export async function connectIncoming(path: string, stallMs: number, timeoutMs = CONNECT_TIMEOUT_MS): Promise<StreamSocket> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await StreamSocket.connect(path, { timeoutMs: stallMs });
    } catch (err) {
      const code = (err as SnapshotError).code;
      if ((code !== ErrorCode.ENOENT && code !== ErrorCode.ECONNREFUSED) || Date.now() > deadline) {
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
