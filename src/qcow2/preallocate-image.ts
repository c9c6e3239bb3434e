/**
 * Where `qemu-img create -f qcow2 -o preallocation=...` puts every cluster,
 * computed by replaying QEMU 7.2's cluster allocator (block/qcow2-refcount.c:
 * alloc_clusters_noref, update_refcount, alloc_refcount_block,
 * qcow2_refcount_area) over the calls qcow2_co_create and qcow2_co_truncate
 * make. Replaying rather than designing our own layout is what makes
 * `qemu-img map` of our images equal to that of qemu-img's, host offsets
 * included: for 'metadata', L2 tables interleave with the data runs and new
 * refcount blocks land in front of the run that first needs them; for
 * 'falloc'/'full', a new refcount table precedes one contiguous data area and
 * the first L2 table reuses the cluster of the old refcount table.
 *
 * Pure: nothing here touches a file. The plan is written by create.ts.
 */
import { QCOW_MAX_L1_SIZE_BYTES } from './cluster-map.js';
import { invariant, unsupported } from './fail.js';
import type { Layout } from './layout.js';
import { QCOW_MAX_REFTABLE_SIZE_BYTES } from './refcount.js';

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

/** QEMU allocates metadata-preallocated data in requests of at most INT_MAX bytes (preallocate_co). */
const INT_MAX = 2 ** 31 - 1;
/** Refcounts this plan handles without a bitmap above 32 MiB (2^28 clusters: 16 TiB at 64 KiB clusters). */
const MAX_PLANNED_CLUSTERS = 2 ** 28;
/** update_refcount asked the caller to search for free clusters again (QEMU's -EAGAIN). */
const AGAIN = -1;

/** guest clusters [guestCluster, +count) live at host clusters [hostCluster, +count). */
export interface DataRun {
  guestCluster: number;
  hostCluster: number;
  count: number;
}

export interface ImagePlan {
  layout: Layout;
  l1Entries: number;
  /** 0 when l1Entries is 0 (qemu-img leaves l1_table_offset 0 then). */
  l1Cluster: number;
  /** Host cluster of the L2 table behind each L1 entry; 0 = none. */
  l2Clusters: number[];
  reftableCluster: number;
  reftableClusters: number;
  /** Host cluster of each refcount block, per refcount table entry; 0 = none. */
  refblocks: number[];
  /** Clusters with refcount 1 (every other cluster has 0). */
  used: ClusterBitmap;
  dataRuns: DataRun[];
  /** 'falloc'/'full': the data area to reserve or zero, in clusters. */
  dataArea: { startCluster: number; clusters: number } | undefined;
  /** Length of the file qemu-img leaves. */
  fileEndBytes: number;
}

/** One bit per host cluster: its refcount is 1. */
export class ClusterBitmap {
  private _words = new Uint32Array(1024);

  get(i: number): boolean {
    const w = i >>> 5;
    return w < this._words.length && (this._words[w]! & (1 << (i & 31))) !== 0;
  }

  set(i: number, on: boolean): void {
    const w = i >>> 5;
    if (w >= this._words.length) {
      if (!on) return;
      const grown = new Uint32Array(Math.max(w + 1, this._words.length * 2));
      grown.set(this._words);
      this._words = grown;
    }
    if (on) this._words[w]! |= 1 << (i & 31);
    else this._words[w]! &= ~(1 << (i & 31));
  }
}

/** qcow2_refcount_metadata_size(): refcount blocks needed so that they also count themselves and the table. */
export function refblocksFor(clusters: number, layout: Layout, generous: boolean): number {
  const blocksPerTableCluster = layout.clusterSize / 8;
  let table = 0;
  let blocks = 0;
  let n = 0;
  let last: number;
  let total = clusters;
  let grow = generous;
  do {
    last = n;
    blocks = Math.ceil((total + table + blocks) / layout.refblockEntries);
    table = Math.ceil(blocks / blocksPerTableCluster);
    n = total + blocks + table;
    if (n === last && grow) {
      total += Math.ceil(table / 2);
      n = 0;
      grow = false;
    }
  } while (n !== last);
  return blocks;
}

/** QEMU's BDRVQcow2State, reduced to what the allocator reads and writes. */
class AllocatorReplay {
  readonly used = new ClusterBitmap();
  refblocks: number[];
  reftableCluster = 1;
  reftableEntries: number;
  freeIndex = 0;
  fileEndBytes = 0;
  private _maxIndex = 0;

  constructor(readonly layout: Layout) {
    this.reftableEntries = layout.clusterSize / 8;
    this.refblocks = new Array<number>(this.reftableEntries).fill(0);
  }

