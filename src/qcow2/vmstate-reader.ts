/**
 * Reads a snapshot's saved VM state: the bytes at guest offset
 * ceil(disk_size / L2 coverage) * L2 coverage through the SNAPSHOT's L1 table
 * (never the active one), exactly vm_state_size of them. Contiguous host
 * clusters are read with one large read; unallocated and zero clusters read
 * as zeros, as QEMU's loadvm sees them.
 */
import { Readable } from 'node:stream';
import type { L1Table, L2Table } from './cluster-map.js';
import { corrupt, unsupported } from './fail.js';
import { readExact } from './file.js';
import { readL2, readSnapshotL1, type ImageState } from './image-state.js';
import type { SnapshotEntry } from './snapshot-table.js';

/** Bytes per chunk pushed downstream; large enough that reads are not syscall bound. */
export const VMSTATE_READ_CHUNK_BYTES = 4 * 1024 * 1024;

/** Host offset of vmstate cluster `k`, 0 for zeros; throws for compressed or invalid entries. */
type ClusterLookup = (k: number) => Promise<number>;

function makeLookup(state: ImageState, l1: L1Table, entry: SnapshotEntry): ClusterLookup {
  const { layout } = state;
  const vmIndex = layout.vmStateL1Index(entry.diskSize);
  let cached: { index: number; table: L2Table | undefined } | undefined;
  return async (k) => {
    const l1Index = vmIndex + Math.floor(k / layout.l2Entries);
    if (cached?.index !== l1Index) {
      const l2Offset = l1Index < l1.entries ? l1.l2Offset(l1Index) : 0;
      cached = { index: l1Index, table: l2Offset === 0 ? undefined : await readL2(state, l2Offset) };
    }
    if (cached.table === undefined) return 0;
    const c = cached.table.entry(k % layout.l2Entries);
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

/** Fills `chunk` with vmstate clusters [firstCluster, ...), merging contiguous host runs into one read. */
async function fillChunk(state: ImageState, lookup: ClusterLookup, chunk: Buffer, firstCluster: number): Promise<void> {
  const { clusterSize } = state.layout;
  const clusters = Math.ceil(chunk.length / clusterSize);
  let runStart = -1;
  let runHost = 0;
  const flush = async (endCluster: number): Promise<void> => {
    if (runStart < 0) return;
    const from = (runStart - firstCluster) * clusterSize;
    const length = Math.min(chunk.length, (endCluster - firstCluster) * clusterSize) - from;
    const available = Math.min(length, state.fileSizeBytes - runHost);
    if (available > 0) chunk.set(await readExact(state.file, runHost, available, 'vmstate'), from);
    runStart = -1;
  };
  for (let k = firstCluster; k < firstCluster + clusters; k++) {
    const host = await lookup(k);
    const contiguous = runStart >= 0 && host === runHost + (k - runStart) * clusterSize;
    if (!contiguous) await flush(k);
    if (host !== 0 && runStart < 0) {
      runStart = k;
      runHost = host;
    }
  }
  await flush(firstCluster + clusters);
}

async function* vmStateChunks(state: ImageState, entry: SnapshotEntry, chunkBytes: number): AsyncGenerator<Buffer> {
  const l1 = await readSnapshotL1(state, entry);
  const lookup = makeLookup(state, l1, entry);
  const clustersPerChunk = Math.max(1, Math.floor(chunkBytes / state.layout.clusterSize));
  const stride = clustersPerChunk * state.layout.clusterSize;
  for (let position = 0; position < entry.vmStateSize; position += stride) {
    const chunk = Buffer.alloc(Math.min(stride, entry.vmStateSize - position));
    await fillChunk(state, lookup, chunk, position / state.layout.clusterSize);
    yield chunk;
  }
}

export function createVmStateReadStream(
  state: ImageState,
  entry: SnapshotEntry,
  chunkBytes = VMSTATE_READ_CHUNK_BYTES,
): Readable {
  return Readable.from(vmStateChunks(state, entry, chunkBytes), { objectMode: false, highWaterMark: chunkBytes });
}
