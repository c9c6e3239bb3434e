/**
 * The device references (DESIGN.md, "Performance targets"): what the disk
 * does for large sequential O_DIRECT I/O from this process, with no packing
 * and no stream. The grid is 1, 2 and 4 requests in flight at 4 and 16 MiB;
 * the write reference of a run is the best median of the write cells, the
 * read reference the best median of the read cells.
 *
 * Addon cells use the addon's own writer/reader (TargetFile, one native
 * thread per request in flight). fio cells (bench/cases/fio-device.js) do the
 * same through libaio when fio is installed.
 */
import { TargetFile } from '../../dist/io/target-file.js';
import { allocAligned } from '../../dist/io/alignment.js';
import { readSourcePath } from '../lib/read-source.js';

export const IN_FLIGHT = [1, 2, 4];
export const BLOCK_MIB = [4, 16];

function fillBlocks(workload, count, blockBytes) {
  // Pool data, so the device sees incompressible bytes like every other writer.
  const blocks = [];
  for (let b = 0; b < count; b++) {
    const buf = allocAligned(blockBytes, 4096);
    const from = (b * blockBytes) % workload.pool.length;
    buf.set(workload.pool.subarray(from, Math.min(from + blockBytes, workload.pool.length)));
    blocks.push(buf);
  }
  return blocks;
}

/** Keeps `inFlight` requests outstanding over [0, total) in `blockBytes` steps. */
async function sweep(total, blockBytes, inFlight, issue) {
  const pending = [];
  for (let pos = 0, n = 0; pos < total; pos += blockBytes, n++) {
    if (pending.length === inFlight) await pending.shift();
    pending.push(issue(n % inFlight, pos));
  }
  await Promise.all(pending);
}

function deviceWrite(inFlight, blockMiB) {
  const blockBytes = blockMiB << 20;
  return {
    id: `g${blockMiB}x${inFlight}`,
    label: `device write: addon, ${blockMiB} MiB O_DIRECT, ${inFlight} in flight`,
    kind: 'device-write',
    sizeClass: 'fast',
    verifiable: false,
    prepare: (ctx) => ({ blocks: fillBlocks(ctx.workload, inFlight, blockBytes) }),
    async run(ctx, { blocks }) {
      const total = Math.ceil((ctx.workload.pageCount * 4096) / blockBytes) * blockBytes;
      const f = await TargetFile.open(ctx.path, { write: true, create: true, truncate: true, direct: true, threads: inFlight });
      if (!f.direct) throw new Error(`O_DIRECT is not in effect for ${ctx.path}`);
      await sweep(total, blockBytes, inFlight, (slot, pos) => f.write(blocks[slot], pos));
      await f.datasync();
      await f.close();
      return { bytes: total };
    },
  };
}

function deviceRead(inFlight, blockMiB) {
  const blockBytes = blockMiB << 20;
  return {
    id: `rd${blockMiB}x${inFlight}`,
    label: `device read: addon, ${blockMiB} MiB O_DIRECT, ${inFlight} in flight`,
    kind: 'device-read',
    sizeClass: 'fast',
    verifiable: false,
    container: true,
    async prepare(ctx) {
      await readSourcePath(ctx.workload); // written here, untimed
      return { blocks: Array.from({ length: inFlight }, () => allocAligned(blockBytes, 4096)) };
    },
    async run(ctx, { blocks }) {
      const source = await readSourcePath(ctx.workload);
      const total = Math.floor((ctx.workload.pageCount * 4096) / blockBytes) * blockBytes;
      const f = await TargetFile.open(source, { write: false, direct: true, threads: inFlight });
      if (!f.direct) throw new Error(`O_DIRECT is not in effect for ${source}`);
      let bytes = 0;
      await sweep(total, blockBytes, inFlight, async (slot, pos) => {
        // Not `bytes += await ...`: that reads `bytes` before the await, and
        // with reads in flight together all but one of their counts were lost.
        const got = await f.read(blocks[slot], pos);
        bytes += got;
      });
      await f.close();
      if (bytes !== total) throw new Error(`(rd${blockMiB}x${inFlight}) read ${bytes} bytes, expected ${total}`);
      return { bytes };
    },
  };
}

export const deviceWriteCases = BLOCK_MIB.flatMap((m) => IN_FLIGHT.map((n) => deviceWrite(n, m)));
export const deviceReadCases = BLOCK_MIB.flatMap((m) => IN_FLIGHT.map((n) => deviceRead(n, m)));
