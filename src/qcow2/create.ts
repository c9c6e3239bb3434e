/**
 * Creating a qcow2 image laid out the way `qemu-img create` lays it out:
 *
 *   cluster 0          header (+ feature name table for v3)
 *   next clusters      refcount table, refcount blocks, active L1 table
 *   with 'metadata'    every L2 table, then every data cluster (not written;
 *                      the file is extended sparsely, so they read as zeros)
 *
 * The plan (what goes where) is computed first and is pure; writing it is a
 * separate step, so data preallocation modes ('falloc', 'full') only add a
 * step between laying out metadata and the final sync.
 */
import { TargetFile } from '../io/target-file.js';
import { L1Table, L2Table, QCOW_MAX_L1_SIZE_BYTES } from './cluster-map.js';
import { invariant, unsupported } from './fail.js';
import {
  CompatibleFeature,
  encodeHeader,
  HeaderExtensionType,
  V2_HEADER_LENGTH,
  type HeaderExtension,
  type Qcow2Header,
} from './header.js';
import { Layout } from './layout.js';
import { QCOW_MAX_REFTABLE_SIZE_BYTES, setRefcountEntry } from './refcount.js';

export type Preallocation = 'off' | 'metadata';

export interface CreateImageOptions {
  /** Virtual disk size in bytes; rounded up to 512 like qemu-img. */
  size: number;
  /** Power of two, 512 B .. 2 MiB. Default 64 KiB. */
  clusterSize?: number;
  /** 2 (compat=0.10) or 3 (compat=1.1). Default 3. */
  version?: 2 | 3;
  /** 'off' (default) or 'metadata' (all L2 tables and data clusters allocated up front). */
  preallocation?: Preallocation;
  /** Refcount entry width: 1, 2, 4, 8, 16, 32 or 64. Default 16; v2 requires 16. */
  refcountBits?: number;
  /** v3 only: set the lazy refcounts compatible bit. Default false. */
  lazyRefcounts?: boolean;
  /** Replace an existing file instead of failing with EEXIST. Default false. */
  overwrite?: boolean;
}

interface ResolvedCreateOptions {
  sizeBytes: number;
  layout: Layout;
  version: 2 | 3;
  preallocation: Preallocation;
  lazyRefcounts: boolean;
  overwrite: boolean;
}

/** Where each structure goes, in clusters. */
export interface CreatePlan {
  layout: Layout;
  l1Entries: number;
  refcountTableCluster: number;
  refcountTableClusters: number;
  refblockCluster: number;
  refblocks: number;
  l1Cluster: number;
  l1Clusters: number;
  /** First L2 table and first data cluster (metadata preallocation only). */
  l2Cluster: number;
  l2Tables: number;
  dataCluster: number;
  dataClusters: number;
  /** Clusters in use, all with refcount 1. */
  totalClusters: number;
}

const SECTOR_BYTES = 512;
const REFCOUNT_WIDTHS = [1, 2, 4, 8, 16, 32, 64];

function validateCreateOptions(options: CreateImageOptions): ResolvedCreateOptions {
  if (options === null || typeof options !== 'object') throw new TypeError('Expected an object for options');
  const { size } = options;
  if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0) {
    throw new RangeError(`Expected a non-negative integer for options.size, received ${String(size)}`);
  }
  const clusterSize = options.clusterSize ?? 65536;
  if (!Number.isInteger(clusterSize) || clusterSize < 512 || clusterSize > 2 << 20 || (clusterSize & (clusterSize - 1)) !== 0) {
    throw new RangeError(`Expected a power of two from 512 to 2097152 for options.clusterSize, received ${clusterSize}`);
  }
  const version = options.version ?? 3;
  if (version !== 2 && version !== 3) throw new RangeError(`Expected 2 or 3 for options.version, received ${String(version)}`);
  const preallocation = options.preallocation ?? 'off';
  if (preallocation !== 'off' && preallocation !== 'metadata') {
    throw new RangeError(`Expected 'off' or 'metadata' for options.preallocation, received ${String(preallocation)}`);
  }
  const refcountBits = options.refcountBits ?? 16;
  if (!REFCOUNT_WIDTHS.includes(refcountBits) || (version === 2 && refcountBits !== 16)) {
    throw new RangeError(`Expected one of ${REFCOUNT_WIDTHS.join(', ')} (16 for version 2) for options.refcountBits, received ${refcountBits}`);
  }
  if (options.lazyRefcounts === true && version === 2) throw new RangeError('Expected version 3 for options.lazyRefcounts');
  return {
    sizeBytes: Math.ceil(size / SECTOR_BYTES) * SECTOR_BYTES,
    layout: new Layout(Math.log2(clusterSize), Math.log2(refcountBits)),
    version,
    preallocation,
    lazyRefcounts: options.lazyRefcounts === true,
    overwrite: options.overwrite === true,
  };
}

