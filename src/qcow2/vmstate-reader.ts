/**
 * Reads a snapshot's saved VM state: the bytes at guest offset
 * ceil(disk_size / L2 coverage) * L2 coverage through the SNAPSHOT's L1 table
 * (never the active one), exactly vm_state_size of them. Unallocated and zero
 * clusters read as zeros without I/O, as QEMU's loadvm sees them.
 *
 * The data goes through a second, read-only descriptor of the image, opened
 * with O_DIRECT where the filesystem allows (metadata still comes through the
 * image's buffered file). Reads are aligned: host runs are whole clusters, and
 * when the descriptor's alignment exceeds the cluster size (512-byte clusters
 * on a 4 KiB-sector disk) the aligned superset is read and sliced. Up to
 * `readAhead` chunks are held at once (in flight, ready, or buffered in the
 * Readable), so the next read runs while the consumer handles this chunk.
 *
 * Buffers: as a Readable, every chunk is read into its own aligned buffer
 * that is pushed as is, so the consumer owns what it gets and may keep it:
 * one buffer per chunk (4 MiB by default), no copy. Fresh memory is what
 * costs here (docs/performance.md, seventh and eighth rounds): cleared on the
 * JS thread or faulted in by the read. So a chunk is a slab
 * (src/io/chunk-slabs.ts) that the process reuses once V8 has collected the
 * chunk it last held, on huge pages when it spans two or more; a slab's pages
 * not mapped yet are mapped on a thread of its own (Prefaulter) while earlier
 * chunks are read; `readAhead` chunks are under way at once. A slab holds
 * an earlier chunk's bytes, so every byte of it is written before the push.
 * pumpTo() lends chunks from reused slots instead and needs none of this.
 */
import { Readable } from 'node:stream';
import { ErrorCode, SnapshotError, toSnapshotError } from '../errors.js';
import { alignDown, alignUp, ioBufferAlignment, usesHugePages } from '../io/alignment.js';
import { allocSlab } from '../io/chunk-slabs.js';
import { Prefaulter } from '../io/prefaulter.js';
import { TargetFile, type DirectMode } from '../io/target-file.js';
import { MAX_BUFFER_SIZE, MAX_BUFFERS } from '../stream/options.js';
import { validateChoice, validateInteger, validateOptionsObject } from '../validate.js';
import type { L1Table, L2Table } from './cluster-map.js';
import { corrupt, invariant, unsupported } from './fail.js';
import { readL2, readSnapshotL1, refuseListOnly, type ImageState } from './image-state.js';
import { toSnapshotInfo, type SnapshotInfo } from './snapshot-info.js';
import type { SnapshotEntry } from './snapshot-table.js';

/**
 * Bytes per chunk pushed downstream: 4 MiB, the writer's buffer size too.
 * Every chunk is fresh memory the consumer owns, and the export's memory
 * bound is readAhead x chunk, each with the huge page of slack its alignment
 * may take (docs/performance.md).
 */
export const VMSTATE_READ_CHUNK_BYTES = 4 * 1024 * 1024;
/**
 * Four chunks under way: being prefaulted, read, or waiting for the consumer.
 * A Readable's chunks are fresh memory, and mapping it in is as slow as the
 * read here (docs/performance.md, seventh round): with two, mapping ran no
 * further ahead than reading; four measured best of 2, 3, 4 and 6, and as
 * well as three 8 MiB chunks. pumpTo reuses this many slots.
 */
export const DEFAULT_READ_AHEAD = 4;
/**
 * Native threads of the data descriptor: when the consumer is waiting, two
 * held chunks are read at once. Measured here (docs/performance.md): 0.95-1.2x
 * the export rate of one thread on a loop disk, 1.12x on a throttled one.
 */
const READ_IO_THREADS = 2;
/** Smallest chunk: one 4 KiB page; a chunk is rounded to whole clusters anyway. */
const MIN_CHUNK_BYTES = 4096;

export interface VmStateReadOptions {
  /** Bytes per chunk, rounded down to whole clusters (at least one). Default 4 MiB. */
  chunkBytes?: number;
  /** Chunks held at once (mapping, reading, ready or buffered); memory is readAhead x chunk, each with up to a huge page of alignment slack. Default 4. */
  readAhead?: number;
  /** O_DIRECT for the data reads: true, false, or 'auto' (where the filesystem allows). Default 'auto'. */
  direct?: DirectMode;
  /** How the snapshot is named: 'name' (default, as loadvm looks it up) or 'id' (exactly that entry). */
  by?: 'name' | 'id';
}

