/**
 * (x) Export: 1 GiB of vmstate read back from a qcow2 internal snapshot,
 * (x0) the same as it read before issue 12 (one native thread, zeroed chunks),
 * img.createVmStateReadStream(name) with its defaults (4 MiB chunks, 2 read
 * ahead) and O_DIRECT required, into a Writable that discards every chunk;
 * (xp) the same stream consumed with pumpTo(), which lends chunks from
 * reused slots instead of pushing fresh memory, into a sink that discards.
 * Compared with the device read reference of the same run (the best of the
 * rd* and fio-r* cells).
 *
 * The image is bench/lib/read-source.js's, which the device-read cells read
 * too: written once, untimed, with O_DIRECT, so no page of it is in the page
 * cache, and the reads themselves are O_DIRECT: the cache cannot flatter the
 * figure.
 */
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { openImage } from '../../dist/index.js';
import { TargetFile } from '../../dist/io/target-file.js';
import { READ_SOURCE_SNAPSHOT, readSource } from '../lib/read-source.js';
import { withThreads } from '../lib/threads.js';

/**
 * `before`: the export as it was before issue 12: one native thread
 * (bench/lib/threads.js) and every chunk zeroed at allocation.
 */
function exportCase({ id, label, before, pump = false }) {
  return {
    id,
    label,
    kind: 'read',
    sizeClass: 'fast',
    verifiable: false,
    container: true,
    prepare: (ctx) => readSource(ctx.workload),
    async run(_ctx, { image, bytes }) {
      const read = await (before ? asBefore(() => exportOnce(image, pump)) : exportOnce(image, pump));
      if (read !== bytes) throw new Error(`(${id}) exported ${read} bytes, the snapshot holds ${bytes}`);
      return { bytes: read };
    },
  };
}

async function asBefore(fn) {
  const uninitialized = TargetFile.prototype.allocBufferUninitialized;
  TargetFile.prototype.allocBufferUninitialized = TargetFile.prototype.allocBuffer;
  try {
    return await withThreads(1, fn);
  } finally {
    TargetFile.prototype.allocBufferUninitialized = uninitialized;
  }
}

async function exportOnce(image, pump) {
  const img = await openImage(image, { readOnly: true });
  try {
    const stream = img.createVmStateReadStream(READ_SOURCE_SNAPSHOT, { direct: true });
    let read = 0;
    if (pump) {
      await stream.pumpTo((chunk) => {
        read += chunk.length;
      });
    } else {
      const discard = new Writable({
        write(chunk, _encoding, callback) {
          read += chunk.length;
          callback();
        },
      });
      await pipeline(stream, discard);
    }
    if (stream.direct !== true) throw new Error(`expected O_DIRECT in effect, got direct=${stream.direct}`);
    return read;
  } finally {
    await img.close();
  }
}

export const exportBefore = exportCase({ id: 'x0', label: 'qcow2 export before: 1 read at a time, zeroed chunks', before: true });
export const exportPumped = exportCase({ id: 'xp', label: 'qcow2 export: the same stream through pumpTo (lent chunks)', pump: true });
export default exportCase({ id: 'x', label: 'qcow2 export: createVmStateReadStream defaults (O_DIRECT)' });
