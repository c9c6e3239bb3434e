/**
 * Creating a qcow2 image exactly as `qemu-img create -f qcow2` (QEMU 7.2)
 * creates it, for every preallocation mode:
 *
 *   'off'       header, refcount table, one refcount block, the L1 table
 *   'metadata'  + every L2 table and every data cluster mapped (the data is
 *               not written: the file is extended sparsely, reads give zeros)
 *   'falloc'    + the data area reserved with fallocate(2)
 *   'full'      + the data area written with zeros
 *
 * Where each cluster goes comes from replaying QEMU's allocator
 * (preallocate-image.ts), so `qemu-img map` agrees with qemu-img's own image.
 * Writing is one step per structure with progress and cancel between steps;
 * a failed or aborted create removes the file, so no half-made image stays.
 */
import { unlink } from 'node:fs/promises';
import { ErrorCode, SnapshotError } from '../errors.js';
import { reserveSpace } from '../io/preallocate.js';
import { TargetFile } from '../io/target-file.js';
import { validatePath, type PathLike } from '../validate.js';
import { L1Table, L2Table } from './cluster-map.js';
import { invariant } from './fail.js';
import {
  CompatibleFeature,
  encodeHeader,
  encodedHeaderLength,
  HeaderExtensionType,
  V2_HEADER_LENGTH,
  type HeaderExtension,
  type Qcow2Header,
} from './header.js';
import { planImage, type ImagePlan } from './preallocate-image.js';
import { setRefcountEntry } from './refcount.js';
import { validateCreateOptions, type CreateImageOptions, type ResolvedCreateOptions } from './create-options.js';

export type { Preallocation } from './preallocate-image.js';
export type { CreateImageOptions, CreateProgress } from './create-options.js';

/** Zero writes for 'full': large enough to run at device speed, small enough to cancel promptly. */
const ZERO_WRITE_BYTES = 8 << 20;

/** QEMU's feature name table, so tools can name bits they do not know. */
function featureNameTable(): HeaderExtension {
  const names: Array<[number, number, string]> = [
    [0, 0, 'dirty bit'],
    [0, 1, 'corrupt bit'],
    [0, 2, 'external data file'],
    [0, 3, 'compression type'],
    [0, 4, 'extended L2 entries'],
    [1, 0, 'lazy refcounts'],
    [2, 0, 'bitmaps'],
    [2, 1, 'raw external data'],
  ];
  const data = Buffer.alloc(names.length * 48);
  names.forEach(([type, bit, name], i) => {
    data[i * 48] = type;
    data[i * 48 + 1] = bit;
    data.write(name, i * 48 + 2, 46, 'ascii');
  });
  return { type: HeaderExtensionType.FEATURE_NAME_TABLE, data };
}

function buildHeader(o: ResolvedCreateOptions, plan: ImagePlan): Qcow2Header {
  const cs = o.layout.clusterSize;
  const v3 = o.version === 3;
  // qcow2_update_header's order: backing format, then the feature name table (v3, where it fits).
  const extensions: HeaderExtension[] = [];
  if (o.backingFormat !== undefined) extensions.push({ type: HeaderExtensionType.BACKING_FORMAT, data: o.backingFormat });
  // qemu-img 7.2 writes the table only with clusters of 8 KiB and up (measured for 512 B .. 64 KiB).
  if (v3 && cs >= 8192) extensions.push(featureNameTable());
  const header: Qcow2Header = {
    version: o.version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: o.layout.clusterBits,
    size: o.sizeBytes,
    cryptMethod: 0,
    l1Size: plan.l1Entries,
    l1TableOffset: plan.l1Cluster * cs,
    refcountTableOffset: plan.reftableCluster * cs,
    refcountTableClusters: plan.reftableClusters,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: 0n,
    compatibleFeatures: o.lazyRefcounts ? CompatibleFeature.LAZY_REFCOUNTS : 0n,
    autoclearFeatures: 0n,
    refcountOrder: o.layout.refcountOrder,
    // v3: 104 bytes of fields, the compression_type byte, padding to 112 (as qemu-img writes).
    headerLength: v3 ? 112 : V2_HEADER_LENGTH,
    compressionType: 0,
    trailingHeaderBytes: v3 ? new Uint8Array(7) : new Uint8Array(0),
    extensions,
    backingFileName: undefined,
  };
  if (o.backingFile !== undefined) {
    // The name follows the end-of-extensions marker, as qemu-img places it.
    header.backingFileOffset = encodedHeaderLength(header);
    header.backingFileSize = o.backingFile.length;
    header.backingFileName = o.backingFile;
    if (header.backingFileOffset + header.backingFileSize > cs) {
      throw new RangeError(`Expected options.backingFile to fit in cluster 0 (${cs} bytes) with the header`);
    }
  }
  return header;
}

/**
 * Creates `path` as a qcow2 image, as `qemu-img create -f qcow2` would. Option
 * mistakes throw synchronously (TypeError / RangeError naming the option).
 * A failed or aborted create removes the file; the promise rejects with the
 * cause (ABORTED for an abort).
 */
export function createImage(path: PathLike, options: CreateImageOptions): Promise<void> {
  const target = validatePath(path, 'path');
  const o = validateCreateOptions(options);
  const plan = planImage(o.sizeBytes, o.layout, o.preallocation);
  const header = encodeHeader(buildHeader(o, plan));
  return writeImage(target, o, plan, header);
}

function checkAborted(o: ResolvedCreateOptions, path: string): void {
  if (o.signal?.aborted === true) {
    throw new SnapshotError(ErrorCode.ABORTED, `creating '${path}' aborted`, { path, cause: o.signal.reason });
  }
}