export interface ResolvedVmStateReadOptions {
  readonly chunkBytes: number;
  readonly readAhead: number;
  readonly direct: DirectMode;
  readonly by: 'name' | 'id';
}

/** Validates once, at the edge: TypeError/RangeError naming the option. */
export function validateVmStateReadOptions(options: unknown): ResolvedVmStateReadOptions {
  const o = validateOptionsObject<VmStateReadOptions>(options, 'options', ['chunkBytes', 'readAhead', 'direct', 'by']);
  const chunkBytes = validateInteger(o.chunkBytes ?? VMSTATE_READ_CHUNK_BYTES, 'options.chunkBytes', MIN_CHUNK_BYTES, MAX_BUFFER_SIZE);
  const readAhead = validateInteger(o.readAhead ?? DEFAULT_READ_AHEAD, 'options.readAhead', 1, MAX_BUFFERS);
  const direct = validateChoice<DirectMode>(o.direct ?? 'auto', 'options.direct', [true, false, 'auto']);
  const by = validateChoice(o.by ?? 'name', 'options.by', ['name', 'id'] as const);
  return Object.freeze({ chunkBytes, readAhead, direct, by });
}

/** Host offset of vmstate cluster `k`, 0 for zeros; throws for compressed or invalid entries. */
type ClusterLookup = (k: number) => Promise<number>;

function makeLookup(state: ImageState, l1: L1Table, entry: SnapshotEntry): ClusterLookup {
  const { layout } = state;
  const vmIndex = layout.vmStateL1Index(entry.diskSize);
  // The promise is cached, not the table: chunks filled concurrently share one L2 read.
  let cached: { index: number; table: Promise<L2Table | undefined> } | undefined;
  return async (k) => {
    const l1Index = vmIndex + Math.floor(k / layout.l2Entries);
    if (cached?.index !== l1Index) {
      const l2Offset = l1Index < l1.entries ? l1.l2Offset(l1Index) : 0;
      cached = { index: l1Index, table: l2Offset === 0 ? Promise.resolve(undefined) : readL2(state, l2Offset) };
    }
    const table = await cached.table;
    if (table === undefined) return 0;
    const c = table.entry(k % layout.l2Entries);
    if (c.kind === 'compressed') throw unsupported(`compressed vmstate cluster in snapshot '${entry.name}'`);
    if (c.kind !== 'normal') return 0;
    if (c.hostOffset + layout.clusterSize > layout.alignUp(state.fileSizeBytes)) {
      throw corrupt(`vmstate cluster ${k} of snapshot '${entry.name}' is past the end of the file`, {
        offset: c.hostOffset,
      });
    }
    return c.hostOffset;
  };
}

/** Host clusters [hostOffset, +lengthBytes) land at chunk[chunkOffset...]. */
interface HostRun {
  chunkOffset: number;
  hostOffset: number;
  lengthBytes: number;
}

/** Merges the chunk's clusters into contiguous host runs; zero clusters are left out (the chunk is zeroed). */
async function planRuns(lookup: ClusterLookup, firstCluster: number, clusters: number, clusterSize: number): Promise<HostRun[]> {
  const runs: HostRun[] = [];
  for (let k = firstCluster; k < firstCluster + clusters; k++) {
    const host = await lookup(k);
    if (host === 0) continue;
    const last = runs[runs.length - 1];
    const chunkOffset = (k - firstCluster) * clusterSize;
    if (last !== undefined && last.chunkOffset + last.lengthBytes === chunkOffset && last.hostOffset + last.lengthBytes === host) {
      last.lengthBytes += clusterSize;
    } else {
      runs.push({ chunkOffset, hostOffset: host, lengthBytes: clusterSize });
    }
  }
  return runs;
}

/**
 * Zeroes every byte of `slot` that no run covers: zero and unallocated
 * clusters, the alignment tail, and whatever an aligned superset read placed
 * past its run. `runs` are in ascending chunk order and do not overlap.
 */
