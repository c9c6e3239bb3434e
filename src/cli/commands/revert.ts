/** `snapstream revert IMAGE NAME`: the disk back to a snapshot, like `qemu-img snapshot -a`. */
import type { Command } from 'commander';
import { openImage } from '../api.js';
import type { CliContext } from '../context.js';

export function registerRevert(program: Command, ctx: CliContext): void {
  program
    .command('revert')
    .description('revert the disk of a qcow2 image to an internal snapshot (like qemu-img snapshot -a)')
    .argument('<IMAGE>', 'qcow2 image (must not be in use by a running QEMU)')
    .argument('<NAME>', 'snapshot name or id; the snapshot is kept')
    .option('-q, --quiet', 'print nothing on success')
    .action(async (image: string, name: string, flags: { quiet?: boolean }) => {
      ctx.image = image;
      const img = await openImage(image);
      try {
        await img.revertSnapshot(name);
      } finally {
        await img.close();
      }
      if (flags.quiet !== true) process.stderr.write(`reverted ${image} to snapshot '${name}'\n`);
    });
}
