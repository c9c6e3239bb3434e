/**
 * (x) Export: 1 GiB of vmstate read back from a qcow2 internal snapshot,
 * img.createVmStateReadStream(name) with its defaults (4 MiB chunks in slabs
 * recycled when V8 collects them, on huge pages, 4 under way) and O_DIRECT
 * required, into a Writable that discards every chunk;
 * (x0) the same as it read before the eighth round: each chunk a fresh,
 * zeroed ArrayBuffer (huge pages, prefaulted on a thread of their own);
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
import { setChunkSlabsEnabled } from '../../dist/io/chunk-slabs.js';
import { READ_SOURCE_SNAPSHOT, readSource } from '../lib/read-source.js';

/** `before`: the export as it was before the eighth round (slabs turned off for the run, then on again). */
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

/** The export of the seventh round: every Readable chunk a fresh, zeroed ArrayBuffer (no slabs). */
async function asBefore(fn) {
  setChunkSlabsEnabled(false);
  try {
    return await fn();
  } finally {
    setChunkSlabsEnabled(true);
  }
}

async function exportOnce(image, pump, options = {}) {
  const img = await openImage(image, { readOnly: true });
  try {
    const stream = img.createVmStateReadStream(READ_SOURCE_SNAPSHOT, { ...options, direct: true });
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

export const exportBefore = exportCase({ id: 'x0', label: 'qcow2 export before round 8: each chunk fresh JS memory', before: true });
export const exportPumped = exportCase({ id: 'xp', label: 'qcow2 export: the same stream through pumpTo (lent chunks)', pump: true });
export default exportCase({ id: 'x', label: 'qcow2 export: createVmStateReadStream defaults (O_DIRECT)' });
