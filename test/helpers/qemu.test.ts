/**
 * The vmstate round trip with QEMU alone: the experiment the qcow2 saver's
 * tests mirror with snapstream in the middle. See the top of qemu.ts for the
 * facts these tests pin down.
 */
import { copyFile, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { overwriteSnapshotVmState, readSnapshotVmState, vmStateLayout } from './qcow2-vmstate.js';
import {
  killAllVms,
  makeRandomMemFile,
  PC_ROM_WINDOW,
  sha256File,
  startPausedVm,
  withPausedVm,
  type Vm,
} from './qemu.js';
import { qemuImg, requireTool, tmpDir, type TmpDir } from './tools.js';

const RAM_MIB = 64;
const RAM_BYTES = RAM_MIB << 20;
const SEED = 20260;

const skip = requireTool('qemu-system-x86_64', 'qemu-img');

/** RAM outside the pc ROM window must equal the mem file; the window shows ROM via pmemsave. */
async function expectRamMatches(dump: string, memFile: string): Promise<void> {
  expect((await stat(dump)).size).toBe(RAM_BYTES);
  const below = { start: 0, end: PC_ROM_WINDOW.start };
  const above = { start: PC_ROM_WINDOW.end, end: RAM_BYTES };
  expect(await sha256File(dump, below)).toBe(await sha256File(memFile, below));
  expect(await sha256File(dump, above)).toBe(await sha256File(memFile, above));
}

describe.skipIf(skip !== undefined)('QEMU vmstate round trip (no snapstream involved)', { timeout: 60_000 }, () => {
  let dir: TmpDir;
  let memFile: string;
  let image: string;
  let streamFile: string;
  let dumpA: string;
  let savedVmState: Buffer;
  const pids: number[] = [];
  const track = (vm: Vm): Vm => (pids.push(vm.pid), vm);

  beforeAll(async () => {
    dir = await tmpDir('qemu-roundtrip');
    memFile = join(dir.path, 'mem.bin');
    image = join(dir.path, 'disk.qcow2');
    streamFile = join(dir.path, 'stream.bin');
    dumpA = join(dir.path, 'dump-a.bin');
    await makeRandomMemFile(memFile, RAM_BYTES, SEED);
    await qemuImg.create(image, 64 << 20);
  });

  afterAll(async () => {
    await killAllVms();
    await dir?.cleanup();
  });

  it('saves a snapshot of a paused VM with a drive that has no guest device, then migrates it to a file', async () => {
    await withPausedVm({ ramMiB: RAM_MIB, memFile, image }, async (vmA) => {
      track(vmA);
      expect(await vmA.status()).toBe('prelaunch');
      await vmA.pmemsave(0, RAM_BYTES, dumpA);
      await vmA.hmpChecked('savevm ref'); // before migrating: migration inactivates the drive
      const migration = await vmA.migrateToFile(streamFile);
      expect(migration.status).toBe('completed');
      expect(await vmA.status()).toBe('postmigrate');
    });
    await expectRamMatches(dumpA, memFile);

    const [snapshot] = await qemuImg.snapshotList(image);
    expect(snapshot).toMatchObject({ id: '1', name: 'ref' });
    const streamBytes = (await stat(streamFile)).size;
    expect(streamBytes).toBeGreaterThan(RAM_BYTES);
    // Same content and format; only the number of RAM iteration boundaries (timing) can differ,
    // each costing a few bytes of section header and end-of-section marker.
    expect(Math.abs((snapshot?.vmStateSize ?? 0) - streamBytes)).toBeLessThan(4096);
    expect((await qemuImg.check(image)).exitCode).toBe(0);
  });

  it('stores the vmstate as one contiguous host run in the QEVM format of the migration stream', async () => {
    const layout = await vmStateLayout(image, 'ref');
    expect(layout.vmStateGuestOffset).toBe(512 << 20); // 64 MiB disk, 64 KiB clusters: one L2 covers 512 MiB
    const first = layout.hostClusters[0] as number;
    layout.hostClusters.forEach((host, i) => expect(host).toBe(first + i * layout.clusterSize));

    savedVmState = await readSnapshotVmState(image, 'ref');
    const stream = await readFile(streamFile);
    expect(savedVmState.subarray(0, 8).toString('hex')).toBe('5145564d00000003'); // "QEVM", version 3
    expect(stream.subarray(0, 8).toString('hex')).toBe('5145564d00000003');
    // Same configuration section and RAMBlock list; RAM iteration boundaries may differ.
    const head = 0xd0;
    expect(savedVmState.subarray(0, head).equals(stream.subarray(0, head))).toBe(true);
    expect(savedVmState.subarray(0, head).includes('pc-i440fx-7.2')).toBe(true);
    expect(savedVmState.subarray(0, head).includes('mem0')).toBe(true);
  });

  it('loadvm in a VM with blank RAM restores the RAM savevm stored', async () => {
    const dumpB = join(dir.path, 'dump-b.bin');
    await withPausedVm({ ramMiB: RAM_MIB, image }, async (vmB) => {
      track(vmB);
      await vmB.hmpChecked('loadvm ref');
      await vmB.pmemsave(0, RAM_BYTES, dumpB);
    });
    expect(await sha256File(dumpB)).toBe(await sha256File(dumpA));
    await expectRamMatches(dumpB, memFile);
  });

  it('loadvm accepts the migrate exec:cat stream stored as the snapshot vmstate', async () => {
    const patched = join(dir.path, 'patched.qcow2');
    await copyFile(image, patched);
    const stream = await readFile(streamFile);
    await overwriteSnapshotVmState(patched, 'ref', stream);
    expect((await readSnapshotVmState(patched, 'ref')).equals(stream)).toBe(true);
    expect((await qemuImg.check(patched)).exitCode).toBe(0);

    // share=on: loadvm's RAM writes land in the file, so the whole RAMBlock can be compared.
    const loaded = join(dir.path, 'loaded-mem.bin');
    await makeRandomMemFile(loaded, RAM_BYTES, SEED + 1);
    await withPausedVm({ ramMiB: RAM_MIB, memFile: loaded, memShare: true, image: patched }, async (vmC) => {
      track(vmC);
      await vmC.hmpChecked('loadvm ref');
    });
    expect(await sha256File(loaded)).toBe(await sha256File(memFile));
  });

  it('an incoming migration from the stream file restores the same RAM', async () => {
    const loaded = join(dir.path, 'incoming-mem.bin');
    await makeRandomMemFile(loaded, RAM_BYTES, SEED + 2);
    await withPausedVm({ ramMiB: RAM_MIB, memFile: loaded, memShare: true, incoming: 'defer' }, async (vmD) => {
      track(vmD);
      expect(await vmD.status()).toBe('inmigrate');
      await vmD.migrateFromFile(streamFile);
      expect(await vmD.status()).toBe('prelaunch'); // the source's run state travels in the stream
    });
    expect(await sha256File(loaded)).toBe(await sha256File(memFile));
  });

  it('the QMP snapshot-save / snapshot-load jobs work like HMP savevm / loadvm', async () => {
    const jobImage = join(dir.path, 'jobs.qcow2');
    await qemuImg.create(jobImage, 64 << 20);
    await withPausedVm({ ramMiB: RAM_MIB, memFile, image: jobImage }, async (vmE) => {
      await track(vmE).savevm('viajob');
    });
    const saved = await readSnapshotVmState(jobImage, 'viajob');
    expect(saved.subarray(0, 0xd0).equals(savedVmState.subarray(0, 0xd0))).toBe(true);

    const loaded = join(dir.path, 'job-mem.bin');
    await makeRandomMemFile(loaded, RAM_BYTES, SEED + 3);
    await withPausedVm({ ramMiB: RAM_MIB, memFile: loaded, memShare: true, image: jobImage }, async (vmF) => {
      await track(vmF).loadvm('viajob');
      await expect(vmF.loadvm('missing')).rejects.toThrow(/missing/);
      await expect(vmF.hmpChecked('loadvm missing')).rejects.toThrow(/does not exist/);
    });
    expect(await sha256File(loaded)).toBe(await sha256File(memFile));
  });

  it('startPausedVm rejects with QEMU\'s message, and reaps it, when QEMU cannot start', async () => {
    const missing = join(dir.path, 'missing.qcow2');
    await expect(startPausedVm({ ramMiB: RAM_MIB, image: missing })).rejects.toThrow(/missing\.qcow2/);
  });

  it('reaps every VM it started', async () => {
    expect(pids.length).toBeGreaterThan(0);
    for (const pid of pids) {
      expect(() => process.kill(pid, 0)).toThrow(); // ESRCH: exited and reaped
    }
  });
});
