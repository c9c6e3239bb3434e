/**
 * (f0) the stream as it was before issue 12: 2 x 4 MiB, one native thread
 * (one write in flight), for before/after in one run. (f2) the ring of the
 * sixth and seventh rounds' defaults, 3 x 4 MiB, with the current
 * write-depth policy (the defaults are 4 x 8 MiB since the eighth round).
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
  label: 'createSnapshotStream before round 8: 3 x 4 MiB',
  buffers: 3,
  bufferSize: 4 << 20,
});
