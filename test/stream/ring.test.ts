import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SnapshotError } from '../../src/errors.js';
import { TargetFile } from '../../src/io/target-file.js';
import { Ring } from '../../src/stream/ring.js';
import { pseudoRandom } from '../helpers/streams.js';
import { tmpDir, type TmpDir } from '../helpers/tools.js';

let dir: TmpDir;
beforeAll(async () => {
  dir = await tmpDir('ring');
});
afterAll(async () => {
  await dir.cleanup();
});

const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

async function withRing<T>(
  name: string,
  count: number,
  fn: (ring: Ring, file: TargetFile, done: { bytes: number; errors: (SnapshotError | undefined)[] }) => Promise<T>,
): Promise<T> {
  const file = await TargetFile.open(join(dir.path, name), { write: true, create: true, direct: 'auto' });
  const done = { bytes: 0, errors: [] as (SnapshotError | undefined)[] };
  const ring = new Ring(
    file,
    count,
    64 * 1024,
    (bytes, err) => {
      done.bytes += bytes;
      done.errors.push(err);
    },
    0,
  );
  try {
    return await fn(ring, file, done);
  } finally {
    await ring.idle();
    await file.close();
  }
}

function expectInternal(fn: () => void, message: RegExp): void {
  let thrown: unknown;
  try {
    fn();
  } catch (err) {
    thrown = err;
  }
  expect(thrown).toBeInstanceOf(SnapshotError);
  expect(thrown).toMatchObject({ code: 'INTERNAL' });
  expect((thrown as Error).message).toMatch(message);
}

describe('Ring', () => {
  it('writes every buffer where it is told, counts writes in flight and frees buffers on completion', async () => {
    const data = pseudoRandom(4 * 64 * 1024, 7);
    await withRing('order.bin', 3, async (ring, file, done) => {
      for (let i = 0; i < 4; i++) {
        const index = ring.acquire();
        expect(index).toBeGreaterThanOrEqual(0);
        (ring.buffers[index] as Uint8Array).set(data.subarray(i * 65536, (i + 1) * 65536));
        ring.submit(index, 65536, 65536, i * 65536);
        expect(ring.inFlight).toBeLessThanOrEqual(3);
        if (i === 2) {
          expect(ring.acquire()).toBe(-1); // all three busy
          await ring.idle();
          expect(ring.inFlight).toBe(0);
        }
      }
      await ring.idle();
      expect(done.errors).toEqual([undefined, undefined, undefined, undefined]);
      expect(done.bytes).toBe(4 * 65536);
      await file.datasync();
    });
    expect(sha(await readFile(join(dir.path, 'order.bin')))).toBe(sha(data));
  });

  it('refuses, with INTERNAL, to submit a buffer that is not FILLING, an unaligned length or position, or more than the buffer', async () => {
    await withRing('asserts.bin', 2, async (ring, file) => {
      expectInternal(() => ring.submit(0, 65536, 65536, 0), /only a FILLING buffer/);
      const index = ring.acquire();
      expectInternal(() => ring.submit(index, file.alignment + 1, 1, 0), /aligned and fits/);
      expectInternal(() => ring.submit(index, 2 * 65536, 65536, 0), /aligned and fits/);
      expectInternal(() => ring.submit(index, 65536, 65536, 1), /position is aligned/);
      expectInternal(() => ring.submit(index, 65536, 0, 0), /logical bytes/);
      expect(ring.inFlight).toBe(0); // nothing was submitted by a refused call
      ring.submit(index, 65536, 100, 0);
      expectInternal(() => ring.submit(index, 65536, 100, 65536), /only a FILLING buffer/);
    });
  });

  it('reports a failed write through the completion with a coded error, and frees the buffer', async () => {
    await withRing('fail.bin', 2, async (ring, file, done) => {
      await file.close(); // the next write fails with EBADF from TargetFile
      const index = ring.acquire();
      ring.submit(index, 65536, 65536, 0);
      await ring.idle();
      expect(done.errors).toHaveLength(1);
      expect(done.errors[0]).toBeInstanceOf(SnapshotError);
      expect(done.errors[0]).toMatchObject({ code: 'EBADF' });
      expect([ring.acquire(), ring.acquire()].sort()).toEqual([0, 1]); // both FREE again
    });
  });
});
