/**
 * Cluster allocation over the committed refcounts, as QEMU's allocator
 * (block/qcow2-refcount.c, alloc_clusters_noref) does it: the lowest run of
 * clusters that the committed metadata counts as free (refcount 0) is handed
 * out first, and the file grows only when no free run is long enough.
 *
 * The free runs are taken from the refcounts as they are on disk when an
 * operation starts, before it changes anything in memory. So a cluster that
 * the same operation frees (the old L1, old refcount blocks, a deleted
 * snapshot's clusters) can never be handed out by it: it was not free when the
 * runs were taken. That is what keeps the shadow commit's guarantee: nothing
 * the committed metadata references is written before the commit point.
 *
 * Every cluster handed out is logged in order (`takenSince`), so that the
 * refcount structure can give each one refcount 1 at the commit.
 */
import { invariant } from './fail.js';
import type { Layout } from './layout.js';

/** A run of clusters, by cluster index. */
export interface ClusterRun {
  first: number;
  count: number;
}

/** A byte range of the image file. */
export interface ByteExtent {
  offset: number;
  length: number;
}

/** What findFreeRuns needs from the refcount structure. */
export interface RefcountView {
  readonly layout: Layout;
  preloadRange(firstCluster: number, endCluster: number): Promise<void>;
  get(cluster: number): number;
}

/**
 * Runs of clusters below `endCluster` whose refcount is 0, in file order.
 * Clusters that no refcount block covers count as free (refcount 0).
 */
export async function findFreeRuns(rc: RefcountView, endCluster: number): Promise<ClusterRun[]> {
  await rc.preloadRange(0, endCluster);
  const runs: ClusterRun[] = [];
  let start = -1;
  for (let cluster = 0; cluster < endCluster; cluster++) {
    const free = rc.get(cluster) === 0;
    if (free && start < 0) start = cluster;
    if (!free && start >= 0) {
      runs.push({ first: start, count: cluster - start });
      start = -1;
    }
  }
  if (start >= 0) runs.push({ first: start, count: endCluster - start });
  return runs;
}

/** Removes every cluster touched by `extents` from sorted, disjoint `runs`. */
export function subtractExtents(runs: readonly ClusterRun[], extents: readonly ByteExtent[], layout: Layout): ClusterRun[] {
  let out = runs.map((r) => ({ ...r }));
  for (const e of extents) {
    if (e.length <= 0) continue;
    const first = layout.clusterIndex(e.offset);
    const end = layout.clusterIndex(e.offset + e.length - 1) + 1;
    const next: ClusterRun[] = [];
    for (const r of out) {
      const rEnd = r.first + r.count;
      if (rEnd <= first || r.first >= end) {
        next.push(r);
        continue;
      }
      if (r.first < first) next.push({ first: r.first, count: first - r.first });
      if (rEnd > end) next.push({ first: end, count: rEnd - end });
    }
    out = next;
  }
  return out;
}

export interface AllocatorOptions {
  /** Clusters never to hand out: another operation's reservation, the vmstate already written. */
  exclude?: readonly ByteExtent[];
  /**
   * Hand out only clusters past the end: the space for them was reserved
   * with fallocate up front (preallocate 'space'), whereas a punched free
   * run would need new blocks at the commit and could fail with ENOSPC.
   */
  endOnly?: boolean;
}

export class ClusterAllocator {
  readonly layout: Layout;
  /** Free runs left, sorted and disjoint, all below `_endCluster`. */
  private _runs: ClusterRun[];
  /** First cluster past everything: the allocated end at the start, grown by allocations past it. */
  private _endCluster: number;
  /** Every run handed out, in order. */
  private readonly _taken: ClusterRun[] = [];
  private readonly _endOnly: boolean;

