/**
 * A read-only consistency check that mirrors QEMU's qcow2_check_refcounts()
 * (block/qcow2-refcount.c), so our numbers can be compared with
 * `qemu-img check --output=json`: rebuild the refcount every cluster should
 * have from the header, the active and snapshot L1/L2 tables, the snapshot
 * table, the refcount table and blocks; compare with the on-disk refcounts
 * (on-disk < expected: corruption, on-disk > expected: leak); then check
 * COPIED in the active tables.
 */
import { L1Table, L2Table, compressedClusterSpan, QCOW_MAX_L1_SIZE_BYTES } from './cluster-map.js';
import { corrupt, unsupported } from './fail.js';
import { bitmapReferences } from './bitmaps.js';
import { readPadded, type RefcountStore } from './refcount.js';
import { loadRefcounts, refuseListOnly, type ImageState } from './image-state.js';
import { isIncompleteV3Entry } from './snapshot-table.js';
import { ErrorCode, isSnapshotError } from '../errors.js';

/** Bound on the in-memory expected-refcount array: 4 bytes per host cluster (1 GiB). */
export const MAX_CHECK_CLUSTERS = 2 ** 28;

export interface CheckResult {
  /** Refcounts lower than the references to them, and other structural errors. */
  corruptions: number;
  /** Clusters whose refcount is higher than the references to them. */
  leaks: number;
  /** Problems that stopped part of the check (I/O errors, unreadable structures). */
  checkErrors: number;
  /** End of the last cluster in use (qemu-img's image-end-offset). */
  imageEndOffset: number;
  /** Guest clusters of the virtual disk. */
  totalClusters: number;
  /** Guest clusters allocated in the active L1. */
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  /** The part of `corruptions` that is only a COPIED flag disagreeing with its refcount (harmless, repairable). */
  copiedFlagErrors: number;
  /** One line per finding, worded like qemu-img's stderr. */
  messages: string[];
}

class Checker {
  readonly result: CheckResult;
  private _refs: Uint32Array;
  private readonly _state: ImageState;
  /** L2 tables by host offset: how many L1 references reach each, and whether the active L1 does. */
  private readonly _l2Uses = new Map<number, { count: number; active: boolean }>();

  constructor(state: ImageState) {
    this._state = state;
    const clusters = state.layout.clustersFor(state.fileSizeBytes);
    if (clusters + 1 > MAX_CHECK_CLUSTERS) throw unsupported(`check of an image with ${clusters} clusters`);
    this._refs = new Uint32Array(clusters + 1);
    this.result = {
      corruptions: 0,
      leaks: 0,
      checkErrors: 0,
      imageEndOffset: 0,
      totalClusters: state.layout.clustersFor(state.header.size),
      allocatedClusters: 0,
      fragmentedClusters: 0,
      compressedClusters: 0,
      copiedFlagErrors: 0,
      messages: [],
    };
  }

  get refs(): Uint32Array {
    return this._refs;
  }

  corruption(message: string, times = 1): void {
    this.result.corruptions += times;
    this.result.messages.push(`ERROR ${message}${times > 1 ? ` (x${times})` : ''}`);
  }

  /** qcow2_inc_refcounts_imrt(): `times` expected references for every cluster of [offset, offset + size). */
  inc(offset: number, size: number, times = 1): void {
    if (size <= 0) return;
    const { layout, fileSizeBytes } = this._state;
    if (offset + size - fileSizeBytes >= layout.clusterSize) {
      this.corruption(`counting reference for region exceeding the end of the file: offset ${offset} size ${size}`, times);
      return;
    }
    const last = layout.clusterIndex(offset + size - 1);
    for (let k = layout.clusterIndex(offset); k <= last; k++) this._refs[k] = this._refs[k]! + times;
  }

  /**
   * check_refcounts_l1(): the table and each L2 table it references. The L2
   * tables' contents are counted later, once per distinct table times its
   * references (snapshots share most L2 tables; reading each once keeps a
   * check before every save cheap).
   */
  async countL1(offset: number, entries: number, active: boolean): Promise<void> {
    if (entries === 0) return;
    const { layout, file, fileSizeBytes } = this._state;
    this.inc(offset, entries * 8);
    const l1 = new L1Table(await readPadded(file, offset, entries * 8, fileSizeBytes), layout);
    for (let i = 0; i < l1.entries; i++) {
      if (l1.raw(i) === 0n) continue;
      const l2Offset = l1.rawOffset(i);
      const problem = l1.problem(i);
      if (problem !== undefined && problem.startsWith('reserved')) this.corruption(`L1 entry ${i} has reserved bits set`);
      this.inc(l2Offset, layout.clusterSize);
      if (!layout.isAligned(l2Offset)) this.corruption(`l2_offset=${l2Offset}: table is not cluster aligned`);
      if (l2Offset + layout.clusterSize > layout.alignUp(fileSizeBytes)) continue;
      const use = this._l2Uses.get(l2Offset) ?? { count: 0, active: false };
      this._l2Uses.set(l2Offset, { count: use.count + 1, active: use.active || active });
    }
  }

