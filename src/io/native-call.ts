/**
 * One native call as a promise: an errno becomes a coded SnapshotError that
 * names the syscall, the path and the offset, with the stack of the caller
 * (the native completion has none worth showing). Shared by TargetFile and
 * StreamSocket.
 */
import { errnoError } from '../errors.js';
import assert from 'node:assert/strict';
import type { Completion, NativeFileHandle } from './native.js';

/** What an error names besides the syscall: the file (or socket path) and whether O_DIRECT was on. */
export interface CallSubject {
  readonly path: string;
  readonly direct?: boolean;
}

export function call<T = unknown>(
  subject: CallSubject | undefined,
  syscallHint: string,
  offset: number | undefined,
  issue: (cb: Completion<T>) => void,
  path?: string,
): Promise<{ bytes: number; details: T }> {
  const trace: { stack?: string } = {};
  Error.captureStackTrace(trace, call);
  return new Promise((resolve, reject) => {
    issue((errno, bytes, syscall, details) => {
      if (errno === 0) {
        resolve({ bytes, details });
        return;
      }
      const err = errnoError(errno, syscall || syscallHint, {
        path: path ?? subject?.path,
        offset,
        direct: subject?.direct,
      });
      if (trace.stack !== undefined) err.stack = `${err.name}: ${err.message}\n${trace.stack.split('\n').slice(1).join('\n')}`;
      reject(err);
    });
  });
}

/**
 * Closes a native handle's descriptor and stops its threads. Every operation
 * must have settled: closing under a running one would let the descriptor
 * number be reused while the kernel still works through it.
 */
export async function closeHandle(native: NativeFileHandle, subject: CallSubject, markClosed: () => void): Promise<void> {
  assert.equal(native.pending(), 0, 'close() with I/O in flight');
  markClosed();
  try {
    await call(subject, 'close', undefined, (cb) => native.close(cb));
  } finally {
    native.dispose();
  }
}
