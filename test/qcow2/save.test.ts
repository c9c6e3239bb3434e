import { createHash } from 'node:crypto';
import { stat } from 'node:fs/promises';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TargetFile } from '../../src/io/target-file.js';
import { openImage, type Image } from '../../src/qcow2/image.js';
import { readSnapshotVmState } from '../helpers/qcow2-vmstate.js';
import { fromChunks, pseudoRandom } from '../helpers/streams.js';
import { qemuImg, qemuIo, requireTool } from '../helpers/tools.js';
import { guestWrite, qemuMissing, readBytes, Workdir } from './fixtures.js';

const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

async function collect(stream: NodeJS.ReadableStream): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const chunk of stream) parts.push(chunk as Buffer);
  return Buffer.concat(parts);
}

/** beginSave + a plain write of `data` at baseOffset + fdatasync + commitSave. */
async function saveWithCalls(img: Image, name: string, data: Buffer, vmClockNs = 0n): Promise<void> {
  const { baseOffset } = await img.beginSave(name);
  const file = await TargetFile.open(img.path, { write: true, create: false, direct: false });
  try {
    if (data.length > 0) await file.write(data, baseOffset);
    await file.datasync();
  } finally {
    await file.close();
  }
  await img.commitSave({ vmStateSize: data.length, vmClockNs, date: new Date(1_700_000_000_123) });
}

async function exportVmState(path: string, name: string): Promise<Buffer> {
  const img = await openImage(path, { readOnly: true });
  try {
    return await collect(img.createVmStateReadStream(name));
  } finally {
    await img.close();
  }
}

