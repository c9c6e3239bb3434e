/**
 * Option validation, once, at the edge. Each validator names the option and
 * what it expected; the result is frozen and fully defaulted so the layers
 * below never re-check.
 */
import type { DirectMode } from './io/target-file.js';

/** 4 MiB: large enough that a 4 MiB pwrite runs at device speed (fio here). */
export const DEFAULT_BUFFER_SIZE = 4 << 20;
/** Four: a full buffer or two can wait for the disk while the producer fills the next (docs/performance.md). */
export const DEFAULT_BUFFERS = 4;
/**
 * Option-time alignment: every DIO alignment Linux reports for the disks we
 * target divides 4096. The real alignment is re-checked after open.
 */
export const OPTION_ALIGNMENT = 4096;
export const MAX_BUFFER_SIZE = 256 << 20;
export const MAX_BUFFERS = 64;

export type Preallocate = 'none' | 'space';

export interface StreamOptions {
  bufferSize?: number;
  buffers?: number;
  direct?: DirectMode;
  offset?: number;
  expectedSize?: number;
  preallocate?: Preallocate;
  signal?: AbortSignal;
  /** qcow2 only: the snapshot to create. */
  snapshot?: string;
  /** 'raw' allows writing over a file that looks like a qcow2 image. */
  format?: 'raw' | 'qcow2';
  /** Permission bits for a file snapstream creates. */
  mode?: number;
  /** qcow2 only: the guest clock recorded in the snapshot, nanoseconds. */
  vmClockNs?: number | bigint;
}

export interface ResolvedStreamOptions {
  readonly bufferSize: number;
  readonly buffers: number;
  readonly direct: DirectMode;
  readonly offset: number;
  readonly expectedSize: number | undefined;
  readonly preallocate: Preallocate;
  readonly signal: AbortSignal | undefined;
  readonly snapshot: string | undefined;
  readonly format: 'raw' | 'qcow2' | undefined;
  readonly mode: number;
  readonly vmClockNs: bigint;
}

function describe(value: unknown): string {
  if (typeof value === 'string') return `'${value}'`;
  if (typeof value === 'bigint') return `${value}n`;
  if (value === null) return 'null';
  if (typeof value === 'object') return Object.prototype.toString.call(value);
  return String(value);
}

export function validateInteger(value: unknown, name: string, min: number, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value)) {
    throw new TypeError(`Expected an integer for ${name}, received ${describe(value)}`);
  }
  if (value < min || value > max) {
    throw new RangeError(`Expected an integer between ${min} and ${max} for ${name}, received ${value}`);
  }
  return value;
}

export function validateMultiple(value: number, name: string, multiple: number, positive: boolean): number {
  if ((positive && value <= 0) || value % multiple !== 0) {
    throw new RangeError(
      `Expected a ${positive ? 'positive ' : ''}multiple of the alignment (${multiple}) for ${name}, received ${value}`,
    );
  }
  return value;
}

function validateChoice<T>(value: unknown, name: string, choices: readonly T[]): T {
  if (!choices.includes(value as T)) {
    throw new TypeError(`Expected one of ${choices.map(describe).join(', ')} for ${name}, received ${describe(value)}`);
  }
  return value as T;
}

export function validateSignal(value: unknown, name: string): AbortSignal | undefined {
  if (value === undefined) return undefined;
  if (!(value instanceof AbortSignal)) throw new TypeError(`Expected an AbortSignal for ${name}, received ${describe(value)}`);
  return value;
}

export function validatePath(value: unknown, name: string): string {
  if (typeof value !== 'string' || value.length === 0 || value.includes('\0')) {
    throw new TypeError(`Expected a non-empty path without NUL bytes for ${name}, received ${describe(value)}`);
  }
  return value;
}

export function validateSnapshotName(value: unknown, name: string): string {
  if (typeof value !== 'string' || value.length === 0 || value.includes('\0')) {
    throw new TypeError(`Expected a non-empty snapshot name for ${name}, received ${describe(value)}`);
  }
  // The snapshot table stores the name length in 16 bits (qcow2.txt, "Snapshot table").
  if (Buffer.byteLength(value, 'utf8') > 0xffff) {
    throw new RangeError(`Expected a snapshot name of at most 65535 UTF-8 bytes for ${name}`);
  }
  return value;
}

function validateClock(value: unknown): bigint {
  if (value === undefined) return 0n;
  if (typeof value === 'bigint' && value >= 0n && value < 1n << 64n) return value;
  if (typeof value === 'number' && Number.isSafeInteger(value) && value >= 0) return BigInt(value);
  throw new RangeError(`Expected a non-negative integer for options.vmClockNs, received ${describe(value)}`);
}

export function validateStreamOptions(options: StreamOptions | undefined): ResolvedStreamOptions {
  if (options !== undefined && (options === null || typeof options !== 'object')) {
    throw new TypeError(`Expected an object for options, received ${describe(options)}`);
  }
  const o = options ?? {};
  const bufferSize = validateInteger(o.bufferSize ?? DEFAULT_BUFFER_SIZE, 'options.bufferSize', 1, MAX_BUFFER_SIZE);
  validateMultiple(bufferSize, 'options.bufferSize', OPTION_ALIGNMENT, true);
  const buffers = validateInteger(o.buffers ?? DEFAULT_BUFFERS, 'options.buffers', 2, MAX_BUFFERS);
  const direct = validateChoice<DirectMode>(o.direct ?? 'auto', 'options.direct', [true, false, 'auto']);
  const offset = validateInteger(o.offset ?? 0, 'options.offset', 0);
  validateMultiple(offset, 'options.offset', OPTION_ALIGNMENT, false);
  const expectedSize = o.expectedSize === undefined ? undefined : validateInteger(o.expectedSize, 'options.expectedSize', 0);
  const preallocate = validateChoice<Preallocate>(o.preallocate ?? 'none', 'options.preallocate', ['none', 'space']);
  if (preallocate === 'space' && expectedSize === undefined) {
    throw new TypeError(`Expected options.expectedSize with options.preallocate 'space', received undefined`);
  }
  const snapshot = o.snapshot === undefined ? undefined : validateSnapshotName(o.snapshot, 'options.snapshot');
  const format = o.format === undefined ? undefined : validateChoice(o.format, 'options.format', ['raw', 'qcow2'] as const);
  if (format === 'raw' && snapshot !== undefined) {
    throw new TypeError(`Expected no options.snapshot with options.format 'raw', received ${describe(snapshot)}`);
  }
  const mode = validateInteger(o.mode ?? 0o600, 'options.mode', 0, 0o7777);
  return Object.freeze({
    bufferSize,
    buffers,
    direct,
    offset,
    expectedSize,
    preallocate,
    signal: validateSignal(o.signal, 'options.signal'),
    snapshot,
    format,
    mode,
    vmClockNs: validateClock(o.vmClockNs),
  });
}
