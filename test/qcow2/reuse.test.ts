/**
 * Reuse of freed space by saves, checked with QEMU's tools and the
 * independent test reader: a vmstate spread over several free runs (buffers
 * split where a run ends) reads back bit for bit, the file does not grow by
 * the vmstate, metadata lands in freed clusters too, and `qemu-img check`
 * stays clean. Also: preallocate 'space' reserves reused runs and still fails
 * before the first byte.
 */
import { stat } from 'node:fs/promises';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream, openImage } from '../../src/index.js';
import { readSnapshotVmState, vmStateLayout } from '../helpers/qcow2-vmstate.js';
import { pseudoRandom } from '../helpers/streams.js';
import { qemuImg } from '../helpers/tools.js';
import { qemuMissing, Workdir } from './fixtures.js';

const MiB = 1 << 20;

async function save(path: string, name: string, data: Buffer, options: Record<string, unknown> = {}): Promise<void> {
  // Odd-sized chunks, so that buffers fill across chunk boundaries.
  const chunks: Buffer[] = [];
  for (let at = 0; at < data.length; at += 777_777) chunks.push(data.subarray(at, at + 777_777));
  await pipeline(Readable.from(chunks), createSnapshotStream(path, { snapshot: name, bufferSize: MiB, ...options }));
}

async function remove(path: string, ...names: string[]): Promise<void> {
  const img = await openImage(path);
  try {
    for (const name of names) await img.deleteSnapshot(name);
  } finally {
    await img.close();
  }
}

describe.skipIf(qemuMissing)('reusing freed space', { timeout: 120_000 }, () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-reuse');
  });
  afterAll(async () => work.cleanup());

  it('spreads a vmstate over several freed runs, splitting buffers at their ends, and QEMU reads it back', async () => {
    const path = await work.image({ sizeBytes: 64 * MiB });
    await save(path, 'a', pseudoRandom(3 * MiB + 5000, 1));
    await save(path, 'b', pseudoRandom(1 * MiB, 2));
    await save(path, 'c', pseudoRandom(5 * MiB + 70_000, 3));
    await save(path, 'd', pseudoRandom(2 * MiB, 4));
    const freedClusters = new Set([...(await vmStateLayout(path, 'a')).hostClusters, ...(await vmStateLayout(path, 'c')).hostClusters]);
    await remove(path, 'a', 'c');
    const before = (await stat(path)).size;

    const e = pseudoRandom(9 * MiB + 12_345, 5);
    await save(path, 'e', e);
    expect((await qemuImg.check(path)).exitCode).toBe(0);
    expect((await readSnapshotVmState(path, 'e')).equals(e)).toBe(true);
    const hosts = (await vmStateLayout(path, 'e')).hostClusters;
    const reused = hosts.filter((h) => freedClusters.has(h)).length;
    // a and c held ~8.1 MiB: all of it whole-MiB runs except alignment slack.
    expect(reused * 65536).toBeGreaterThanOrEqual(7 * MiB);
    expect((await stat(path)).size - before).toBeLessThan(3 * MiB);
    expect((await readSnapshotVmState(path, 'b')).equals(pseudoRandom(1 * MiB, 2))).toBe(true);
    expect((await readSnapshotVmState(path, 'd')).equals(pseudoRandom(2 * MiB, 4))).toBe(true);
    const img = await openImage(path, { readOnly: true });
    try {
      const result = await img.check();
      expect(result.corruptions + result.leaks).toBe(0);
      expect(result.space!.freeDataBytes).toBe(0);
      expect(result.space!.fileLengthBytes).toBe((await stat(path)).size);
    } finally {
      await img.close();
    }
  });

  it('takes the smallest run that holds the expected size (best fit)', async () => {
    const path = await work.image({ sizeBytes: 64 * MiB });
    await save(path, 'big', pseudoRandom(6 * MiB, 6));
    await save(path, 'keep1', pseudoRandom(MiB, 7));
    await save(path, 'small', pseudoRandom(3 * MiB, 8));
    await save(path, 'keep2', pseudoRandom(MiB, 9));
    const smallClusters = new Set((await vmStateLayout(path, 'small')).hostClusters);
    const bigClusters = new Set((await vmStateLayout(path, 'big')).hostClusters);
    await remove(path, 'big', 'small');
    const data = pseudoRandom(3 * MiB - 100, 10);
    await save(path, 'fit', data, { expectedSize: data.length });
    const hosts = (await vmStateLayout(path, 'fit')).hostClusters;
    // The run is small's vmstate plus the freed metadata next to it; nothing comes from big's.
    expect(hosts.filter((h) => bigClusters.has(h))).toEqual([]);
    expect(hosts.filter((h) => smallClusters.has(h)).length).toBeGreaterThanOrEqual(hosts.length - 2);
    expect((await readSnapshotVmState(path, 'fit')).equals(data)).toBe(true);
    expect((await qemuImg.check(path)).exitCode).toBe(0);
  });

  it("with preallocate 'space' reuses a freed run and gives back what it did not use", async () => {
    const path = await work.image({ sizeBytes: 64 * MiB });
    await save(path, 'old', pseudoRandom(8 * MiB, 11));
    await save(path, 'keep', pseudoRandom(MiB, 12));
    await remove(path, 'old');
    const lengthBefore = (await stat(path)).size;
    const data = pseudoRandom(6 * MiB, 13);
    await save(path, 'new', data, { preallocate: 'space', expectedSize: 8 * MiB });
    expect((await readSnapshotVmState(path, 'new')).equals(data)).toBe(true);
    expect((await qemuImg.check(path)).exitCode).toBe(0);
    // Metadata goes to the reserved end (the runs were punched), then the unused reservation is cut.
    expect((await stat(path)).size - lengthBefore).toBeLessThan(MiB);
  });
});