  /** check_refcounts_l2() for every distinct L2 table recorded by countL1(). */
  async countL2Tables(): Promise<void> {
    const { layout, file, fileSizeBytes } = this._state;
    for (const [l2Offset, use] of [...this._l2Uses].sort((a, b) => a[0] - b[0])) {
      const bytes = await readPadded(file, layout.clusterIndex(l2Offset) * layout.clusterSize, layout.clusterSize, fileSizeBytes);
      this.countL2(new L2Table(bytes, l2Offset, layout), use.count, use.active);
    }
  }

  private countL2(l2: L2Table, times: number, active: boolean): void {
    const { layout } = this._state;
    let nextContiguous = 0;
    for (let i = 0; i < l2.entries; i++) {
      if (l2.isUnallocated(i)) continue;
      const entry = l2.classify(i);
      if (entry.kind === 'invalid') this.corruption(`L2 table at ${l2.hostOffset} entry ${i}: ${entry.problem}`, times);
      if (entry.baseKind === 'compressed') {
        this.inc(entry.hostOffset, entry.compressedBytes, times);
        const span = compressedClusterSpan(entry, layout);
        if (span.last < span.first) continue;
        if (active) {
          this.result.allocatedClusters++;
          this.result.compressedClusters++;
          this.result.fragmentedClusters++;
        }
      } else if (entry.baseKind === 'normal' || entry.baseKind === 'zero-alloc') {
        if (active) {
          this.result.allocatedClusters++;
          if (nextContiguous !== 0 && entry.hostOffset !== nextContiguous) this.result.fragmentedClusters++;
          nextContiguous = entry.hostOffset + layout.clusterSize;
        }
        this.inc(entry.hostOffset, layout.clusterSize, times);
      }
    }
  }

  async countSnapshots(): Promise<void> {
    const { snapshots, header, layout } = this._state;
    for (const [i, sn] of snapshots.entries()) {
      if (isIncompleteV3Entry(sn, header.version)) this.corruption(`snapshot table entry ${i} is incomplete`);
      if (!layout.isAligned(sn.l1TableOffset)) {
        this.corruption(`snapshot ${sn.id} (${sn.name}) l1_offset=${sn.l1TableOffset}: L1 table is not cluster aligned`);
        continue;
      }
      if (sn.l1Size > QCOW_MAX_L1_SIZE_BYTES / 8) {
        this.corruption(`snapshot ${sn.id} (${sn.name}) l1_size=${sn.l1Size}: L1 table is too large`);
        continue;
      }
      await this.countL1(sn.l1TableOffset, sn.l1Size, false);
    }
    this.inc(header.snapshotsOffset, this._state.snapshotTableBytes);
  }

  /** check_refblocks(): each refcount block is referenced exactly once. */
  countRefcountBlocks(rc: RefcountStore): void {
    const { layout } = this._state;
    const clusters = this._refs.length - 1;
    for (const offset of rc.blockOffsets()) {
      const cluster = layout.clusterIndex(offset);
      if (cluster >= clusters) {
        this.corruption(`refcount block at ${offset} is outside image`);
        continue;
      }
      this.inc(offset, layout.clusterSize);
      if (this._refs[cluster] !== 1) this.corruption(`refcount block at ${offset} refcount=${this._refs[cluster]}`);
    }
  }
}

/** compare_refcounts(): on-disk versus expected, and the image end offset. */
async function compare(checker: Checker, state: ImageState, rc: RefcountStore): Promise<void> {
  const refs = checker.refs;
  await rc.preloadRange(0, refs.length);
  let highest = 0;
  for (let i = 0; i < refs.length; i++) {
    const onDisk = rc.get(i);
    const expected = refs[i]!;
    if (onDisk > 0 || expected > 0) highest = i;
    if (onDisk === expected) continue;
    if (onDisk < expected) checker.corruption(`cluster ${i} refcount=${onDisk} reference=${expected}`);
    else {
      checker.result.leaks++;
      checker.result.messages.push(`Leaked cluster ${i} refcount=${onDisk} reference=${expected}`);
    }
  }
  checker.result.imageEndOffset = (highest + 1) * state.layout.clusterSize;
}

