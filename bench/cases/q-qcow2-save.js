/**
 * (q) and (qp): 1 GiB of vmstate saved as an internal snapshot of a qcow2
 * image, createSnapshotStream(img, { snapshot }), from creating the image to
 * the committed snapshot. DESIGN.md's target: (q) >= 0.85 x the device write reference. (qp) adds
 * `preallocate: 'space'` (vmstate run and metadata reserved up front) and
 * reports the reservation time and the extent count of the image.
 */
import { createImage, createSnapshotStream } from '../../dist/index.js';
import { pumpPages } from '../lib/pump.js';
import { timeReservation } from './r-raw-prealloc.js';

/** A disk of 1 GiB: the vmstate area starts right after it (one L2 table of 64 KiB clusters covers 512 MiB). */
const DISK_BYTES = 1 << 30;

export function qcow2Case({ id, label, preallocate }) {
  return {
    id,
    label,
    sizeClass: 'fast',
    verifiable: false,
    // The file is an image holding the stream, so its size is not the stream's.
    container: true,
    async run(ctx) {
      await createImage(ctx.path, { size: DISK_BYTES, overwrite: true });
      const expectedSize = ctx.workload.streamBytes;
      const options = { snapshot: 'bench', direct: true, ...(preallocate ? { preallocate: 'space', expectedSize } : {}) };
      // Timed on its own first (the free tail it leaves is where the save then allocates);
      // the stream's own reservation then finds the space allocated.
      const preallocSeconds = preallocate ? await timeReservation(ctx.path, expectedSize, false) : undefined;
      const out = createSnapshotStream(ctx.path, options);
      await pumpPages(out, ctx.workload);
      if (out.direct !== true) throw new Error(`(${id}) expected O_DIRECT in effect, got direct=${out.direct}`);
      return {
        bytes: out.bytesWritten,
        extra: { extents: ctx.helpers.extentCount(ctx.path), ...(preallocSeconds === undefined ? {} : { preallocSeconds }) },
      };
    },
  };
}

export const qcow2Preallocated = qcow2Case({ id: 'qp', label: "qcow2 save, preallocate: 'space'", preallocate: true });
export default qcow2Case({ id: 'q', label: 'qcow2 save: createSnapshotStream(img, { snapshot })', preallocate: false });
