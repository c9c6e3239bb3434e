/**
 * No remanence: once a snapshot is deleted (or a save aborted, or a process
 * died between the commit and the discard and the image was opened again),
 * no 64-byte sample of its vmstate can be found anywhere in the image file
 * (after a crash: once the image has been written again).
 *
 * Targets: ext4 and xfs loop mounts (hole punching), a bare loop block device
 * holding the qcow2 image itself (kernel zeroing; its backing file, the
 * "disk" under the device, is searched too), ramfs (no fallocate at all:
 * zeros are written), and the machine's own disk. Every image also passes
 * `qemu-img check`, and our check() reports no free cluster holding data.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TargetFile } from '../../src/io/target-file.js';
import { createSnapshotStream, openImage } from '../../src/index.js';
import { loopFsSkipReason, ramfsSkipReason, Skipped, withLoopDevice, withLoopFs, withRamfs } from '../helpers/loopfs.js';
import { pseudoRandom } from '../helpers/streams.js';
import { qemuImg, tmpDir, type TmpDir } from '../helpers/tools.js';
import { qemuMissing } from './fixtures.js';

const MiB = 1 << 20;
const VMSTATE_BYTES = 8 * MiB + 12_345;
const SAMPLE_BYTES = 64;

/** 64-byte samples from all over `data`: one per 64 KiB, at a varying offset inside it. */
function samples(data: Buffer): Buffer[] {
  const out: Buffer[] = [];
  for (let at = 0; at + SAMPLE_BYTES <= data.length; at += 64 * 1024) {
    const off = at + ((at / 1024) % 4000);
    if (off + SAMPLE_BYTES <= data.length) out.push(data.subarray(off, off + SAMPLE_BYTES));
  }
  return out;
}

function found(haystack: Buffer, needles: Buffer[]): number {
  return needles.filter((n) => haystack.includes(n)).length;
}

async function saveVmState(image: string, name: string, data: Buffer): Promise<void> {
  await pipeline(Readable.from([data]), createSnapshotStream(image, { snapshot: name }));
}

async function readWhole(path: string): Promise<Buffer> {
  if (!path.startsWith('/dev/')) return readFile(path);
  const f = await TargetFile.open(path, { write: false, direct: false });
  try {
    const buf = Buffer.alloc(f.size);
    await f.read(buf, 0);
    return buf;
  } finally {
    await f.close();
  }
}

/** Save A and B, delete A: nothing of A left, all of B there, both checks clean. */
async function deleteLeavesNothing(image: string, extraHaystack?: string): Promise<void> {
  const a = pseudoRandom(VMSTATE_BYTES, 101);
  const b = pseudoRandom(VMSTATE_BYTES, 202);
  await saveVmState(image, 'a', a);
  await saveVmState(image, 'b', b);
  expect(found(await readWhole(image), samples(a))).toBe(samples(a).length);
  const img = await openImage(image);
  try {
    await img.deleteSnapshot('a');
    const space = (await img.check()).space!;
    expect(space.freeDataBytes, JSON.stringify(space)).toBe(0);
  } finally {
    await img.close();
  }
  const bytes = await readWhole(image);
  expect(found(bytes, samples(a)), 'samples of the deleted vmstate in the image').toBe(0);
  expect(found(bytes, samples(b))).toBe(samples(b).length);
  if (extraHaystack !== undefined) {
    expect(found(await readFile(extraHaystack), samples(a)), 'samples of the deleted vmstate under the device').toBe(0);
  }
  expect((await qemuImg.check(image)).exitCode).toBe(0);
}

/** An aborted save into the space A left behind leaves nothing either. */
async function abortLeavesNothing(image: string): Promise<void> {
  const c = pseudoRandom(VMSTATE_BYTES, 303);
  const controller = new AbortController();
  const out = createSnapshotStream(image, { snapshot: 'c', signal: controller.signal });
  const half = c.subarray(0, 6 * MiB);
  let sent = 0;
  const source = new Readable({
    read() {
      if (sent >= half.length) {
        controller.abort();
        return;
      }
      this.push(half.subarray(sent, sent + MiB));
      sent += MiB;
    },
  });
  await expect(pipeline(source, out)).rejects.toThrow();
  const bytes = await readWhole(image);
  expect(found(bytes, samples(half)), 'samples of the aborted vmstate').toBe(0);
  expect((await qemuImg.check(image)).exitCode).toBe(0);
  expect((await qemuImg.snapshotList(image)).map((s) => s.name)).toEqual(['b']);
}

