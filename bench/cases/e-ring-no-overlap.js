/**
 * (e) Packing without overlap: the same copy into one aligned 4 MiB buffer as
 * the stream does, but each full buffer is written and awaited before the next
 * byte is copied (TargetFile, O_DIRECT, one native thread). The stream needs
 * buffers >= 2, so this plain loop stands in for "one buffer": it isolates
 * what double buffering adds on top of packing alone.
 */
import { TargetFile } from '../../dist/io/target-file.js';

const BUFFER_BYTES = 4 << 20;

export default {
  id: 'e',
  label: 'packing, 1 x 4 MiB buffer, no overlap',
  sizeClass: 'fast',
  async run(ctx) {
    const { workload } = ctx;
    const { pages, headers, pageCount } = workload;
    const f = await TargetFile.open(ctx.path, { write: true, create: true, truncate: true, direct: true, threads: 1 });
    const buf = f.allocBuffer(BUFFER_BYTES);
    let fill = 0;
    let pos = 0;
    for (let i = 0; i < pageCount; i++) {
      const k = workload.poolIndex(i);
      for (let j = 0; j < 2; j++) {
        const chunk = j === 0 ? headers[k] : pages[k];
        const length = chunk.byteLength;
        let at = 0;
        while (at < length) {
          const n = Math.min(BUFFER_BYTES - fill, length - at);
          buf.set(n === length ? chunk : chunk.subarray(at, at + n), fill);
          fill += n;
          at += n;
          if (fill === BUFFER_BYTES) {
            await f.write(buf, pos); // no overlap: copying waits for the disk
            pos += BUFFER_BYTES;
            fill = 0;
          }
        }
      }
    }
    const bytes = pos + fill;
    if (fill > 0) {
      const padded = Math.ceil(fill / f.alignment) * f.alignment;
      buf.fill(0, fill, padded);
      await f.write(buf.subarray(0, padded), pos);
    }
    await f.truncate(bytes);
    await f.datasync();
    await f.close();
    return { bytes };
  },
};
