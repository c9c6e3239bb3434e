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
 * 4 MiB: two huge pages, and one request of the virtio disk here
 * (max_sectors_kb). Until the sixth round this was 16 MiB: on the disks of
 * earlier rounds, before buffers sat on huge pages and before the stream
 * flushed as it went, 16 MiB writes beat 4 MiB ones (docs/performance.md).
 * Measured again with both (sixth round, 1 GiB, MiB/s medians):
 * - a process's first stream, whose ring is fresh memory, 6 runs each in
 *   fresh processes: 3 x 16 MiB 1383, 3 x 4 MiB 1650, 4 x 4 MiB 1663, against
 *   a 16 MiB device write of 1808. Fresh memory is slow to touch on a virtual
 *   machine, and a 48 MiB ring is four times as much of it as a 12 MiB one;
 * - the steady state, the ring reused (src/io/buffer-pool.ts), bench subset of
 *   4 runs: f 1869 against 1743, q 1795 against 1618, the socket source (as
 *   savevm) 1831 against 1597;
 * - a disk throttled to 100 MiB/s: 100 MiB/s either way;
 * - a 1 GiB savevm of a running VM: 0.59-0.69 s against 0.64-0.80 s.
 * And the ring costs a quarter of the memory.
 */
export const DEFAULT_BUFFER_SIZE = 4 << 20;
/**
 * Three: one filling while up to two wait for or sit on the disk, so the
 * disk has the next write queued when one completes, and the depth tuner
 * (depth-tuner.ts) can try two at once. Memory: 12 MiB per stream.
 */
export const DEFAULT_BUFFERS = 3;
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
  /** Bytes per ring buffer; a multiple of the target's alignment. Default 4 MiB. */
  bufferSize?: number;
  /** Buffers in the ring, >= 2. Default 3. */
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
