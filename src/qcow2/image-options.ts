/**
 * The options of openImage() and of Image#createSnapshotStream (the stream's
 * own options plus the guest clock to record). Validated here with the
 * shared validators; the image and the snapshot sink take the resolved values.
 */
import { resolveStreamCore, STREAM_CORE_OPTION_KEYS, type StreamConfig, type StreamCoreOptions } from '../stream/options.js';
import type { SnapshotError } from '../errors.js';
import { describe, validateBoolean, validateOptionsObject } from '../validate.js';

export interface SaveStreamOptions extends StreamCoreOptions {
  /** The guest clock recorded in the snapshot (QEMU's vm_clock_nsec), nanoseconds. Default 0. */
  vmClockNs?: number | bigint;
}

const SAVE_STREAM_OPTION_KEYS = [...STREAM_CORE_OPTION_KEYS, 'vmClockNs'] as const;

/** What the snapshot sink reads. */
export interface SnapshotSinkConfig extends StreamConfig {
  readonly vmClockNs: bigint;
}

/** vm_clock_nsec is an unsigned 64-bit field (qcow2.txt "Snapshot table"). */
export function resolveVmClock(value: unknown): bigint {
  if (value === undefined) return 0n;
  if (typeof value === 'bigint' && value >= 0n && value < 1n << 64n) return value;
  if (typeof value === 'number' && Number.isSafeInteger(value) && value >= 0) return BigInt(value);
  throw new RangeError(`Expected a non-negative 64-bit integer for options.vmClockNs, received ${describe(value)}`);
}

export function validateSaveStreamOptions(options: unknown): SnapshotSinkConfig {
  const o = validateOptionsObject<SaveStreamOptions>(options, 'options', SAVE_STREAM_OPTION_KEYS);
  return Object.freeze({ ...resolveStreamCore(o), vmClockNs: resolveVmClock(o.vmClockNs) });
}

export interface OpenImageOptions {
  /** Only read: list, export, check. Default false. */
  readOnly?: boolean;
  /** Read-only without taking QEMU's lock bytes, like `qemu-img -U`. The image may change underneath. */
  forceShare?: boolean;
}

export interface OpenImageConfig {
  readonly readOnly: boolean;
  readonly forceShare: boolean;
}

export function validateOpenImageOptions(options: unknown): OpenImageConfig {
  const o = validateOptionsObject<OpenImageOptions>(options, 'options', ['readOnly', 'forceShare']);
  const readOnly = o.readOnly === undefined ? false : validateBoolean(o.readOnly, 'options.readOnly');
  const forceShare = o.forceShare === undefined ? false : validateBoolean(o.forceShare, 'options.forceShare');
  // forceShare takes no lock, so it can only read.
  return Object.freeze({ readOnly: readOnly || forceShare, forceShare });
}

export interface BeginSaveOptions {
  /** A power of two the vmstate's start is aligned to (the O_DIRECT alignment of the writer). */
  alignment?: number;
  /** A vmstate already written at this offset (the savevm hand-off, qcow2/handoff.ts). */
  baseOffset?: number;
  /** Stops whatever writes the vmstate (called when the image is closed first). */
  cancel?: (error: SnapshotError) => void;
}
