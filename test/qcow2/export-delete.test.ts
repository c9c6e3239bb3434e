/**
 * An export and a delete of the same snapshot on one open image: whichever
 * comes first wins, and never both. A delete while an export reads the
 * snapshot is refused (SNAPSHOT_IN_USE); an export asked for while a delete
 * of it runs is refused as if the snapshot were gone (SNAPSHOT_NOT_FOUND),
 * since the delete frees the clusters the export would read and a save may
 * reuse them at once. Checked against the bytes saved and qemu-img.
 */
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openImage, SnapshotError, type Image } from '../../src/index.js';
import { pseudoRandom, sha256 } from '../helpers/streams.js';
import { qemuImg } from '../helpers/tools.js';
import { qemuMissing, Workdir } from './fixtures.js';

const MiB = 1024 * 1024;

async function save(img: Image, name: string, data: Buffer): Promise<void> {
  await pipeline(Readable.from([data]), img.createSnapshotStream(name));
}

async function shaOf(stream: Readable): Promise<string> {
  const parts: Buffer[] = [];
  await pipeline(
    stream,
    new Writable({
      write(chunk: Buffer, _encoding, callback) {
        parts.push(chunk);
        callback();
      },
    }),
  );
  return sha256(parts);
}

const codeOf = (err: unknown): string => (err instanceof SnapshotError ? err.code : `uncoded ${String(err)}`);

describe.skipIf(qemuMissing)('qcow2 export and delete of the same snapshot', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-export-delete');
  });
  afterAll(async () => work?.cleanup());

  it('refuses the delete while the export reads, and deletes once the export has ended', async () => {
    const path = await work.image({ sizeBytes: 16 * MiB });
    const data = pseudoRandom(6 * MiB + 99, 21);
    const img = await openImage(path);
    try {
      await save(img, 'a', data);
      const reading = shaOf(img.createVmStateReadStream('a', { chunkBytes: MiB }));
      await expect(img.deleteSnapshot('a')).rejects.toMatchObject({ code: 'SNAPSHOT_IN_USE' });
      expect(await reading).toBe(sha256(data));
      await img.deleteSnapshot('a');
    } finally {
      await img.close();
    }
    expect((await qemuImg.snapshotList(path)).map((s) => s.name)).toEqual([]);
    expect((await qemuImg.check(path)).exitCode).toBe(0);
  });

  it('never lets an export and a delete of one snapshot both go ahead, whatever the timing', async () => {
    const path = await work.image({ sizeBytes: 16 * MiB });
    const img = await openImage(path);
    const seen = new Map<string, number>();
    try {
      for (let k = 0; k < 40; k++) {
        const data = pseudoRandom(2 * MiB + k, 100 + k);
        await save(img, 'a', data);
        const deleting = img.deleteSnapshot('a').then(
          () => 'ok',
          (err: unknown) => codeOf(err),
        );
        // A different moment of the delete each time: before it starts, while it runs, after it.
        for (let y = 0; y < k; y++) await new Promise((resolve) => setImmediate(resolve));
        let exported: string;
        try {
          const sha = await shaOf(img.createVmStateReadStream('a'));
          expect(sha, `round ${k}: the export's bytes`).toBe(sha256(data));
          exported = 'ok';
        } catch (err) {
          exported = codeOf(err);
        }
        const deleted = await deleting;
        const outcome = `export ${exported}, delete ${deleted}`;
        seen.set(outcome, (seen.get(outcome) ?? 0) + 1);
        expect(['export ok, delete SNAPSHOT_IN_USE', 'export SNAPSHOT_NOT_FOUND, delete ok'], `round ${k}`).toContain(outcome);
        if (deleted !== 'ok') await img.deleteSnapshot('a');
      }
    } finally {
      await img.close();
    }
    console.log(`[export-delete] ${JSON.stringify(Object.fromEntries(seen))}`);
    // Both orders happened, so the rounds did meet the delete at different moments.
    expect(seen.size).toBe(2);
    expect((await qemuImg.check(path)).exitCode).toBe(0);
  }, 120_000);
});
