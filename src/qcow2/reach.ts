/**
 * Walks everything an L1 table reaches, in the order QEMU's
 * qcow2_update_snapshot_refcount() does: each L2 table, then the host
 * clusters its entries use. A compressed cluster counts every host cluster
 * its data touches (it may straddle two).
 */
import { compressedClusterSpan, type L1Table, type L2Table } from './cluster-map.js';
import { corrupt } from './fail.js';
import { readL2, type ImageState } from './image-state.js';

export interface ReachedTable {
  l1Index: number;
  l2: L2Table;
  /** Host cluster indices referenced by the L2 table's entries (with repeats, one per reference). */
  dataClusters: number[];
}

/** Host cluster indices used by one L2 table's entries; throws QCOW2_CORRUPT on invalid entries. */
export function dataClustersOf(l2: L2Table, state: Pick<ImageState, 'layout'>): number[] {
  const clusters: number[] = [];
  for (let i = 0; i < l2.entries; i++) {
    if (l2.isUnallocated(i)) continue;
    const entry = l2.entry(i);
    if (entry.kind === 'normal' || entry.kind === 'zero-alloc') {
      clusters.push(state.layout.clusterIndex(entry.hostOffset));
    } else if (entry.kind === 'compressed') {
      const span = compressedClusterSpan(entry, state.layout);
      for (let c = span.first; c <= span.last; c++) clusters.push(c);
    }
  }
  return clusters;
}

/**
 * Calls `visit` once per allocated L1 entry (skipping indices for which
 * `skip` is true), with the L2 table and the clusters it references.
 */
export async function forEachReachedTable(
  state: ImageState,
  l1: L1Table,
  visit: (table: ReachedTable) => Promise<void> | void,
  skip: (l1Index: number) => boolean = () => false,
): Promise<void> {
  for (let i = 0; i < l1.entries; i++) {
    if (skip(i)) continue;
    const l2Offset = l1.l2Offset(i);
    if (l2Offset === 0) continue;
    if (l2Offset < state.layout.clusterSize) throw corrupt(`L1 entry ${i} points into the header cluster`);
    const l2 = await readL2(state, l2Offset);
    await visit({ l1Index: i, l2, dataClusters: dataClustersOf(l2, state) });
  }
}
