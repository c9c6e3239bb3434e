/**
 * An emulation of how QEMU writes a vmstate to an O_DIRECT image today
 * (migration/qemu-file.c + the block layer), after the RFC "qemu-file writing
 * performance improving" (D. Plotnikov, 2020):
 *
 * - qemu-file collects iovecs without copying: the 8-byte page headers (from
 *   its 32 KiB buffer) and pointers to the RAM pages. It flushes when it holds
 *   MAX_IOV_SIZE iovecs (64) or its 32 KiB buffer is full; with only 8 bytes
 *   buffered per page, the iovec limit is always hit first.
 * - A flush is a synchronous write of an unaligned range: the block layer
 *   reads the head and tail blocks (read-modify-write), copies the iovecs into
 *   an aligned bounce buffer (the headers make the vector misaligned), and
 *   issues one pwrite on the O_DIRECT descriptor, waiting for it.
 *
 * The RFC's "easy way" raises the iovec limit to IOV_MAX (1024): the same
 * path, 16x fewer flushes.
 */
import fs from 'node:fs';
import { allocAligned } from '../../dist/io/alignment.js';
import { PAIR_BYTES } from './workload.js';

export const QEMU_MAX_IOV = 64; // MAX_IOV_SIZE = MIN(IOV_MAX, 64) in qemu-file.c
export const IOV_MAX = 1024; // Linux
const BLOCK_BYTES = 4096; // the disk's O_DIRECT alignment here (statx DIOALIGN)

function alignDown(n) {
  return n - (n % BLOCK_BYTES);
}

function alignUp(n) {
  return Math.ceil(n / BLOCK_BYTES) * BLOCK_BYTES;
}

/** A writer case flushing every `maxIov` iovecs through a bounce buffer. */
export function qemuFileCase({ id, label, maxIov, sizeClass }) {
  const flushBytes = (maxIov / 2) * PAIR_BYTES;
  return {
    id,
    label,
    sizeClass,
    prepare() {
      // Room for one flush plus a head and a tail block.
      return { bounce: allocAligned(alignUp(flushBytes) + 2 * BLOCK_BYTES, BLOCK_BYTES), iov: new Array(maxIov) };
    },
    run(ctx, { bounce, iov }) {
      const { workload } = ctx;
      const fd = fs.openSync(ctx.path, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC | fs.constants.O_DIRECT, 0o600);
      let count = 0;
      let pos = 0;
      const flush = () => {
        const head = alignDown(pos);
        const lead = pos - head;
        let len = 0;
        for (let j = 0; j < count; j++) len += iov[j].byteLength;
        const end = pos + len;
        const tail = alignDown(end);
        // Read-modify-write of the partial head and tail blocks.
        if (lead > 0) fs.readSync(fd, bounce, 0, BLOCK_BYTES, head);
        if (end !== tail && tail !== head) fs.readSync(fd, bounce, tail - head, BLOCK_BYTES, tail);
        let at = lead;
        for (let j = 0; j < count; j++) {
          bounce.set(iov[j], at);
          at += iov[j].byteLength;
          iov[j] = undefined;
        }
        const span = alignUp(end) - head;
        const n = fs.writeSync(fd, bounce, 0, span, head);
        if (n !== span) throw new Error(`short O_DIRECT write: ${n} of ${span}`);
        pos = end;
        count = 0;
      };
      const { pages, headers, pageCount } = workload;
      for (let i = 0; i < pageCount; i++) {
        const k = workload.poolIndex(i);
        iov[count++] = headers[k];
        iov[count++] = pages[k];
        if (count === maxIov) flush();
      }
      if (count > 0) flush();
      fs.ftruncateSync(fd, pos);
      fs.fsyncSync(fd);
      fs.closeSync(fd);
      return { bytes: pos };
    },
  };
}
