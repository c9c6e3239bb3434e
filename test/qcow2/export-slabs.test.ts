/**
 * The Readable export's chunks live in native slabs that are used again once
 * V8 has collected the chunk (src/io/chunk-slabs.ts, native/slabs.cc). A slab
 * is handed out holding an earlier chunk's bytes, so these tests dirty the
 * free list on purpose and check that no byte of it reaches a consumer, and
 * that a chunk a consumer keeps is never handed out again. Oracles: the data
 * saved (its hash), and the independent reader in test/helpers/qcow2-vmstate.ts.
 */
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream } from '../../src/index.js';
import { PAGE_BYTES } from '../../src/io/alignment.js';
import { addon } from '../../src/io/native.js';
import { openImage, type Image } from '../../src/qcow2/image.js';
import { readSnapshotVmState, vmStateLayout } from '../helpers/qcow2-vmstate.js';
import { pseudoRandom, sha256 } from '../helpers/streams.js';
import { be64, patchBytes, qemuMissing, Workdir } from './fixtures.js';

const MiB = 1024 * 1024;

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

/** Collects until the chunks dropped so far are finalized and their slabs are free again. */
async function collectGarbage(): Promise<void> {
  for (let i = 0; i < 3; i++) {
    gc();
    // Finalizers of external buffers run from the event loop after the collection.
    await new Promise((resolve) => setImmediate(resolve));
  }
}

async function save(path: string, name: string, data: Buffer): Promise<void> {
  await pipeline(Readable.from([data], { objectMode: true }), createSnapshotStream(path, { snapshot: name }));
}

/** Every chunk of an export, as the consumer got them. */
async function chunksOf(path: string, name: string, options: Parameters<Image['createVmStateReadStream']>[1] = {}): Promise<Buffer[]> {
  const img = await openImage(path, { readOnly: true });
  try {
    const chunks: Buffer[] = [];
    for await (const chunk of img.createVmStateReadStream(name, options)) chunks.push(chunk as Buffer);
    return chunks;
  } finally {
    await img.close();
  }
}

describe.skipIf(qemuMissing)('qcow2 export: chunk slabs', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-export-slabs');
  });
  afterAll(async () => work?.cleanup());

  it('never hands a chunk the consumer still holds to another chunk', async () => {
    const path = await work.image({ sizeBytes: 16 * MiB });
    const a = pseudoRandom(24 * MiB, 1);
    const b = pseudoRandom(24 * MiB, 2);
    await save(path, 'a', a);
    await save(path, 'b', b);
    const kept = await chunksOf(path, 'a');
    expect(kept.length).toBe(6);
    const before = addon.slabStats();
    // Other exports churn the free list around the kept chunks, with collections between them.
    for (let round = 0; round < 4; round++) {
      await collectGarbage();
      expect(sha256(Buffer.concat(await chunksOf(path, 'b'))), `export b, round ${round}`).toBe(sha256(b));
    }
    await collectGarbage();
    const after = addon.slabStats();
    expect(after.reused - before.reused, 'the churn reused slabs').toBeGreaterThan(0);
    expect(sha256(Buffer.concat(kept)), 'the chunks kept from export a').toBe(sha256(a));
  });

  it('reads an unmapped part of the vmstate as zeros from a slab that held other data', async () => {
    // 512-byte clusters: one L2 table maps 32 KiB, so clearing one entry of
    // the snapshot's own L1 table unmaps 32 KiB of its vmstate.
    const clusterSize = 512;
    const l2Coverage = (clusterSize / 8) * clusterSize;
    const size = 256 * 1024;
    const path = await work.image({ sizeBytes: 1 * MiB, clusterSize });
    const dirty = Buffer.alloc(size, 0xa5);
    const data = pseudoRandom(size, 3);
    await save(path, 'dirty', dirty);
    await save(path, 'holed', data);
    const layout = await vmStateLayout(path, 'holed');
    const l1Index = layout.vmStateGuestOffset / l2Coverage + 2;
    await patchBytes(path, layout.snapshot.l1TableOffset + l1Index * 8, be64(0));
    const expected = Buffer.from(data);
    expected.fill(0, 2 * l2Coverage, 3 * l2Coverage);
    expect(sha256(await readSnapshotVmState(path, 'holed')), 'oracle').toBe(sha256(expected));

    // The same chunk geometry both times: the slab the first export drops is the one the second gets.
    expect(sha256(Buffer.concat(await chunksOf(path, 'dirty'))), 'export dirty').toBe(sha256(dirty));
    await collectGarbage();
    const before = addon.slabStats();
    const chunks = await chunksOf(path, 'holed');
    expect(addon.slabStats().reused - before.reused, 'a slab was used again').toBeGreaterThan(0);
    expect(sha256(Buffer.concat(chunks)), 'export holed').toBe(sha256(expected));
  });

  it("zeroes a slab's bytes past the chunk, which a consumer can reach through chunk.buffer", async () => {
    // Page-cache reads (direct: false) are unaligned: a 1000-byte vmstate is a
    // 1024-byte chunk (two clusters) in a slab of one page.
    const path = await work.image({ sizeBytes: 1 * MiB, clusterSize: 512 });
    await save(path, 'dirty', Buffer.alloc(PAGE_BYTES, 0xff));
    const data = pseudoRandom(1000, 4);
    await save(path, 'small', data);
    expect((await chunksOf(path, 'dirty', { direct: false }))[0]!.buffer.byteLength).toBe(PAGE_BYTES);
    await collectGarbage();
    const before = addon.slabStats();
    const [chunk, ...rest] = await chunksOf(path, 'small', { direct: false });
    expect(rest).toHaveLength(0);
    expect(addon.slabStats().reused - before.reused, 'the dirty slab was used again').toBeGreaterThan(0);
    expect(sha256(chunk!)).toBe(sha256(data));
    const whole = new Uint8Array(chunk!.buffer);
    expect(whole.length).toBe(PAGE_BYTES);
    expect(whole.subarray(1024).every((byte) => byte === 0)).toBe(true);
  });

  it('refuses bad slab geometry with a TypeError or RangeError, and trims idle slabs', async () => {
    expect(() => addon.allocSlab(0, 4096, 0)).toThrow(RangeError);
    expect(() => addon.allocSlab(4096 + 1, 4096, 0)).toThrow(RangeError);
    expect(() => addon.allocSlab(4096, 3000, 0)).toThrow(RangeError);
    expect(() => (addon.allocSlab as unknown as (x: string) => void)('4096')).toThrow(TypeError);
    await collectGarbage();
    addon.trimSlabs(0);
    let slab: { buffer: ArrayBuffer; fresh: boolean } | undefined = addon.allocSlab(8192, 4096, 0);
    expect(slab.buffer.byteLength).toBe(8192);
    expect(slab.fresh).toBe(true);
    slab = undefined;
    await collectGarbage();
    slab = addon.allocSlab(8192, 4096, 0);
    expect(slab.fresh, 'the slab just freed').toBe(false);
    expect(slab.buffer.byteLength).toBe(8192);
    slab = undefined;
    await collectGarbage();
    expect(addon.slabStats().free).toBeGreaterThan(0);
    expect(addon.trimSlabs(0)).toBe(0);
    expect(addon.slabStats()).toMatchObject({ free: 0, freeBytes: 0 });
  });
});
