/**
 * The vmstate round trip with QEMU alone: the experiment the qcow2 saver's
 * tests mirror with snapstream in the middle. See the top of qemu.ts for the
 * facts these tests pin down.
 */
import { copyFile, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { overwriteSnapshotVmState, readSnapshotVmState, vmStateLayout } from './qcow2-vmstate.js';
import { killAllVms, makeRandomMemFile, PC_ROM_WINDOW, sha256File, startPausedVm, type Vm } from './qemu.js';
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
  const vms: Vm[] = [];

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
    const vmA = await startPausedVm({ ramMiB: RAM_MIB, memFile, image });
    vms.push(vmA);
    expect(await vmA.status()).toBe('prelaunch');
    await vmA.pmemsave(0, RAM_BYTES, dumpA);
    await expectRamMatches(dumpA, memFile);

    await vmA.hmpChecked('savevm ref'); // before migrating: migration inactivates the drive
    const migration = await vmA.migrateToFile(streamFile);
    expect(migration.status).toBe('completed');
    expect(await vmA.status()).toBe('postmigrate');
    await vmA.quit();

    const [snapshot] = await qemuImg.snapshotList(image);
    expect(snapshot).toMatchObject({ id: '1', name: 'ref' });
    const streamBytes = (await stat(streamFile)).size;
    expect(streamBytes).toBeGreaterThan(RAM_BYTES);
    expect(snapshot?.vmStateSize).toBe(streamBytes);
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
    const vmB = await startPausedVm({ ramMiB: RAM_MIB, image });
    vms.push(vmB);
    await vmB.hmpChecked('loadvm ref');
    const dumpB = join(dir.path, 'dump-b.bin');
    await vmB.pmemsave(0, RAM_BYTES, dumpB);
    await vmB.quit();
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
    const vmC = await startPausedVm({ ramMiB: RAM_MIB, memFile: loaded, memShare: true, image: patched });
    vms.push(vmC);
    await vmC.hmpChecked('loadvm ref');
    await vmC.quit();
    expect(await sha256File(loaded)).toBe(await sha256File(memFile));
  });

  it('an incoming migration from the stream file restores the same RAM', async () => {
    const loaded = join(dir.path, 'incoming-mem.bin');
    await makeRandomMemFile(loaded, RAM_BYTES, SEED + 2);
    const vmD = await startPausedVm({ ramMiB: RAM_MIB, memFile: loaded, memShare: true, incoming: 'defer' });
    vms.push(vmD);
    await vmD.migrateFromFile(streamFile);
    expect(await vmD.status()).toBe('paused');
    await vmD.quit();
    expect(await sha256File(loaded)).toBe(await sha256File(memFile));
  });

  it('the QMP snapshot-save / snapshot-load jobs work like HMP savevm / loadvm', async () => {
    const jobImage = join(dir.path, 'jobs.qcow2');
    await qemuImg.create(jobImage, 64 << 20);
    const vmE = await startPausedVm({ ramMiB: RAM_MIB, memFile, image: jobImage });
    vms.push(vmE);
    await vmE.savevm('viajob');
    await vmE.quit();
    const saved = await readSnapshotVmState(jobImage, 'viajob');
    expect(saved.subarray(0, 0xd0).equals(savedVmState.subarray(0, 0xd0))).toBe(true);

    const loaded = join(dir.path, 'job-mem.bin');
    await makeRandomMemFile(loaded, RAM_BYTES, SEED + 3);
    const vmF = await startPausedVm({ ramMiB: RAM_MIB, memFile: loaded, memShare: true, image: jobImage });
    vms.push(vmF);
    await vmF.loadvm('viajob');
    await expect(vmF.loadvm('missing')).rejects.toThrow(/missing/);
    await expect(vmF.hmpChecked('loadvm missing')).rejects.toThrow(/does not exist/);
    await vmF.quit();
    expect(await sha256File(loaded)).toBe(await sha256File(memFile));
  });

  it('reaps every VM it started', async () => {
    for (const vm of vms) {
      expect(() => process.kill(vm.pid, 0)).toThrow(); // ESRCH: gone and reaped
    }
  });
});
