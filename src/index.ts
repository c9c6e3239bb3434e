/**
 * snapstream's public API. Nothing else lives here.
 */
import { rawSinkFactory } from './stream/raw-sink.js';
import { SnapshotStream } from './stream/snapshot-stream.js';
import { validatePath, validateStreamOptions, type StreamOptions } from './options.js';

export { SnapshotError, ErrorCode, isSnapshotError } from './errors.js';
export type { StreamOptions } from './options.js';
export type { ProgressEvent } from './stream/snapshot-stream.js';
export { SnapshotStream } from './stream/snapshot-stream.js';

/**
 * A Writable that writes a snapshot stream to `path` at disk speed: a raw
 * file or block device, or, with `{ snapshot }`, an internal snapshot of a
 * qcow2 image.
 */
export function createSnapshotStream(path: string, options?: StreamOptions): SnapshotStream {
  const target = validatePath(path, 'path');
  const opts = validateStreamOptions(options);
  return new SnapshotStream(opts, rawSinkFactory(target, opts));
}
