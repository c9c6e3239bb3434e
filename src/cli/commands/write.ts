/**
 * `snapstream write FILE [SOURCE|-]`: the raw stream writer. Reads stdin (or
 * SOURCE) and writes it to FILE or a block device at disk speed; the file
 * has its exact length and every byte is durable when the command exits 0.
 * FILE '-' is stdout; a FIFO or character device is written in order,
 * unpadded. Made for the end of a pipe: `migrate "exec:snapstream write state.raw"`.
 */
import type { Command } from 'commander';
import { createSnapshotStream } from '../api.js';
import type { CliContext } from '../context.js';
import { UsageError } from '../errors.js';
import { addQuietFlag, addStreamFlags, sizeArg, type StreamFlags, toStreamOptions } from '../options.js';
import { runStream } from '../run-stream.js';
import { copySequential, targetKind } from '../sequential.js';
import { formatBytes, formatRate } from '../size.js';
import { openSource, refuseSameFile, STDIO } from '../stdio.js';

interface WriteFlags extends StreamFlags {
  offset?: number;
}

export function registerWrite(program: Command, ctx: CliContext): void {
  const cmd = program
    .command('write')
    .description('write a stream (stdin by default) to a raw file, a block device, a FIFO or stdout')
    .argument('<FILE>', "target file or block device; '-' is stdout")
    .argument('[SOURCE]', "what to write; '-' or nothing reads stdin", STDIO);
  addQuietFlag(addStreamFlags(cmd))
    .option('--offset <size>', 'start at this offset in the target, a multiple of its alignment; bytes past the stream are kept', sizeArg)
    .addHelpText(
      'after',
      `
Examples:
  snapstream write state.raw < vmstate.bin
  (qemu) migrate "exec:snapstream write /var/lib/vm/state.raw"
  ... | snapstream write /dev/vg0/state --direct=true --expected-size 8G --preallocate`,
    );
  cmd.action(async (file: string, sourcePath: string, flags: WriteFlags) => {
    const kind = targetKind(file);
    const source = openSource(sourcePath);
    if (kind === 'seekable') refuseSameFile(source, file);
    else refuseSeekOptions(flags);
    const options = toStreamOptions(flags, source.sizeBytes);
    const started = process.hrtime.bigint();
    let bytes: number;
    let mode: string;
    if (kind === 'seekable') {
      if (flags.offset !== undefined) options.offset = flags.offset;
      const run = { interrupts: ctx.interrupts, source: source.stream, label: 'write', quiet: flags.quiet };
      const out = await runStream(run, options, (opts) => createSnapshotStream(file, opts));
      bytes = out.bytesWritten;
      mode = out.direct === true ? 'O_DIRECT' : 'page cache + fdatasync';
    } else {
      const run = { interrupts: ctx.interrupts, source: source.stream, label: 'write', quiet: flags.quiet, totalBytes: options.expectedSize };
      bytes = await copySequential(run, file);
      mode = 'sequential';
    }
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    if (flags.quiet !== true) {
      const where = file === STDIO ? 'stdout' : file;
      process.stderr.write(`wrote ${formatBytes(bytes)} to ${where} (${mode}, ${formatRate(bytes / seconds)})\n`);
    }
  });
}

/** Offsets, reservations and O_DIRECT mean nothing to stdout, a FIFO or a character device. */
function refuseSeekOptions(flags: WriteFlags): void {
  const given = [
    flags.offset !== undefined && flags.offset !== 0 ? '--offset' : undefined,
    flags.preallocate === true ? '--preallocate' : undefined,
    flags.direct === 'true' ? '--direct=true' : undefined,
  ].filter((f) => f !== undefined);
  if (given.length > 0) {
    throw new UsageError(`${given.join(', ')} need(s) a file or block device; stdout, a FIFO or a character device is written in order`);
  }
}
