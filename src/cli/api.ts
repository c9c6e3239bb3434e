/**
 * The slice of the public API (src/index.ts) the command line uses, and
 * nothing deeper.
 */
export { createSnapshotStream, createImage, openImage, connectVm, ErrorCode, SnapshotError, isSnapshotError } from '../index.js';
export type {
  StreamOptions,
  ProgressEvent,
  SnapshotStream,
  SnapshotInfo,
  CheckResult,
  Image,
  Preallocation,
  CreateImageOptions,
} from '../index.js';
