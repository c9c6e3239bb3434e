/**
 * The allocator over committed refcounts and the vmstate placement: pure
 * logic first (first fit, end of file, exclusions, never a freed cluster),
 * then free runs found in an image where QEMU itself deleted a snapshot,
 * checked against the deleted vmstate's host clusters read by the
 * independent test reader.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ClusterAllocator, findFreeRuns, subtractExtents, type ClusterRun, type RefcountView } from '../../src/qcow2/allocator.js';
import { Layout } from '../../src/qcow2/layout.js';
import { VmStateRuns } from '../../src/qcow2/vmstate-runs.js';
import { loadImageState } from '../../src/qcow2/image-state.js';
import { RefcountStore } from '../../src/qcow2/refcount.js';
import { TargetFile } from '../../src/io/target-file.js';
import { vmStateLayout } from '../helpers/qcow2-vmstate.js';
import { pseudoRandom } from '../helpers/streams.js';
import { openImage } from '../../src/qcow2/image.js';
import { qemuImg, qemuIo } from '../helpers/tools.js';
import { qemuMissing, Workdir } from './fixtures.js';

const layout = new Layout(16, 4); // 64 KiB clusters, 16-bit refcounts
const C = layout.clusterSize;

/** Refcounts from an array: index = cluster. */
function view(refcounts: number[]): RefcountView {
  return {
    layout,
    preloadRange: async () => undefined,
    get: (cluster: number) => refcounts[cluster] ?? 0,
  };
}

describe('free runs from committed refcounts', () => {
  it('finds every run of refcount-0 clusters below the end, in file order', async () => {
    const runs = await findFreeRuns(view([1, 1, 0, 0, 1, 0, 1, 0, 0, 0]), 10);
    expect(runs).toEqual([
      { first: 2, count: 2 },
      { first: 5, count: 1 },
      { first: 7, count: 3 },
    ]);
  });

  it('subtracts byte ranges cluster by cluster, splitting runs', () => {
    const runs: ClusterRun[] = [{ first: 2, count: 10 }];
    expect(subtractExtents(runs, [{ offset: 4 * C + 100, length: C }], layout)).toEqual([
      { first: 2, count: 2 },
      { first: 6, count: 6 },
    ]);
  });
});

describe('ClusterAllocator', () => {
  it('hands out the lowest free run that fits (first fit), then the end of the file', () => {
    const alloc = new ClusterAllocator(layout, [{ first: 3, count: 1 }, { first: 6, count: 4 }], 20);
    expect(alloc.allocClusters(2)).toBe(6 * C);
    expect(alloc.allocClusters(1)).toBe(3 * C);
    expect(alloc.allocClusters(3)).toBe(20 * C);
    expect(alloc.allocClusters(2)).toBe(8 * C);
    expect(alloc.endOffset).toBe(23 * C);
    expect(alloc.takenSince(0)).toEqual([
      { first: 6, count: 2 },
      { first: 3, count: 1 },
      { first: 20, count: 3 },
      { first: 8, count: 2 },
    ]);
    expect(alloc.takenSince(3)).toEqual([{ first: 8, count: 2 }]);
  });

  it('never hands out an excluded cluster (a running save, the vmstate already written)', () => {
    const alloc = new ClusterAllocator(layout, [{ first: 2, count: 8 }], 10, {
      exclude: [
        { offset: 2 * C, length: 3 * C },
        { offset: 12 * C, length: 2 * C },
      ],
    });
    expect(alloc.freeRuns()).toEqual([{ first: 5, count: 5 }]);
    expect(alloc.allocClusters(5)).toBe(5 * C);
    // The exclusion past the end moved the end past it.
    expect(alloc.allocClusters(1)).toBe(14 * C);
  });

  it('takes only the end of the file when told to (space reserved with fallocate)', () => {
    const alloc = new ClusterAllocator(layout, [{ first: 2, count: 8 }], 10, { endOnly: true });
    expect(alloc.allocClusters(1)).toBe(10 * C);
  });

  it('extends a free run that reaches the end instead of skipping it', () => {
    const alloc = new ClusterAllocator(layout, [{ first: 8, count: 2 }], 10);
    expect(alloc.allocClusters(5)).toBe(8 * C);
    expect(alloc.endOffset).toBe(13 * C);
  });

  it('never hands out a cluster that was in use when the runs were taken, whatever is freed later', async () => {
    const refcounts = [1, 1, 1, 0, 1, 1, 0, 0];
    const alloc = await ClusterAllocator.fromRefcounts(view(refcounts), 8 * C);
    // The operation frees clusters 4 and 5 in memory; the allocator must not see it.
    refcounts[4] = 0;
    refcounts[5] = 0;
    const handed = [alloc.allocClusters(1), alloc.allocClusters(1), alloc.allocClusters(1), alloc.allocClusters(2)];
    expect(handed).toEqual([3 * C, 6 * C, 7 * C, 8 * C]);
  });

  it('takes a caller-placed range and keeps the skipped clusters free', () => {
    const alloc = new ClusterAllocator(layout, [{ first: 2, count: 4 }], 10);
    alloc.takeRange(3, 2);
    alloc.takeRange(12, 4);
    expect(alloc.freeRuns()).toEqual([
      { first: 2, count: 1 },
      { first: 5, count: 1 },
      { first: 10, count: 2 },
    ]);
    expect(alloc.endOffset).toBe(16 * C);
    expect(() => alloc.takeRange(3, 1)).toThrow(/free/);
  });

  it('refuses a range that is in use', () => {
    const alloc = new ClusterAllocator(layout, [{ first: 2, count: 2 }], 10);
    expect(() => alloc.takeRange(3, 3)).toThrow(/INTERNAL|invariant/);
  });
});

