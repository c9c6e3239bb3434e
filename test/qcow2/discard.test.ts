/**
 * Discard on real targets: a hole punched in a file on the real disk (blocks
 * given back, per stat), zeros written on ramfs (no fallocate at all), and a
 * loop block device zeroed by the kernel, with the device's backing file read
 * to see what reached the "disk". The neighbours of every range stay intact.
 */
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TargetFile } from '../../src/io/target-file.js';
import { Discarder, findNonZero, mergeExtents } from '../../src/qcow2/discard.js';
import { pseudoRandom } from '../helpers/streams.js';
import { loopFsSkipReason, ramfsSkipReason, Skipped, withLoopDevice, withRamfs } from '../helpers/loopfs.js';
import { tmpDir, type TmpDir } from '../helpers/tools.js';

const MiB = 1 << 20;

function countSample(haystack: Buffer, needle: Buffer): number {
  let n = 0;
  for (let at = haystack.indexOf(needle); at >= 0; at = haystack.indexOf(needle, at + 1)) n++;
  return n;
}

async function discardAndCheck(path: string, data: Buffer, expectMethod: string[]): Promise<void> {
  const file = await TargetFile.open(path, { write: true, direct: false });
  try {
    const d = new Discarder(file);
    const bytes = await d.discard([{ offset: 1 * MiB, length: 2 * MiB }], data.length);
    await file.datasync();
    expect(bytes).toBe(2 * MiB);
    expect(expectMethod).toContain(d.method);
    expect(await findNonZero(file, [{ offset: 0, length: 4 * MiB }], 4 * MiB)).toEqual([
      { offset: 0, length: 1 * MiB },
      { offset: 3 * MiB, length: 1 * MiB },
    ]);
  } finally {
    await file.close();
  }
  const after = (await readFile(path)).subarray(0, 4 * MiB);
  expect(after.subarray(0, MiB).equals(data.subarray(0, MiB))).toBe(true);
  expect(after.subarray(3 * MiB, 4 * MiB).equals(data.subarray(3 * MiB, 4 * MiB))).toBe(true);
  expect(after.subarray(MiB, 3 * MiB).every((b) => b === 0)).toBe(true);
  expect(countSample(after, data.subarray(2 * MiB, 2 * MiB + 64))).toBe(0);
}

describe('discard', () => {
  let dir: TmpDir;
  beforeAll(async () => {
    dir = await tmpDir('discard');
  });
  afterAll(async () => dir.cleanup());

  it('merges overlapping and touching ranges, drops empty ones', () => {
    expect(
      mergeExtents([
        { offset: 10, length: 5 },
        { offset: 0, length: 10 },
        { offset: 30, length: 0 },
        { offset: 12, length: 10 },
        { offset: 40, length: 1 },
      ]),
    ).toEqual([
      { offset: 0, length: 22 },
      { offset: 40, length: 1 },
    ]);
  });

  it('punches a hole in a regular file: the blocks go back and the range reads as zeros', async () => {
    const path = join(dir.path, 'punch.bin');
    const data = pseudoRandom(4 * MiB, 1);
    await writeFile(path, data);
    const before = await stat(path);
    await discardAndCheck(path, data, ['punch']);
    const after = await stat(path);
    expect(after.size).toBe(before.size);
    expect(before.blocks * 512 - after.blocks * 512).toBeGreaterThanOrEqual(2 * MiB);
  });

  it('clips ranges at the end of the file and leaves its length alone', async () => {
    const path = join(dir.path, 'clip.bin');
    await writeFile(path, pseudoRandom(MiB, 2));
    const file = await TargetFile.open(path, { write: true, direct: false });
    try {
      expect(await new Discarder(file).discard([{ offset: MiB / 2, length: 4 * MiB }], MiB)).toBe(MiB / 2);
    } finally {
      await file.close();
    }
    expect((await stat(path)).size).toBe(MiB);
  });

  it.skipIf(ramfsSkipReason() !== undefined)('writes zeros where the filesystem has no fallocate (ramfs)', async () => {
    const result = await withRamfs(async (mnt) => {
      const path = join(mnt, 'zero.bin');
      const data = pseudoRandom(4 * MiB, 3);
      await writeFile(path, data);
      await discardAndCheck(path, data, ['zero-write']);
    });
    expect(result).not.toBeInstanceOf(Skipped);
  });

  it.skipIf(loopFsSkipReason('ext4') !== undefined)('zeroes a range of a loop block device, down to its backing file', async () => {
    const result = await withLoopDevice({ sizeBytes: 8 * MiB }, async (device, backing) => {
      const data = pseudoRandom(4 * MiB, 4);
      const dev = await TargetFile.open(device, { write: true, direct: false });
      try {
        await dev.write(data, 0);
        await dev.datasync();
      } finally {
        await dev.close();
      }
      await discardAndCheck(device, data, ['punch', 'zero-range', 'zero-write']);
      const disk = await readFile(backing);
      expect(countSample(disk, data.subarray(2 * MiB, 2 * MiB + 64))).toBe(0);
      expect(countSample(disk, data.subarray(MiB / 2, MiB / 2 + 64))).toBe(1);
    });
    expect(result).not.toBeInstanceOf(Skipped);
  });
});
