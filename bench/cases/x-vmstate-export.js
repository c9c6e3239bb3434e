/**
 * (x) Export: 1 GiB of vmstate read back from a qcow2 internal snapshot,
 * img.createVmStateReadStream(name) with its defaults (4 MiB chunks on huge
 * pages, prefaulted on a thread of their own, 4 under way) and O_DIRECT
 * required, into a Writable that discards every chunk;
 * (x0) the same as it read before the seventh round: 2 chunks under way, each
 * on small pages, uninitialised, and faulted in by its read;
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
import { Prefaulter } from '../../dist/io/prefaulter.js';
import { ioBufferAlignment } from '../../dist/io/alignment.js';
import { addon } from '../../dist/io/native.js';
import { READ_SOURCE_SNAPSHOT, readSource } from '../lib/read-source.js';

/**
 * `before`: the export as it was before the seventh round (bench-only
 * patches of the dist build, undone after): 2 chunks ahead, each allocated
 * uninitialised on small pages, no prefault.
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
      const read = await (before ? asBefore(() => exportOnce(image, pump, { readAhead: 2 })) : exportOnce(image, pump));
      if (read !== bytes) throw new Error(`(${id}) exported ${read} bytes, the snapshot holds ${bytes}`);
      return { bytes: read };
    },
  };
}

/**
 * The chunk allocation of the sixth round: malloc'd (not zeroed) and aligned
 * only for O_DIRECT, so on small pages; the bytes outside the window zeroed.
 */
function allocUninitialized(length) {
  const alignment = ioBufferAlignment(this.memoryAlignment, this.alignment);
  const backing = Buffer.allocUnsafeSlow(length + alignment).buffer;
  const skip = addon.alignmentSkip(backing, alignment);
  const whole = new Uint8Array(backing);
  whole.fill(0, 0, skip);
  whole.fill(0, skip + length);
  return new Uint8Array(backing, skip, length);
}

async function asBefore(fn) {
  const alloc = TargetFile.prototype.allocBuffer;
  const prefault = Prefaulter.prototype.prefault;
  TargetFile.prototype.allocBuffer = allocUninitialized;
  Prefaulter.prototype.prefault = () => Promise.resolve();
  try {
    return await fn();
  } finally {
    TargetFile.prototype.allocBuffer = alloc;
    Prefaulter.prototype.prefault = prefault;
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

export const exportBefore = exportCase({ id: 'x0', label: 'qcow2 export before round 7: 2 ahead, small pages, no prefault', before: true });
export const exportPumped = exportCase({ id: 'xp', label: 'qcow2 export: the same stream through pumpTo (lent chunks)', pump: true });
export default exportCase({ id: 'x', label: 'qcow2 export: createVmStateReadStream defaults (O_DIRECT)' });
