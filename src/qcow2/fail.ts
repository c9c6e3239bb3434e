/**
 * The ways an image can be refused, as coded SnapshotErrors. Every
 * validation in src/qcow2 goes through these so that messages share one shape:
 * what is wrong, where (`offset`), and what to do about it when we know.
 */
import { assert } from '../assert.js';
import { ErrorCode, SnapshotError } from '../errors.js';

/** The image breaks the format or QEMU's limits. */
export function corrupt(message: string, details: { path?: string; offset?: number } = {}): SnapshotError {
  return new SnapshotError(ErrorCode.QCOW2_CORRUPT, `qcow2 image is corrupt: ${message}`, details);
}

/** The file is not a qcow2 image at all (a raw disk, a vmstate file, anything else). */
export function notQcow2(why: string, details: { path?: string } = {}): SnapshotError {
  return new SnapshotError(ErrorCode.NOT_QCOW2, `not a qcow2 image: ${why}`, { ...details, offset: 0 });
}

/** The image is valid, but uses something snapstream does not implement. */
export function unsupported(message: string, details: { path?: string; offset?: number } = {}): SnapshotError {
  return new SnapshotError(ErrorCode.QCOW2_UNSUPPORTED, `qcow2 feature not supported: ${message}`, details);
}

/** A broken internal invariant: a bug in snapstream, never bad input. */
export function internal(message: string): SnapshotError {
  return new SnapshotError(ErrorCode.INTERNAL, `snapstream qcow2 invariant violated: ${message}`);
}

/** Asserts an internal invariant; unlike node:assert it throws a SnapshotError. */
export function invariant(condition: unknown, message: string): asserts condition {
  assert(condition, message);
}
