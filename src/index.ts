/**
 * snapstream's public API. Nothing else lives here.
 *
 * Layers, top to bottom; data flows down and nothing calls upward
 * (DESIGN.md "Layers"):
 *
 *   src/cli/     argument parsing, progress, exit codes      -> src/index.ts
 *   src/index.ts this API (options for a path: src/options.ts)
 *   src/vm/      QMP client, savevm/loadvm of a running QEMU (DESIGN.md "Checkpoint and restore")
 *   src/qcow2/   the image, its on-disk structures, the save sink
 *   src/stream/  SnapshotStream: the ring, backpressure, progress
 *   src/io/      TargetFile: typed facade over the addon
 *   native/      the addon: syscalls and threads
 *
 * src/errors.ts (the error codes), src/validate.ts (the shared validators)
 * and src/qcow2-magic.ts are leaves that every layer may import.
 */
import { qcow2SinkFactory } from './qcow2/image.js';
import { rawSinkFactory } from './stream/raw-sink.js';
import { SnapshotStream } from './stream/snapshot-stream.js';
import { validateStreamOptions, type StreamOptions } from './options.js';
import { validatePath, type PathLike } from './validate.js';

export { SnapshotError, ErrorCode, isSnapshotError } from './errors.js';
export type { StreamOptions } from './options.js';
export type { PathLike } from './validate.js';
export type { ProgressEvent } from './stream/snapshot-stream.js';
export { SnapshotStream } from './stream/snapshot-stream.js';
export { openImage, Image } from './qcow2/image.js';
export type { OpenImageOptions, SaveStreamOptions, SnapshotInfo, CheckResult } from './qcow2/image.js';
export type { VmStateReadOptions, VmStateReadStream } from './qcow2/vmstate-reader.js';
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
export function createSnapshotStream(path: PathLike, options?: StreamOptions): SnapshotStream {
  const target = validatePath(path, 'path');
  const opts = validateStreamOptions(options);
  const sink = opts.snapshot !== undefined ? qcow2SinkFactory(target, opts.snapshot, opts) : rawSinkFactory(target, opts);
  return new SnapshotStream(opts, sink);
}
