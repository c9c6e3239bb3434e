/**
 * The shared validators. Every option of the public API is checked with
 * these, once, at the entry point that receives it, and every mistake reads
 * "Expected <what> for <option>, received <value>" as a TypeError (wrong
 * kind) or RangeError (right kind, out of range).
 *
 * A leaf module like errors.ts: every layer may import it, it imports no
 * layer. The option *schemas* live with the layer that owns the options
 * (src/options.ts for the top-level stream, src/qcow2 for images).
 */
import { fileURLToPath } from 'node:url';

/**
 * QEMU keeps snapshot names in a 256-byte C string (QEMUSnapshotInfo.name):
 * `qemu-img snapshot`, `loadvm` and `delvm` compare at most 255 bytes, so a
 * longer name could not be addressed by them.
 */
export const MAX_SNAPSHOT_NAME_BYTES = 255;

/** A value as it appears in a message: strings quoted, bigints with `n`, objects by tag. */
export function describe(value: unknown): string {
  if (typeof value === 'string') return `'${value}'`;
  if (typeof value === 'bigint') return `${value}n`;
  if (value === null) return 'null';
  if (typeof value === 'function') return 'a function';
  if (typeof value === 'object') return Object.prototype.toString.call(value);
  return String(value);
}

export function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0 && n <= 2 ** 30;
}

/**
 * An options object (or undefined, read as {}) with only the keys in
 * `known`: a misspelt option (`bufersize`) is a TypeError naming it, not a
 * silently ignored default.
 */
export function validateOptionsObject<T extends object>(value: unknown, name: string, known: readonly (keyof T & string)[]): Partial<T> {
  if (value === undefined) return {};
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new TypeError(`Expected an object for ${name}, received ${describe(value)}`);
  }
  for (const key of Object.keys(value)) {
    if (!(known as readonly string[]).includes(key)) {
      throw new TypeError(`Expected one of ${known.join(', ')} for the keys of ${name}, received ${describe(key)}`);
    }
  }
  return value as Partial<T>;
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

export function validatePowerOfTwo(value: unknown, name: string, min: number, max: number): number {
  const n = validateInteger(value, name, min, max);
  if (!isPowerOfTwo(n)) throw new RangeError(`Expected a power of two between ${min} and ${max} for ${name}, received ${n}`);
  return n;
}

export function validateMultiple(value: number, name: string, multiple: number, positive: boolean): number {
  if ((positive && value <= 0) || value % multiple !== 0) {
    throw new RangeError(
      `Expected a ${positive ? 'positive ' : ''}multiple of the alignment (${multiple}) for ${name}, received ${value}`,
    );
  }
  return value;
}

export function validateChoice<T>(value: unknown, name: string, choices: readonly T[]): T {
  if (!choices.includes(value as T)) {
    throw new TypeError(`Expected one of ${choices.map(describe).join(', ')} for ${name}, received ${describe(value)}`);
  }
  return value as T;
}

export function validateBoolean(value: unknown, name: string): boolean {
  if (typeof value !== 'boolean') throw new TypeError(`Expected true or false for ${name}, received ${describe(value)}`);
  return value;
}

export function validateSignal(value: unknown, name: string): AbortSignal | undefined {
  if (value === undefined) return undefined;
  if (!(value instanceof AbortSignal)) throw new TypeError(`Expected an AbortSignal for ${name}, received ${describe(value)}`);
  return value;
}

export function validateFunction<F extends (...args: never[]) => unknown>(value: unknown, name: string): F | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'function') throw new TypeError(`Expected a function for ${name}, received ${describe(value)}`);
  return value as F;
}

/** A path as `fs` takes it: a string, a Buffer of UTF-8 bytes, or a file: URL. */
export type PathLike = string | Buffer | URL;

/** A path as `fs` takes it, returned as the string the addon opens. */
export function validatePath(value: unknown, name: string): string {
  let path = value;
  if (value instanceof URL) {
    if (value.protocol !== 'file:') throw new TypeError(`Expected a file: URL for ${name}, received ${value.href}`);
    path = fileURLToPath(value);
  } else if (Buffer.isBuffer(value)) {
    path = value.toString('utf8');
    // The addon opens a string: bytes that are not UTF-8 would name another file.
    if (!Buffer.from(path as string, 'utf8').equals(value)) throw new TypeError(`Expected a UTF-8 path for ${name}, received a Buffer that is not`);
  }
  if (typeof path !== 'string' || path.length === 0 || path.includes('\0')) {
    throw new TypeError(`Expected a non-empty path (string, Buffer or file: URL) without NUL bytes for ${name}, received ${describe(value)}`);
  }
  return path;
}

/** A name for a new snapshot: QEMU's rule (non-empty, no NUL, at most 255 UTF-8 bytes). */
export function validateSnapshotName(value: unknown, name: string): string {
  if (typeof value !== 'string' || value.length === 0 || value.includes('\0')) {
    throw new TypeError(`Expected a non-empty snapshot name without NUL bytes for ${name}, received ${describe(value)}`);
  }
  const bytes = Buffer.byteLength(value, 'utf8');
  if (bytes > MAX_SNAPSHOT_NAME_BYTES) {
    throw new RangeError(`Expected a snapshot name of at most ${MAX_SNAPSHOT_NAME_BYTES} UTF-8 bytes for ${name}, received ${bytes} bytes`);
  }
  return value;
}

/** The id or name of an existing snapshot: any non-empty string without NUL (lookups compare bytes, not rules). */
export function validateSnapshotRef(value: unknown, name: string): string {
  if (typeof value !== 'string' || value.length === 0 || value.includes('\0')) {
    throw new TypeError(`Expected a snapshot id or name for ${name}, received ${describe(value)}`);
  }
  return value;
}
