/**
 * A QMP client over a unix socket (QEMU docs/interop/qmp-spec.txt).
 *
 * The server greets with `{"QMP": {...}}`; the client sends
 * `qmp_capabilities` first; each command `{"execute", "arguments", "id"}`
 * gets exactly one `{"return"}` or `{"error": {"class", "desc"}}` with the
 * same id; `{"event"}` messages arrive at any time and are queued until a
 * waitEvent() consumes them. Every wait is bounded. A QEMU `-qmp` socket
 * serves one client at a time: a second client connects but gets no greeting
 * until the first leaves, hence the greeting timeout names that cause.
 */
import { connect, type Socket } from 'node:net';
import { ErrorCode, SnapshotError } from '../errors.js';

/** Bound for one command. QMP commands return at once; long work runs as jobs or migrations. */
export const DEFAULT_COMMAND_TIMEOUT_MS = 10_000;
/** Bound for connect + greeting + capabilities. */
export const DEFAULT_CONNECT_TIMEOUT_MS = 5_000;
/** Unconsumed events kept at most (oldest dropped first): a bound on memory if nobody waits. */
const MAX_QUEUED_EVENTS = 1000;
/** A line longer than this is not QMP (QEMU's largest replies, query-qmp-schema, are ~200 KB). */
const MAX_LINE_BYTES = 16 << 20;

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

/**
 * A QEMU error reply or a command that got no reply (code QMP_ERROR), or a
 * connection that could not be made or was lost (code QMP_CLOSED).
 */
export class QmpError extends SnapshotError {
  /** The command that failed, when there was one. */
  readonly command: string | undefined;
  /** QEMU's error class (e.g. 'GenericError', 'CommandNotFound'); undefined for a connection failure. */
  readonly errorClass: string | undefined;
  /** QEMU's error description, verbatim. */
  readonly desc: string | undefined;