  refcount(cluster: number): boolean {
    const t = Math.floor(cluster / this.layout.refblockEntries);
    return t < this.reftableEntries && this.refblocks[t] !== 0 && this.used.get(cluster);
  }

  written(cluster: number, bytes: number): void {
    this.fileEndBytes = Math.max(this.fileEndBytes, cluster * this.layout.clusterSize + bytes);
  }

  /** alloc_clusters_noref(): the first run of `n` free clusters at or after free_cluster_index. */
  private allocNoref(n: number): number {
    for (let i = 0; i < n; i++) {
      if (this.freeIndex >= MAX_PLANNED_CLUSTERS) throw unsupported('the image needs more than 2^28 clusters');
      if (this.refcount(this.freeIndex++)) i = -1;
    }
    return this.freeIndex - n;
  }

  /** qcow2_alloc_clusters(). */
  alloc(n: number): number {
    for (;;) {
      const start = this.allocNoref(n);
      if (this.update(start, n, false) !== AGAIN) return start;
    }
  }

  /** qcow2_alloc_clusters_at(): takes the free clusters at `start`, up to `n`; returns how many. */
  allocAt(start: number, n: number): number {
    for (;;) {
      let i = 0;
      while (i < n && !this.refcount(start + i)) i++;
      if (this.update(start, i, false) !== AGAIN) return i;
    }
  }

  /** update_refcount() with addend 1; on AGAIN the clusters already counted are uncounted. */
  update(start: number, n: number, decrease: boolean): number {
    let table = -1;
    for (let c = start; c < start + n; c++) {
      const t = Math.floor(c / this.layout.refblockEntries);
      if (t !== table && this.ensureRefblock(c) === AGAIN) {
        this.freeIndex = Math.min(this.freeIndex, start);
        this.update(start, c - start, !decrease);
        return AGAIN;
      }
      table = t;
      this.used.set(c, !decrease);
      if (decrease && c < this.freeIndex) this.freeIndex = c;
    }
    return 0;
  }

  /** alloc_refcount_block(): 0 when the block exists, AGAIN after making one. */
  private ensureRefblock(cluster: number): number {
    const t = Math.floor(cluster / this.layout.refblockEntries);
    if (t < this.reftableEntries && this.refblocks[t] !== 0) return 0;
    const block = this.allocNoref(1);
    if (Math.floor(block / this.layout.refblockEntries) === t) {
      this.used.set(block, true); // the block describes itself
    } else if (this.update(block, 1, false) === AGAIN) {
      return AGAIN;
    }
    this.written(block, this.layout.clusterSize);
    if (t < this.reftableEntries) {
      this.refblocks[t] = block;
      this._maxIndex = Math.max(this._maxIndex, t);
      return AGAIN;
    }
    const blocksUsed = Math.ceil(Math.max(cluster + 1, block + 1) / this.layout.refblockEntries);
    this.refcountArea(blocksUsed * this.layout.refblockEntries, 0, false, t, block);
    return AGAIN;
  }

  /**
   * qcow2_refcount_area(): a new refcount table, plus the refcount blocks
   * still missing, placed at `start` and covering themselves and
   * `additional` clusters beyond. Returns the first cluster after them.
   */
  refcountArea(start: number, additional: number, exact: boolean, newIndex = 0, newBlock = 0): number {
    const { layout } = this;
    const total = refblocksFor(start + additional, layout, !exact);
    const perCluster = layout.clusterSize / 8;
    const entries = Math.ceil((exact ? total : total + Math.ceil(total / 2)) / perCluster) * perCluster;
    if (entries * 8 > QCOW_MAX_REFTABLE_SIZE_BYTES) throw unsupported("the refcount table would exceed QEMU's 8 MiB limit");
    const tableClusters = (entries * 8) / layout.clusterSize;
    const table = new Array<number>(entries).fill(0);
    const copied = entries > this._maxIndex ? this._maxIndex + 1 : entries;
    for (let i = 0; i < copied; i++) table[i] = this.refblocks[i] ?? 0;
    if (newBlock !== 0) table[newIndex] = newBlock;
    const areaIndex = Math.floor(start / layout.refblockEntries);
    let missing = 0;
    for (let i = areaIndex; i < total; i++) if (table[i] === 0) missing++;
    const tableCluster = start + missing;
    const end = tableCluster + tableClusters;
    let next = start;
    for (let i = areaIndex; i < total; i++) {
      if (table[i] === 0) {
        table[i] = next++;
        this.written(table[i]!, layout.clusterSize);
      }
      const first = i * layout.refblockEntries;
      const last = Math.min(end, first + layout.refblockEntries);
      for (let c = Math.max(first, start); c < last; c++) this.used.set(c, true);
    }
    invariant(next === tableCluster, 'refcount blocks end where the table starts');
    this.written(tableCluster, tableClusters * layout.clusterSize);
    const old = { cluster: this.reftableCluster, clusters: (this.reftableEntries * 8) / layout.clusterSize };
    this.refblocks = table;
    this.reftableEntries = entries;
    this.reftableCluster = tableCluster;
    this._maxIndex = table.reduce((max, b, i) => (b !== 0 ? i : max), 0);
    this.update(old.cluster, old.clusters, true);
    return end;
  }