/** check_oflag_copied(): COPIED set exactly where the on-disk refcount is 1, in the active tables. */
async function checkCopied(checker: Checker, state: ImageState, rc: RefcountStore): Promise<void> {
  const { l1, layout, file, fileSizeBytes } = state;
  for (let i = 0; i < l1.entries; i++) {
    const l2Offset = l1.rawOffset(i);
    if (l2Offset === 0 || !layout.isAligned(l2Offset) || l2Offset + layout.clusterSize > layout.alignUp(fileSizeBytes)) continue;
    const l2Refcount = await rc.getAsync(layout.clusterIndex(l2Offset));
    if ((l2Refcount === 1) !== l1.isCopied(i)) {
      checker.corruption(`OFLAG_COPIED L2 cluster: l1_index=${i} refcount=${l2Refcount}`);
      checker.result.copiedFlagErrors++;
    }
    const l2 = new L2Table(await readPadded(file, l2Offset, layout.clusterSize, fileSizeBytes), l2Offset, layout);
    for (let j = 0; j < l2.entries; j++) {
      if (l2.isUnallocated(j)) continue;
      const entry = l2.classify(j);
      if (entry.baseKind !== 'normal' && entry.baseKind !== 'zero-alloc') continue;
      const refcount = await rc.getAsync(layout.clusterIndex(entry.hostOffset));
      if ((refcount === 1) !== entry.copied) {
        checker.corruption(`OFLAG_COPIED data cluster: offset=${entry.hostOffset} refcount=${refcount}`);
        checker.result.copiedFlagErrors++;
      }
    }
  }
}

/**
 * `rc`: the refcounts, when the caller has loaded them already (a save checks
 * and then allocates with one store); the check only reads them.
 */
export async function checkImage(state: ImageState, loaded?: RefcountStore): Promise<CheckResult> {
  refuseListOnly(state, 'a check');
  const checker = new Checker(state);
  const { header, layout } = state;
  let rc: RefcountStore;
  try {
    rc = loaded ?? (await loadRefcounts(state));
  } catch (err) {
    if (!isSnapshotError(err, ErrorCode.QCOW2_CORRUPT)) throw err;
    checker.result.checkErrors++;
    checker.result.messages.push(`ERROR cannot read the refcount structure: ${err.message}`);
    return checker.result;
  }
  checker.inc(0, layout.clusterSize);
  await checker.countL1(header.l1TableOffset, header.l1Size, true);
  await checker.countSnapshots();
  await checker.countL2Tables();
  checker.inc(header.refcountTableOffset, header.refcountTableClusters * layout.clusterSize);
  await countBitmaps(checker, state);
  checker.countRefcountBlocks(rc);
  await compare(checker, state, rc);
  await checkCopied(checker, state, rc);
  return checker.result;
}

/** qcow2_check_bitmaps_refcounts(): the bitmap directory, tables and data clusters. */
async function countBitmaps(checker: Checker, state: ImageState): Promise<void> {
  try {
    const { ranges } = await bitmapReferences(state.file, state.header, state.layout.clusterSize, state.fileSizeBytes);
    for (const [offset, length] of ranges) checker.inc(offset, length);
  } catch (err) {
    if (!isSnapshotError(err, ErrorCode.QCOW2_CORRUPT)) throw err;
    checker.corruption(err.message);
  }
}

/**
 * Refuses to write into an image whose metadata disagrees with itself
 * (refcounts below their references, overlapping or out-of-file
 * structures): QEMU's pre-write overlap checks, done once and completely
 * before the first byte is written. Leaks and COPIED mismatches are fine:
 * a write recomputes COPIED from the refcounts.
 */
export async function refuseInconsistent(state: ImageState, rc: RefcountStore, path: string): Promise<void> {
  const result = await checkImage(state, rc);
  const structural = result.corruptions - result.copiedFlagErrors + result.checkErrors;
  if (structural === 0) return;
  const first = result.messages.find((m) => m.startsWith('ERROR') && !m.includes('OFLAG_COPIED')) ?? '';
  throw corrupt(
    `${structural} inconsistenc${structural === 1 ? 'y' : 'ies'} in the metadata (${first.replace(/^ERROR /, '')}); ` +
      'refusing to write. Inspect with `qemu-img check`, repair with `qemu-img check -r all`',
    { path },
  );
}