  constructor(
    message: string,
    details: { code?: typeof ErrorCode.QMP_ERROR | typeof ErrorCode.QMP_CLOSED; command?: string; errorClass?: string; desc?: string; path?: string; cause?: unknown } = {},
  ) {
    super(details.code ?? ErrorCode.QMP_ERROR, message, { path: details.path, cause: details.cause });
    this.name = 'QmpError';
    this.command = details.command;
    this.errorClass = details.errorClass;
    this.desc = details.desc;
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

export interface ExecuteOptions {
  timeoutMs?: number;
}

export class QmpClient {
  readonly path: string;
  /** The server's greeting (`QMP.version`, `QMP.capabilities`). */
  readonly greeting: Record<string, unknown>;
  private readonly _socket: Socket;
  private readonly _pending = new Map<number, Pending>();
  private readonly _events: QmpEvent[] = [];
  private readonly _waiters: EventWaiter[] = [];
  private readonly _closeListeners: Array<(error: QmpError) => void> = [];
  private _nextId = 1;
  private _buffer = '';
  private _closed: QmpError | undefined;

  private constructor(path: string, socket: Socket, greeting: Record<string, unknown>, rest: string) {
    this.path = path;
    this._socket = socket;
    this.greeting = greeting;
    socket.on('data', (chunk: Buffer) => this._onData(chunk.toString('utf8')));
    socket.on('error', (error) => this._fail(closed(`QMP socket '${path}': ${error.message}`, path, error)));
    socket.on('close', () => this._fail(closed(`QMP socket '${path}' closed by QEMU`, path)));
    if (rest !== '') this._onData(rest);
  }

  /** Connects, reads the greeting and negotiates capabilities, all within `timeoutMs`. */
  static async connect(path: string, options: { timeoutMs?: number } = {}): Promise<QmpClient> {
    const timeoutMs = options.timeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const started = Date.now();
    const { socket, greeting, rest } = await openAndGreet(path, timeoutMs);
    const client = new QmpClient(path, socket, greeting, rest);
    try {
      await client.execute('qmp_capabilities', undefined, { timeoutMs: Math.max(1, timeoutMs - (Date.now() - started)) });
    } catch (err) {
      client.close();
      throw err;
    }
    return client;
  }

  /** QEMU's version as [major, minor, micro], from the greeting. */
  get version(): [number, number, number] {
    const v = (this.greeting.QMP as { version?: { qemu?: { major?: number; minor?: number; micro?: number } } } | undefined)?.version?.qemu;
    return [v?.major ?? 0, v?.minor ?? 0, v?.micro ?? 0];
  }

  get closed(): boolean {
    return this._closed !== undefined;
  }

  /** Sends a command; resolves with its `return`, rejects with QmpError (QEMU's class and desc) on `error`. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, options: ExecuteOptions = {}): Promise<T> {
    if (this._closed !== undefined) return Promise.reject(this._closedFor(command));
    const id = this._nextId++;
    const timeoutMs = options.timeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new QmpError(`QMP ${command}: no reply within ${timeoutMs} ms`, { command, path: this.path }));
      }, timeoutMs);
      this._pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      const message = { execute: command, ...(args === undefined ? {} : { arguments: args }), id };
      this._socket.write(`${JSON.stringify(message)}\n`);
    });
  }

  /** The first queued or future event named `name` (and matching `filter`), consumed; rejects after `timeoutMs`. */
  waitEvent(name: string, timeoutMs: number, filter?: (event: QmpEvent) => boolean): Promise<QmpEvent> {
    const matches = (event: QmpEvent): boolean => event.event === name && (filter === undefined || filter(event));
    const index = this._events.findIndex(matches);
    if (index >= 0) return Promise.resolve(this._events.splice(index, 1)[0]!);
    if (this._closed !== undefined) return Promise.reject(this._closedFor(`event ${name}`));
    return new Promise<QmpEvent>((resolve, reject) => {
      const waiter: EventWaiter = {
        name,
        matches,
        resolve,
        reject,
        timer: setTimeout(() => {
          this._removeWaiter(waiter);
          reject(new QmpError(`QMP event ${name}: not received within ${timeoutMs} ms`, { path: this.path }));
        }, timeoutMs),
      };
      this._waiters.push(waiter);
    });
  }

  /** Events received and not yet consumed, oldest first. */
  get events(): readonly QmpEvent[] {
    return this._events;
  }

  /** Calls `listener` once when the connection ends for any reason other than close(); returns the unsubscribe. */
  onClose(listener: (error: QmpError) => void): () => void {
    this._closeListeners.push(listener);
    return () => {
      const index = this._closeListeners.indexOf(listener);
      if (index >= 0) this._closeListeners.splice(index, 1);
    };
  }

  /** Ends the connection; pending commands and waits reject. Idempotent. */
  close(): void {
    this._fail(closed(`QMP connection to '${this.path}' closed`, this.path), false);
    this._socket.destroy();
  }

  private _closedFor(what: string): QmpError {
    return closed(`QMP ${what}: ${this._closed!.message}`, this.path, this._closed);
  }

  private _onData(text: string): void {
    this._buffer += text;
    if (this._buffer.length > MAX_LINE_BYTES && !this._buffer.includes('\n')) {
      this._fail(closed(`QMP socket '${this.path}': a message over ${MAX_LINE_BYTES} bytes`, this.path));
      this._socket.destroy();
      return;
    }
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
        this._fail(closed(`QMP socket '${this.path}': not JSON: ${line.slice(0, 200)}`, this.path));
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
    if (pending === undefined) return; // the reply to a command that timed out
    this._pending.delete(message.id as number);
    clearTimeout(pending.timer);
    const error = message.error as { class?: unknown; desc?: unknown } | undefined;
    if (error === undefined) {
      pending.resolve(message.return);
      return;
    }
    const errorClass = String(error.class);
    const desc = String(error.desc);
    pending.reject(new QmpError(`QMP ${pending.command} failed: ${desc} (${errorClass})`, { command: pending.command, errorClass, desc, path: this.path }));
  }

  private _onEvent(event: QmpEvent): void {
    const waiter = this._waiters.find((w) => w.matches(event));
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
    const index = this._waiters.indexOf(waiter);
    if (index >= 0) this._waiters.splice(index, 1);
  }

  private _fail(error: QmpError, notify = true): void {
    if (this._closed !== undefined) return;
    this._closed = error;
    for (const pending of this._pending.values()) {
      clearTimeout(pending.timer);
      pending.reject(closed(`QMP ${pending.command}: ${error.message}`, this.path, error));
    }
    this._pending.clear();
    for (const waiter of this._waiters.splice(0)) {
      clearTimeout(waiter.timer);
      waiter.reject(closed(`QMP event ${waiter.name}: ${error.message}`, this.path, error));
    }
    if (notify) for (const listener of this._closeListeners.splice(0)) listener(error);
  }
}

function closed(message: string, path: string, cause?: unknown): QmpError {
  return new QmpError(message, { code: ErrorCode.QMP_CLOSED, path, cause });
}

/** Opens the socket and reads the greeting line within `timeoutMs`. */
function openAndGreet(path: string, timeoutMs: number): Promise<{ socket: Socket; greeting: Record<string, unknown>; rest: string }> {
  return new Promise((resolve, reject) => {
    const socket = connect(path);
    let buffer = '';
    let connected = false;
    const fail = (error: QmpError): void => {
      clearTimeout(timer);
      socket.destroy();
      reject(error);
    };
    const timer = setTimeout(() => {
      const why = connected
        ? `no QMP greeting within ${timeoutMs} ms (QEMU serves one client per -qmp socket: is another client connected?)`
        : `no connection within ${timeoutMs} ms`;
      fail(closed(`QMP socket '${path}': ${why}`, path));
    }, timeoutMs);
    const onData = (chunk: Buffer): void => {
      buffer += chunk.toString('utf8');
      const newline = buffer.indexOf('\n');
      if (newline < 0) {
        if (buffer.length > MAX_LINE_BYTES) fail(closed(`QMP socket '${path}': not a QMP server`, path));
        return;
      }
      clearTimeout(timer);
      socket.off('data', onData).off('error', onError).off('close', onClose);
      let greeting: unknown;
      try {
        greeting = JSON.parse(buffer.slice(0, newline));
      } catch {
        greeting = undefined;
      }
      if (greeting === null || typeof greeting !== 'object' || !('QMP' in greeting)) {
        fail(closed(`QMP socket '${path}': not a QMP greeting: ${buffer.slice(0, 200)}`, path));
        return;
      }
      resolve({ socket, greeting: greeting as Record<string, unknown>, rest: buffer.slice(newline + 1) });
    };
    const onError = (error: NodeJS.ErrnoException): void => {
      const hint = error.code === 'ENOENT' ? ' (no such socket: is QEMU running with -qmp unix:PATH,server=on?)' : '';
      fail(closed(`cannot connect to QMP socket '${path}': ${error.code ?? error.message}${hint}`, path, error));
    };
    const onClose = (): void => fail(closed(`QMP socket '${path}' closed before the greeting`, path));
    socket.once('connect', () => {
      connected = true;
    });
    socket.on('data', onData).on('error', onError).on('close', onClose);
  });
}
