/** (b) QEMU today: 64-iovec flushes, bounce buffer, synchronous O_DIRECT pwrite with head/tail RMW. */
import { QEMU_MAX_IOV, qemuFileCase } from '../lib/qemu-file.js';

export default qemuFileCase({
  id: 'b',
  label: 'QEMU today: 64 iovecs, sync O_DIRECT',
  maxIov: QEMU_MAX_IOV,
  sizeClass: 'slow',
});
