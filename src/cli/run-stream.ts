/**
 * Pipes a source into a SnapshotStream the way every writing command does:
 * with a progress bar, and with SIGINT/SIGTERM/SIGHUP aborting the stream as
 * long as its input has not ended (an abort then gives the space back and
 * removes a file the stream created). Once the input has ended the stream
 * finishes: a save commits, a raw target is made durable.
 */
import type { SnapshotStream, StreamOptions } from './api.js';
import type { Interrupts } from './interrupt.js';
import { runWithProgress } from './progress.js';

export interface StreamRun {
  interrupts: Interrupts;
  source: NodeJS.ReadableStream;
  label: string;
  quiet: boolean | undefined;
}

/** Opens the stream with `options` plus the interrupt signal, runs it to the end, and returns it. */
export async function runStream(
  run: StreamRun,
  options: StreamOptions,
  open: (options: StreamOptions) => SnapshotStream,
): Promise<SnapshotStream> {
  let out: SnapshotStream | undefined;
  const abort = run.interrupts.abortSignal(() => out?.writableEnded !== true);
  try {
    out = open({ ...options, signal: abort.signal });
    await runWithProgress(out, run.source, run.label, options.expectedSize, run.quiet);
    return out;
  } catch (err) {
    // The stream reports a generic abort; say which signal it was.
    throw abort.signal.aborted ? (abort.signal.reason as Error) : err;
  } finally {
    abort.dispose();
  }
}
