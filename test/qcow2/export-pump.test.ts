/**
 * VmStateReadStream#pumpTo: the export with lent chunks (reused slots, no
 * fresh memory per chunk). Oracles: the SHA-256 of the bytes saved, the
 * independent reader in test/helpers/qcow2-vmstate.ts, and QEMU's own savevm.
 */
import { readdirSync } from 'node:fs';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream, SnapshotError } from '../../src/index.js';
import { openImage, type Image } from '../../src/qcow2/image.js';
import { DEFAULT_READ_AHEAD, type VmStateReadOptions } from '../../src/qcow2/vmstate-reader.js';
import { descriptorsOn } from '../helpers/descriptors.js';
import { readSnapshotVmState } from '../helpers/qcow2-vmstate.js';
import { pseudoRandom, sha256 } from '../helpers/streams.js';
import { requireTool } from '../helpers/tools.js';
import { qemuMissing, Workdir } from './fixtures.js';

const MiB = 1024 * 1024;
const qemuSystemMissing = requireTool('qemu-system-x86_64', 'qemu-img');

async function saveOurs(path: string, name: string, data: Buffer): Promise<void> {
  const pieces = [];
  for (let pos = 0; pos < data.length; pos += 64 * 1024 + 7) pieces.push(data.subarray(pos, pos + 64 * 1024 + 7));
  await pipeline(Readable.from(pieces, { objectMode: true }), createSnapshotStream(path, { snapshot: name }));
}

/**
 * Pumps `name` into a sink that holds each chunk for a while before it
 * settles, and checks the chunk did not change meanwhile. Returns the bytes,
 * copied, and what the sink saw.
 */
async function pumpAll(img: Image, name: string, options: VmStateReadOptions = {}, holdMs = 0): Promise<{ bytes: Buffer; chunks: number; buffers: Set<ArrayBufferLike> }> {
  const parts: Buffer[] = [];
  const buffers = new Set<ArrayBufferLike>();
  let chunks = 0;
  await img.createVmStateReadStream(name, options).pumpTo(async (chunk) => {
    chunks++;
    buffers.add(chunk.buffer);
    const lent = sha256(chunk);
    if (holdMs > 0) await sleep(holdMs);
    expect(sha256(chunk), `chunk ${chunks} changed while lent`).toBe(lent);
    parts.push(Buffer.from(chunk));
  });
  return { bytes: Buffer.concat(parts), chunks, buffers };
}

