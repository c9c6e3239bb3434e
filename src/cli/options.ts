/**
 * Flags shared by the commands that write a stream (save, write), turned into
 * the API's StreamOptions. Values are parsed here (sizes, choices) so that a
 * typo exits 2 before anything is opened; the API validates the rest.
 */
import { type Command, InvalidArgumentError, Option } from 'commander';
import type { StreamOptions } from './api.js';
import { UsageError } from './errors.js';
import { parseSize } from './size.js';

/** commander argParser for sizes: a bad size is a usage error (exit 2). */
export function sizeArg(value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

/** The ring's buffers are written with O_DIRECT: whole 4 KiB blocks (the largest common alignment), at most 256 MiB each. */
const BUFFER_ALIGNMENT = 4096;
const MAX_BUFFER_BYTES = 256 << 20;

/** --buffer-size: one message that says everything a valid value is. */
function bufferSizeArg(value: string): number {
  const bytes = sizeArg(value);
  if (bytes < BUFFER_ALIGNMENT || bytes > MAX_BUFFER_BYTES || bytes % BUFFER_ALIGNMENT !== 0) {
    throw new InvalidArgumentError(`Expected a multiple of 4096 from 4K to 256M, received '${value}'`);
  }
  return bytes;
}

export interface StreamFlags {
  direct: 'auto' | 'true' | 'false';
  bufferSize?: number;
  buffers?: number;
  expectedSize?: number;
  preallocate?: boolean;
  flushInterval?: number;
  quiet?: boolean;
}

function countArg(value: string): number {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < 1 || !/^\d+$/.test(value)) {
    throw new InvalidArgumentError(`Expected a positive integer, received '${value}'`);
  }
  return n;
}

export function addStreamFlags(cmd: Command): Command {
  return cmd
    .addOption(
      new Option('--direct <mode>', "O_DIRECT: 'true' or fail, 'false' page cache + fdatasync, 'auto' where the filesystem allows")
        .choices(['auto', 'true', 'false'])
        .default('auto'),
    )
    .option('--buffer-size <size>', 'bytes per ring buffer, a multiple of 4096 up to 256M (default 8M)', bufferSizeArg)
    .option('--buffers <n>', 'buffers in the ring, >= 2 (default 4)', countArg)
    .option('--expected-size <size>', 'size hint: shown as progress, and reserved with --preallocate', sizeArg)
    .option('--preallocate', 'reserve --expected-size bytes before the first write (ENOSPC at once, not midway)')
    .option('--flush-interval <size>', 'fdatasync every this many bytes as the stream goes; 0: only at the end (default 64M)', sizeArg);
}

export function addQuietFlag(cmd: Command): Command {
  return cmd.option('-q, --quiet', 'draw no progress');
}

/**
 * The API options for these flags. `knownSizeBytes` (a source file's length)
 * stands in for --expected-size; --preallocate with neither is a usage error,
 * not silently ignored.
 */
export function toStreamOptions(flags: StreamFlags, knownSizeBytes?: number): StreamOptions {
  const options: StreamOptions = { direct: flags.direct === 'auto' ? 'auto' : flags.direct === 'true' };
  if (flags.bufferSize !== undefined) options.bufferSize = flags.bufferSize;
  if (flags.buffers !== undefined) options.buffers = flags.buffers;
  if (flags.flushInterval !== undefined) options.flushInterval = flags.flushInterval;
  const expectedSize = flags.expectedSize ?? knownSizeBytes;
  if (expectedSize !== undefined) options.expectedSize = expectedSize;
  if (flags.preallocate === true) {
    if (expectedSize === undefined) throw new UsageError('--preallocate needs --expected-size when the source has no known size');
    options.preallocate = 'space';
  }
  return options;
}