describe.skipIf(qemuMissing)('qcow2 save (QEMU savevm semantics)', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-save');
  });
  afterAll(async () => work.cleanup());

  for (const clusterSize of [4096, 65536, 2 * 1024 * 1024]) {
    for (const compat of ['0.10', '1.1'] as const) {
      it(`saves a snapshot qemu-img accepts, lists and restores (cluster ${clusterSize}, compat ${compat})`, async () => {
        const path = await work.image({ sizeBytes: 256 << 20, clusterSize, compat });
        await guestWrite(path, 'write -P 0xab 0 3M');
        const vmstate = pseudoRandom(5 * 1024 * 1024 + 12345, clusterSize);
        const img = await openImage(path);
        try {
          await saveWithCalls(img, 'saved', vmstate, 987_654_321_000n);
        } finally {
          await img.close();
        }
        const check = await qemuImg.check(path);
        expect(check.exitCode, JSON.stringify(check)).toBe(0);
        const [listed] = await qemuImg.snapshotList(path);
        expect(listed).toMatchObject({ id: '1', name: 'saved', vmStateSize: vmstate.length, vmClockNs: 987_654_321_000n });
        expect(listed!.dateSec).toBe(1_700_000_000);
        expect(listed!.dateNsec).toBe(123_000_000);
        expect(sha(await exportVmState(path, 'saved'))).toBe(sha(vmstate));
        expect(sha(await readSnapshotVmState(path, 'saved'))).toBe(sha(vmstate));
        // Writes after the save must not reach the snapshot.
        await guestWrite(path, 'write -P 0xcd 1M 1M');
        await qemuImg.snapshot(path, 'apply', 'saved');
        await qemuIo(path, ['read -P 0xab 0 3M']);
        expect((await qemuImg.check(path)).exitCode).toBe(0);
        expect(sha(await exportVmState(path, 'saved'))).toBe(sha(vmstate));
      });
    }
  }

  it('gives ids max+1, refuses a duplicate name with SNAPSHOT_EXISTS, and qemu-img deletes our snapshot cleanly', async () => {
    const path = await work.image({ sizeBytes: 64 << 20 });
    await qemuImg.snapshot(path, 'create', 'q1');
    const img = await openImage(path);
    try {
      await saveWithCalls(img, 'ours', Buffer.from('hello vmstate'));
      await expect(img.beginSave('ours')).rejects.toMatchObject({ code: 'SNAPSHOT_EXISTS' });
      await expect(img.beginSave('1')).rejects.toMatchObject({ code: 'SNAPSHOT_EXISTS' });
      expect(img.snapshots().map((s) => [s.id, s.name])).toEqual([
        ['1', 'q1'],
        ['2', 'ours'],
      ]);
    } finally {
      await img.close();
    }
    await qemuImg.snapshot(path, 'delete', 'ours');
    expect((await qemuImg.check(path)).exitCode).toBe(0);
  });

  it('saves through createSnapshotStream with O_DIRECT, and refuses a zero-length vmstate with SNAPSHOT_EMPTY', async () => {
    const path = await work.image({ sizeBytes: 128 << 20 });
    await guestWrite(path, 'write -P 0x5a 0 1M');
    const vmstate = pseudoRandom(3 * 1024 * 1024 + 7, 7);
    const img = await openImage(path);
    let sizeAfterSave = 0;
    try {
      const chunks = [] as Buffer[];
      for (let i = 0; i < vmstate.length; i += 4104) chunks.push(vmstate.subarray(i, i + 4104));
      await pipeline(fromChunks(chunks), img.createSnapshotStream('streamed', { bufferSize: 1 << 20 }));
      sizeAfterSave = (await stat(path)).size;
      // QEMU would read a 0-byte vmstate as a disk-only snapshot, which loadvm refuses.
      await expect(pipeline(fromChunks([]), img.createSnapshotStream('empty'))).rejects.toMatchObject({ code: 'SNAPSHOT_EMPTY' });
      expect(img.snapshots().map((s) => s.name)).toEqual(['streamed']);
    } finally {
      await img.close();
    }
    expect((await stat(path)).size).toBe(sizeAfterSave);
    expect((await qemuImg.check(path)).exitCode).toBe(0);
    expect(sha(await exportVmState(path, 'streamed'))).toBe(sha(vmstate));
    expect((await qemuImg.snapshotList(path)).map((s) => [s.name, s.vmStateSize])).toEqual([['streamed', vmstate.length]]);
  });

  it('streams with O_DIRECT into 512-byte clusters by starting the vmstate on an aligned offset', async () => {
    const path = await work.image({ sizeBytes: 8 << 20, clusterSize: 512 });
    await guestWrite(path, 'write -P 0x5a 0 100k');
    const vmstate = pseudoRandom(1_000_003, 9);
    const img = await openImage(path);
    try {
      const stream = img.createSnapshotStream('small-clusters', { bufferSize: 256 * 1024 });
      await pipeline(fromChunks([vmstate]), stream);
      expect(stream.direct).toBe(true);
    } finally {
      await img.close();
    }
    expect((await qemuImg.check(path)).exitCode).toBe(0);
    expect(sha(await exportVmState(path, 'small-clusters'))).toBe(sha(vmstate));
  });

  it('saves through the path-based sink factory, which closes the image afterwards', async () => {
    const { SnapshotStream } = await import('../../src/stream/snapshot-stream.js');
    const { validateStreamOptions } = await import('../../src/options.js');
    const { qcow2SinkFactory } = await import('../../src/qcow2/image.js');
    const path = await work.image({ sizeBytes: 32 << 20 });
    const vmstate = pseudoRandom(777_777, 3);
    const opts = validateStreamOptions({ snapshot: 'by-path', vmClockNs: 5_000_000_000n });
    await pipeline(fromChunks([vmstate]), new SnapshotStream(opts, qcow2SinkFactory(path, 'by-path', opts)));
    expect((await qemuImg.check(path)).exitCode).toBe(0);
    expect(await qemuImg.snapshotList(path)).toMatchObject([{ name: 'by-path', vmStateSize: 777_777, vmClockNs: 5_000_000_000n }]);
    const img = await openImage(path);
    await img.close();
  });

  it('an aborted stream leaves no snapshot, the old file length and a clean image', async () => {
    const path = await work.image({ sizeBytes: 32 << 20 });
    await guestWrite(path, 'write -P 0x12 0 1M');
    const before = (await stat(path)).size;
    const img = await openImage(path);
    try {
      const controller = new AbortController();
      const stream = img.createSnapshotStream('aborted', { bufferSize: 1 << 20, signal: controller.signal });
      const source = (async function* () {
        for (let i = 0; i < 8; i++) yield pseudoRandom(1 << 20, i);
        controller.abort();
        yield pseudoRandom(1 << 20, 99);
      })();
      await expect(pipeline(source, stream)).rejects.toMatchObject({ code: 'ABORTED' });
      expect(img.snapshots()).toEqual([]);
      await saveWithCalls(img, 'after-abort', Buffer.from('still usable'));
    } finally {
      await img.close();
    }
    expect((await qemuImg.check(path)).exitCode).toBe(0);
    expect((await qemuImg.snapshotList(path)).map((s) => s.name)).toEqual(['after-abort']);
    expect((await stat(path)).size).toBeLessThan(before + (1 << 20));
  });

  it('reuses the free tail a save killed while streaming left behind', async () => {
    const path = await work.image({ sizeBytes: 32 << 20 });
    await guestWrite(path, 'write -P 0x13 0 1M');
    const clean = (await stat(path)).size;
    const { appendFile } = await import('node:fs/promises');
    await appendFile(path, pseudoRandom(3 << 20, 1)); // what a killed stream leaves: unreferenced bytes past EOF
    expect((await qemuImg.check(path)).exitCode).toBe(0);
    const img = await openImage(path);
    try {
      const { baseOffset } = await img.beginSave('reuse');
      expect(baseOffset).toBe(Math.ceil(clean / 65536) * 65536);
      await img.abortSave();
      await saveWithCalls(img, 'reuse', pseudoRandom(100_000, 2));
    } finally {
      await img.close();
    }
    expect((await qemuImg.check(path)).exitCode).toBe(0);
    expect(sha(await exportVmState(path, 'reuse'))).toBe(sha(pseudoRandom(100_000, 2)));
  });

  it('refuses bad commit metadata with RangeError naming the field, and the save can then be aborted', async () => {
    const path = await work.image({ sizeBytes: 16 << 20 });
    const img = await openImage(path);
    try {
      await img.beginSave('meta');
      await expect(img.commitSave({ vmStateSize: -1 })).rejects.toThrow(/vmStateSize/);
      await img.beginSave('meta');
      await expect(img.commitSave({ vmStateSize: 1, date: new Date(-5) })).rejects.toThrow(/for date/);
      await img.beginSave('meta');
      await expect(img.commitSave({ vmStateSize: 1, vmClockNs: -1n })).rejects.toThrow(/vmClockNs/);
      expect(img.snapshots()).toEqual([]);
    } finally {
      await img.close();
    }
    expect((await qemuImg.check(path)).exitCode).toBe(0);
  });

  it('abortSave truncates the file back and leaves qemu-img check clean', async () => {
    const path = await work.image({ sizeBytes: 64 << 20 });
    await guestWrite(path, 'write -P 0x01 0 1M');
    const before = (await stat(path)).size;
    const img = await openImage(path);
    try {
      const { baseOffset } = await img.beginSave('never');
      const file = await TargetFile.open(path, { write: true, create: false, direct: false });
      await file.write(pseudoRandom(1 << 20, 3), baseOffset);
      await file.close();
      await img.abortSave();
      expect(img.snapshots()).toEqual([]);
    } finally {
      await img.close();
    }
    expect((await stat(path)).size).toBe(before);
    expect((await qemuImg.check(path)).exitCode).toBe(0);
  });

  it('adds refcount blocks when the vmstate needs them (4 KiB clusters, 8-bit refcounts)', async () => {
    // 4 KiB clusters, 8-bit refcounts: one refcount block covers 16 MiB, so 40 MiB needs new blocks.
    const path = await work.image({ sizeBytes: 16 << 20, clusterSize: 4096, refcountBits: 8 });
    await guestWrite(path, 'write -P 0x42 0 1M');
    const vmstate = pseudoRandom(40 << 20, 11);
    const img = await openImage(path);
    try {
      await saveWithCalls(img, 'big', vmstate);
    } finally {
      await img.close();
    }
    expect((await qemuImg.check(path)).exitCode).toBe(0);
    expect(sha(await exportVmState(path, 'big'))).toBe(sha(vmstate));
  });

  it('changes no live metadata in place: COPIED changes go to fresh L2 copies, the snapshot keeps the originals', async () => {
    const path = await work.image({ sizeBytes: 64 << 20, clusterSize: 65536 });
    await guestWrite(path, 'write -P 0x42 0 1M', 'write -P 0x43 40M 64k');
    const l1Before = (await readBytes(path, 40, 8)).readBigUInt64BE();
    const img = await openImage(path);
    try {
      await saveWithCalls(img, 'one', pseudoRandom(70_000, 3));
      await saveWithCalls(img, 'two', pseudoRandom(70_000, 4)); // nothing left to un-COPY: the L2 tables are shared
    } finally {
      await img.close();
    }
    const after = await qemuImg.check(path);
    expect([after.exitCode, after.leaks ?? 0, after.corruptions ?? 0]).toEqual([0, 0, 0]);
    expect((await readBytes(path, 40, 8)).readBigUInt64BE(), 'the active L1 is a fresh copy').not.toBe(l1Before);
    await guestWrite(path, 'write -P 0x44 0 64k');
    for (const [name, reads] of [
      ['one', ['read -P 0x42 0 1M', 'read -P 0x43 40M 64k']],
      ['two', ['read -P 0x42 0 1M', 'read -P 0x43 40M 64k']],
    ] as const) {
      await qemuImg.snapshot(path, 'apply', name);
      await qemuIo(path, [...reads]);
      expect((await qemuImg.check(path)).exitCode).toBe(0);
    }
  });

  it('reserves enough space for the shadow copies: copied L2 tables, L1, refcount blocks and table (4 KiB clusters)', async () => {
    // 4 KiB clusters: one L2 table maps 2 MiB, so 64 KiB every 2 MiB puts COPIED entries in 64 L2 tables.
    const path = await work.image({ sizeBytes: 128 << 20, clusterSize: 4096, refcountBits: 8 });
    const writes: string[] = [];
    for (let mib = 0; mib < 128; mib += 2) writes.push(`write -P 0x42 ${mib}M 64k`);
    await guestWrite(path, ...writes);
    const vmstate = pseudoRandom(3 << 20, 9);
    const img = await openImage(path);
    try {
      const { baseOffset } = await img.beginSave('bounded');
      const save = (img as unknown as { _saves: { session: { tx: { reservationBytes(bytes: number): number } } } })._saves.session.tx;
      const bound = save.reservationBytes(vmstate.length);
      const file = await TargetFile.open(img.path, { write: true, create: false, direct: false });
      try {
        await file.write(vmstate, baseOffset);
        await file.datasync();
      } finally {
        await file.close();
      }
      await img.commitSave({ vmStateSize: vmstate.length });
      const end = (await stat(path)).size;
      expect(end - baseOffset).toBeGreaterThan(vmstate.length + 64 * 4096); // the 64 L2 copies are there
      expect(end - baseOffset).toBeLessThanOrEqual(bound);
    } finally {
      await img.close();
    }
    expect((await qemuImg.check(path)).exitCode).toBe(0);
  });

  it('refuses to save into an image whose refcounts are 1 bit wide, before writing anything', async () => {
    const path = await work.image({ sizeBytes: 16 << 20, refcountBits: 1 });
    await guestWrite(path, 'write -P 0x42 0 64k');
    const img = await openImage(path);
    try {
      await expect(saveWithCalls(img, 'x', Buffer.alloc(100))).rejects.toMatchObject({ code: 'QCOW2_UNSUPPORTED' });
    } finally {
      await img.close();
    }
    expect((await qemuImg.check(path)).exitCode).toBe(0);
    expect(await qemuImg.snapshotList(path)).toEqual([]);
  });
});

