/**
 * The options of the top-level createSnapshotStream(path, options): the
 * stream's own options (src/stream/options.ts), where in the target it
 * starts, and what the target is (a raw file, or with `snapshot` a new
 * snapshot of a qcow2 image). Validated once, here, with the shared
 * validators; the layers below take the resolved values as their own typed
 * parameters (StreamConfig, RawTargetConfig, SnapshotSinkConfig) and never
 * import this module.
 */
import { resolveVmClock } from './qcow2/image-options.js';
import { OPTION_ALIGNMENT, resolveStreamCore, STREAM_CORE_OPTION_KEYS, type StreamConfig, type StreamCoreOptions } from './stream/options.js';
import { describe, validateChoice, validateInteger, validateMultiple, validateOptionsObject, validateSnapshotName } from './validate.js';

export { DEFAULT_BUFFER_SIZE, DEFAULT_BUFFERS, MAX_BUFFER_SIZE, MAX_BUFFERS, OPTION_ALIGNMENT } from './stream/options.js';
export type { Preallocate } from './stream/options.js';

export interface StreamOptions extends StreamCoreOptions {
  /** Aligned start offset in the target. Default 0. */
  offset?: number;
  /** qcow2 only: the snapshot to create. */
  snapshot?: string;
  /** 'raw' allows writing over a file that looks like a qcow2 image. */
  format?: 'raw' | 'qcow2';
  /** Permission bits for a file snapstream creates. */
  mode?: number;
  /** qcow2 only: the guest clock recorded in the snapshot, nanoseconds. */
  vmClockNs?: number | bigint;
}

const STREAM_OPTION_KEYS = [...STREAM_CORE_OPTION_KEYS, 'offset', 'snapshot', 'format', 'mode', 'vmClockNs'] as const;

export interface ResolvedStreamOptions extends StreamConfig {
  readonly offset: number;
  readonly snapshot: string | undefined;
  readonly format: 'raw' | 'qcow2' | undefined;
  readonly mode: number;
  readonly vmClockNs: bigint;
}

export function validateStreamOptions(options: StreamOptions | undefined): ResolvedStreamOptions {
  const o = validateOptionsObject<StreamOptions>(options, 'options', STREAM_OPTION_KEYS);
  const core = resolveStreamCore(o);
  const offset = validateInteger(o.offset ?? 0, 'options.offset', 0);
  validateMultiple(offset, 'options.offset', OPTION_ALIGNMENT, false);
  const snapshot = o.snapshot === undefined ? undefined : validateSnapshotName(o.snapshot, 'options.snapshot');
  const format = o.format === undefined ? undefined : validateChoice(o.format, 'options.format', ['raw', 'qcow2'] as const);
  if (format === 'raw' && snapshot !== undefined) {
    throw new TypeError(`Expected no options.snapshot with options.format 'raw', received ${describe(snapshot)}`);
  }
  const mode = validateInteger(o.mode ?? 0o600, 'options.mode', 0, 0o7777);
  return Object.freeze({ ...core, offset, snapshot, format, mode, vmClockNs: resolveVmClock(o.vmClockNs) });
}