function zeroOutsideRuns(slot: Uint8Array, runs: readonly HostRun[]): void {
  let at = 0;
  for (const run of runs) {
    invariant(run.chunkOffset >= at, 'vmstate runs ascend without overlap');
    if (run.chunkOffset > at) slot.fill(0, at, run.chunkOffset);
    at = run.chunkOffset + run.lengthBytes;
  }
  if (at < slot.length) slot.fill(0, at);
}

type Callback = (error?: Error | null) => void;

/** Calls the sink; its throw, or a value that is not a promise, becomes a settled promise. */
function lend(sink: (chunk: Buffer) => unknown, chunk: Buffer): Promise<unknown> {
  try {
    return Promise.resolve(sink(chunk));
  } catch (err) {
    return Promise.reject(err as Error);
  }
}

export class VmStateReadStream extends Readable {
  /** The snapshot being read (as resolved from the name asked for). */
  readonly snapshot: SnapshotInfo;
  private readonly _state: ImageState;
  private readonly _entry: SnapshotEntry;
  private readonly _opts: ResolvedVmStateReadOptions;
  /** Clusters per chunk, and the bytes of vmstate each chunk covers (the stride). */
  private readonly _chunkClusters: number;
  private readonly _strideBytes: number;
  private readonly _chunkCount: number;
  private _file: TargetFile | undefined;
  private _direct: boolean | undefined;
  private _lookup: ClusterLookup | undefined;
  /** Read alignment of the data descriptor: its DIO alignment under O_DIRECT, else 1. */
  private _alignment = 1;
  /** Maps a Readable's fresh chunks in ahead of their reads (created with the first). */
  private _prefaulter: Prefaulter | undefined;
  /** Next chunk to start reading, next chunk to push. */
  private _nextRead = 0;
  private _nextPush = 0;
  private readonly _inFlight = new Map<number, Promise<void>>();
  private readonly _ready = new Map<number, Buffer>();
  /** The consumer asked for data (_read) and push() has not said stop since. */
  private _wanted = false;
  private _failed = false;
  /** The descriptor and the cluster lookup, once _construct has run. */
  private _opened: Promise<void> | undefined;
  /** Consumed through pumpTo(), not as a Readable. */
  private _pumping = false;
  /** The Readable side asked for data (_read ran): pumpTo is refused from then on. */
  private _readAsStream = false;

  constructor(state: ImageState, entry: SnapshotEntry, options: ResolvedVmStateReadOptions) {
    // highWaterMark 1 byte: push() says stop after each chunk, so the Readable
    // buffers at most one, and that one counts against readAhead (_held).
    super({ highWaterMark: 1 });
    const { clusterSize } = state.layout;
    this.snapshot = toSnapshotInfo(entry);
    this._state = state;
    this._entry = entry;
    this._opts = options;
    this._chunkClusters = Math.max(1, Math.floor(options.chunkBytes / clusterSize));
    this._strideBytes = this._chunkClusters * clusterSize;
    this._chunkCount = Math.ceil(entry.vmStateSize / this._strideBytes);
  }

  /** O_DIRECT is in effect on the data descriptor (undefined until it is open, or with nothing to read). */
  get direct(): boolean | undefined {
    return this._direct;
  }

  /** Offset and length alignment of the data reads (1 when buffered). */
  get alignment(): number {
    return this._alignment;
  }

  override _construct(callback: Callback): void {
    this._opened ??= this._open();
    this._opened.then(
      () => callback(),
      (err: unknown) => callback(toSnapshotError(err)),
    );
  }

  private async _open(): Promise<void> {
    const l1 = await readSnapshotL1(this._state, this._entry);
    this._lookup = makeLookup(this._state, l1, this._entry);
    if (this._chunkCount === 0) return; // nothing to read: no descriptor
    const threads = Math.min(READ_IO_THREADS, this._opts.readAhead);
    const file = await TargetFile.open(this._state.file.path, { write: false, direct: this._opts.direct, threads });
    this._file = file;
    this._direct = file.direct;
    this._alignment = file.direct ? Math.max(file.alignment, file.memoryAlignment) : 1;
  }

