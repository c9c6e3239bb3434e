/** `snapstream delete IMAGE NAME`: removes an internal snapshot (by name or id). */
import type { Command } from 'commander';
import { openImage } from '../api.js';
import type { CliContext } from '../context.js';
import { refuseNonImagePath } from '../image-path.js';

export function registerDelete(program: Command, ctx: CliContext): void {
  program
    .command('delete')
    .description('delete an internal snapshot of a qcow2 image')
    .argument('<IMAGE>', 'qcow2 image (must not be in use by a running QEMU)')
    .argument('<NAME>', 'snapshot name (as qemu-img snapshot -d and delvm take it)')
    .option('-q, --quiet', 'print nothing on success')
    .action(async (image: string, name: string, flags: { quiet?: boolean }) => {
      ctx.image = image;
      refuseNonImagePath(image);
      // From the open on, a signal waits: before the delete it stops it, once
      // started the delete (one atomic header write) completes.
      const waitForUs = ctx.interrupts.onInterrupt(() => undefined);
      let deleted: { id: string; name: string };
      try {
        const img = await openImage(image);
        try {
          ctx.interrupts.throwIfInterrupted();
          deleted = await img.deleteSnapshot(name);
        } finally {
          await img.close();
        }
      } finally {
        waitForUs();
      }
      if (flags.quiet !== true) process.stderr.write(`deleted snapshot ${deleted.id} '${deleted.name}' from ${image}\n`);
    });
}
