/**
 * A sink is where a SnapshotStream's bytes go: a direct-I/O target file, the
 * offset where logical byte 0 lands, and what to do at the end. The raw sink
 * truncates and syncs; the qcow2 sink commits a snapshot.
 */
import type { TargetFile } from '../io/target-file.js';

/**
 * Native I/O threads for a stream's target. One: the ring queues the next
 * full buffer behind the running write, so the thread starts it the moment
 * the previous pwrite returns, with no JS round trip, and the disk sees one
 * sequential 4 MiB write after another. Measured here (npm run bench, same
 * run): the addon's own writer did 1705 MiB/s with 1 write in flight against
 * 1500 with 2, and the stream went from 0.89x to 1.04x of the 2-in-flight
 * device reference when it dropped from 2 threads to 1.
 */
export const STREAM_IO_THREADS = 1;

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
  /** The stream failed or was destroyed; no I/O is in flight. Undo what can be undone. */
  abort(error: Error | null): Promise<void>;
  /** Release the file and any locks; called exactly once, last. */
  close(): Promise<void>;
}

export type SinkFactory = () => Promise<StreamSink>;
