/**
 * Sources and sinks at the ends of a pipe: a named file or `-` for
 * stdin/stdout. stdout stays clean for data; messages go to stderr.
 */
import { createReadStream, fstatSync, statSync } from 'node:fs';
import type { Readable, Writable } from 'node:stream';
import { UsageError } from './errors.js';

export const STDIO = '-';

export interface Source {
  stream: Readable;
  /** Known length (a regular file, or stdin redirected from one); undefined for a pipe. */
  sizeBytes: number | undefined;
  name: string;
}

function regularFileSize(stat: { isFile(): boolean; size: number }): number | undefined {
  return stat.isFile() ? stat.size : undefined;
}

/** `-` or nothing is stdin; anything else is a file, opened now so a missing one fails early. */
export function openSource(path: string | undefined): Source {
  if (path === undefined || path === STDIO) {
    if (process.stdin.isTTY === true) {
      throw new UsageError('refusing to read a stream from the terminal', 'pipe the data in, or name a FILE');
    }
    let sizeBytes: number | undefined;
    try {
      sizeBytes = regularFileSize(fstatSync(0));
    } catch {
      sizeBytes = undefined;
    }
    return { stream: process.stdin, sizeBytes, name: 'stdin' };
  }
  // statSync throws ENOENT with the path: the error printer shows it as is.
  const sizeBytes = regularFileSize(statSync(path));
  return { stream: createReadStream(path, { highWaterMark: 1 << 20 }), sizeBytes, name: path };
}

/** stdout for `-`, refusing a terminal: binary vmstate on a TTY helps nobody. */
export function stdoutSink(): Writable {
  if (process.stdout.isTTY === true) {
    throw new UsageError('refusing to write binary data to the terminal', "redirect stdout, or name a FILE instead of '-'");
  }
  return process.stdout;
}
