/**
 * Sources and sinks at the ends of a pipe: a named file or `-` for
 * stdin/stdout. stdout stays clean for data; messages go to stderr.
 */
import { createReadStream, fstatSync, statSync, type Stats } from 'node:fs';
import type { Readable, Writable } from 'node:stream';
import { ErrorCode, SnapshotError } from './api.js';
import { UsageError } from './errors.js';

export const STDIO = '-';

export interface Source {
  stream: Readable;
  /** Known length (a regular file, or stdin redirected from one); undefined for a pipe. */
  sizeBytes: number | undefined;
  name: string;
  /** Device and inode of a regular file or block device, to recognise the target itself. */
  identity: FileIdentity | undefined;
}

export interface FileIdentity {
  dev: number;
  ino: number;
}

function regularFileSize(stat: { isFile(): boolean; size: number }): number | undefined {
  return stat.isFile() ? stat.size : undefined;
}

/** Only files and block devices can be both read and written as the same bytes; /dev/null in and out is fine. */
function identityOf(stat: Stats): FileIdentity | undefined {
  return stat.isFile() || stat.isBlockDevice() ? { dev: stat.dev, ino: stat.ino } : undefined;
}

/**
 * Refuses, as cat does, a source that is the target itself (same st_dev and
 * st_ino): the stream would read its own growing output until the disk is full.
 */
export function refuseSameFile(source: Source, targetPath: string): void {
  if (source.identity === undefined) return;
  let target: Stats;
  try {
    target = statSync(targetPath);
  } catch {
    return; // a target that does not exist yet is not the source
  }
  if (target.dev === source.identity.dev && target.ino === source.identity.ino) {
    throw new SnapshotError(ErrorCode.SAME_FILE, `the source ${source.name} is the target '${targetPath}' itself`, { path: targetPath });
  }
}

/** `-` or nothing is stdin; anything else is a file, opened now so a missing one fails early. */
export function openSource(path: string | undefined): Source {
  if (path === undefined || path === STDIO) {
    if (process.stdin.isTTY === true) {
      throw new UsageError('refusing to read a stream from the terminal', 'pipe the data in, or name a FILE');
    }
    let stat: Stats | undefined;
    try {
      stat = fstatSync(0);
    } catch {
      stat = undefined;
    }
    const sizeBytes = stat === undefined ? undefined : regularFileSize(stat);
    return { stream: process.stdin, sizeBytes, name: 'stdin', identity: stat === undefined ? undefined : identityOf(stat) };
  }
  // statSync throws ENOENT with the path: the error printer shows it as is.
  const stat = statSync(path);
  const stream = createReadStream(path, { highWaterMark: 1 << 20 });
  return { stream, sizeBytes: regularFileSize(stat), name: `'${path}'`, identity: identityOf(stat) };
}

/** stdout for `-`, refusing a terminal: binary vmstate on a TTY helps nobody. */
export function stdoutSink(): Writable {
  if (process.stdout.isTTY === true) {
    throw new UsageError('refusing to write binary data to the terminal', "redirect stdout, or name a FILE instead of '-'");
  }
  return process.stdout;
}