/** Lays out the image; refcount blocks and table are sized until they cover themselves. */
export function planImage(sizeBytes: number, layout: Layout, preallocation: Preallocation): CreatePlan {
  const l1Entries = layout.l1EntriesFor(sizeBytes);
  if (l1Entries * 8 > QCOW_MAX_L1_SIZE_BYTES) throw unsupported(`a ${sizeBytes}-byte disk needs an L1 table above 32 MiB`);
  const l1Clusters = layout.clustersFor(l1Entries * 8);
  const dataClusters = preallocation === 'metadata' ? layout.clustersFor(sizeBytes) : 0;
  const l2Tables = preallocation === 'metadata' ? l1Entries : 0;
  let refcountTableClusters = 1;
  let refblocks = 1;
  for (;;) {
    const total = 1 + refcountTableClusters + refblocks + l1Clusters + l2Tables + dataClusters;
    const neededBlocks = Math.ceil(total / layout.refblockEntries);
    const neededTable = layout.clustersFor(neededBlocks * 8);
    if (neededBlocks <= refblocks && neededTable <= refcountTableClusters) break;
    refblocks = Math.max(refblocks, neededBlocks);
    refcountTableClusters = Math.max(refcountTableClusters, neededTable);
  }
  if (refcountTableClusters * layout.clusterSize > QCOW_MAX_REFTABLE_SIZE_BYTES) {
    throw unsupported("the refcount table would exceed QEMU's 8 MiB limit");
  }
  const refblockCluster = 1 + refcountTableClusters;
  const l1Cluster = refblockCluster + refblocks;
  const l2Cluster = l1Cluster + l1Clusters;
  const dataCluster = l2Cluster + l2Tables;
  return {
    layout,
    l1Entries,
    refcountTableCluster: 1,
    refcountTableClusters,
    refblockCluster,
    refblocks,
    l1Cluster,
    l1Clusters,
    l2Cluster,
    l2Tables,
    dataCluster,
    dataClusters,
    totalClusters: dataCluster + dataClusters,
  };
}

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

function buildHeader(o: ResolvedCreateOptions, plan: CreatePlan): Qcow2Header {
  const cs = o.layout.clusterSize;
  const v3 = o.version === 3;
  return {
    version: o.version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: o.layout.clusterBits,
    size: o.sizeBytes,
    cryptMethod: 0,
    l1Size: plan.l1Entries,
    l1TableOffset: plan.l1Cluster * cs,
    refcountTableOffset: plan.refcountTableCluster * cs,
    refcountTableClusters: plan.refcountTableClusters,
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
    extensions: v3 && cs >= 1024 ? [featureNameTable()] : [],
    backingFileName: undefined,
  };
}

/**
 * Creates `path` as an empty (or metadata-preallocated) qcow2 image. Option
 * mistakes throw synchronously (TypeError / RangeError naming the option).
 */
export function createImage(path: string, options: CreateImageOptions): Promise<void> {
  if (typeof path !== 'string' || path.length === 0) throw new TypeError(`Expected a non-empty path for path, received ${String(path)}`);
  const o = validateCreateOptions(options);
  return writeImage(path, o, planImage(o.sizeBytes, o.layout, o.preallocation));
}

async function writeImage(path: string, o: ResolvedCreateOptions, plan: CreatePlan): Promise<void> {
  const file = await TargetFile.open(path, {
    write: true,
    create: true,
    exclusive: !o.overwrite,
    truncate: o.overwrite,
    direct: false,
    mode: 0o644,
  });
  try {
    await writeMetadata(file, o, plan);
    // Data preallocation ('falloc', 'full') will go here, between metadata and the final sync.
    // fdatasync: the new image is complete and durable before createImage resolves.
    await file.datasync();
  } finally {
    await file.close();
  }
}

async function writeMetadata(file: TargetFile, o: ResolvedCreateOptions, plan: CreatePlan): Promise<void> {
  const { layout } = plan;
  const cs = layout.clusterSize;
  await file.write(encodeHeader(buildHeader(o, plan)), 0);
  const table = Buffer.alloc(plan.refcountTableClusters * cs);
  for (let i = 0; i < plan.refblocks; i++) table.writeBigUInt64BE(BigInt((plan.refblockCluster + i) * cs), i * 8);
  await file.write(table, plan.refcountTableCluster * cs);
  for (let i = 0; i < plan.refblocks; i++) {
    const block = Buffer.alloc(cs);
    const first = i * layout.refblockEntries;
    for (let c = first; c < Math.min(plan.totalClusters, first + layout.refblockEntries); c++) {
      setRefcountEntry(block, c - first, layout.refcountOrder, 1);
    }
    await file.write(block, (plan.refblockCluster + i) * cs);
  }
  const l1 = L1Table.empty(plan.l1Entries, layout);
  for (let t = 0; t < plan.l2Tables; t++) {
    l1.set(t, (plan.l2Cluster + t) * cs, true);
    await file.write(metadataL2(plan, t).bytes, (plan.l2Cluster + t) * cs);
  }
  await file.write(l1.bytes, plan.l1Cluster * cs);
  // Like qemu-img: without data clusters the file ends right after the L1 entries.
  const end = plan.dataClusters > 0 ? plan.totalClusters * cs : plan.l1Cluster * cs + plan.l1Entries * 8;
  invariant(end >= plan.l1Cluster * cs, 'file covers the L1 table');
  await file.truncate(end);
}

/** L2 table `t` of a metadata-preallocated image: every entry allocated, COPIED, in order. */
function metadataL2(plan: CreatePlan, t: number): L2Table {
  const { layout } = plan;
  const l2 = L2Table.empty((plan.l2Cluster + t) * layout.clusterSize, layout);
  for (let i = 0; i < layout.l2Entries; i++) {
    const guestCluster = t * layout.l2Entries + i;
    if (guestCluster >= plan.dataClusters) break;
    l2.setStandard(i, (plan.dataCluster + guestCluster) * layout.clusterSize, { copied: true });
  }
  return l2;
}
