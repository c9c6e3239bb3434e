/**
 * The options that shape a SnapshotStream itself, whatever its target: ring
 * geometry, O_DIRECT policy, the size hint and space reservation, the abort
 * signal. Validated here, with the shared validators, by every entry point
 * that creates a stream (src/options.ts for a path, src/qcow2 for an open
 * image); the stream and its sinks then take the resolved values.
 */
import type { DirectMode } from '../io/target-file.js';
import { validateChoice, validateInteger, validateMultiple, validateSignal } from '../validate.js';

/**
 * 8 MiB: four huge pages, and two requests of the virtio disk here
 * (max_sectors_kb is 4 MiB), so one write keeps two requests on the device.
 * History (docs/performance.md): 16 MiB until the sixth round; 4 MiB in the
 * sixth and seventh, chosen when a process's first stream paid dearly for
 * every page of fresh memory and the disk did 1.7-2.1 GB/s.
 * Measured again in the eighth round, 1 GiB of 8 B + 4 KiB writes, MiB/s
 * medians over the device write reference of the same bench run:
 * - the bench's runner, the ring pooled, three subset runs of 5 repetitions:
 *   4 x 8 MiB 0.91-0.99x against 3 x 4 MiB 0.83-0.88x; in one of them also
 *   3 x 8 MiB 0.87x, 4 x 4 MiB 0.83x and 3 x 16 MiB 0.83x. The seventh
 *   round's two full runs had 4 x 8 at 0.92x and 0.95x, 3 x 4 at 0.86x and 0.84x;
 * - fresh processes (a process's first stream, as the CLI's), 5 runs each:
 *   4 x 8 MiB 2441 / 2560 / 2782 against 3 x 4 MiB 1344 / 2531 / 2773
 *   (min / median / max): the JS thread bounds both there;
 * - a disk throttled to 100 MiB/s: 98-100 MiB/s either way.
 */
export const DEFAULT_BUFFER_SIZE = 8 << 20;
/**
 * Four: one filling while up to three wait for or sit on the disk, so that
 * with the depth tuner's two writes in flight (four requests) the next write
 * is already queued when one completes. Memory: 32 MiB per stream.
 */
export const DEFAULT_BUFFERS = 4;
/**
 * Default bytes written between flushes during a stream (the `flushInterval`
 * option). A disk with a volatile cache, or a virtual disk whose host caches,
 * otherwise writes back everything in the final fdatasync, after the last
 * buffer, while the producer has nothing left to do; flushing as the stream
 * goes moves that work into time the disk would idle between writes whenever
 * the producer is slower than the disk. Measured on this project's virtio disk
 * (docs/performance.md, fifth round), 1 GiB in 16 MiB writes from huge pages,
 * the producer taking 7 ms per buffer: 0.79-0.86 s with a flush every 32 or
 * 64 MiB against 0.98-1.0 s with only the final one; with no producer time at
 * all (the disk the only limit) the flushes cost 2-4% (0.77-0.78 against
 * 0.74-0.77 s). The stream itself: 1001-1190 MiB/s against 893-1106.
 */
export const DEFAULT_FLUSH_INTERVAL = 64 * 1024 * 1024;
/**
 * Option-time alignment: every DIO alignment Linux reports for the disks we
 * target divides 4096. The real alignment is re-checked after open.
 */
export const OPTION_ALIGNMENT = 4096;
export const MAX_BUFFER_SIZE = 256 << 20;
export const MAX_BUFFERS = 64;

export type Preallocate = 'none' | 'space';

/** The stream's own options, as a caller passes them. */
export interface StreamCoreOptions {
  /** Bytes per ring buffer; a multiple of the target's alignment. Default 8 MiB. */
  bufferSize?: number;
  /** Buffers in the ring, >= 2. Default 4. */
  buffers?: number;
  /** true: O_DIRECT or fail; false: page cache + fdatasync; 'auto': O_DIRECT where the filesystem allows. */
  direct?: DirectMode;
  /** Size hint in bytes. */
  expectedSize?: number;
  /** 'space': reserve expectedSize before the first byte (immediate ENOSPC). */
  preallocate?: Preallocate;
  /** Bytes written between fdatasync calls while the stream runs (the final one always comes); 0: only the final one. Default 64 MiB. */
  flushInterval?: number;
  signal?: AbortSignal;
}

export const STREAM_CORE_OPTION_KEYS = ['bufferSize', 'buffers', 'direct', 'expectedSize', 'preallocate', 'flushInterval', 'signal'] as const;

/** What SnapshotStream and the sinks read: every field resolved. */
export interface StreamConfig {
  readonly bufferSize: number;
  readonly buffers: number;
  readonly direct: DirectMode;
  readonly expectedSize: number | undefined;
  readonly preallocate: Preallocate;
  readonly flushInterval: number;
  readonly signal: AbortSignal | undefined;
}

/** Resolves the core options of an already type-checked options object (see validateOptionsObject). */
export function resolveStreamCore(o: StreamCoreOptions): StreamConfig {
  const bufferSize = validateInteger(o.bufferSize ?? DEFAULT_BUFFER_SIZE, 'options.bufferSize', 1, MAX_BUFFER_SIZE);
  validateMultiple(bufferSize, 'options.bufferSize', OPTION_ALIGNMENT, true);
  const buffers = validateInteger(o.buffers ?? DEFAULT_BUFFERS, 'options.buffers', 2, MAX_BUFFERS);
  const direct = validateChoice<DirectMode>(o.direct ?? 'auto', 'options.direct', [true, false, 'auto']);
  const expectedSize = o.expectedSize === undefined ? undefined : validateInteger(o.expectedSize, 'options.expectedSize', 0);
  const preallocate = validateChoice<Preallocate>(o.preallocate ?? 'none', 'options.preallocate', ['none', 'space']);
  if (preallocate === 'space' && expectedSize === undefined) {
    throw new TypeError(`Expected options.expectedSize with options.preallocate 'space', received undefined`);
  }
  const flushInterval = validateInteger(o.flushInterval ?? DEFAULT_FLUSH_INTERVAL, 'options.flushInterval', 0);
  return { bufferSize, buffers, direct, expectedSize, preallocate, flushInterval, signal: validateSignal(o.signal, 'options.signal') };
}