  override _read(): void {
    this._readAsStream = true;
    if (this._pumping) {
      this._fail(this._consumedError());
      return;
    }
    this._wanted = true;
    // Readable#read() calls _read before it takes the buffered chunk; pumping
    // on the next microtask sees it gone, so _held() lets the next read start.
    queueMicrotask(() => this._pump());
  }

  /** Pushes ready chunks in order while wanted, then keeps readAhead chunks held. */
  private _pump(): void {
    if (this._failed || this.destroyed || this._pumping) return;
    for (let chunk = this._ready.get(this._nextPush); this._wanted && chunk !== undefined; chunk = this._ready.get(this._nextPush)) {
      this._ready.delete(this._nextPush);
      this._nextPush++;
      this._wanted = this.push(chunk);
    }
    if (this._wanted && this._nextPush === this._chunkCount) {
      this._wanted = false;
      this.push(null);
      return;
    }
    // A consumer may have destroyed the stream from inside push().
    if (this._failed || this.destroyed) return;
    while (this._nextRead < this._chunkCount && this._held() < this._opts.readAhead) {
      const index = this._nextRead++;
      const read = this._fill(index)
        .then(
          (chunk) => {
            this._inFlight.delete(index);
            this._ready.set(index, chunk);
            this._pump();
          },
          (err: unknown) => {
            this._inFlight.delete(index);
            this._fail(err);
          },
        )
        .catch((err: unknown) => this._fail(err)); // a throw in _pump must not become an unhandled rejection
      this._inFlight.set(index, read);
    }
  }

  /** Chunks this stream holds memory for: being read, ready, and buffered in the Readable. */
  private _held(): number {
    return this._inFlight.size + this._ready.size + Math.ceil(this.readableLength / this._strideBytes);
  }

  private _fail(err: unknown): void {
    if (this._failed) return;
    this._failed = true;
    this.destroy(toSnapshotError(err));
  }

  /**
   * The vmstate handed to `sink` chunk by chunk, in order, without the
   * Readable machinery and without fresh memory per chunk: `readAhead`
   * aligned slots are read into and reused.
   *
   * The chunks are lent, not given: a chunk is valid until the promise `sink`
   * returned for it settles, and its memory is then read into again (and
   * zeroed when the pump ends). Copy what must outlive that. The next chunk
   * may be handed over before that promise settles (a sink that queues in
   * order, as a socket send does, keeps its device busy); up to `readAhead`
   * chunks are read or lent at once.
   *
   * Why: every chunk a Readable pushes is fresh memory the consumer owns, and
   * on Node 20 that allocation rate keeps V8 in back-to-back mark-compacts
   * (docs/performance.md, fifth round). Lending reused slots costs about a
   * sixth of the CPU.
   *
   * Resolves when `sink` has settled for the last chunk. Rejects with the
   * first failure: a read's, `sink`'s (a throw or a rejection), or
   * IMAGE_CLOSED when the image is closed meanwhile; nothing is handed to
   * `sink` after that. The stream is closed when this settles. A stream is
   * consumed once: pumpTo on a stream already read as a Readable, a second
   * pumpTo, or reading it as a Readable while it pumps fail with
   * STREAM_CONSUMED.
   */
  async pumpTo(sink: (chunk: Buffer) => unknown): Promise<void> {
    if (typeof sink !== 'function') throw new TypeError(`Expected a function as the sink, received ${sink === null ? 'null' : typeof sink}`);
    if (this._pumping || this._readAsStream) throw this._consumedError();
    this._failOnStop();
    this._pumping = true;
    // Errors reach the caller through the returned promise; without a listener
    // a failed open (destroy from _construct) would be an uncaught 'error'.
    this.on('error', () => undefined);
    const pending: Array<Promise<unknown>> = [];
    let slots: Uint8Array[] = [];
    try {
      await this._whenOpen();
      const file = this._file;
      const slotCount = Math.min(this._opts.readAhead, this._chunkCount);
      const slotBytes = alignUp(this._strideBytes, this._alignment);
      // Zeroed (allocBuffer): slots of two huge pages or more go on huge pages (src/io/alignment.ts).
      slots = Array.from({ length: slotCount }, () => file!.allocBuffer(slotBytes));
      // slotFree[k]: settles when the sink is done with slot k's last chunk.
      const slotFree: Array<Promise<unknown>> = slots.map(() => Promise.resolve());
      // The first rejection of `sink`: once it is seen, nothing more is lent.
      let refused: { error: unknown } | undefined;
      const reads: Array<Promise<Buffer> | undefined> = [];
      const startRead = (index: number): void => {
        const read = slotFree[index % slotCount]!.then(() => this._failOnStop()).then(() => this._fill(index, slots[index % slotCount]));
        reads[index] = read;
        this._track(index, read, pending);
      };
      for (let index = 0; index < slotCount; index++) startRead(index);
      for (let index = 0; index < this._chunkCount; index++) {
        const chunk = await reads[index]!;
        reads[index] = undefined;
        if (refused !== undefined) throw refused.error;
        // Stopped meanwhile (the image closed, or read as a Readable): nothing
        // more is lent, even when every remaining read had already started.
        this._failOnStop();
        const sent = lend(sink, chunk);
        pending.push(sent.catch((error: unknown) => void (refused ??= { error })));
        slotFree[index % slotCount] = sent;
        if (index + slotCount < this._chunkCount) startRead(index + slotCount);
      }
      await Promise.all(slotFree);
    } finally {
      // Nothing may still read into a slot or send from one when the descriptor closes.
      await Promise.allSettled(pending);
      // The slots held VM memory; as the ring does, leave none of it behind.
      for (const slot of slots) slot.fill(0);
      this.destroy();
      if (!this.closed) await new Promise((resolve) => this.once('close', resolve));
    }
  }

