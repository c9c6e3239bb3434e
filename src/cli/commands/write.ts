/**
 * `snapstream write FILE [SOURCE|-]`: the raw stream writer. Reads stdin (or
 * SOURCE) and writes it to FILE or a block device at disk speed; the file
 * has its exact length and every byte is durable when the command exits 0.
 * Made for the end of a pipe: `migrate "exec:snapstream write state.raw"`.
 */
import type { Command } from 'commander';
import { createSnapshotStream } from '../api.js';
import type { CliContext } from '../context.js';
import { UsageError } from '../errors.js';
import { addQuietFlag, addStreamFlags, sizeArg, type StreamFlags, toStreamOptions } from '../options.js';
import { formatBytes, formatRate } from '../size.js';
import { runWithProgress } from '../progress.js';
import { openSource, STDIO } from '../stdio.js';

interface WriteFlags extends StreamFlags {
  offset?: number;
  preallocate?: boolean;
}

export function registerWrite(program: Command, _ctx: CliContext): void {
  const cmd = program
    .command('write')
    .description('write a stream (stdin by default) to a raw file or block device')
    .argument('<FILE>', 'target file or block device')
    .argument('[SOURCE]', "what to write; '-' or nothing reads stdin", STDIO);
  addQuietFlag(addStreamFlags(cmd))
    .option('--offset <size>', 'start at this offset in the target, a multiple of 4096', sizeArg)
    .option('--preallocate', 'reserve --expected-size bytes before the first write (ENOSPC at once, not midway)')
    .addHelpText(
      'after',
      `
Examples:
  snapstream write state.raw < vmstate.bin
  (qemu) migrate "exec:snapstream write /var/lib/vm/state.raw"
  ... | snapstream write /dev/vg0/state --direct=true --expected-size 8G --preallocate`,
    );
  cmd.action(async (file: string, sourcePath: string, flags: WriteFlags) => {
    const source = openSource(sourcePath);
    const options = toStreamOptions(flags);
    if (flags.offset !== undefined) options.offset = flags.offset;
    if (options.expectedSize === undefined && source.sizeBytes !== undefined) options.expectedSize = source.sizeBytes;
    if (flags.preallocate === true) {
      if (options.expectedSize === undefined) {
        throw new UsageError('--preallocate needs --expected-size when the source has no known size');
      }
      options.preallocate = 'space';
    }
    const started = process.hrtime.bigint();
    const out = createSnapshotStream(file, options);
    await runWithProgress(out, source.stream, 'write', options.expectedSize, flags.quiet);
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    if (flags.quiet !== true) {
      const mode = out.direct === true ? 'O_DIRECT' : 'page cache + fdatasync';
      process.stderr.write(`wrote ${formatBytes(out.bytesWritten)} to ${file} (${mode}, ${formatRate(out.bytesWritten / seconds)})\n`);
    }
  });
}