describe('vmstate placement', () => {
  const MiB = 1 << 20;
  const runsOf = (...spec: Array<[number, number]>): ClusterRun[] => spec.map(([first, count]) => ({ first, count }));

  it('skips runs shorter than one ring buffer and ends open-ended at the aligned end of the file', () => {
    // 64 KiB clusters: 16 clusters = 1 MiB, 64 = 4 MiB.
    const plan = VmStateRuns.plan(runsOf([2, 16], [40, 64], [200, 70]), 300 * C + 4096, layout, {
      chunkBytes: 4 * MiB,
      alignBytes: 4096,
    });
    expect(plan.extents).toEqual([
      { logical: 0, offset: 40 * C, length: 64 * C },
      { logical: 64 * C, offset: 200 * C, length: 70 * C },
    ]);
    expect(plan.tailLogical).toBe(134 * C);
    expect(plan.tailOffset).toBe(301 * C);
  });

  it('takes the smallest run that holds the expected size (best fit)', () => {
    const plan = VmStateRuns.plan(runsOf([10, 200], [300, 80], [500, 100]), 1000 * C, layout, {
      chunkBytes: 4 * MiB,
      alignBytes: 4096,
      expectedBytes: 90 * C,
    });
    expect(plan.extents).toEqual([{ logical: 0, offset: 500 * C, length: 100 * C }]);
  });

  it('spans every usable run when none holds the expected size', () => {
    const plan = VmStateRuns.plan(runsOf([10, 64], [300, 80]), 1000 * C, layout, {
      chunkBytes: 4 * MiB,
      alignBytes: 4096,
      expectedBytes: 500 * C,
    });
    expect(plan.extents.map((e) => e.offset)).toEqual([10 * C, 300 * C]);
  });

  it('aligns runs to the O_DIRECT alignment when it exceeds the cluster size', () => {
    const small = new Layout(9, 4); // 512-byte clusters
    const plan = VmStateRuns.plan([{ first: 3, count: 20_000 }], 40_000 * 512, small, { chunkBytes: 1 * MiB, alignBytes: 4096 });
    expect(plan.extents[0]!.offset % 4096).toBe(0);
    expect((plan.extents[0]!.offset + plan.extents[0]!.length) % 4096).toBe(0);
    expect(plan.tailOffset % 4096).toBe(0);
  });

  it('places whole buffers with one offset and splits a buffer that crosses the end of a run', () => {
    const plan = new VmStateRuns(
      [
        { logical: 0, offset: 100 * C, length: 96 * C },
        { logical: 96 * C, offset: 400 * C, length: 64 * C },
      ],
      1000 * C,
      C,
    );
    expect(plan.place(0, 64 * C)).toBe(100 * C);
    expect(plan.place(64 * C, 64 * C)).toEqual([
      { from: 0, to: 32 * C, position: 164 * C },
      { from: 32 * C, to: 64 * C, position: 400 * C },
    ]);
    expect(plan.place(128 * C, 64 * C)).toEqual([
      { from: 0, to: 32 * C, position: 432 * C },
      { from: 32 * C, to: 64 * C, position: 1000 * C },
    ]);
    expect(plan.place(192 * C, 64 * C)).toBe(1032 * C);
    expect(plan.hostOffset(97 * C + 5)).toBe(401 * C + 5);
  });

  it('lists the host clusters a vmstate of a given length uses, in logical order', () => {
    const plan = new VmStateRuns([{ logical: 0, offset: 100 * C, length: 4 * C }], 50_000 * C, C);
    expect(plan.usedExtents(3 * C + 1)).toEqual([{ offset: 100 * C, length: 4 * C }]);
    expect(plan.usedExtents(5 * C + 1)).toEqual([
      { offset: 100 * C, length: 4 * C },
      { offset: 50_000 * C, length: 2 * C },
    ]);
    expect(plan.usedExtents(0)).toEqual([]);
  });
});

describe.skipIf(qemuMissing)('free runs in an image where QEMU deleted a snapshot', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-allocator');
  });
  afterAll(async () => work.cleanup());

  it("hold the deleted snapshot's vmstate and none of the data clusters the active disk maps", async () => {
    const path = await work.image({ sizeBytes: 64 << 20, clusterSize: 65536 });
    await qemuIo(path, ['write -P 0x11 0 4M']);
    const img = await openImage(path);
    const { baseOffset } = await img.beginSave('gone');
    const data = await TargetFile.open(path, { write: true, direct: false });
    await data.write(pseudoRandom(3 << 20, 7), baseOffset);
    await data.datasync();
    await data.close();
    await img.commitSave({ vmStateSize: 3 << 20 });
    await img.close();
    const vmClusters = (await vmStateLayout(path, 'gone')).hostClusters.map((h) => h / C);
    expect(vmClusters.length).toBe(48);
    await qemuImg.snapshot(path, 'delete', 'gone');
    const mapped = (await qemuImg.map(path)).filter((e) => e.data && e.offset !== undefined);

    const file = await TargetFile.open(path, { write: false, direct: false });
    try {
      const state = await loadImageState(file);
      const rc = await RefcountStore.load(file, state.layout, state.header.refcountTableOffset, state.header.refcountTableClusters, state.fileSizeBytes);
      const runs = await findFreeRuns(rc, state.layout.clustersFor(state.fileSizeBytes));
      const isFree = (cluster: number): boolean => runs.some((r) => cluster >= r.first && cluster < r.first + r.count);
      expect(vmClusters.filter((c) => !isFree(c))).toEqual([]);
      for (const e of mapped) {
        for (let at = e.offset!; at < e.offset! + e.length; at += C) expect(isFree(at / C), `data cluster at ${at}`).toBe(false);
      }
      expect(isFree(0)).toBe(false);
    } finally {
      await file.close();
    }
  });
});
