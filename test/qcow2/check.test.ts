import { readFile } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openImage } from '../../src/qcow2/image.js';
import type { CheckResult } from '../../src/qcow2/check.js';
import { qemuImg } from '../helpers/tools.js';
import { guestWrite, patchBytes, qemuMissing, Workdir } from './fixtures.js';

async function ourCheck(path: string): Promise<CheckResult> {
  const img = await openImage(path, { readOnly: true });
  try {
    return await img.check();
  } finally {
    await img.close();
  }
}

/** Offsets of the first refcount block, first L2 table and first data cluster of a fresh image. */
async function landmarks(path: string): Promise<{ refblock: number; l2: number; data: number }> {
  const bytes = await readFile(path);
  const reftable = Number(bytes.readBigUInt64BE(48));
  const l1 = Number(bytes.readBigUInt64BE(40));
  const refblock = Number(bytes.readBigUInt64BE(reftable));
  const l2 = Number(bytes.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
  const data = Number(bytes.readBigUInt64BE(l2) & 0x00fffffffffffe00n);
  return { refblock, l2, data };
}

function refcount16(value: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(value);
  return b;
}

describe.skipIf(qemuMissing)('check() agrees with qemu-img check', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-check');
  });
  afterAll(async () => work.cleanup());

  async function expectAgreement(path: string): Promise<CheckResult> {
    const theirs = await qemuImg.check(path);
    const ours = await ourCheck(path);
    expect(
      { corruptions: ours.corruptions, leaks: ours.leaks, end: ours.imageEndOffset },
      ours.messages.join('\n'),
    ).toEqual({ corruptions: theirs.corruptions ?? 0, leaks: theirs.leaks ?? 0, end: theirs['image-end-offset'] });
    return ours;
  }

  it('reports a clean image with snapshots as clean', async () => {
    const path = await work.image({ sizeBytes: 64 << 20, clusterSize: 4096 });
    await guestWrite(path, 'write -P 1 0 1M');
    await qemuImg.snapshot(path, 'create', 'a');
    await guestWrite(path, 'write -P 2 64k 1M');
    const ours = await expectAgreement(path);
    expect(ours.corruptions + ours.leaks).toBe(0);
  });

  it('reports a refcount higher than the references as a leak', async () => {
    const path = await work.image({ sizeBytes: 64 << 20 });
    await guestWrite(path, 'write -P 1 0 64k');
    const { refblock, data } = await landmarks(path);
    await patchBytes(path, refblock + (data / 65536) * 2, refcount16(3));
    const ours = await expectAgreement(path);
    expect(ours.leaks).toBe(1);
  });

  it('reports a refcount lower than the references, and the COPIED mismatch, as corruptions', async () => {
    const path = await work.image({ sizeBytes: 64 << 20 });
    await guestWrite(path, 'write -P 1 0 64k');
    const { refblock, data } = await landmarks(path);
    await patchBytes(path, refblock + (data / 65536) * 2, refcount16(0));
    const ours = await expectAgreement(path);
    expect(ours.corruptions).toBe(2);
  });

  it('reports a data cluster whose COPIED flag is clear at refcount 1', async () => {
    const path = await work.image({ sizeBytes: 64 << 20 });
    await guestWrite(path, 'write -P 1 0 64k');
    const { l2 } = await landmarks(path);
    const entry = (await readFile(path)).subarray(l2, l2 + 8);
    entry[0] = entry[0]! & 0x7f;
    await patchBytes(path, l2, entry);
    const ours = await expectAgreement(path);
    expect(ours.corruptions).toBe(1);
  });

  it('reports a refcount block with refcount 2 as a corruption and the extra as a leak', async () => {
    const path = await work.image({ sizeBytes: 64 << 20 });
    const { refblock } = await landmarks(path);
    await patchBytes(path, refblock + (refblock / 65536) * 2, refcount16(2));
    await expectAgreement(path);
  });
});
