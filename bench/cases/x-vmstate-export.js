/**
 * (x) Export: 1 GiB of vmstate read back from a qcow2 internal snapshot,
 * img.createVmStateReadStream(name) with its defaults (4 MiB chunks, 2 read
 * ahead) and O_DIRECT required, into a Writable that discards every chunk.
 * Compared with the device read reference of the same run (the best of the
 * rd* and fio-r* cells).
 *
 * The image is written once, untimed, in prepare (the page stream saved by
 * createSnapshotStream with O_DIRECT), so no page of it is in the page cache,
 * and the reads themselves are O_DIRECT: the cache cannot flatter the figure.
 * It lives in the runner's scratch directory, which the runner deletes.
 */
import { mkdirSync } from 'node:fs';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createImage, createSnapshotStream, openImage } from '../../dist/index.js';
import { pumpPages } from '../lib/pump.js';

/** bench/run.js's TMP_DIR: scratch on the work disk, removed at the end of the run. */
const SCRATCH_DIR = join(dirname(dirname(fileURLToPath(import.meta.url))), '.tmp', String(process.pid));
const SNAPSHOT = 'bench-export';
/** 1 GiB disk: the vmstate area starts right after it. */
const DISK_BYTES = 1 << 30;

export default {
  id: 'x',
  label: 'qcow2 export: createVmStateReadStream (O_DIRECT, 2 x 4 MiB read-ahead)',
  kind: 'read',
  sizeClass: 'fast',
  verifiable: false,
  container: true,
  async prepare(ctx) {
    mkdirSync(SCRATCH_DIR, { recursive: true });
    const image = join(SCRATCH_DIR, 'x-source.qcow2');
    await createImage(image, { size: DISK_BYTES, overwrite: true });
    const out = createSnapshotStream(image, { snapshot: SNAPSHOT, direct: true });
    await pumpPages(out, ctx.workload);
    return { image, bytes: out.bytesWritten };
  },
  async run(ctx, { image, bytes }) {
    const img = await openImage(image, { readOnly: true });
    try {
      const source = img.createVmStateReadStream(SNAPSHOT, { direct: true });
      let read = 0;
      const discard = new Writable({
        write(chunk, _encoding, callback) {
          read += chunk.length;
          callback();
        },
      });
      await pipeline(source, discard);
      if (source.direct !== true) throw new Error(`(x) expected O_DIRECT in effect, got direct=${source.direct}`);
      if (read !== bytes) throw new Error(`(x) exported ${read} bytes, the snapshot holds ${bytes}`);
      return { bytes: read };
    } finally {
      await img.close();
    }
  },
};