describe.skipIf(qemuMissing)('qcow2 export: pumpTo (lent chunks)', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-export-pump');
  });
  afterAll(async () => work?.cleanup());

  for (const clusterSize of [512, 65536, 2 * MiB]) {
    it(`hands over every byte in order, unchanged while lent, from readAhead reused slots (cluster ${clusterSize})`, async () => {
      const path = await work.image({ sizeBytes: 16 * MiB, clusterSize });
      const data = pseudoRandom(9 * MiB + 4321, clusterSize);
      await saveOurs(path, 's', data);
      expect(sha256(await readSnapshotVmState(path, 's')), 'oracle').toBe(sha256(data));
      const img = await openImage(path, { readOnly: true });
      try {
        for (const [options, holdMs] of [
          [{}, 0],
          [{ chunkBytes: 256 * 1024, readAhead: 3 }, 2],
          [{ chunkBytes: MiB, readAhead: 1 }, 1],
          [{ direct: false as const, readAhead: 4 }, 0],
        ] as const) {
          const got = await pumpAll(img, 's', options, holdMs);
          expect(sha256(got.bytes), JSON.stringify(options)).toBe(sha256(data));
          expect(got.buffers.size, `distinct buffers lent, ${JSON.stringify(options)}`).toBeLessThanOrEqual(options.readAhead ?? DEFAULT_READ_AHEAD);
        }
        expect(descriptorsOn(path)).toBe(1);
      } finally {
        await img.close();
      }
    });
  }

  it('zeroes the slots at the end: a chunk kept past its promise reads zeros afterwards', async () => {
    const path = await work.image({ sizeBytes: 16 * MiB });
    await saveOurs(path, 'k', pseudoRandom(3 * MiB, 11));
    const img = await openImage(path, { readOnly: true });
    try {
      const kept: Buffer[] = [];
      await img.createVmStateReadStream('k', { chunkBytes: MiB }).pumpTo((chunk) => void kept.push(chunk));
      expect(kept).toHaveLength(3);
      for (const chunk of kept) expect(chunk.every((b) => b === 0)).toBe(true);
    } finally {
      await img.close();
    }
  });

  it('takes a sink that returns nothing or throws synchronously; a throw or a rejection ends the pump with it, and nothing more is lent', async () => {
    const path = await work.image({ sizeBytes: 16 * MiB });
    const data = pseudoRandom(6 * MiB, 12);
    await saveOurs(path, 'e', data);
    const img = await openImage(path, { readOnly: true });
    try {
      const before = readdirSync('/proc/self/fd').length;
      let seen = 0;
      await img.createVmStateReadStream('e', { chunkBytes: MiB }).pumpTo(() => {
        seen++;
      });
      expect(seen).toBe(6);

      const thrown = new Error('sink threw');
      let calls = 0;
      const syncThrow = img.createVmStateReadStream('e', { chunkBytes: MiB }).pumpTo(() => {
        if (++calls === 2) throw thrown;
      });
      await expect(syncThrow).rejects.toBe(thrown);
      expect(calls).toBeLessThanOrEqual(3);

      const rejected = new Error('sink rejected');
      let lentAfter = 0;
      let failedAt: number | undefined;
      calls = 0;
      const asyncReject = img.createVmStateReadStream('e', { chunkBytes: MiB, readAhead: 3 }).pumpTo(async () => {
        const n = ++calls;
        if (failedAt !== undefined) lentAfter++;
        await sleep(1);
        if (n === 2) {
          failedAt = n;
          throw rejected;
        }
      });
      await expect(asyncReject).rejects.toBe(rejected);
      // Chunks lent before the rejection settled may follow it (readAhead 3), none after.
      expect(lentAfter).toBeLessThanOrEqual(1);
      expect(readdirSync('/proc/self/fd').length).toBe(before);
      // The image is untouched: the snapshot exports again, whole.
      expect(sha256((await pumpAll(img, 'e')).bytes)).toBe(sha256(data));
    } finally {
      await img.close();
    }
  });

  it('consumes a stream once: STREAM_CONSUMED for pumpTo after reading, a second pumpTo, or reading while it pumps; TypeError for a sink that is not a function', async () => {
    const path = await work.image({ sizeBytes: 16 * MiB });
    const data = pseudoRandom(4 * MiB, 13);
    await saveOurs(path, 'c', data);
    const img = await openImage(path, { readOnly: true });
    try {
      const read = img.createVmStateReadStream('c');
      await new Promise<void>((resolve) => read.once('data', () => resolve()));
      await expect(read.pumpTo(() => undefined)).rejects.toMatchObject({ code: 'STREAM_CONSUMED' });
      read.destroy();

      const twice = img.createVmStateReadStream('c', { chunkBytes: MiB });
      const first = twice.pumpTo(() => sleep(1));
      await expect(twice.pumpTo(() => undefined)).rejects.toMatchObject({ code: 'STREAM_CONSUMED' });
      await first; // the first pump is not disturbed

      const both = img.createVmStateReadStream('c', { chunkBytes: MiB });
      const pumping = both.pumpTo(() => sleep(2));
      const readErrors: unknown[] = [];
      both.on('error', (err) => readErrors.push(err));
      both.resume();
      const err = await pumping.then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(SnapshotError);
      expect(err).toMatchObject({ code: 'STREAM_CONSUMED' });
      expect(readErrors[0]).toMatchObject({ code: 'STREAM_CONSUMED' });

      const bad = img.createVmStateReadStream('c');
      await expect(bad.pumpTo(42 as never)).rejects.toBeInstanceOf(TypeError);
      bad.destroy();

      expect(sha256((await pumpAll(img, 'c')).bytes)).toBe(sha256(data));
    } finally {
      await img.close();
    }
    expect(descriptorsOn(path)).toBe(0);
  });

  it('ends with IMAGE_CLOSED when the image closes mid-pump, with no descriptor left open', async () => {
    const path = await work.image({ sizeBytes: 32 * MiB });
    await saveOurs(path, 'z', pseudoRandom(20 * MiB, 14));
    const img = await openImage(path, { readOnly: true });
    let lent = 0;
    const pumping = img.createVmStateReadStream('z', { chunkBytes: MiB }).pumpTo(async () => {
      lent++;
      await sleep(5);
    });
    const outcome = pumping.then(
      () => undefined,
      (e: unknown) => e,
    );
    while (lent < 2) await sleep(1);
    await img.close();
    expect(await outcome).toMatchObject({ code: 'IMAGE_CLOSED' });
    expect(lent).toBeLessThan(20);
    expect(descriptorsOn(path)).toBe(0);
  });
});

describe.skipIf(qemuSystemMissing)('qcow2 export: pumpTo of a snapshot written by QEMU savevm', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-export-pump-qemu');
  });
  afterAll(async () => work?.cleanup());

  it("hands over QEMU's own vmstate byte for byte", async () => {
    const path = await work.image({ sizeBytes: 32 * MiB });
    const { withPausedVm } = await import('../helpers/qemu.js');
    await withPausedVm({ ramMiB: 32, image: path }, async (vm) => vm.savevm('vm1'));
    const oracle = await readSnapshotVmState(path, 'vm1');
    expect(oracle.length).toBeGreaterThan(0);
    const img = await openImage(path, { readOnly: true });
    try {
      for (const options of [{}, { chunkBytes: 8192, readAhead: 3 }]) {
        expect(sha256((await pumpAll(img, 'vm1', options, 1)).bytes), JSON.stringify(options)).toBe(sha256(oracle));
      }
    } finally {
      await img.close();
    }
  });
});
