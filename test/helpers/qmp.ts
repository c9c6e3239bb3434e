/**
 * A minimal QMP client over a unix socket, for tests that drive QEMU.
 *
 * Protocol (docs/interop/qmp-spec.txt): the server sends a greeting
 * `{"QMP": {...}}`, the client must send `qmp_capabilities` first, then each
 * command `{"execute", "arguments", "id"}` gets exactly one `{"return"}` or
 * `{"error"}` carrying the same id. Asynchronous `{"event"}` messages can
 * arrive at any time; they are queued until a `waitEvent` consumes them.
 * Every wait is bounded, and `close()` destroys the socket.
 */
import { connect, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

/** Bound for one command; savevm of 64 MiB takes well under a second here. */
const DEFAULT_COMMAND_TIMEOUT_MS = 30_000;

/** QEMU creates the socket during start-up, ~100 ms after spawn under TCG. */
const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
const CONNECT_RETRY_MS = 20;

/** Unconsumed events kept at most; older ones are dropped first. */
const MAX_QUEUED_EVENTS = 1000;

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

/** A QMP `{"error": {"class", "desc"}}` reply. */
export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command} failed: ${errorClass}: ${desc}`);
    this.name = 'QmpError';
  }
}

interface Pending {
  command: string;
  resolve(value: unknown): void;
  reject(error: Error): void;
  timer: NodeJS.Timeout;
}

interface EventWaiter {
  name: string;
  matches(event: QmpEvent): boolean;
  resolve(event: QmpEvent): void;
  reject(error: Error): void;
  timer: NodeJS.Timeout;
}

export class QmpClient {
  readonly greeting: Record<string, unknown>;
  private readonly _socket: Socket;
  private readonly _pending = new Map<number, Pending>();
  private readonly _events: QmpEvent[] = [];
  private readonly _eventWaiters: EventWaiter[] = [];
  private _nextId = 1;
  private _buffer = '';
  private _closedError: Error | undefined;

  private constructor(socket: Socket, greeting: Record<string, unknown>, rest: string) {
    this._socket = socket;
    this.greeting = greeting;
    this._buffer = rest;
    socket.on('data', (chunk: Buffer) => this._onData(chunk.toString('utf8')));
    socket.on('error', (error) => this._fail(error));
    socket.on('close', () => this._fail(new Error('QMP socket closed')));
  }

  /**
   * Connects to `socketPath` (retrying until it exists or `timeoutMs`
   * passes), reads the greeting and negotiates capabilities.
   */
  static async connect(socketPath: string, options: { timeoutMs?: number } = {}): Promise<QmpClient> {
    const timeoutMs = options.timeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const { socket, greeting, rest } = await openAndGreet(socketPath, Math.max(1, deadline - Date.now()));
        const client = new QmpClient(socket, greeting, rest);
        await client.execute('qmp_capabilities', undefined, { timeoutMs: Math.max(1000, deadline - Date.now()) });
        return client;
      } catch (error) {
        const code = (error as NodeJS.ErrnoException).code;
        const retryable = code === 'ENOENT' || code === 'ECONNREFUSED';
        if (!retryable || Date.now() + CONNECT_RETRY_MS >= deadline) {
          throw new Error(`QMP connect ${socketPath}: ${(error as Error).message}`, { cause: error });
        }
        await sleep(CONNECT_RETRY_MS);
      }
    }
  }

  /** Sends a command; resolves with its `return` value, rejects with QmpError on `error`. */
  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    options: { timeoutMs?: number } = {},
  ): Promise<T> {
    if (this._closedError !== undefined) return Promise.reject(this._closedError);
    const id = this._nextId++;
    const timeoutMs = options.timeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new Error(`QMP ${command}: no reply after ${timeoutMs} ms`));
      }, timeoutMs);
      this._pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      const message = { execute: command, ...(args === undefined ? {} : { arguments: args }), id };
      this._socket.write(`${JSON.stringify(message)}\n`);
    });
  }

  /**
   * Resolves with the first queued or future event named `name` (and
   * matching `filter`, if given), consuming it. Rejects after `timeoutMs`.
   */
  waitEvent(name: string, timeoutMs: number, filter?: (event: QmpEvent) => boolean): Promise<QmpEvent> {
    const matches = (event: QmpEvent): boolean => event.event === name && (filter === undefined || filter(event));
    const index = this._events.findIndex(matches);
    if (index >= 0) return Promise.resolve(this._events.splice(index, 1)[0] as QmpEvent);
    if (this._closedError !== undefined) return Promise.reject(this._closedError);
    return new Promise<QmpEvent>((resolve, reject) => {
      const waiter: EventWaiter = {
        name,
        matches,
        resolve,
        reject,
        timer: setTimeout(() => {
          this._removeWaiter(waiter);
          reject(new Error(`QMP event ${name}: not received within ${timeoutMs} ms`));
        }, timeoutMs),
      };
      this._eventWaiters.push(waiter);
    });
  }

  /** Events received and not yet consumed by `waitEvent` (oldest first). */
  get events(): readonly QmpEvent[] {
    return this._events;
  }

  /** Destroys the socket; pending commands and waits reject. Idempotent. */
  close(): void {
    this._fail(new Error('QMP client closed'));
    this._socket.destroy();
  }

  private _onData(text: string): void {
    this._buffer += text;
    let newline: number;
    while ((newline = this._buffer.indexOf('\n')) >= 0) {
      const line = this._buffer.slice(0, newline).trim();
      this._buffer = this._buffer.slice(newline + 1);
      if (line === '') continue;
      let message: Record<string, unknown>;
      try {
        message = JSON.parse(line) as Record<string, unknown>;
      } catch {
        // A desynchronised stream cannot be trusted further.
        this._fail(new Error(`QMP: unparsable message ${line.slice(0, 200)}`));
        this._socket.destroy();
        return;
      }
      this._onMessage(message);
    }
  }

  private _onMessage(message: Record<string, unknown>): void {
    if (typeof message.event === 'string') {
      this._onEvent(message as unknown as QmpEvent);
      return;
    }
    const pending = typeof message.id === 'number' ? this._pending.get(message.id) : undefined;
    if (pending === undefined) return; // a reply to a command that already timed out
    this._pending.delete(message.id as number);
    clearTimeout(pending.timer);
    const error = message.error as { class: string; desc: string } | undefined;
    if (error !== undefined) pending.reject(new QmpError(pending.command, error.class, error.desc));
    else pending.resolve(message.return);
  }

  private _onEvent(event: QmpEvent): void {
    const waiter = this._eventWaiters.find((w) => w.matches(event));
    if (waiter !== undefined) {
      clearTimeout(waiter.timer);
      this._removeWaiter(waiter);
      waiter.resolve(event);
      return;
    }
    this._events.push(event);
    if (this._events.length > MAX_QUEUED_EVENTS) this._events.shift();
  }

  private _removeWaiter(waiter: EventWaiter): void {
    const index = this._eventWaiters.indexOf(waiter);
    if (index >= 0) this._eventWaiters.splice(index, 1);
  }

  private _fail(error: Error): void {
    if (this._closedError !== undefined) return;
    this._closedError = error;
    for (const pending of this._pending.values()) {
      clearTimeout(pending.timer);
      pending.reject(new Error(`QMP ${pending.command}: ${error.message}`));
    }
    this._pending.clear();
    for (const waiter of this._eventWaiters.splice(0)) {
      clearTimeout(waiter.timer);
      waiter.reject(new Error(`QMP event ${waiter.name}: ${error.message}`));
    }
  }
}

/** Opens the socket and reads the greeting line, all within `timeoutMs`. */
function openAndGreet(
  socketPath: string,
  timeoutMs: number,
): Promise<{ socket: Socket; greeting: Record<string, unknown>; rest: string }> {
  return new Promise((resolve, reject) => {
    const socket = connect(socketPath);
    let buffer = '';
    const fail = (error: Error): void => {
      clearTimeout(timer);
      socket.destroy();
      reject(error);
    };
    const timer = setTimeout(() => fail(new Error(`no QMP greeting within ${timeoutMs} ms`)), timeoutMs);
    const onData = (chunk: Buffer): void => {
      buffer += chunk.toString('utf8');
      const newline = buffer.indexOf('\n');
      if (newline < 0) return;
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('error', fail);
      socket.off('close', onClose);
      let greeting: Record<string, unknown>;
      try {
        greeting = JSON.parse(buffer.slice(0, newline)) as Record<string, unknown>;
      } catch {
        fail(new Error(`not a QMP greeting: ${buffer.slice(0, 200)}`));
        return;
      }
      if (!('QMP' in greeting)) {
        fail(new Error(`not a QMP greeting: ${buffer.slice(0, 200)}`));
        return;
      }
      resolve({ socket, greeting, rest: buffer.slice(newline + 1) });
    };
    const onClose = (): void => fail(new Error('socket closed before the QMP greeting'));
    socket.on('data', onData);
    socket.on('error', fail);
    socket.on('close', onClose);
  });
}
