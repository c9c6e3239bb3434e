/**
 * (g) The device reference (DESIGN.md, "Performance targets"): the addon
 * writing aligned 4 MiB blocks, 2 in flight on 2 native threads, then
 * fdatasync. No packing, no stream: what the disk takes from this process.
 */
import { TargetFile } from '../../dist/io/target-file.js';
import { allocAligned } from '../../dist/io/alignment.js';

const BLOCK_BYTES = 4 << 20;

/**
 * `inFlight` 2 is the reference of the targets. `inFlight` 1 is a diagnostic:
 * with a 2-buffer ring, one buffer fills while the other is written, so the
 * disk mostly sees one 4 MiB write at a time; (g1) is the ceiling for that.
 */
export function deviceCase({ id, label, inFlight }) {
  return {
    id,
    label,
    sizeClass: 'fast',
    verifiable: false,
    prepare(ctx) {
      // Pool data, so the device sees incompressible bytes like every other writer.
      const blocks = [];
      for (let b = 0; b < inFlight; b++) {
        const buf = allocAligned(BLOCK_BYTES, 4096);
        buf.set(ctx.workload.pool.subarray(b * BLOCK_BYTES, (b + 1) * BLOCK_BYTES));
        blocks.push(buf);
      }
      return { blocks };
    },
    async run(ctx, { blocks }) {
      const total = Math.ceil((ctx.workload.pageCount * 4096) / BLOCK_BYTES) * BLOCK_BYTES;
      const f = await TargetFile.open(ctx.path, { write: true, create: true, truncate: true, direct: true, threads: inFlight });
      if (!f.direct) throw new Error(`(${id}) O_DIRECT is not in effect`);
      const pending = [];
      for (let pos = 0, n = 0; pos < total; pos += BLOCK_BYTES, n++) {
        if (pending.length === inFlight) await pending.shift();
        pending.push(f.write(blocks[n % inFlight], pos));
      }
      await Promise.all(pending);
      await f.datasync();
      await f.close();
      return { bytes: total };
    },
  };
}

export default deviceCase({ id: 'g', label: 'device: addon, 4 MiB O_DIRECT, 2 in flight', inFlight: 2 });
