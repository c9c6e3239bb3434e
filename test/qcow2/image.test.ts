import { createHash } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openImage } from '../../src/qcow2/image.js';
import { qemuImg, qemuIo } from '../helpers/tools.js';
import { guestWrite, qemuMissing, Workdir } from './fixtures.js';
import { readSnapshotVmState } from '../helpers/qcow2-vmstate.js';
import { copyFile } from 'node:fs/promises';
import { TargetFile } from '../../src/io/target-file.js';
import { loadImageState } from '../../src/qcow2/image-state.js';
import { dataClustersOf, forEachReachedTable } from '../../src/qcow2/reach.js';
import { RefcountStore } from '../../src/qcow2/refcount.js';
import { run } from '../helpers/tools.js';

/** Refcount of every data cluster the active L1 reaches, by host cluster index (data clusters never move). */
async function activeDataRefcounts(path: string): Promise<Map<number, number>> {
  const file = await TargetFile.open(path, { write: false, direct: false });
  try {
    const state = await loadImageState(file);
    const { layout, header } = state;
    const rc = await RefcountStore.load(file, layout, header.refcountTableOffset, header.refcountTableClusters, state.fileSizeBytes);
    const counts = new Map<number, number>();
    await forEachReachedTable(state, state.l1, async ({ l2 }) => {
      for (const cluster of dataClustersOf(l2, state)) counts.set(cluster, await rc.getAsync(cluster));
    });
    return counts;
  } finally {
    await file.close();
  }
}

async function collect(stream: NodeJS.ReadableStream): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const chunk of stream) parts.push(chunk as Buffer);
  return Buffer.concat(parts);
}

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