  private _consumedError(): SnapshotError {
    const how = this._pumping ? 'is being pumped (pumpTo)' : 'was read as a Readable';
    return new SnapshotError(ErrorCode.STREAM_CONSUMED, `the export of snapshot '${this._entry.name}' ${how}: a stream is consumed once`, {
      path: this._state.file.path,
    });
  }

  /** The open of _construct, started here when pumpTo comes first (_construct runs on the next tick). */
  private _whenOpen(): Promise<void> {
    this._opened ??= this._open();
    return this._opened;
  }

  /**
   * Throws the stream's end once it is destroyed, so a pump stops between
   * chunks: the error it was destroyed with (image closed, STREAM_CONSUMED),
   * else IMAGE_CLOSED.
   */
  private _failOnStop(): void {
    if (!this.destroyed) return;
    if (this.errored instanceof SnapshotError) throw this.errored;
    throw new SnapshotError(ErrorCode.IMAGE_CLOSED, `the export of snapshot '${this._entry.name}' was stopped`);
  }

  /** Lists a pumped read in _inFlight (teardown waits for it) and in `pending`. */
  private _track(index: number, read: Promise<unknown>, pending: Array<Promise<unknown>>): void {
    const settled = read.then(
      () => undefined,
      () => undefined,
    );
    this._inFlight.set(index, settled);
    void settled.then(() => this._inFlight.delete(index));
    pending.push(settled);
  }

  /** Reads chunk `index` into `slot` (default: a fresh aligned buffer); returns its vmstate bytes. */
  private async _fill(index: number, slot?: Uint8Array): Promise<Buffer> {
    const { clusterSize } = this._state.layout;
    const file = this._file;
    const lookup = this._lookup;
    invariant(file !== undefined && lookup !== undefined, 'vmstate chunk read before open');
    const position = index * this._strideBytes;
    const lengthBytes = Math.min(this._strideBytes, this._entry.vmStateSize - position);
    const clusters = Math.ceil(lengthBytes / clusterSize);
    // Whole clusters, so a run's length is aligned whenever the cluster size is.
    let view = slot;
    let runs: HostRun[];
    if (view === undefined) {
      // A slab (src/io/chunk-slabs.ts) is uninitialised, so every byte of it is written below,
      // by the runs' reads and zeroOutsideRuns, before the consumer sees it.
      const length = alignUp(clusters * clusterSize, this._alignment);
      const slab = allocSlab(length, ioBufferAlignment(file.memoryAlignment, file.alignment));
      view = slab?.view ?? file.allocBuffer(length);
      // New memory's pages are mapped in on the prefaulter's thread while the
      // cluster lookups run (a slab used before has them). The prefault never
      // rejects, and is waited for even when a lookup fails: teardown
      // disposes the prefaulter once this settles.
      const mapped = slab === undefined || slab.fresh ? this._prefault(view) : Promise.resolve();
      try {
        runs = await planRuns(lookup, position / clusterSize, clusters, clusterSize);
      } finally {
        await mapped;
      }
      // A stream stopped meanwhile reads nothing more.
      this._failOnStop();
    } else {
      runs = await planRuns(lookup, position / clusterSize, clusters, clusterSize);
    }
    for (const run of runs) await this._readRun(file, view, run);
    zeroOutsideRuns(view, runs);
    const chunk = Buffer.from(view.buffer, view.byteOffset, lengthBytes);
    invariant(chunk.length === lengthBytes && runs.every((r) => r.chunkOffset + r.lengthBytes <= view.length), 'vmstate chunk bounds');
    return chunk;
  }

