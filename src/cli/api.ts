/**
 * The slice of the public API (src/index.ts) the command line uses, and
 * nothing deeper.
 */
export { createSnapshotStream, createImage, openImage, SnapshotError, isSnapshotError } from '../index.js';
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

/** The qcow2 layer is always present; kept for the demo's mode line. */
export function hasQcow2(): boolean {
  return true;
}
