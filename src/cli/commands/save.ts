/**
 * `snapstream save IMAGE NAME [FILE|-]`: a vmstate stream (a file, or stdin
 * from `migrate "exec:snapstream save ..."`) becomes an internal snapshot of
 * a qcow2 image, disk included, as QEMU's savevm would leave it.
 */
import type { Command } from 'commander';
import { createSnapshotStream } from '../api.js';
import type { CliContext } from '../context.js';
import { refuseNonImagePath } from '../image-path.js';
import { addQuietFlag, addStreamFlags, type StreamFlags, toStreamOptions } from '../options.js';
import { runStream } from '../run-stream.js';
import { formatBytes } from '../size.js';
import { openSource, refuseSameFile } from '../stdio.js';

export function registerSave(program: Command, ctx: CliContext): void {
  const cmd = program
    .command('save')
    .description('save a vmstate stream as an internal snapshot of a qcow2 image')
    .argument('<IMAGE>', 'qcow2 image (must not be open for writing by a running QEMU)')
    .argument('<NAME>', 'name of the new snapshot')
    .argument('[FILE]', "vmstate to store; '-' or nothing reads stdin", '-');
  addQuietFlag(addStreamFlags(cmd)).addHelpText(
    'after',
    `
Examples:
  snapstream save disk.qcow2 before-upgrade state.bin
  qemu-img ... | snapstream save disk.qcow2 snap1 -
  ... | snapstream save disk.qcow2 nightly - --expected-size 8G --preallocate`,
  );
  cmd.action(async (image: string, name: string, file: string, flags: StreamFlags) => {
    ctx.image = image;
    refuseNonImagePath(image);
    const source = openSource(file);
    refuseSameFile(source, image);
    const options = toStreamOptions(flags, source.sizeBytes);
    options.snapshot = name;
    const run = { interrupts: ctx.interrupts, source: source.stream, label: `save ${name}`, quiet: flags.quiet };
    const out = await runStream(run, options, (opts) => createSnapshotStream(image, opts));
    process.stderr.write(
      flags.quiet === true ? '' : `saved snapshot '${name}' in ${image}: ${formatBytes(out.bytesWritten)} of vmstate\n`,
    );
  });
}
