/**
 * snapstream's public API. Nothing else lives here.
 *
 * Layers, top to bottom (nothing calls upward):
 *   src/cli -> src/index.ts -> src/vm -> src/qcow2 -> src/stream -> src/io -> native
 */
import { qcow2SinkFactory } from './qcow2/image.js';
import { rawSinkFactory } from './stream/raw-sink.js';
import { SnapshotStream } from './stream/snapshot-stream.js';
import { validatePath, validateStreamOptions, type StreamOptions } from './options.js';

export { SnapshotError, ErrorCode, isSnapshotError } from './errors.js';
export type { StreamOptions } from './options.js';
export type { ProgressEvent } from './stream/snapshot-stream.js';
export { SnapshotStream } from './stream/snapshot-stream.js';
export { openImage, Image } from './qcow2/image.js';
export type { OpenImageOptions, SnapshotInfo, CheckResult } from './qcow2/image.js';
export { createImage } from './qcow2/create.js';
export { connectVm, VmConnection } from './vm/connect.js';
export type { ConnectVmOptions } from './vm/connect.js';
export type { SaveVmOptions, SaveVmProgress, SaveVmResult, SaveVmDisk } from './vm/savevm.js';
export type { LoadVmOptions, LoadVmProgress, LoadVmResult } from './vm/loadvm.js';
export { QmpError } from './vm/qmp.js';
export type { CreateImageOptions, Preallocation } from './qcow2/create.js';

/**
 * A Writable that writes a snapshot stream to `path` at disk speed: a raw
 * file or block device, or, with `{ snapshot }`, an internal snapshot of the
 * qcow2 image at `path`. 'finish' means every byte is durable (and, for a
 * snapshot, committed).
 */
export function createSnapshotStream(path: string, options?: StreamOptions): SnapshotStream {
  const target = validatePath(path, 'path');
  const opts = validateStreamOptions(options);
  const sink = opts.snapshot !== undefined ? qcow2SinkFactory(target, opts) : rawSinkFactory(target, opts);
  return new SnapshotStream(opts, sink);
}
