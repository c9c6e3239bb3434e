/**
 * `snapstream loadvm --qmp SOCKET NAME`: restores a snapshot into a QEMU
 * started with `-incoming defer` and the same configuration.
 */
import type { Command } from 'commander';
import { connectVm } from '../api.js';
import type { CliContext } from '../context.js';
import { formatBytes, formatRate } from '../size.js';
import { addVmFlags, liveLine, withInterrupt, type VmFlags } from './savevm.js';

export function registerLoadVm(program: Command, ctx: CliContext): void {
  const cmd = program
    .command('loadvm')
    .description("restore a snapshot into a QEMU started with '-incoming defer' and the same configuration")
    .argument('<NAME>', 'snapshot name or id (on every writable disk)')
    .option('--resume', 'start the guest afterwards (default: as the snapshot recorded)')
    .option('--no-resume', 'leave the guest paused afterwards')
    .option('--vmstate-disk <DISK>', 'disk (device, node name or path) that holds the vmstate')
    .option('--state-image <FILE>', 'a live snapshot: the state image that holds its vmstate (the disks hold disk-only halves)');
  addVmFlags(cmd).addHelpText(
    'after',
    `
Every writable disk is reverted to the snapshot first (as 'snapstream revert' would), then
the vmstate is streamed into QEMU's migrate-incoming.

Example:
  qemu-system-x86_64 ... -incoming defer -qmp unix:/run/vm1.qmp,server=on,wait=off &
  snapstream loadvm --qmp /run/vm1.qmp nightly`,
  );
  cmd.action(async (name: string, flags: VmFlags & { resume?: boolean; vmstateDisk?: string; stateImage?: string }) => {
    const vm = await connectVm(flags.qmp);
    const line = liveLine(`loadvm ${name}`, flags.quiet === true || flags.json === true);
    try {
      const result = await withInterrupt((signal) =>
        vm.loadvm(name, {
          signal,
          resume: flags.resume,
          vmstateDisk: flags.vmstateDisk,
          stateImage: flags.stateImage,
          onProgress: ({ bytes, elapsedMs }) => line.update(bytes, elapsedMs, 'elapsed'),
        }),
      );
      line.stop();
      if (flags.json === true) process.stdout.write(`${JSON.stringify(result)}\n`);
      else if (flags.quiet !== true) {
        process.stderr.write(
          `loaded snapshot '${name}': ${formatBytes(result.vmStateBytes)} of vmstate at ${formatRate(result.rateBytesPerSec)} ` +
            `in ${(result.durationMs / 1000).toFixed(2)} s; VM ${result.status}\n`,
        );
      }
    } finally {
      line.stop();
      await vm.close();
    }
  });
}
