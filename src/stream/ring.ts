/**
 * The ring: N aligned buffers, each FREE -> FILLING -> IN_FLIGHT -> FREE.
 * Allocated once when the stream opens; the hot path only moves indices.
 *
 * A full buffer goes straight to the target's native I/O thread: there is no
 * JS-side queue, because the ring already bounds what can be in flight (at
 * most N buffers) and the native thread runs writes in submission order.
 */
import { assert, internalError } from '../assert.js';
import { toSnapshotError, type SnapshotError } from '../errors.js';
import { returnZeroedBuffer } from '../io/buffer-pool.js';
import type { TargetFile } from '../io/target-file.js';
import { DepthTuner } from './depth-tuner.js';
import type { WritePiece } from './sink.js';

export const FREE = 0;
export const FILLING = 1;
export const IN_FLIGHT = 2;

/** Called on the JS thread when a submitted buffer's write finished or failed; the buffer is FREE again. */
export type SlotDone = (logicalBytes: number, error: SnapshotError | undefined) => void;

export class Ring {
  readonly buffers: Uint8Array[];
  readonly bufferSize: number;
  private readonly _file: TargetFile;
  private readonly _state: Uint8Array;
  private readonly _logicalBytes: Float64Array; // per IN_FLIGHT buffer: stream bytes it carries (the rest is padding)
  private readonly _submittedBytes: Float64Array; // per IN_FLIGHT buffer: bytes handed to the disk
  private readonly _dirtyBytes: Float64Array; // per buffer: the most bytes it ever carried, what wipe() clears
  private readonly _tuner: DepthTuner;
  private readonly _onOk: (() => void)[] = [];
  private readonly _onFail: ((err: unknown) => void)[] = [];
  private readonly _done: SlotDone;
  private readonly _flushInterval: number;
  private _next = 0; // where the search for a FREE buffer starts, to keep file order simple
  private _inFlight = 0;
  /** Bytes written since the last flush started; whether one runs now; flushes started (diagnostics). */
  private _unflushed = 0;
  private _flushing = false;
  private _flushes = 0;
  private readonly _idleWaiters: (() => void)[] = [];

  /** `flushInterval`: bytes written between fdatasync calls during the stream; 0 for none. */
  constructor(file: TargetFile, count: number, bufferSize: number, done: SlotDone, flushInterval: number) {
    assert(count >= 2 && bufferSize > 0 && bufferSize % file.alignment === 0, 'ring geometry');
    assert(Number.isSafeInteger(flushInterval) && flushInterval >= 0, 'flush interval');
    this._file = file;
    this._done = done;
    this._flushInterval = flushInterval;
    this.bufferSize = bufferSize;
    this.buffers = [];
    for (let i = 0; i < count; i++) {
      // The ring of a stream before, when the pool holds one (its first fill is then not a first touch).
      this.buffers.push(file.takePooledBuffer(bufferSize));
      // One pre-bound pair per buffer, so a submit allocates no closure.
      this._onOk.push(() => this._complete(i, undefined));
      this._onFail.push((err: unknown) => this._complete(i, toSnapshotError(err)));
    }
    this._state = new Uint8Array(count);
    this._logicalBytes = new Float64Array(count);
    this._submittedBytes = new Float64Array(count);
    this._dirtyBytes = new Float64Array(count);
    this._tuner = new DepthTuner(file);
  }

  /** Chooses how many of the writes in flight the disk sees at once. */
  get tuner(): DepthTuner {
    return this._tuner;
  }

  /** fdatasync calls started during the stream so far (flushInterval). */
  get flushes(): number {
    return this._flushes;
  }

  /** Writes submitted and not yet completed. */
  get inFlight(): number {
    return this._inFlight;
  }

  /** Index of a FREE buffer, now FILLING, or -1 when all are busy. */
  acquire(): number {
    const n = this._state.length;
    for (let k = 0; k < n; k++) {
      const i = (this._next + k) % n;
      if (this._state[i] === FREE) {
        this._state[i] = FILLING;
        this._next = (i + 1) % n;
        return i;
      }
    }
    return -1;
  }

  /**
   * Hands the first `length` bytes of FILLING buffer `index` to the target at
   * file offset `position`; `logicalBytes` of them are stream data.
   */
  submit(index: number, length: number, logicalBytes: number, position: number | readonly WritePiece[]): void {
    const alignment = this._file.alignment;
    assert(this._state[index] === FILLING, 'only a FILLING buffer is submitted');
    assert(length > 0 && length <= this.bufferSize && length % alignment === 0, 'submit length is aligned and fits the buffer');
    if (typeof position === 'number') assert(position % alignment === 0, 'submit position is aligned');
    else assertPieces(position, length, alignment);
    assert(logicalBytes > 0 && logicalBytes <= length, 'logical bytes fit the submitted length');
    this._state[index] = IN_FLIGHT;
    this._logicalBytes[index] = logicalBytes;
    this._submittedBytes[index] = length;
    if (length > (this._dirtyBytes[index] as number)) this._dirtyBytes[index] = length;
    this._inFlight++;
    assert(this._inFlight <= this._state.length, 'in flight <= buffers');
    this._tuner.submitted(this._inFlight);
    const buffer = this.buffers[index] as Uint8Array;
    const data = length === buffer.byteLength ? buffer : buffer.subarray(0, length);
    const write = typeof position === 'number' ? this._file.write(data, position) : writePieces(this._file, data, position);
    write.then(this._onOk[index], this._onFail[index]);
  }