  /** qcow2_get_last_cluster(): the last cluster with a refcount, searching back from the file's end. */
  lastUsedCluster(): number {
    for (let c = this.layout.clustersFor(this.fileEndBytes) - 1; c >= 0; c--) if (this.refcount(c)) return c;
    return -1;
  }
}

/** Runs of data clusters, each within one L2 table and one request, as the loops in QEMU issue them. */
function* requests(dataClusters: number, layout: Layout, maxRequestClusters: number): Generator<[number, number]> {
  for (let g = 0; g < dataClusters; ) {
    const n = Math.min(dataClusters - g, maxRequestClusters, layout.l2Entries - (g % layout.l2Entries));
    yield [g, n];
    g += n;
  }
}

/** The image qemu-img 7.2 creates for a disk of `sizeBytes` (a multiple of 512). */
export function planImage(sizeBytes: number, layout: Layout, preallocation: Preallocation): ImagePlan {
  const cs = layout.clusterSize;
  const l1Entries = layout.l1EntriesFor(sizeBytes);
  if (l1Entries * 8 > QCOW_MAX_L1_SIZE_BYTES) throw unsupported(`a ${sizeBytes}-byte disk needs an L1 table above 32 MiB`);
  const q = new AllocatorReplay(layout);
  // qcow2_co_create: header, a one-cluster refcount table and one refcount block, then counted.
  q.refblocks[0] = 2;
  q.written(0, 3 * cs);
  q.alloc(3);
  // qcow2_co_truncate -> qcow2_grow_l1_table(exact): the L1 table, written entry-exact.
  const l1Cluster = l1Entries > 0 ? q.alloc(layout.clustersFor(l1Entries * 8)) : 0;
  if (l1Entries > 0) q.written(l1Cluster, l1Entries * 8);
  const l2Clusters = new Array<number>(l1Entries).fill(0);
  const l2For = (guestCluster: number): void => {
    const t = Math.floor(guestCluster / layout.l2Entries);
    if (l2Clusters[t] !== 0) return;
    l2Clusters[t] = q.alloc(1);
    q.written(l2Clusters[t]!, cs);
  };
  const dataClusters = layout.clustersFor(sizeBytes);
  const dataRuns: DataRun[] = [];
  let dataArea: ImagePlan['dataArea'];
  if (preallocation === 'metadata') {
    // preallocate_co: per request, the L2 table (if new), then the data clusters.
    const maxRequest = Math.floor(INT_MAX / cs);
    for (const [g, n] of requests(dataClusters, layout, maxRequest)) {
      l2For(g);
      const host = q.alloc(n);
      dataRuns.push({ guestCluster: g, hostCluster: host, count: n });
      q.written(host, n * cs);
    }
  } else if (preallocation === 'falloc' || preallocation === 'full') {
    // qcow2_co_truncate(PREALLOC_MODE_FALLOC/FULL): refcount structures for data + L2 tables + 1, then the data area.
    const oldEnd = q.lastUsedCluster() + 1;
    const l2Tables = Math.ceil(dataClusters / layout.l2Entries) + 1;
    const start = q.refcountArea(oldEnd, dataClusters + l2Tables, true);
    invariant(q.allocAt(start, dataClusters) === dataClusters, 'the data area is free');
    dataArea = { startCluster: start, clusters: dataClusters };
    q.written(start, dataClusters * cs);
    for (const [g, n] of requests(dataClusters, layout, Infinity)) {
      l2For(g);
      dataRuns.push({ guestCluster: g, hostCluster: start + g, count: n });
    }
  }
  return {
    layout,
    l1Entries,
    l1Cluster,
    l2Clusters,
    reftableCluster: q.reftableCluster,
    reftableClusters: (q.reftableEntries * 8) / cs,
    refblocks: q.refblocks,
    used: q.used,
    dataRuns,
    dataArea,
    fileEndBytes: q.fileEndBytes,
  };
}
