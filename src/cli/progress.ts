/**
 * Progress on the terminal, for save, export, write and create.
 *
 * Drawn on stderr, and only when stderr is a TTY and --quiet is off: stdout
 * may be carrying the data (`export IMAGE NAME -`), and a log file or a pipe
 * has no use for carriage-return animations.
 */
import cliProgress from 'cli-progress';
import { pipeline } from 'node:stream/promises';
import type { SnapshotStream } from './api.js';
import { formatBytes, formatRate } from './size.js';

/** Redraws per second: enough to look live, few enough to cost nothing at GB/s. */
const FPS = 8;
/** A rate over less than this is noise (the first buffer lands at once). */
const MIN_RATE_WINDOW_MS = 250;

export interface Progress {
  /** Total bytes done so far (absolute, not a delta). */
  update(bytes: number): void;
  /** Final redraw and newline; idempotent. */
  stop(): void;
}

export interface ProgressOptions {
  label: string;
  /** Known size in bytes; undefined for a stream of unknown length (stdin). */
  totalBytes?: number;
  quiet?: boolean;
  stream?: NodeJS.WriteStream;
}

const NO_PROGRESS: Progress = { update() {}, stop() {} };

export function progressEnabled(quiet: boolean | undefined, stream: NodeJS.WriteStream = process.stderr): boolean {
  return quiet !== true && stream.isTTY === true && process.env.TERM !== 'dumb';
}

function formatEta(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '--:--';
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const pad = (n: number) => String(n).padStart(2, '0');
  return h > 0 ? `${h}:${pad(m)}:${pad(s % 60)}` : `${pad(m)}:${pad(s % 60)}`;
}

/** Bytes, rate and ETA when the size is known; bytes and rate otherwise. */
export function renderLine(
  label: string,
  doneBytes: number,
  totalBytes: number | undefined,
  elapsedMs: number,
  options: { bar?: string; final?: boolean } = {},
): string {
  const { bar, final = false } = options;
  const measurable = final ? elapsedMs > 0 : elapsedMs >= MIN_RATE_WINDOW_MS;
  const rate = measurable ? (doneBytes * 1000) / elapsedMs : Number.NaN;
  const rateText = Number.isNaN(rate) ? '-- /s' : formatRate(rate);
  if (totalBytes === undefined || totalBytes <= 0) {
    return `${label} ${formatBytes(doneBytes)}  ${rateText}`;
  }
  const pct = Math.min(100, Math.floor((doneBytes * 100) / totalBytes));
  const eta = final ? 0 : Number.isNaN(rate) || rate <= 0 ? Number.NaN : (totalBytes - doneBytes) / rate;
  const barText = bar === undefined ? '' : ` |${bar}|`;
  return `${label}${barText} ${String(pct).padStart(3)}%  ${formatBytes(doneBytes)} / ${formatBytes(totalBytes)}  ${rateText}  ETA ${formatEta(eta)}`;
}

export function createProgress(options: ProgressOptions): Progress {
  const stream = options.stream ?? process.stderr;
  if (!progressEnabled(options.quiet, stream)) return NO_PROGRESS;
  const started = Date.now();
  const known = options.totalBytes !== undefined && options.totalBytes > 0;
  // A size hint can be too small (--expected-size, a growing source): the total follows the bytes done.
  let totalBytes = options.totalBytes;
  let stopped = false;
  const bar = new cliProgress.SingleBar(
    {
      stream,
      fps: FPS,
      hideCursor: true,
      // Signals are handled by the command (src/cli/interrupt.ts), which stops the bar.
      gracefulExit: false,
      clearOnComplete: false,
      barsize: 24,
      format: (opts, params) => {
        const barText = known ? cliProgress.Format.BarFormat(params.progress, opts) : undefined;
        return renderLine(options.label, params.value, totalBytes, Date.now() - started, { bar: barText, final: stopped });
      },
    },
    cliProgress.Presets.shades_classic,
  );
  bar.start(known ? options.totalBytes! : 0, 0);
  return {
    update(bytes) {
      if (stopped) return;
      if (known && bytes > (totalBytes as number)) {
        totalBytes = bytes;
        bar.setTotal(bytes);
      }
      bar.update(bytes);
    },
    stop() {
      if (stopped) return;
      stopped = true;
      bar.stop();
    },
  };
}

/** Pipes `source` into a SnapshotStream, drawing its 'progress' events. */
export async function runWithProgress(
  out: SnapshotStream,
  source: NodeJS.ReadableStream,
  label: string,
  totalBytes: number | undefined,
  quiet: boolean | undefined,
): Promise<void> {
  const progress = createProgress({ label, totalBytes, quiet });
  out.on('progress', ({ bytesWritten }) => progress.update(bytesWritten));
  try {
    await pipeline(source, out);
    progress.update(out.bytesWritten);
  } finally {
    progress.stop();
  }
}
