/**
 * What an open image knows about itself, loaded and validated in one place
 * (open), and the small metadata walks shared by save, delete and check.
 */
import { ErrorCode, SnapshotError } from '../errors.js';
import { corrupt, unsupported } from './fail.js';
import { acquireImageLocks, READER_LOCKS, WRITER_LOCKS, type LockPlan } from './lock.js';
import { readExact, type MetaFile } from './file.js';
import { decodeHeader, HEADER_PROBE_BYTES, probeClusterBits, type Qcow2Header } from './header.js';
import { assertNoOverlap, fixedMetadataRanges, validateHeader, type MetadataRange } from './header-validate.js';
import type { Layout } from './layout.js';
import { L1Table, L2Table } from './cluster-map.js';
import { readPadded, RefcountStore } from './refcount.js';
import {
  decodeSnapshotTable,
  QCOW_MAX_SNAPSHOTS_SIZE_BYTES,
  SNAPSHOT_HEADER_BYTES,
  validateSnapshotEntry,
  type SnapshotEntry,
} from './snapshot-table.js';

export interface ImageState {
  file: MetaFile;
  header: Qcow2Header;
  layout: Layout;
  /** File size in bytes, kept current by our own writes. */
  fileSizeBytes: number;
  /** Incompatible bit 0 was set at open. */
  dirty: boolean;
  /** A feature that allows listing only (header-validate.ts HeaderFacts.listOnly). */
  listOnly: string | undefined;
  l1: L1Table;
  snapshots: SnapshotEntry[];
  /** Exact byte length of the on-disk snapshot table. */
  snapshotTableBytes: number;
}

/** Reads and validates header, active L1 and snapshot table. Nothing is sized by an unchecked field. */
export async function loadImageState(file: MetaFile): Promise<ImageState> {
  const fileSizeBytes = (await file.stat()).size;
  const probe = Buffer.alloc(Math.min(HEADER_PROBE_BYTES, fileSizeBytes));
  await file.read(probe, 0);
  const clusterBits = probeClusterBits(probe);
  const cluster0 = Buffer.alloc(Math.min(2 ** clusterBits, fileSizeBytes));
  await file.read(cluster0, 0);
  const header = decodeHeader(cluster0);
  const { layout, dirty, listOnly } = validateHeader(header, fileSizeBytes);
  const l1Bytes = await readPadded(file, header.l1TableOffset, header.l1Size * 8, fileSizeBytes);
  const l1 = new L1Table(l1Bytes, layout);
  const { entries, tableBytes } = await readSnapshotTable(file, header, fileSizeBytes);
  entries.forEach((entry, i) => validateSnapshotEntry(entry, i, layout, fileSizeBytes));
  const ranges: MetadataRange[] = [
    ...fixedMetadataRanges(header, layout),
    { what: 'snapshot table', offset: header.snapshotsOffset, length: tableBytes },
  ];
  assertNoOverlap(ranges, layout);
  return { file, header, layout, fileSizeBytes, dirty, listOnly, l1, snapshots: entries, snapshotTableBytes: tableBytes };
}

async function readSnapshotTable(
  file: MetaFile,
  header: Qcow2Header,
  fileSizeBytes: number,
): Promise<{ entries: SnapshotEntry[]; tableBytes: number }> {
  if (header.nbSnapshots === 0) return { entries: [], tableBytes: 0 };
  const limit = Math.min(QCOW_MAX_SNAPSHOTS_SIZE_BYTES, fileSizeBytes - header.snapshotsOffset);
  let want = Math.min(limit, Math.max(64 * 1024, header.nbSnapshots * (SNAPSHOT_HEADER_BYTES + 40)));
  for (;;) {
    const buf = await readExact(file, header.snapshotsOffset, want, 'snapshot table');
    const result = decodeSnapshotTable(buf, header.nbSnapshots, header.size);
    if (!('needBytes' in result)) return result;
    if (result.needBytes > limit) {
      throw corrupt('snapshot table runs past the end of the file', { offset: header.snapshotsOffset });
    }
    want = Math.min(limit, Math.max(result.needBytes, want * 2));
  }
}

export async function readL2(state: Pick<ImageState, 'file' | 'layout' | 'fileSizeBytes'>, offset: number): Promise<L2Table> {
  if (offset + state.layout.clusterSize > state.layout.alignUp(state.fileSizeBytes)) {
    throw corrupt(`L2 table at ${offset} is past the end of the file`, { offset });
  }
  const bytes = await readPadded(state.file, offset, state.layout.clusterSize, state.fileSizeBytes);
  return new L2Table(bytes, offset, state.layout);
}

/** Reads a snapshot's L1 table (offset and size validated at open). */
export async function readSnapshotL1(state: ImageState, entry: SnapshotEntry): Promise<L1Table> {
  const bytes = await readPadded(state.file, entry.l1TableOffset, entry.l1Size * 8, state.fileSizeBytes);
  return new L1Table(bytes, state.layout);
}

/** Refuses, with QCOW2_UNSUPPORTED, to `what` an image that can only be listed. */
export function refuseListOnly(state: Pick<ImageState, 'listOnly' | 'file'>, what: string): void {
  if (state.listOnly !== undefined) throw unsupported(`${what} of an image with ${state.listOnly}`, { path: state.file.path });
}

/** The image's refcount table and blocks as committed now (offset and size validated at open). */
export function loadRefcounts(state: ImageState): Promise<RefcountStore> {
  const { file, layout, header, fileSizeBytes } = state;
  return RefcountStore.load(file, layout, header.refcountTableOffset, header.refcountTableClusters, fileSizeBytes);
}

/**
 * Opens an image on `file`: QEMU's lock bytes first (none with forceShare),
 * then the validated state. A dirty image (lazy refcounts not written back)
 * may be read but not written. The caller closes `file` on failure.
 */
export async function openImageState(
  file: MetaFile,
  config: { readonly readOnly: boolean; readonly forceShare: boolean },
): Promise<{ state: ImageState; locks: LockPlan | undefined }> {
  const locks = config.forceShare ? undefined : config.readOnly ? READER_LOCKS : WRITER_LOCKS;
  if (locks !== undefined) await acquireImageLocks(file, locks);
  const state = await loadImageState(file);
  if (state.listOnly !== undefined && !config.readOnly) {
    throw unsupported(`${state.listOnly}; open it read-only to list its snapshots`, { path: file.path, offset: 72 });
  }
  if (state.dirty && !config.readOnly) {
    // Not corrupt: QEMU with lazy refcounts sets it while running and rebuilds the refcounts on repair.
    throw new SnapshotError(
      ErrorCode.IMAGE_DIRTY,
      `image '${file.path}' is dirty: its lazy refcounts were not written back (QEMU stopped without closing it), ` +
        `so they cannot be trusted for a write. Repair it with \`qemu-img check -r all ${file.path}\`; reading works as it is`,
      { path: file.path, offset: 72 },
    );
  }
  return { state, locks };
}
