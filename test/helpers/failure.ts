/** The SnapshotError a promise rejects with; fails the test when it resolves or rejects with anything else. */
import { expect } from 'vitest';
import { SnapshotError } from '../../src/index.js';

export async function failure(promise: Promise<unknown>): Promise<SnapshotError> {
  const err = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(SnapshotError);
  return err as SnapshotError;
}
