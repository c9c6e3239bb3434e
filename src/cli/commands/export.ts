/**
 * `snapstream export IMAGE NAME [FILE|-]`: the saved vmstate bytes of a
 * snapshot, to a file or block device (written with the fast stream), to a
 * FIFO or character device (in order, unpadded), or to stdout for a pipe.
 * With '-', stdout carries only the data; progress and the summary go to
 * stderr. A disk-only snapshot has no vmstate: that is an error, and no
 * output file is created.
 */
import type { Command } from 'commander';
import { pipeline } from 'node:stream/promises';
import { createSnapshotStream, openImage, type SnapshotInfo } from '../api.js';
import type { CliContext } from '../context.js';
import { refuseNonImagePath } from '../image-path.js';
import { addQuietFlag } from '../options.js';
import { createProgress } from '../progress.js';
import { ByteCounter, copySequential, targetKind } from '../sequential.js';
import { formatBytes, formatRate } from '../size.js';
import { STDIO } from '../stdio.js';

export function registerExport(program: Command, ctx: CliContext): void {
  const cmd = program
    .command('export')
    .description("write a snapshot's saved vmstate to a file, a device or stdout")
    .argument('<IMAGE>', 'qcow2 image')
    .argument('<NAME>', 'snapshot name (as loadvm takes it)')
    .argument('[FILE]', "destination; '-' or nothing is stdout", STDIO)
    .option('-U, --force-share', "read without QEMU's image lock, like qemu-img -U (a running VM may change the image meanwhile)");
  addQuietFlag(cmd).addHelpText(
    'after',
    `
Examples:
  snapstream export disk.qcow2 snap1 state.bin
  snapstream export disk.qcow2 snap1 - | sha256sum
  snapstream export -U running-vm.qcow2 snap1 state.bin`,
  );
  cmd.action(async (image: string, name: string, file: string, flags: { quiet?: boolean; forceShare?: boolean }) => {
    ctx.image = image;
    refuseNonImagePath(image);
    const kind = targetKind(file);
    const started = process.hrtime.bigint();
    const img = await openImage(image, { readOnly: true, forceShare: flags.forceShare === true });
    let bytes: number;
    let entry: SnapshotInfo | undefined;
    try {
      // A disk-only snapshot is refused here (SNAPSHOT_DISK_ONLY), before any output file exists.
      const source = img.createVmStateReadStream(name);
      entry = source.snapshot;
      const totalBytes = entry.vmStateSize;
      const run = { interrupts: ctx.interrupts, source, label: `export ${entry.id} '${entry.name}'`, quiet: flags.quiet, totalBytes };
      bytes = kind === 'seekable' ? await exportToFile(run, file) : await copySequential(run, file);
    } finally {
      await img.close();
    }
    if (flags.quiet === true) return;
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    const which = entry === undefined ? `'${name}'` : `'${entry.name}' (id ${entry.id})`;
    const where = file === STDIO ? 'stdout' : file;
    process.stderr.write(`exported snapshot ${which} of ${image}: ${formatBytes(bytes)} to ${where} (${formatRate(bytes / seconds)})\n`);
  });
}

/** The fast stream into a file or block device; a signal before the end removes a file it created. */
async function exportToFile(
  run: { interrupts: CliContext['interrupts']; source: NodeJS.ReadableStream; label: string; quiet?: boolean; totalBytes?: number },
  file: string,
): Promise<number> {
  let out: ReturnType<typeof createSnapshotStream> | undefined;
  const abort = run.interrupts.abortSignal(() => out?.writableEnded !== true);
  const progress = createProgress({ label: run.label, totalBytes: run.totalBytes, quiet: run.quiet });
  try {
    out = createSnapshotStream(file, { expectedSize: run.totalBytes, signal: abort.signal });
    const counter = new ByteCounter(progress);
    await pipeline(run.source, counter, out);
    return out.bytesWritten;
  } catch (err) {
    throw abort.signal.aborted ? (abort.signal.reason as Error) : err;
  } finally {
    abort.dispose();
    progress.stop();
  }
}
