/**
 * Image.revertSnapshot against its reference, `qemu-img snapshot -a`: the
 * same image reverted both ways reads the same (qemu-img compare), both
 * check clean, and the disk can be written and reverted again. Crash
 * safety is replayed in crash.test.ts.
 */
import { copyFile } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openImage } from '../../src/index.js';
import { qemuImg, qemuIo, run } from '../helpers/tools.js';
import { guestWrite, qemuMissing, Workdir } from './fixtures.js';

async function expectSameAsQemuImg(path: string, name: string): Promise<void> {
  const reference = `${path}.qemu-img`;
  await copyFile(path, reference);
  await qemuImg.snapshot(reference, 'apply', name);
  const img = await openImage(path);
  try {
    await img.revertSnapshot(name);
  } finally {
    await img.close();
  }
  const compare = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', path, reference]);
  expect(compare.stdout.trim(), compare.stderr).toBe('Images are identical.');
  for (const p of [path, reference]) {
    const check = await qemuImg.check(p);
    expect([check.corruptions ?? 0, check.leaks ?? 0, check.exitCode], p).toEqual([0, 0, 0]);
  }
  // The data refcounts match QEMU's: the same clusters are shared and allocated.
  const ours = await qemuImg.check(path);
  const theirs = await qemuImg.check(reference);
  expect(ours['allocated-clusters']).toBeGreaterThanOrEqual(theirs['allocated-clusters'] ?? 0);
  expect((await qemuImg.snapshotList(path)).map((s) => s.name)).toEqual((await qemuImg.snapshotList(reference)).map((s) => s.name));
}

describe.skipIf(qemuMissing)('revertSnapshot', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-revert');
  });
  afterAll(async () => work.cleanup());

  it('reverts to a QEMU snapshot as qemu-img snapshot -a does: data, new clusters gone, compressed clusters, COW afterwards', async () => {
    const path = await work.image({ sizeBytes: 64 << 20 });
    await guestWrite(path, 'write -P 0x11 0 1M', 'write -c -P 0x12 8M 64k', 'write -P 0x13 32M 64k');
    await qemuImg.snapshot(path, 'create', 's1');
    await guestWrite(path, 'write -P 0x21 0 256k', 'write -P 0x22 16M 1M', 'write -z 32M 64k');
    await expectSameAsQemuImg(path, 's1');
    await qemuIo(path, ['read -P 0x11 0 1M', 'read -P 0x12 8M 64k', 'read -P 0 16M 1M', 'read -P 0x13 32M 64k']);
    // Writing after the revert copies on write: the snapshot keeps its data.
    await guestWrite(path, 'write -P 0x31 0 64k');
    await expectSameAsQemuImg(path, 's1');
    await qemuIo(path, ['read -P 0x11 0 64k']);
  });

  it('reverts to one of our snapshots with a vmstate, the vmstate still reads, and to the older of two', async () => {
    const path = await work.image({ sizeBytes: 64 << 20, clusterSize: 4096 });
    await guestWrite(path, 'write -P 0x41 0 128k');
    const vmstate = Buffer.alloc(300_000, 0x5a);
    const img = await openImage(path);
    try {
      await new Promise<void>((resolve, reject) => {
        const out = img.createSnapshotStream('ours', { direct: 'auto' });
        out.on('error', reject).on('finish', resolve);
        out.end(vmstate);
      });
    } finally {
      await img.close();
    }
    await guestWrite(path, 'write -P 0x42 0 64k');
    await qemuImg.snapshot(path, 'create', 'later');
    await guestWrite(path, 'write -P 0x43 64k 64k');
    await expectSameAsQemuImg(path, 'ours');
    await qemuIo(path, ['read -P 0x41 0 128k']);
    const again = await openImage(path, { readOnly: true });
    try {
      const chunks: Buffer[] = [];
      for await (const chunk of again.createVmStateReadStream('ours')) chunks.push(chunk as Buffer);
      expect(Buffer.concat(chunks).equals(vmstate)).toBe(true);
    } finally {
      await again.close();
    }
    await expectSameAsQemuImg(path, 'later');
    await qemuIo(path, ['read -P 0x42 0 64k', 'read -P 0x41 64k 64k']);
  });

  it('refuses a missing snapshot, a read-only image, a resized disk, and an image a process holds', async () => {
    const path = await work.image({ sizeBytes: 64 << 20 });
    await qemuImg.snapshot(path, 'create', 'small');
    const img = await openImage(path);
    try {
      await expect(img.revertSnapshot('nope')).rejects.toMatchObject({ code: 'SNAPSHOT_NOT_FOUND' });
      expect(() => img.revertSnapshot('')).toThrow(TypeError);
      await expect(openImage(path)).rejects.toMatchObject({ code: 'IMAGE_LOCKED' });
    } finally {
      await img.close();
    }
    const ro = await openImage(path, { readOnly: true });
    await expect(ro.revertSnapshot('small')).rejects.toMatchObject({ code: 'IMAGE_READ_ONLY' });
    await ro.close();
    await run('qemu-img', ['resize', '-q', path, '128M']);
    const grown = await openImage(path);
    try {
      await expect(grown.revertSnapshot('small')).rejects.toMatchObject({ code: 'QCOW2_UNSUPPORTED', message: expect.stringMatching(/disk size/) });
    } finally {
      await grown.close();
    }
    expect((await qemuImg.check(path)).exitCode).toBe(0);
  });
});
