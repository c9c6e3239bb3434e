/** (c) The RFC's "easy way": the same path with the iovec limit raised to IOV_MAX (1024). */
import { IOV_MAX, qemuFileCase } from '../lib/qemu-file.js';

export default qemuFileCase({
  id: 'c',
  label: 'QEMU + IOV_MAX: 1024 iovecs, sync O_DIRECT',
  maxIov: IOV_MAX,
  sizeClass: 'fast',
});
