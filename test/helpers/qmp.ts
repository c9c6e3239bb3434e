/**
 * QMP for tests: the library's own client (src/vm/qmp.ts), which speaks the
 * protocol (greeting, capabilities, ids, events, a timeout on every wait),
 * plus what only tests want: connecting to a socket QEMU has not created
 * yet, retrying until it appears, and a longer default command timeout.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpClient as LibraryQmpClient, QmpError } from '../../src/vm/qmp.js';

export { QmpError };
export type { QmpEvent } from '../../src/vm/qmp.js';

/** QEMU creates the socket during start-up, ~100 ms after spawn under TCG. */
const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
const CONNECT_RETRY_MS = 20;

/** The library's client; tests use its execute/waitEvent/events/close/greeting. */
export type QmpClient = LibraryQmpClient;

export const QmpClient = {
  /**
   * Connects to `socketPath`, retrying while it does not exist yet or
   * refuses connections, until `timeoutMs` passes; then greeting and
   * capabilities as the library does.
   */
  async connect(socketPath: string, options: { timeoutMs?: number } = {}): Promise<LibraryQmpClient> {
    const timeoutMs = options.timeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        return await LibraryQmpClient.connect(socketPath, { timeoutMs: Math.max(1, deadline - Date.now()) });
      } catch (error) {
        const code = ((error as Error).cause as NodeJS.ErrnoException | undefined)?.code;
        const retryable = code === 'ENOENT' || code === 'ECONNREFUSED';
        if (!retryable || Date.now() + CONNECT_RETRY_MS >= deadline) {
          throw new Error(`QMP connect ${socketPath}: ${(error as Error).message}`, { cause: error });
        }
        await sleep(CONNECT_RETRY_MS);
      }
    }
  },
};