describe.skipIf(qemuMissing)('no remanence of a deleted vmstate', { timeout: 120_000 }, () => {
  let dir: TmpDir;
  beforeAll(async () => {
    dir = await tmpDir('remanence');
  });
  afterAll(async () => dir.cleanup());

  it('on the machine\'s own disk, after delete and after an aborted save', async () => {
    const image = join(dir.path, 'disk.qcow2');
    await qemuImg.create(image, 64 * MiB);
    await deleteLeavesNothing(image);
    await abortLeavesNothing(image);
  });

  it('after a process died between the commit and the discard: the next write discards first', async () => {
    const image = join(dir.path, 'crashed.qcow2');
    await qemuImg.create(image, 64 * MiB);
    const a = pseudoRandom(VMSTATE_BYTES, 404);
    await saveVmState(image, 'a', a);
    await saveVmState(image, 'b', pseudoRandom(VMSTATE_BYTES, 405)); // so that A's clusters become a hole, not the tail
    const img = await openImage(image);
    const hostOffsets: number[] = [];
    try {
      // Where A's clusters are, before the delete frees them.
      const { vmStateLayout } = await import('../helpers/qcow2-vmstate.js');
      hostOffsets.push(...(await vmStateLayout(image, 'a')).hostClusters);
      await img.deleteSnapshot('a');
    } finally {
      await img.close();
    }
    // The discard never happened: put A's bytes back into its now free clusters, as a crash would leave them.
    const f = await TargetFile.open(image, { write: true, direct: false });
    try {
      for (const [k, host] of hostOffsets.entries()) await f.write(a.subarray(k * 65536, (k + 1) * 65536), host);
      await f.datasync();
    } finally {
      await f.close();
    }
    const before = await openImage(image, { readOnly: true });
    try {
      expect((await before.check()).space!.freeDataBytes).toBeGreaterThan(0);
    } finally {
      await before.close();
    }
    expect(found(await readFile(image), samples(a))).toBeGreaterThan(0);
    // The next write (here a save of another snapshot) discards first.
    await saveVmState(image, 'c', pseudoRandom(MiB, 406));
    expect(found(await readFile(image), samples(a)), 'samples left after the next write').toBe(0);
    expect((await qemuImg.check(image)).exitCode).toBe(0);
  });

  for (const fsType of ['ext4', 'xfs'] as const) {
    it.skipIf(loopFsSkipReason(fsType) !== undefined)(`on an ${fsType} loop mount`, async () => {
      const result = await withLoopFs({ sizeBytes: 320 * MiB, fsType }, async (mnt) => {
        const image = join(mnt, 'img.qcow2');
        await qemuImg.create(image, 64 * MiB);
        await deleteLeavesNothing(image);
        await abortLeavesNothing(image);
      });
      expect(result).not.toBeInstanceOf(Skipped);
    });
  }

  it.skipIf(loopFsSkipReason('ext4') !== undefined)('on a loop block device holding the image, down to its backing file', async () => {
    const result = await withLoopDevice({ sizeBytes: 96 * MiB }, async (device, backing) => {
      await qemuImg.create(device, 64 * MiB);
      await deleteLeavesNothing(device, backing);
      await abortLeavesNothing(device);
    });
    expect(result).not.toBeInstanceOf(Skipped);
  });

  it.skipIf(ramfsSkipReason() !== undefined)('on ramfs, which cannot punch holes (zeros are written)', async () => {
    const result = await withRamfs(async (mnt) => {
      const image = join(mnt, 'img.qcow2');
      await qemuImg.create(image, 64 * MiB);
      await deleteLeavesNothing(image);
      await abortLeavesNothing(image);
    });
    expect(result).not.toBeInstanceOf(Skipped);
  });
});
