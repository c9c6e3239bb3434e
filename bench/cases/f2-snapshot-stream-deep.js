/** (f2) createSnapshotStream with a deeper, larger ring: 4 x 8 MiB. */
import { snapshotStreamCase } from './f-snapshot-stream.js';

export default snapshotStreamCase({
  id: 'f2',
  label: 'createSnapshotStream (4 x 8 MiB, O_DIRECT)',
  buffers: 4,
  bufferSize: 8 << 20,
});
