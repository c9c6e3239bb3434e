/**
 * (f0) the stream as it was before issue 12: 2 x 4 MiB, one native thread
 * (one write in flight), for before/after in one run. (f2) a larger ring,
 * 4 x 8 MiB, with the current write-depth policy.
 */
import { snapshotStreamCase } from './f-snapshot-stream.js';

export const oldDefaults = snapshotStreamCase({
  id: 'f0',
  label: 'createSnapshotStream before: 2 x 4 MiB, 1 in flight',
  buffers: 2,
  bufferSize: 4 << 20,
  threads: 1,
});

export default snapshotStreamCase({
  id: 'f2',
  label: 'createSnapshotStream (4 x 8 MiB, O_DIRECT)',
  buffers: 4,
  bufferSize: 8 << 20,
});