  constructor(layout: Layout, freeRuns: readonly ClusterRun[], endCluster: number, options: AllocatorOptions = {}) {
    invariant(Number.isSafeInteger(endCluster) && endCluster >= 1, 'allocation end past the header');
    this.layout = layout;
    this._endCluster = endCluster;
    const inside = freeRuns
      .map((r) => ({ first: r.first, count: Math.min(r.count, endCluster - r.first) }))
      .filter((r) => r.count > 0 && r.first >= 1);
    this._runs = subtractExtents(inside, options.exclude ?? [], layout);
    this._endOnly = options.endOnly === true;
    // Excluded clusters past the end are skipped over rather than handed out.
    for (const e of options.exclude ?? []) {
      if (e.length > 0) this._endCluster = Math.max(this._endCluster, layout.clusterIndex(e.offset + e.length - 1) + 1);
    }
    for (let i = 1; i < this._runs.length; i++) {
      invariant(this._runs[i - 1]!.first + this._runs[i - 1]!.count <= this._runs[i]!.first, 'free runs sorted and disjoint');
    }
  }

  /** Takes the committed free runs below `endOffset` from `rc`. */
  static async fromRefcounts(rc: RefcountView, endOffset: number, options: AllocatorOptions = {}): Promise<ClusterAllocator> {
    const endCluster = rc.layout.clustersFor(endOffset);
    return new ClusterAllocator(rc.layout, await findFreeRuns(rc, endCluster), endCluster, options);
  }

  /** Byte offset past the last cluster that is in use or handed out. */
  get endOffset(): number {
    return this._endCluster * this.layout.clusterSize;
  }

  /** Free runs still available below the end, in file order (copies). */
  freeRuns(): ClusterRun[] {
    return this._runs.map((r) => ({ ...r }));
  }

  get freeClusters(): number {
    return this._runs.reduce((sum, r) => sum + r.count, 0);
  }

  /**
   * `count` contiguous clusters: the lowest free run that holds them
   * (first fit, as QEMU), else the end of the file. Returns the byte offset.
   */
  allocClusters(count: number): number {
    invariant(Number.isSafeInteger(count) && count >= 1, `cluster count ${count}`);
    const i = this._endOnly ? -1 : this._runs.findIndex((r) => r.count >= count);
    if (i < 0) return this.takeAtEnd(count);
    const run = this._runs[i]!;
    const first = run.first;
    if (run.count === count) this._runs.splice(i, 1);
    else this._runs[i] = { first: first + count, count: run.count - count };
    this._taken.push({ first, count });
    return first * this.layout.clusterSize;
  }

  allocBytes(bytes: number): number {
    return this.allocClusters(Math.max(1, this.layout.clustersFor(bytes)));
  }

  /**
   * Takes clusters [first, first + count) that are free or past the end
   * (placement decided by the caller, e.g. the vmstate runs). Clusters
   * skipped between the old end and `first` stay free.
   */
  takeRange(first: number, count: number): void {
    invariant(Number.isSafeInteger(count) && count >= 1 && first >= 1, 'a range past the header');
    const end = first + count;
    const insideEnd = Math.min(end, this._endCluster);
    if (first < insideEnd) {
      const before = this.freeClusters;
      this._runs = subtractExtents(this._runs, [this.extentOf({ first, count: insideEnd - first })], this.layout);
      invariant(before - this.freeClusters === insideEnd - first, `clusters ${first}..${insideEnd} are free`);
    }
    if (end > this._endCluster) {
      if (first > this._endCluster) this._runs.push({ first: this._endCluster, count: first - this._endCluster });
      this._endCluster = end;
    }
    this._taken.push({ first, count });
  }

  /** How many runs have been handed out so far (a mark for takenSince). */
  get takenCount(): number {
    return this._taken.length;
  }

  /** Runs handed out after `mark` (a former takenCount), in order. */
  takenSince(mark: number): ClusterRun[] {
    return this._taken.slice(mark).map((r) => ({ ...r }));
  }

  extentOf(run: ClusterRun): ByteExtent {
    return { offset: run.first * this.layout.clusterSize, length: run.count * this.layout.clusterSize };
  }

  private takeAtEnd(count: number): number {
    const first = this._endCluster;
    // A free run that ends at the end is extended rather than skipped, as QEMU does.
    const last = this._runs[this._runs.length - 1];
    if (!this._endOnly && last !== undefined && last.first + last.count === first) {
      this._runs.pop();
      this._endCluster = last.first + count;
      this._taken.push({ first: last.first, count });
      return last.first * this.layout.clusterSize;
    }
    this._endCluster += count;
    this._taken.push({ first, count });
    return first * this.layout.clusterSize;
  }
}
