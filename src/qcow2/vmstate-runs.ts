/**
 * Where a vmstate goes: free runs of the image first, then the end of the
 * file. The vmstate is a stream of unknown length written in ring buffers of
 * `chunkBytes` with O_DIRECT, so a run is worth taking only when it holds at
 * least one whole buffer: smaller runs are left to the metadata, and the
 * vmstate's writes stay long and aligned. A buffer that straddles the end of
 * a run is written in two pieces (VmStateRuns.place).
 *
 *   - With a size hint, the smallest free run that holds the whole vmstate
 *     (best fit), so that one long run is written;
 *   - otherwise, or when no run is large enough, every run of at least one
 *     buffer in file order;
 *   - and after them, open-ended, the end of the file.
 *
 * Every run starts and ends on a multiple of max(cluster size, O_DIRECT
 * alignment), so each logical cluster maps to one host cluster and every
 * piece of a buffer is aligned.
 */
import type { ByteExtent, ClusterRun } from './allocator.js';
import { invariant } from './fail.js';
import type { Layout } from './layout.js';
import type { WritePiece } from '../stream/sink.js';

/** One stretch of the vmstate: logical bytes [logical, logical + length) at host offset `offset`. */
export interface VmStateExtent {
  logical: number;
  offset: number;
  length: number;
}

export interface VmStatePlanOptions {
  /** The stream's ring buffer size: the shortest run worth taking. */
  chunkBytes: number;
  /** O_DIRECT alignment of the data descriptor (a power of two). */
  alignBytes: number;
  /** Expected vmstate length, when the caller knows it. */
  expectedBytes?: number | undefined;
}

export class VmStateRuns {
  /** The finite runs in logical order. */
  readonly extents: readonly VmStateExtent[];
  /** Logical offset where the open-ended tail at the end of the file begins. */
  readonly tailLogical: number;
  /** Host offset of the tail's first byte. */
  readonly tailOffset: number;
  private readonly _clusterSize: number;

  constructor(extents: readonly VmStateExtent[], tailOffset: number, clusterSize: number) {
    let logical = 0;
    for (const e of extents) {
      invariant(e.logical === logical && e.length > 0 && e.length % clusterSize === 0, 'vmstate extents contiguous, whole clusters');
      logical += e.length;
    }
    for (const e of extents) invariant(e.offset + e.length <= tailOffset, 'vmstate runs lie before the tail');
    this.extents = extents;
    this.tailLogical = logical;
    this.tailOffset = tailOffset;
    this._clusterSize = clusterSize;
  }

  /**
   * Picks the runs from `freeRuns` (sorted, committed-free clusters) and puts
   * the tail at `endOffset` rounded up to the alignment step.
   */
  static plan(freeRuns: readonly ClusterRun[], endOffset: number, layout: Layout, options: VmStatePlanOptions): VmStateRuns {
    const step = Math.max(layout.clusterSize, options.alignBytes);
    const usable: ByteExtent[] = [];
    for (const run of freeRuns) {
      const start = Math.ceil((run.first * layout.clusterSize) / step) * step;
      const end = Math.floor(((run.first + run.count) * layout.clusterSize) / step) * step;
      if (end - start >= Math.max(options.chunkBytes, step)) usable.push({ offset: start, length: end - start });
    }
    const chosen = chooseRuns(usable, options.expectedBytes);
    let logical = 0;
    const extents = chosen.map((e) => {
      const extent = { logical, offset: e.offset, length: e.length };
      logical += e.length;
      return extent;
    });
    return new VmStateRuns(extents, Math.ceil(endOffset / step) * step, layout.clusterSize);
  }

  /** Host offset of logical byte `logical`. */
  hostOffset(logical: number): number {
    if (logical >= this.tailLogical) return this.tailOffset + (logical - this.tailLogical);
    const e = this.extentAt(logical);
    return e.offset + (logical - e.logical);
  }

  /**
   * Where a buffer of `length` bytes for logical offset `logical` goes: one
   * host offset (the common case, no allocation), or pieces when it crosses
   * the end of a run.
   */
  place(logical: number, length: number): number | WritePiece[] {
    const end = logical + length;
    if (logical >= this.tailLogical) return this.tailOffset + (logical - this.tailLogical);
    const first = this.extentAt(logical);
    if (end <= first.logical + first.length) return first.offset + (logical - first.logical);
    const pieces: WritePiece[] = [];
    for (let at = logical; at < end; ) {
      const position = this.hostOffset(at);
      const run = at >= this.tailLogical ? undefined : this.extentAt(at);
      const runEnd = run === undefined ? end : run.logical + run.length;
      const to = Math.min(end, runEnd);
      pieces.push({ from: at - logical, to: to - logical, position });
      at = to;
    }
    return pieces;
  }

  /** Host byte ranges holding logical bytes [0, bytes), rounded up to whole clusters. */
  usedExtents(bytes: number): ByteExtent[] {
    const end = Math.ceil(bytes / this._clusterSize) * this._clusterSize;
    const out: ByteExtent[] = [];
    for (const e of this.extents) {
      if (e.logical >= end) break;
      out.push({ offset: e.offset, length: Math.min(e.length, end - e.logical) });
    }
    if (end > this.tailLogical) out.push({ offset: this.tailOffset, length: end - this.tailLogical });
    return out;
  }

  private extentAt(logical: number): VmStateExtent {
    // Few runs in practice; a binary search keeps a fragmented image cheap too.
    let lo = 0;
    let hi = this.extents.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.extents[mid]!.logical <= logical) lo = mid;
      else hi = mid - 1;
    }
    const e = this.extents[lo];
    invariant(e !== undefined && logical >= e.logical && logical < e.logical + e.length, `logical offset ${logical} in a run`);
    return e;
  }
}

/** Best fit for a known size; otherwise (or when nothing fits) every usable run in file order. */
function chooseRuns(usable: readonly ByteExtent[], expectedBytes: number | undefined): ByteExtent[] {
  if (expectedBytes !== undefined && expectedBytes > 0) {
    let best: ByteExtent | undefined;
    for (const e of usable) {
      if (e.length >= expectedBytes && (best === undefined || e.length < best.length)) best = e;
    }
    if (best !== undefined) return [best];
  }
  return [...usable];
}