async function writeImage(path: string, o: ResolvedCreateOptions, plan: ImagePlan, header: Buffer): Promise<void> {
  checkAborted(o, path);
  const file = await TargetFile.open(path, {
    write: true,
    create: true,
    exclusive: !o.overwrite,
    truncate: o.overwrite,
    direct: false,
    mode: o.mode,
  });
  try {
    const progress = new Progress(o, plan);
    await file.truncate(plan.fileEndBytes);
    await writeMetadata(file, plan, progress);
    await preallocateData(file, o, plan, progress);
    // The magic goes last: a create cut short never looks like a qcow2 image.
    await file.write(header, 0);
    // fdatasync: the new image is complete and durable before createImage resolves.
    await file.datasync();
    await file.close();
  } catch (err) {
    await file.close().catch(() => undefined);
    // Ours alone (created, or truncated with overwrite): a half-made image is worse than none.
    await unlink(path).catch(() => undefined);
    throw err;
  }
}

/** Progress over every byte written or reserved; also the cancel point between steps. */
class Progress {
  readonly total: number;
  private _done = 0;

  constructor(
    private readonly _o: ResolvedCreateOptions,
    plan: ImagePlan,
  ) {
    const cs = plan.layout.clusterSize;
    const tables = plan.l2Clusters.filter((c) => c !== 0).length + plan.refblocks.filter((c) => c !== 0).length;
    const data = plan.dataArea === undefined ? 0 : plan.dataArea.clusters * cs;
    this.total = (tables + plan.reftableClusters) * cs + plan.l1Entries * 8 + data;
  }

  step(path: string, bytes: number): void {
    this._done += bytes;
    invariant(this._done <= this.total, 'progress stays within its total');
    this._o.onProgress?.({ bytesDone: this._done, bytesTotal: this.total });
    checkAborted(this._o, path);
  }
}

async function writeMetadata(file: TargetFile, plan: ImagePlan, progress: Progress): Promise<void> {
  const { layout } = plan;
  const cs = layout.clusterSize;
  const table = Buffer.alloc(plan.reftableClusters * cs);
  plan.refblocks.forEach((cluster, i) => table.writeBigUInt64BE(BigInt(cluster * cs), i * 8));
  await file.write(table, plan.reftableCluster * cs);
  progress.step(file.path, table.length);
  for (const [i, cluster] of plan.refblocks.entries()) {
    if (cluster === 0) continue;
    const block = Buffer.alloc(cs);
    const first = i * layout.refblockEntries;
    for (let c = 0; c < layout.refblockEntries; c++) {
      if (plan.used.get(first + c)) setRefcountEntry(block, c, layout.refcountOrder, 1);
    }
    await file.write(block, cluster * cs);
    progress.step(file.path, cs);
  }
  const l1 = L1Table.empty(plan.l1Entries, layout);
  for (const [t, cluster] of plan.l2Clusters.entries()) {
    if (cluster === 0) continue;
    l1.set(t, cluster * cs, true);
    await file.write(l2Table(plan, t).bytes, cluster * cs);
    progress.step(file.path, cs);
  }
  if (plan.l1Entries > 0) {
    // qemu-img writes the L1 entry-exact; with 'off' the file ends right after it.
    await file.write(l1.bytes.subarray(0, plan.l1Entries * 8), plan.l1Cluster * cs);
    progress.step(file.path, plan.l1Entries * 8);
  }
}

/** L2 table `t`: every data cluster the plan maps through it, COPIED (refcount 1). */
function l2Table(plan: ImagePlan, t: number): L2Table {
  const { layout } = plan;
  const l2 = L2Table.empty(plan.l2Clusters[t]! * layout.clusterSize, layout);
  const first = t * layout.l2Entries;
  for (const run of plan.dataRuns) {
    if (run.guestCluster < first || run.guestCluster >= first + layout.l2Entries) continue;
    for (let k = 0; k < run.count; k++) {
      l2.setStandard(run.guestCluster - first + k, (run.hostCluster + k) * layout.clusterSize, { copied: true });
    }
  }
  return l2;
}

/** 'falloc': fallocate the data area; 'full': write zeros over it (file-posix's PREALLOC_MODE_FULL). */
async function preallocateData(file: TargetFile, o: ResolvedCreateOptions, plan: ImagePlan, progress: Progress): Promise<void> {
  if (plan.dataArea === undefined) return;
  const cs = plan.layout.clusterSize;
  const offset = plan.dataArea.startCluster * cs;
  const length = plan.dataArea.clusters * cs;
  if (o.preallocation === 'falloc') {
    let reported = 0;
    await reserveSpace(file, offset, length, {
      signal: o.signal,
      chunkBytes: o.chunkBytes,
      restoreSize: plan.fileEndBytes,
      onProgress: ({ bytesDone }) => {
        progress.step(file.path, bytesDone - reported);
        reported = bytesDone;
      },
    });
    // Unwatched reservations report nothing; account for them in one step.
    if (reported < length) progress.step(file.path, length - reported);
    return;
  }
  invariant(o.preallocation === 'full', 'data preallocation mode');
  const zeros = Buffer.alloc(Math.min(o.chunkBytes ?? ZERO_WRITE_BYTES, ZERO_WRITE_BYTES, length));
  for (let done = 0; done < length; ) {
    const n = Math.min(zeros.length, length - done);
    await file.write(n === zeros.length ? zeros : zeros.subarray(0, n), offset + done);
    done += n;
    progress.step(file.path, n);
  }
}