describe.skipIf(qemuMissing)('qcow2 image: open, list, export, delete, check', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-image');
  });
  afterAll(async () => work.cleanup());

  for (const clusterSize of [4096, 65536, 2 * 1024 * 1024]) {
    for (const compat of ['0.10', '1.1'] as const) {
      it(`lists snapshots exactly like qemu-img (cluster ${clusterSize}, compat ${compat})`, async () => {
        const path = await work.image({ sizeBytes: 64 << 20, clusterSize, compat });
        await guestWrite(path, 'write -P 0xab 0 1M');
        await qemuImg.snapshot(path, 'create', 'first');
        await guestWrite(path, 'write -P 0xcd 512k 1M');
        await qemuImg.snapshot(path, 'create', 'second');
        const expected = await qemuImg.snapshotList(path);
        const img = await openImage(path, { readOnly: true });
        try {
          const ours = img.snapshots().map((s) => ({
            id: s.id,
            name: s.name,
            vmStateSize: s.vmStateSize,
            dateSec: s.dateSec,
            dateNsec: s.dateNsec,
            vmClockNs: s.vmClockNs,
          }));
          expect(ours).toEqual(expected.map(({ icount: _icount, ...rest }) => rest));
          expect(img.snapshots()[0]!.diskSize).toBe(64 << 20);
        } finally {
          await img.close();
        }
        const check = await (async () => {
          const img2 = await openImage(path, { readOnly: true });
          try {
            return await img2.check();
          } finally {
            await img2.close();
          }
        })();
        const theirs = await qemuImg.check(path);
        expect(check.corruptions).toBe(theirs.corruptions ?? 0);
        expect(check.leaks).toBe(theirs.leaks ?? 0);
        expect(check.imageEndOffset).toBe(theirs['image-end-offset']);
        expect(check.allocatedClusters).toBe(theirs['allocated-clusters']);
        expect(check.totalClusters).toBe(theirs['total-clusters']);
      });
    }
  }

  it('deletes a snapshot so that qemu-img check stays clean and the other snapshot still restores', async () => {
    const path = await work.image({ sizeBytes: 64 << 20 });
    await guestWrite(path, 'write -P 0x11 0 2M');
    await qemuImg.snapshot(path, 'create', 'a');
    await guestWrite(path, 'write -P 0x22 1M 2M');
    await qemuImg.snapshot(path, 'create', 'b');
    await guestWrite(path, 'write -P 0x33 0 4M');
    const img = await openImage(path);
    try {
      await img.deleteSnapshot('a');
      expect(img.snapshots().map((s) => s.name)).toEqual(['b']);
    } finally {
      await img.close();
    }
    const check = await qemuImg.check(path);
    expect(check.exitCode).toBe(0);
    expect((await qemuImg.snapshotList(path)).map((s) => s.name)).toEqual(['b']);
    await qemuImg.snapshot(path, 'apply', 'b');
    await qemuIo(path, ['read -P 0x11 0 1M', 'read -P 0x22 1M 2M']);
    expect((await qemuImg.check(path)).exitCode).toBe(0);
  });

  it('leaves after a delete what `qemu-img snapshot -d` leaves: same snapshots, same data refcounts, same disks, check clean', async () => {
    const path = await work.image({ sizeBytes: 64 << 20, clusterSize: 65536 });
    await guestWrite(path, 'write -P 0x11 0 2M', 'write -c -P 0x12 8M 64k');
    await qemuImg.snapshot(path, 'create', 'a');
    await guestWrite(path, 'write -P 0x22 1M 2M', 'write -z 8M 64k');
    await qemuImg.snapshot(path, 'create', 'b');
    await guestWrite(path, 'write -P 0x33 0 512k');
    const theirs = work.path('theirs');
    await copyFile(path, theirs);
    await qemuImg.snapshot(theirs, 'delete', 'a');
    const img = await openImage(path);
    try {
      await img.deleteSnapshot('a');
    } finally {
      await img.close();
    }
    for (const p of [path, theirs]) {
      const check = await qemuImg.check(p);
      expect([check.exitCode, check.corruptions ?? 0, check.leaks ?? 0]).toEqual([0, 0, 0]);
    }
    expect(await qemuImg.snapshotList(path)).toEqual(await qemuImg.snapshotList(theirs));
    expect([...(await activeDataRefcounts(path))].sort()).toEqual([...(await activeDataRefcounts(theirs))].sort());
    expect((await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', path, theirs])).code).toBe(0);
    for (const p of [path, theirs]) await qemuImg.snapshot(p, 'apply', 'b');
    expect((await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', path, theirs])).code).toBe(0);
    expect((await qemuImg.check(path)).exitCode).toBe(0);
  });

  it('exports the vmstate of a snapshot written by QEMU savevm byte for byte', async () => {
    const path = await work.image({ sizeBytes: 64 << 20 });
    const { withPausedVm } = await import('../helpers/qemu.js');
    await withPausedVm({ ramMiB: 32, image: path }, async (vm) => vm.savevm('vm1'));
    const oracle = await readSnapshotVmState(path, 'vm1');
    const img = await openImage(path, { readOnly: true });
    try {
      const info = img.snapshots()[0]!;
      expect(info.vmStateSize).toBe(oracle.length);
      expect(info.icount).toBe(-1n);
      const ours = await collect(img.createVmStateReadStream('vm1', { chunkBytes: 256 * 1024 }));
      expect(sha(ours)).toBe(sha(oracle));
    } finally {
      await img.close();
    }
  });
});

describe.skipIf(qemuMissing)('qcow2 image: delete', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-delete');
  });
  afterAll(async () => work.cleanup());

  it('deletes a snapshot QEMU savevm wrote, vmstate included, leaving qemu-img check clean', async () => {
    const { withPausedVm } = await import('../helpers/qemu.js');
    const path = await work.image({ sizeBytes: 64 << 20 });
    await guestWrite(path, 'write -P 0x10 0 1M');
    await withPausedVm({ ramMiB: 32, image: path }, async (vm) => {
      await vm.savevm('one');
      await vm.savevm('two');
    });
    const img = await openImage(path);
    try {
      await img.deleteSnapshot('one');
      // By name only, as qemu-img snapshot -d and delvm look it up; the message names the id's snapshot.
      await expect(img.deleteSnapshot('2')).rejects.toThrow(/no snapshot named '2'; snapshot id 2 is named 'two'/);
      await img.deleteSnapshot('two');
      expect(img.snapshots()).toEqual([]);
      expect(await img.check()).toMatchObject({ corruptions: 0, leaks: 0 });
    } finally {
      await img.close();
    }
    const check = await qemuImg.check(path);
    expect(check.exitCode, JSON.stringify(check)).toBe(0);
    await qemuIo(path, ['read -P 0x10 0 1M']);
  });

  it('refuses unknown snapshots with SNAPSHOT_NOT_FOUND and read-only images with IMAGE_READ_ONLY', async () => {
    const path = await work.image({ sizeBytes: 16 << 20 });
    await qemuImg.snapshot(path, 'create', 'x');
    const img = await openImage(path);
    await expect(img.deleteSnapshot('nope')).rejects.toMatchObject({ code: 'SNAPSHOT_NOT_FOUND' });
    expect(() => img.createVmStateReadStream('nope')).toThrow(expect.objectContaining({ code: 'SNAPSHOT_NOT_FOUND' }));
    await img.close();
    await expect(img.check()).rejects.toMatchObject({ code: 'IMAGE_CLOSED' });
    const ro = await openImage(path, { readOnly: true });
    await expect(ro.deleteSnapshot('x')).rejects.toMatchObject({ code: 'IMAGE_READ_ONLY' });
    await expect(ro.beginSave('y')).rejects.toMatchObject({ code: 'IMAGE_READ_ONLY' });
    expect(() => ro.beginSave('')).toThrow(TypeError);
    expect(() => ro.beginSave('n'.repeat(256))).toThrow(RangeError);
    await ro.close();
  });
});

describe.skipIf(qemuMissing)('qcow2 image: paths as fs takes them', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-paths');
  });
  afterAll(async () => work.cleanup());

  it('accepts a file: URL and a UTF-8 Buffer wherever a path goes', async () => {
    const { createImage, createSnapshotStream } = await import('../../src/index.js');
    const { pathToFileURL } = await import('node:url');
    const { pipeline } = await import('node:stream/promises');
    const { fromChunks, pseudoRandom } = await import('../helpers/streams.js');
    const path = work.path('pâth with space');
    await createImage(pathToFileURL(path), { size: 16 << 20 });
    await pipeline(fromChunks([pseudoRandom(100_000, 5)]), createSnapshotStream(pathToFileURL(path), { snapshot: 'via-url' }));
    const img = await openImage(Buffer.from(path, 'utf8'));
    try {
      expect(img.path).toBe(path);
      expect(img.snapshots().map((s) => s.name)).toEqual(['via-url']);
    } finally {
      await img.close();
    }
    expect((await qemuImg.snapshotList(path)).map((s) => [s.name, s.vmStateSize])).toEqual([['via-url', 100_000]]);
  });

  it('refuses a URL that is not file: and a Buffer that is not UTF-8, naming the argument', () => {
    expect(() => openImage(new URL('http://example.com/disk.qcow2'))).toThrow(/Expected a file: URL for path/);
    expect(() => openImage(Buffer.from([0x2f, 0xff, 0xfe]))).toThrow(/Expected a UTF-8 path for path/);
    expect(() => openImage(42 as unknown as string)).toThrow(TypeError);
  });
});
