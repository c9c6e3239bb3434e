import { describe, expect, it } from 'vitest';
import { assert, internalError } from '../src/assert.js';
import { SnapshotError } from '../src/errors.js';
import { invariant } from '../src/qcow2/fail.js';

describe('assert', () => {
  it('returns nothing when the condition holds', () => {
    expect(assert(true, 'holds')).toBeUndefined();
    expect(assert(1, 'truthy')).toBeUndefined();
  });

  it('throws a SnapshotError with code INTERNAL naming the invariant when it does not', () => {
    for (const falsy of [false, 0, null, undefined, '']) {
      let thrown: unknown;
      try {
        assert(falsy, 'the ring has a FREE buffer');
      } catch (err) {
        thrown = err;
      }
      expect(thrown).toBeInstanceOf(SnapshotError);
      expect(thrown).toMatchObject({ code: 'INTERNAL' });
      expect((thrown as Error).message).toBe('snapstream invariant violated: the ring has a FREE buffer');
    }
  });

  it('is what qcow2 invariant() throws, so both layers report a broken invariant the same way', () => {
    let thrown: unknown;
    try {
      invariant(false, 'refcount blocks end where the table starts');
    } catch (err) {
      thrown = err;
    }
    const expected = internalError('refcount blocks end where the table starts');
    expect(thrown).toBeInstanceOf(SnapshotError);
    expect(thrown).toMatchObject({ code: expected.code, message: expected.message });
  });
});
