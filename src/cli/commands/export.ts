/**
 * `snapstream export IMAGE NAME [FILE|-]`: the saved vmstate bytes of a
 * snapshot, to a file (written with the fast stream) or to stdout for a pipe.
 * With '-', stdout carries only the data; progress goes to stderr.
 */
import type { Command } from 'commander';
import { Transform, type TransformCallback, type Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createSnapshotStream, openImage } from '../api.js';
import type { CliContext } from '../context.js';
import { addQuietFlag } from '../options.js';
import { createProgress, type Progress } from '../progress.js';
import { STDIO, stdoutSink } from '../stdio.js';

/** Passes chunks through untouched, counting them for the progress line. */
class Counter extends Transform {
  bytes = 0;
  constructor(private readonly _progress: Progress) {
    super();
  }
  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.bytes += chunk.length;
    this._progress.update(this.bytes);
    callback(null, chunk);
  }
}

export function registerExport(program: Command, ctx: CliContext): void {
  const cmd = program
    .command('export')
    .description("write a snapshot's saved vmstate to a file or stdout")
    .argument('<IMAGE>', 'qcow2 image')
    .argument('<NAME>', 'snapshot name (as loadvm takes it)')
    .argument('[FILE]', "destination; '-' or nothing is stdout", STDIO);
  addQuietFlag(cmd).addHelpText(
    'after',
    `
Examples:
  snapstream export disk.qcow2 snap1 state.bin
  snapstream export disk.qcow2 snap1 - | sha256sum`,
  );
  cmd.action(async (image: string, name: string, file: string, flags: { quiet?: boolean }) => {
    ctx.image = image;
    const toStdout = file === STDIO;
    const sink: Writable | undefined = toStdout ? stdoutSink() : undefined;
    const img = await openImage(image, { readOnly: true });
    try {
      const source = img.createVmStateReadStream(name);
      const { id, name: resolved, vmStateSize: totalBytes } = source.snapshot;
      const progress = createProgress({ label: `export ${id} '${resolved}'`, totalBytes, quiet: flags.quiet });
      const counter = new Counter(progress);
      try {
        await pipeline(source, counter, sink ?? createSnapshotStream(file, { expectedSize: totalBytes }));
      } finally {
        progress.stop();
      }
    } finally {
      await img.close();
    }
  });
}
