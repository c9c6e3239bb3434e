/**
 * (r) and (rp): a raw save through createSnapshotStream without and with
 * `preallocate: 'space'`. Both report the file's extent count (filefrag)
 * afterwards; (rp) also reports how long the reservation itself took. The
 * reservation is done once more by the stream, on space that is already
 * allocated, so the timed run includes it and costs what a user would pay.
 */
import { createSnapshotStream } from '../../dist/index.js';
import { reserveSpace } from '../../dist/io/preallocate.js';
import { TargetFile } from '../../dist/io/target-file.js';
import { performance } from 'node:perf_hooks';
import { pumpPages } from '../lib/pump.js';

/** Reserves `bytes` at the start of `path` and returns the seconds it took. */
export async function timeReservation(path, bytes, create) {
  const t0 = performance.now();
  const f = await TargetFile.open(path, { write: true, create, direct: false });
  try {
    await reserveSpace(f, f.size, bytes);
  } finally {
    await f.close();
  }
  return (performance.now() - t0) / 1000;
}

export function rawCase({ id, label, preallocate }) {
  return {
    id,
    label,
    sizeClass: 'fast',
    async run(ctx) {
      const expectedSize = ctx.workload.streamBytes;
      const preallocSeconds = preallocate ? await timeReservation(ctx.path, expectedSize, true) : undefined;
      const options = { direct: true, ...(preallocate ? { preallocate: 'space', expectedSize } : {}) };
      const out = createSnapshotStream(ctx.path, options);
      await pumpPages(out, ctx.workload);
      return {
        bytes: out.bytesWritten,
        extra: { extents: ctx.helpers.extentCount(ctx.path), ...(preallocSeconds === undefined ? {} : { preallocSeconds }) },
      };
    },
  };
}

export const rawPreallocated = rawCase({ id: 'rp', label: "raw save, preallocate: 'space' (fallocate first)", preallocate: true });
export default rawCase({ id: 'r', label: 'raw save, no preallocation (extent count)', preallocate: false });
