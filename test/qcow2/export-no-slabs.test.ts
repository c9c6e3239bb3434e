/**
 * Where the runtime refuses external buffers (a V8 sandbox, as in Electron),
 * the addon's allocSlab throws and the export's chunks fall back to zeroed
 * JS memory (src/io/chunk-slabs.ts); where a slab's memory cannot be had,
 * that one chunk does. Both are simulated by replacing allocSlab; a refusal
 * is remembered for the process, so it comes last, in a file with a process
 * of its own (vitest's forks pool). Oracle: the hash of the data saved.
 */
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream } from '../../src/index.js';
import { addon } from '../../src/io/native.js';
import { openImage } from '../../src/qcow2/image.js';
import { pseudoRandom, sha256 } from '../helpers/streams.js';
import { qemuMissing, Workdir } from './fixtures.js';

const MiB = 1024 * 1024;

describe.skipIf(qemuMissing)('qcow2 export: external buffers refused', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-export-no-slabs');
  });
  afterAll(async () => work?.cleanup());

  /** An image with snapshot 's': pseudo-random vmstate of two whole 4 MiB chunks and a part of one. */
  async function savedSnapshot(seed: number): Promise<{ path: string; data: Buffer }> {
    const path = await work.image({ sizeBytes: 16 * MiB });
    const data = pseudoRandom(10 * MiB + seed * 111, seed);
    await pipeline(Readable.from([data], { objectMode: true }), createSnapshotStream(path, { snapshot: 's' }));
    return { path, data };
  }

  it('takes JS memory for a chunk whose slab cannot be had, and slabs again for the next', async () => {
    const { path, data } = await savedSnapshot(6);
    const original = addon.allocSlab;
    let asked = 0;
    addon.allocSlab = (...args: Parameters<typeof original>) => {
      if (asked++ === 0) throw Object.assign(new Error('allocSlab: out of memory'), { code: 'SLAB_NO_MEMORY' });
      return original(...args);
    };
    const img = await openImage(path, { readOnly: true });
    try {
      const chunks: Buffer[] = [];
      for await (const chunk of img.createVmStateReadStream('s')) chunks.push(chunk as Buffer);
      expect(sha256(Buffer.concat(chunks))).toBe(sha256(data));
      expect(asked).toBe(chunks.length);
      expect(chunks[0]!.buffer.byteLength, 'the first chunk in JS memory, with its slack').toBeGreaterThan(chunks[0]!.length);
      expect(chunks[1]!.buffer.byteLength, 'the next in a slab, exactly its size').toBe(chunks[1]!.length);
    } finally {
      addon.allocSlab = original;
      await img.close();
    }
  });

  it('exports byte for byte from JS memory, asking for a slab no more after the refusal', async () => {
    const { path, data } = await savedSnapshot(5);
    const original = addon.allocSlab;
    let asked = 0;
    addon.allocSlab = () => {
      asked++;
      // As native/slabs.cc reports napi_no_external_buffers_allowed.
      throw Object.assign(new Error('allocSlab: external buffers are not allowed here'), { code: 'SLAB_REFUSED' });
    };
    try {
      for (let round = 0; round < 2; round++) {
        const img = await openImage(path, { readOnly: true });
        try {
          const chunks: Buffer[] = [];
          for await (const chunk of img.createVmStateReadStream('s')) chunks.push(chunk as Buffer);
          expect(sha256(Buffer.concat(chunks)), `round ${round}`).toBe(sha256(data));
          // Not slabs: the chunks are ordinary ArrayBuffers, with their alignment slack.
          expect(chunks[0]!.buffer.byteLength).toBeGreaterThan(chunks[0]!.length);
        } finally {
          await img.close();
        }
      }
      expect(asked).toBe(1);
    } finally {
      addon.allocSlab = original;
    }
  });
});