  /**
   * Maps a Readable chunk's pages in before its read, on the prefaulter's
   * thread. Only chunks on huge pages (slabs and allocBuffer put those of
   * two huge pages or more there): a smaller one is usually memory the allocator
   * already has mapped, and the hop would cost more than it saves.
   */
  private _prefault(view: Uint8Array): Promise<void> {
    if (!usesHugePages(view.length)) return Promise.resolve();
    this._prefaulter ??= new Prefaulter();
    return this._prefaulter.prefault(view);
  }

  /**
   * Reads one host run into the chunk buffer. Whole clusters whose offsets
   * satisfy the descriptor's alignment go straight into it; otherwise
   * (clusters smaller than the DIO alignment) the aligned superset is read
   * into a scratch buffer and the run is sliced out of it.
   */
  private async _readRun(file: TargetFile, slot: Uint8Array, run: HostRun): Promise<void> {
    const a = this._alignment;
    const start = alignDown(run.hostOffset, a);
    const end = alignUp(run.hostOffset + run.lengthBytes, a);
    const inPlace = start === run.hostOffset && run.chunkOffset % a === 0;
    const target = inPlace ? slot.subarray(run.chunkOffset, run.chunkOffset + (end - start)) : file.allocBuffer(end - start);
    const got = await file.read(target, start);
    // Only the last cluster may run past the end of the file (qcow2 does not pad it); those bytes are zeros.
    const expected = Math.min(end, this._state.fileSizeBytes) - start;
    if (got < expected) {
      throw new SnapshotError(
        ErrorCode.EIO,
        `short read of '${file.path}': ${got} of ${expected} bytes at offset ${start} (did the file shrink?)`,
        { syscall: 'pread', path: file.path, offset: start },
      );
    }
    // Bytes past `got` (end of file) read as zeros (the scratch buffer is zeroed).
    if (inPlace && got < target.length) target.fill(0, got);
    if (!inPlace) slot.set(target.subarray(run.hostOffset - start, run.hostOffset - start + run.lengthBytes), run.chunkOffset);
  }

  override _destroy(error: Error | null, callback: Callback): void {
    this._failed = true;
    this._teardown().then(
      () => callback(error),
      (err: unknown) => callback(error ?? toSnapshotError(err)),
    );
  }

  private async _teardown(): Promise<void> {
    // Never close the descriptor under a running read: the number could be
    // reused by another open while the kernel still reads through it.
    while (this._inFlight.size > 0) await Promise.allSettled([...this._inFlight.values()]);
    this._ready.clear();
    const file = this._file;
    this._file = undefined;
    try {
      // Every prefault belongs to a read listed in _inFlight, all settled now.
      this._prefaulter?.dispose();
    } finally {
      await file?.close();
    }
  }
}

/** A disk-only snapshot (vm_state_size 0, as QEMU reads it) has nothing to export: SNAPSHOT_DISK_ONLY. */
export function createVmStateReadStream(
  state: ImageState,
  entry: SnapshotEntry,
  options: ResolvedVmStateReadOptions = validateVmStateReadOptions(undefined),
): VmStateReadStream {
  refuseListOnly(state, 'an export');
  if (entry.vmStateSize === 0) {
    throw new SnapshotError(ErrorCode.SNAPSHOT_DISK_ONLY, `snapshot '${entry.name}' (id ${entry.id}) of '${state.file.path}' is disk-only: it has no saved VM state to export`, {
      path: state.file.path,
    });
  }
  return new VmStateReadStream(state, entry, options);
}
