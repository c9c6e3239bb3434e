/**
 * Flags shared by the commands that write a stream (save, write), turned into
 * the API's StreamOptions. Values are parsed here (sizes, choices) so that a
 * typo exits 2 before anything is opened; the API validates the rest.
 */
import { type Command, InvalidArgumentError, Option } from 'commander';
import type { StreamOptions } from './api.js';
import { parseSize } from './size.js';

/** commander argParser for sizes: a bad size is a usage error (exit 2). */
export function sizeArg(value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

export interface StreamFlags {
  direct: 'auto' | 'true' | 'false';
  bufferSize?: number;
  buffers?: number;
  expectedSize?: number;
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
    .option('--buffer-size <size>', 'bytes per ring buffer, a multiple of 4096 (default 16M)', sizeArg)
    .option('--buffers <n>', 'buffers in the ring, >= 2 (default 3)', countArg)
    .option('--expected-size <size>', 'size hint: shown as progress, and reserved with --preallocate', sizeArg);
}

export function addQuietFlag(cmd: Command): Command {
  return cmd.option('-q, --quiet', 'draw no progress');
}

export function toStreamOptions(flags: StreamFlags): StreamOptions {
  const options: StreamOptions = { direct: flags.direct === 'auto' ? 'auto' : flags.direct === 'true' };
  if (flags.bufferSize !== undefined) options.bufferSize = flags.bufferSize;
  if (flags.buffers !== undefined) options.buffers = flags.buffers;
  if (flags.expectedSize !== undefined) options.expectedSize = flags.expectedSize;
  return options;
}