const vmMissing = qemuMissing ?? requireTool('qemu-system-x86_64');

describe.skipIf(vmMissing)('qcow2 save read back by QEMU loadvm', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-loadvm');
  });
  afterAll(async () => work.cleanup());

  it('QEMU loadvm restores a snapshot whose vmstate snapstream wrote', async () => {
    const { withPausedVm } = await import('../helpers/qemu.js');
    const path = await work.image({ sizeBytes: 64 << 20 });
    await guestWrite(path, 'write -P 0x77 0 2M');
    await withPausedVm({ ramMiB: 32, image: path }, async (vm) => vm.savevm('by-qemu'));
    const vmstate = await exportVmState(path, 'by-qemu');
    await qemuImg.snapshot(path, 'delete', 'by-qemu');
    const img = await openImage(path);
    try {
      await saveWithCalls(img, 'by-snapstream', vmstate);
    } finally {
      await img.close();
    }
    await guestWrite(path, 'write -P 0x99 0 2M');
    expect((await qemuImg.check(path)).exitCode).toBe(0);
    await withPausedVm({ ramMiB: 32, image: path }, async (vm) => {
      await vm.loadvm('by-snapstream');
      expect(['paused', 'prelaunch']).toContain(await vm.status());
    });
    await qemuIo(path, ['read -P 0x77 0 2M']);
    expect((await qemuImg.check(path)).exitCode).toBe(0);
  });

  it('saves next to a QEMU savevm snapshot (active L1 still maps the vmstate area) and QEMU loads both', async () => {
    const { withPausedVm } = await import('../helpers/qemu.js');
    const path = await work.image({ sizeBytes: 64 << 20 });
    await guestWrite(path, 'write -P 0x31 0 1M');
    await withPausedVm({ ramMiB: 32, image: path }, async (vm) => vm.savevm('qemu-snap'));
    const qemuState = await exportVmState(path, 'qemu-snap');
    await guestWrite(path, 'write -P 0x32 0 1M');
    const img = await openImage(path);
    try {
      await saveWithCalls(img, 'ours', qemuState);
    } finally {
      await img.close();
    }
    expect((await qemuImg.check(path)).exitCode).toBe(0);
    expect((await exportVmState(path, 'qemu-snap')).equals(qemuState)).toBe(true);
    await withPausedVm({ ramMiB: 32, image: path }, async (vm) => {
      await vm.loadvm('ours');
      await vm.loadvm('qemu-snap');
    });
    await qemuIo(path, ['read -P 0x31 0 1M']);
    await qemuImg.snapshot(path, 'apply', 'ours');
    await qemuIo(path, ['read -P 0x32 0 1M']);
    expect((await qemuImg.check(path)).exitCode).toBe(0);
  });
});
