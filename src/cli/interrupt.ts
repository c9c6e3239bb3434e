/**
 * SIGINT, SIGTERM and SIGHUP as an abort, not a death: the running command
 * stops what can still be undone (a stream that has not ended is aborted, so
 * a save gives its space back and a file the command created is removed),
 * its `finally` blocks run (the progress bar puts the cursor and line
 * wrapping back, images are closed), and the process exits with 128 + the
 * signal number, as a shell reports a job the signal killed.
 *
 * What cannot be undone is finished: a save whose input has ended commits,
 * a delete that has started completes (both are one atomic header write).
 * The last line then says so. A command that registered no listener (list,
 * check, create) has nothing to undo and exits at once; so does a second
 * signal, after putting the terminal back, for a user who will not wait.
 */
import { ErrorCode, SnapshotError } from './api.js';

/** Exit codes a shell gives a process killed by these signals (128 + signo). */
export const SIGNAL_EXIT_CODES = { SIGHUP: 129, SIGINT: 130, SIGTERM: 143 } as const;
export type HandledSignal = keyof typeof SIGNAL_EXIT_CODES;
const HANDLED = Object.keys(SIGNAL_EXIT_CODES) as HandledSignal[];

/** DECTCEM show cursor, DECAWM line wrapping on: what a progress bar turns off. */
const TERMINAL_RESTORE = '\x1b[?25h\x1b[?7h';

type Listener = (signal: HandledSignal) => void;

export class Interrupts {
  private _received: HandledSignal | undefined;
  private readonly _listeners = new Set<Listener>();
  private readonly _handler = (signal: NodeJS.Signals): void => this._onSignal(signal as HandledSignal);

  /** Starts handling the three signals; returns the function that stops. */
  install(): () => void {
    for (const signal of HANDLED) process.on(signal, this._handler);
    return () => {
      for (const signal of HANDLED) process.off(signal, this._handler);
    };
  }

  /** The first signal received, if any. */
  get received(): HandledSignal | undefined {
    return this._received;
  }

  /** The exit code for the signal received, or undefined. */
  get exitCode(): number | undefined {
    return this._received === undefined ? undefined : SIGNAL_EXIT_CODES[this._received];
  }

  /** Calls `listener` on the first signal (at once if it came already); returns the unsubscribe function. */
  onInterrupt(listener: Listener): () => void {
    if (this._received !== undefined) {
      const signal = this._received;
      queueMicrotask(() => listener(signal));
      return () => undefined;
    }
    this._listeners.add(listener);
    return () => this._listeners.delete(listener);
  }

  /** An AbortSignal that aborts on the first signal, while `stillAbortable()` says the work can be undone. */
  abortSignal(stillAbortable: () => boolean = () => true): { signal: AbortSignal; dispose: () => void } {
    const controller = new AbortController();
    const dispose = this.onInterrupt((signal) => {
      if (stillAbortable()) controller.abort(interrupted(signal));
    });
    return { signal: controller.signal, dispose };
  }

  /** Throws ABORTED when a signal came: for the moment before an operation that cannot be undone starts. */
  throwIfInterrupted(): void {
    if (this._received !== undefined) throw interrupted(this._received);
  }

  private _onSignal(signal: HandledSignal): void {
    if (this._received !== undefined) {
      // The second signal: the user will not wait for the clean-up.
      exitNow(signal, `\nsnapstream: ${signal} again: exiting at once; a partial target may be left behind\n`);
    }
    this._received = signal;
    if (this._listeners.size === 0) exitNow(signal, ''); // nothing in progress that could be undone
    for (const listener of [...this._listeners]) listener(signal);
  }
}

function exitNow(signal: HandledSignal, message: string): never {
  if (process.stderr.isTTY === true) process.stderr.write(TERMINAL_RESTORE);
  if (message !== '') process.stderr.write(message);
  process.exit(SIGNAL_EXIT_CODES[signal]);
}

/** The error a command fails with when a signal stopped it. */
export function interrupted(signal: HandledSignal): SnapshotError {
  return new SnapshotError(ErrorCode.ABORTED, `interrupted by ${signal}`);
}
