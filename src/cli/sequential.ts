/**
 * Targets that take bytes only in order: stdout, a FIFO, a character device
 * (/dev/null, a tape, a serial line), a socket. They have no offsets, no
 * O_DIRECT and no length to set, so the fast stream (pwrite at offsets,
 * padding, ftruncate) does not apply: the bytes go through one plain
 * sequential Writable, unpadded and untruncated.
 */
import { constants as fsConstants, createWriteStream, statSync, type Stats } from 'node:fs';
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

/**
 * Opens a sequential target: O_WRONLY only, never O_CREAT or O_TRUNC (a FIFO
 * or device has nothing to truncate, and a path that became a regular file
 * since the stat must not be emptied).
 */
export function openSequential(path: string): Writable {
  if (path === STDIO) return stdoutSink();
  // fs.open takes numeric flags; the typings only list the string forms.
  const flags = fsConstants.O_WRONLY as unknown as string;
  return createWriteStream(path, { flags, highWaterMark: 1 << 20 });
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
export async function copySequential(run: SequentialRun, sink: Writable): Promise<number> {
  const progress = createProgress({ label: run.label, totalBytes: run.totalBytes, quiet: run.quiet });
  const counter = new ByteCounter(progress);
  const abort = run.interrupts.abortSignal();
  try {
    await pipeline(run.source, counter, sink, { signal: abort.signal });
    return counter.bytes;
  } catch (err) {
    // pipeline rejects with a generic AbortError; say which signal it was.
    throw abort.signal.aborted ? (abort.signal.reason as Error) : err;
  } finally {
    abort.dispose();
    progress.stop();
  }
}
