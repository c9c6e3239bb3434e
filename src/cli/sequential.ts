/**
 * Targets that take bytes only in order: stdout, a FIFO, a character device
 * (/dev/null, a tape, a serial line), a socket. They have no offsets, no
 * O_DIRECT and no length to set, so the fast stream (pwrite at offsets,
 * padding, ftruncate) does not apply: the bytes go through one plain
 * sequential Writable, unpadded and untruncated.
 */
import { constants as fsConstants, createWriteStream, openSync, statSync, type Stats } from 'node:fs';
import { Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { Transform, type TransformCallback, type Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { Interrupts } from './interrupt.js';
import { createProgress, type Progress } from './progress.js';
import { STDIO, stdoutSink } from './stdio.js';

/** stdout, an existing non-seekable file, or a file/block device for the fast stream. */
export type TargetKind = 'stdout' | 'sequential' | 'seekable';

function isSequential(stat: Stats): boolean {
  return stat.isFIFO() || stat.isCharacterDevice() || stat.isSocket();
}

/** What `path` is as a target; a missing path is a file the fast stream will create. */
export function targetKind(path: string): TargetKind {
  if (path === STDIO) return 'stdout';
  let stat: Stats;
  try {
    stat = statSync(path);
  } catch {
    return 'seekable';
  }
  return isSequential(stat) ? 'sequential' : 'seekable';
}

/** How often an open of a FIFO checks for a reader (open would otherwise block a thread until one comes). */
const FIFO_READER_POLL_MS = 50;

/**
 * Opens a sequential target: O_WRONLY only, never O_CREAT or O_TRUNC (a FIFO
 * or device has nothing to truncate, and a path that became a regular file
 * since the stat must not be emptied). A FIFO becomes a libuv pipe, so a
 * write that waits for a slow reader waits in the event loop, where a signal
 * can still stop it, not in a thread that process exit would wait for.
 */
export async function openSequential(path: string, signal: AbortSignal): Promise<Writable> {
  if (path === STDIO) return stdoutSink();
  if (statSync(path).isFIFO()) return new Socket({ fd: await openFifo(path, signal), readable: false, writable: true });
  // fs.open takes numeric flags; the typings only list the string forms.
  const flags = fsConstants.O_WRONLY as unknown as string;
  return createWriteStream(path, { flags, highWaterMark: 1 << 20 });
}

/** open(O_WRONLY | O_NONBLOCK) fails with ENXIO until a reader has the FIFO open: poll, abortably. */
async function openFifo(path: string, signal: AbortSignal): Promise<number> {
  for (;;) {
    try {
      return openSync(path, fsConstants.O_WRONLY | fsConstants.O_NONBLOCK);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENXIO') throw err;
    }
    await sleep(FIFO_READER_POLL_MS, undefined, { signal });
  }
}

/** Passes chunks through untouched, counting them for the progress line and the summary. */
export class ByteCounter extends Transform {
  bytes = 0;
  constructor(private readonly _progress: Progress) {
    super();
  }
  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.bytes += chunk.length;
    this._progress.update(this.bytes);
    callback(null, chunk);
  }
}

export interface SequentialRun {
  interrupts: Interrupts;
  source: NodeJS.ReadableStream;
  label: string;
  quiet: boolean | undefined;
  totalBytes: number | undefined;
}

/** Copies `source` into `sink` in order; a signal stops it at once (there is nothing to undo). Returns the bytes copied. */
export async function copySequential(run: SequentialRun, target: string): Promise<number> {
  const progress = createProgress({ label: run.label, totalBytes: run.totalBytes, quiet: run.quiet });
  const counter = new ByteCounter(progress);
  const abort = run.interrupts.abortSignal();
  // A write blocked in the kernel (a FIFO nobody reads) never completes, and
  // the sink's close waits for it: on a signal, stop waiting for the pipeline.
  const stopped = new Promise<never>((_resolve, reject) =>
    abort.signal.addEventListener('abort', () => reject(abort.signal.reason as Error), { once: true }),
  );
  stopped.catch(() => undefined);
  try {
    const sink = await Promise.race([openSequential(target, abort.signal), stopped]);
    await Promise.race([pipeline(run.source, counter, sink, { signal: abort.signal }), stopped]);
    return counter.bytes;
  } catch (err) {
    // pipeline rejects with a generic AbortError; say which signal it was.
    throw abort.signal.aborted ? (abort.signal.reason as Error) : err;
  } finally {
    abort.dispose();
    progress.stop();
  }
}
