/**
 * Internal invariants. A failed assertion is a bug in snapstream, never bad
 * input, and it surfaces as a coded SnapshotError (INTERNAL) rather than
 * node:assert's AssertionError, so a caller that switches on `code` still
 * sees one closed set. Messages are string literals at the call sites: an
 * assertion on the hot path must not allocate when it holds.
 */
import { ErrorCode, SnapshotError } from './errors.js';

/** The error a broken invariant becomes. */
export function internalError(message: string): SnapshotError {
  return new SnapshotError(ErrorCode.INTERNAL, `snapstream invariant violated: ${message}`);
}

/** Throws internalError(message) unless `condition` holds. */
export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw internalError(message);
}
