/**
 * A sink is where a SnapshotStream's bytes go: a direct-I/O target file, the
 * offset where logical byte 0 lands, and what to do at the end. The raw sink
 * truncates and syncs; the qcow2 sink commits a snapshot.
 */
import type { TargetFile } from '../io/target-file.js';

/**
 * Native I/O threads for a stream's target: the most writes the disk can see
 * at once. Two, and the ring's DepthTuner (depth-tuner.ts) measures whether
 * this device does better with one or two and keeps the better. With one
 * write at a time the next queued buffer still starts the moment the
 * previous pwrite returns, on the native thread, with no JS round trip.
 */
export const STREAM_IO_THREADS = 2;

/** A piece of one buffer write: buffer bytes [from, to) go to file offset `position`. */
export interface WritePiece {
  from: number;
  to: number;
  position: number;
}

export interface StreamSink {
  readonly file: TargetFile;
  /** File offset of logical byte 0; a multiple of file.alignment. */
  readonly baseOffset: number;
  /** Most logical bytes the sink can take, when bounded. */
  readonly maxLength: number | undefined;
  /**
   * Where the buffer for logical bytes [logical, logical + length) goes, when
   * the sink's space is not one contiguous run from baseOffset (a qcow2
   * vmstate spread over reused free runs): one file offset, or pieces when
   * the buffer crosses the end of a run. Called once per buffer.
   */
  readonly place?: (logical: number, length: number) => number | WritePiece[];
  /**
   * Every byte up to `paddedEnd` (file offset, aligned, zero-padded past the
   * logical end) has been written. Make it durable and meaningful.
   */
  finalize(logicalLength: number, paddedEnd: number): Promise<void>;
  /**
   * Optional read-modify-write of the tail: buffer[from, to) is zero padding
   * about to be written at file offset position + from. A sink whose target
   * has bytes of its own there fills it with them, so the padding keeps them.
   */
  fillTail?(buffer: Uint8Array, from: number, to: number, position: number): Promise<void>;
  /** The stream failed or was destroyed; no I/O is in flight. Undo what can be undone. */
  abort(error: Error | null): Promise<void>;
  /** Release the file and any locks; called exactly once, last. */
  close(): Promise<void>;
}

export type SinkFactory = () => Promise<StreamSink>;
