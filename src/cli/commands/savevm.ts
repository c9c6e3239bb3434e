/**
 * `snapstream savevm --qmp SOCKET NAME`: QEMU's savevm through snapstream.
 * The VM is stopped only while QEMU produces its state; Ctrl-C or SIGTERM
 * aborts, commits nothing and resumes the VM.
 */
import type { Command } from 'commander';
import { connectVm } from '../api.js';
import type { CliContext } from '../context.js';
import { progressEnabled } from '../progress.js';
import { formatBytes, formatRate } from '../size.js';

/** Redraws per second on a TTY. */
const FPS = 8;

export interface VmFlags {
  qmp: string;
  json?: boolean;
  quiet?: boolean;
}

/** A one-line live status on stderr (TTY only): bytes, rate and the time so far. */
export function liveLine(label: string, quiet: boolean | undefined): { update(bytes: number, ms: number, what: string): void; stop(): void } {
  if (!progressEnabled(quiet)) return { update() {}, stop() {} };
  let last = 0;
  let drawn = false;
  return {
    update(bytes, ms, what) {
      const now = Date.now();
      if (now - last < 1000 / FPS) return;
      last = now;
      drawn = true;
      const rate = ms >= 250 ? formatRate((bytes * 1000) / ms) : '-- /s';
      process.stderr.write(`\r\x1b[K${label} ${formatBytes(bytes)}  ${rate}  ${what} ${(ms / 1000).toFixed(2)} s`);
    },
    stop() {
      if (drawn) process.stderr.write('\n');
    },
  };
}

/** An AbortSignal fired by Ctrl-C or SIGTERM for the duration of `run`. */
export async function withInterrupt<T>(run: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const controller = new AbortController();
  const onSignal = (): void => controller.abort();
  process.on('SIGINT', onSignal).on('SIGTERM', onSignal);
  try {
    return await run(controller.signal);
  } finally {
    process.off('SIGINT', onSignal).off('SIGTERM', onSignal);
  }
}

export function addVmFlags(cmd: Command): Command {
  return cmd
    .requiredOption('--qmp <SOCKET>', "QEMU's QMP unix socket (-qmp unix:SOCKET,server=on,wait=off); one client at a time")
    .option('--json', 'print the result as JSON on stdout')
    .option('-q, --quiet', 'print nothing on success');
}

export function registerSaveVm(program: Command, ctx: CliContext): void {
  const cmd = program
    .command('savevm')
    .description('savevm of a running or paused QEMU over QMP: every writable qcow2 disk, the vmstate in the first')
    .argument('<NAME>', 'name of the new snapshot (must not exist)')
    .option('--vmstate-disk <DISK>', 'disk (device, node name or path) that takes the vmstate')
    .option('--live', 'live checkpoint: the guest runs on while its RAM is saved (milliseconds of downtime); needs --state-image')
    .option('--state-image <FILE>', 'with --live: qcow2 file for the vmstate (created if missing; no QEMU may have it open)');
  addVmFlags(cmd).addHelpText(
    'after',
    `
The VM is stopped from 'stop' until the snapshot is committed, then resumed if it was running.
A paused VM stays paused, in QEMU's 'postmigrate' state: 'cont' it before the next savevm.

With --live the VM is stopped only while QEMU takes disk-only snapshots of its disks and
write-protects its RAM; the vmstate goes to the state image (docs/live-checkpoint.md).

Examples:
  snapstream savevm --qmp /run/vm1.qmp nightly
  snapstream savevm --live --state-image /var/lib/vm1/state.qcow2 --qmp /run/vm1.qmp hourly
  snapstream savevm --qmp /run/vm1.qmp --json nightly`,
  );
  cmd.action(async (name: string, flags: VmFlags & { vmstateDisk?: string; live?: boolean; stateImage?: string }) => {
    const vm = await connectVm(flags.qmp);
    const line = liveLine(`savevm ${name}`, flags.quiet === true || flags.json === true);
    try {
      const result = await withInterrupt((signal) =>
        vm.savevm(name, {
          signal,
          vmstateDisk: flags.vmstateDisk,
          ...(flags.live === true || flags.stateImage !== undefined ? { live: flags.live === true, stateImage: flags.stateImage } : {}),
          onProgress: ({ bytes, downtimeMs }) => line.update(bytes, downtimeMs, 'downtime'),
        }),
      );
      line.stop();
      if (flags.json === true) process.stdout.write(`${JSON.stringify(result)}\n`);
      else if (flags.quiet !== true) {
        process.stderr.write(
          `saved snapshot '${name}' (${result.disks.length} disk${result.disks.length === 1 ? '' : 's'}): ` +
            `${formatBytes(result.vmStateBytes)} of vmstate at ${formatRate(result.rateBytesPerSec)}, ` +
            `downtime ${result.live === true ? `${result.downtimeMs.toFixed(1)} ms` : `${(result.downtimeMs / 1000).toFixed(2)} s`}; VM ${result.status}` +
            `${result.stateImage === undefined ? '' : `; vmstate in ${result.stateImage.path}`}\n`,
        );
      }
    } finally {
      line.stop();
      await vm.close();
    }
  });
}