  private _complete(index: number, error: SnapshotError | undefined): void {
    // Runs from a promise reaction: a throw here would be an unhandled
    // rejection, so a broken invariant is reported as the write's error.
    let err = error;
    if (this._state[index] !== IN_FLIGHT || this._inFlight <= 0) err ??= internalError('a completed buffer was IN_FLIGHT');
    this._state[index] = FREE;
    this._inFlight = Math.max(0, this._inFlight - 1);
    if (err === undefined) {
      try {
        this._tuner.completed(this._submittedBytes[index] as number, this._inFlight);
      } catch (thrown) {
        // The tuner changes the target's depth: a failure there fails this write, never escapes.
        err = toSnapshotError(thrown);
      }
    }
    if (err === undefined) this._unflushed += this._submittedBytes[index] as number;
    // One flush at a time: while one runs, the bytes written meanwhile wait for the next. Started
    // before _done, so that a teardown _done sets off (destroy from a listener) waits for it too.
    if (err === undefined && this._flushInterval > 0 && this._unflushed >= this._flushInterval && !this._flushing && !this._file.closed) this._flush();
    this._done(this._logicalBytes[index] as number, err);
    this._wakeIfIdle();
  }

  /**
   * fdatasync of what has been written so far, queued on the target's native
   * threads behind the writes already queued, not awaited by the producer.
   * It is not a barrier: a write submitted meanwhile may or may not be
   * covered, and the sink's final flush covers everything. A failure fails
   * the stream like a failed write: a write-back error is never lost.
   */
  private _flush(): void {
    this._flushing = true;
    this._unflushed = 0;
    this._flushes++;
    let flushed: Promise<void>;
    try {
      flushed = this._file.datasync();
    } catch (err) {
      // Runs inside a write's completion: nothing may throw out of it.
      flushed = Promise.reject(err as Error);
    }
    flushed.then(
      () => this._flushed(undefined),
      (err: unknown) => this._flushed(toSnapshotError(err)),
    );
  }

  private _flushed(error: SnapshotError | undefined): void {
    this._flushing = false;
    if (error !== undefined) this._done(0, error);
    this._wakeIfIdle();
  }

  private _wakeIfIdle(): void {
    if (this._inFlight === 0 && !this._flushing) {
      for (const wake of this._idleWaiters.splice(0)) wake();
    }
  }

  /** Someone awaits idle() and will see the outcome of the writes in flight. */
  get awaited(): boolean {
    return this._idleWaiters.length > 0;
  }

  /** Resolves when no write and no flush is in flight. */
  idle(): Promise<void> {
    if (this._inFlight === 0 && !this._flushing) return Promise.resolve();
    return new Promise((resolve) => {
      this._idleWaiters.push(resolve);
    });
  }

  /**
   * Overwrites every byte the stream put in a buffer, so VM memory does not
   * linger after the stream; pages never written stay untouched (a short
   * stream does not fault in the whole ring just to clear it).
   */
  wipe(fillingBytes = 0): void {
    for (let i = 0; i < this.buffers.length; i++) {
      const dirty = Math.max(this._dirtyBytes[i] as number, this._state[i] === FILLING ? fillingBytes : 0);
      (this.buffers[i] as Uint8Array).fill(0, 0, Math.min(dirty, this.bufferSize));
      this._dirtyBytes[i] = 0;
    }
  }

  /**
   * After the last wipe(), with nothing in flight: the buffers go back to the
   * process's pool for the next stream, and this ring has none left.
   */
  release(): void {
    assert(this._inFlight === 0 && !this._flushing, 'a ring is released only when idle');
    for (let i = 0; i < this.buffers.length; i++) {
      assert(this._dirtyBytes[i] === 0, 'a ring is released only once wiped');
      returnZeroedBuffer(this.buffers[i] as Uint8Array);
    }
    this.buffers.length = 0;
  }
}

/**
 * A buffer whose bytes go to several places (a sink spread over runs, see
 * StreamSink.place): written piece by piece in order, completing once. Rare:
 * only a buffer that crosses the end of a run.
 */
async function writePieces(file: TargetFile, data: Uint8Array, pieces: readonly WritePiece[]): Promise<void> {
  for (const p of pieces) await file.write(data.subarray(p.from, p.to), p.position);
}

function assertPieces(pieces: readonly WritePiece[], length: number, alignment: number): void {
  assert(pieces.length > 0 && pieces[0]!.from === 0 && pieces[pieces.length - 1]!.to === length, 'pieces cover the buffer');
  for (let i = 0; i < pieces.length; i++) {
    const p = pieces[i]!;
    assert(p.from % alignment === 0 && p.position % alignment === 0 && p.to > p.from, 'pieces are aligned');
    assert(i === 0 || pieces[i - 1]!.to === p.from, 'pieces are contiguous in the buffer');
  }
}
