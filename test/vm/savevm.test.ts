/**
 * vm.savevm / vm.loadvm against a real QEMU 7.2: RAM of known random
 * content, disks with cache=none, the outcome checked with QEMU itself (HMP
 * loadvm, pmemsave, qemu-io) and qemu-img, not with our own reader.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { connectVm } from '../../src/index.js';
import { makeRandomMemFile, PC_ROM_WINDOW, sha256File } from '../helpers/qemu.js';
import { qemuImg, qemuIo, requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';
import { qemuWrite, startVm, type TestVm } from './harness.js';

const skip = requireTool('qemu-system-x86_64', 'qemu-img', 'qemu-io');
const RAM_MIB = 64;
const RAM_BYTES = RAM_MIB << 20;
const UNTOUCHED_BY_FIRMWARE = { start: 1 << 20, end: 40 << 20 };

/** sha256 of guest RAM outside the ROM window, from a pmemsave dump or the memory file. */
async function ramDigest(file: string, end = RAM_BYTES): Promise<string[]> {
  return [await sha256File(file, { start: 0, end: PC_ROM_WINDOW.start }), await sha256File(file, { start: PC_ROM_WINDOW.end, end })];
}

async function dumpRam(vm: TestVm, file: string): Promise<void> {
  await vm.pmemsave(0, RAM_BYTES, file);
}

async function expectClean(path: string): Promise<void> {
  const check = await qemuImg.check(path);
  expect(check.corruptions ?? 0).toBe(0);
  expect(check.leaks ?? 0).toBe(0);
  expect(check.exitCode).toBe(0);
}

describe.skipIf(skip !== undefined)('savevm and loadvm of a QEMU over QMP', () => {
  let dir: TmpDir;
  let mem: string;

  beforeAll(async () => {
    dir = await tmpDir('vm-save');
    mem = join(dir.path, 'ram.bin');
    await makeRandomMemFile(mem, RAM_BYTES, 11);
  });
  afterAll(async () => dir.cleanup());

  it('saves a paused VM: HMP loadvm in a fresh QEMU gives its RAM bit for bit and its disk as at the savevm; QEMU\'s own snapshot still loads', async () => {
    const image = join(dir.path, 'paused.qcow2');
    await qemuImg.create(image, 256 << 20);
    const vm = await startVm({ dir: dir.path, tag: 'a', ramMiB: RAM_MIB, memFile: mem, disks: [{ path: image }] });
    try {
      await qemuWrite(vm, 0, 'write -P 0xa1 0 64k');
      const snap = await connectVm(vm.snapSocket);
      const result = await snap.savevm('ours');
      await snap.close();
      expect(result.status).toBe('postmigrate');
      expect(result.vmStateBytes).toBeGreaterThan(RAM_BYTES);
      expect(result.disks).toEqual([{ device: 'drive0', path: image, vmStateBytes: result.vmStateBytes }]);
      // The guest may run again (the images are re-activated by cont), and QEMU writes to the disk again.
      await vm.qmp.execute('cont');
      await vm.qmp.execute('stop');
      await qemuWrite(vm, 0, 'write -P 0xb2 0 64k');
      await vm.hmpChecked('savevm theirs');
    } finally {
      await vm.quit();
    }
    await expectClean(image);
    const listed = await qemuImg.snapshotList(image);
    expect(listed.map((s) => s.name)).toEqual(['ours', 'theirs']);
    expect(listed[0]!.vmStateSize).toBeGreaterThan(RAM_BYTES);

    const loader = await startVm({ dir: dir.path, tag: 'b', ramMiB: RAM_MIB, disks: [{ path: image }] });
    try {
      await loader.hmpChecked('loadvm ours');
      const dump = join(dir.path, 'ours.ram');
      await dumpRam(loader, dump);
      expect(await ramDigest(dump)).toEqual(await ramDigest(mem));
      await qemuWrite(loader, 0, 'read -P 0xa1 0 64k');
      await loader.hmpChecked('loadvm theirs');
      await qemuWrite(loader, 0, 'read -P 0xb2 0 64k');
    } finally {
      await loader.quit();
    }
    await expectClean(image);

    // Our loadvm into a QEMU started with -incoming defer: same RAM, same disk, left in its saved run state.
    const target = await startVm({ dir: dir.path, tag: 'c', ramMiB: RAM_MIB, disks: [{ path: image }], incoming: true, running: true });
    try {
      const snap = await connectVm(target.snapSocket);
      const loaded = await snap.loadvm('ours');
      await snap.close();
      // A VM saved before it ever ran (-S) comes back in that state, as QEMU's -incoming would leave it.
      expect(loaded.savedRunState).toBe('prelaunch');
      expect(loaded.status).toBe('prelaunch');
      expect(await target.status()).toBe('prelaunch');
      const dump = join(dir.path, 'incoming.ram');
      await dumpRam(target, dump);
      expect(await ramDigest(dump)).toEqual(await ramDigest(mem));
      await qemuWrite(target, 0, 'read -P 0xa1 0 64k');
    } finally {
      await target.quit();
    }
    await expectClean(image);
    await qemuIo(image, ['read -P 0xa1 0 64k']);
  });

  it('saves a running VM: it runs and writes again after the savevm, and our loadvm starts it again from the snapshot', async () => {
    const image = join(dir.path, 'running.qcow2');
    await qemuImg.create(image, 256 << 20);
    const vm = await startVm({ dir: dir.path, tag: 'd', ramMiB: RAM_MIB, memFile: mem, disks: [{ path: image }], running: true });
    let ramAtSave: string[];
    try {
      await qemuWrite(vm, 0, 'write -P 0xc1 0 64k');
      const snap = await connectVm(vm.snapSocket);
      const result = await snap.savevm('live');
      await snap.close();
      expect(result.status).toBe('running');
      expect(await vm.status()).toBe('running');
      expect(result.downtimeMs).toBeGreaterThan(0);
      // SeaBIOS without a boot disk leaves 1-47 MiB alone (it uses low memory, ~47.9-48 MiB and the top
      // 128 KiB; measured with pmemsave): that range still holds the file's content at the save.
      ramAtSave = [await sha256File(mem, UNTOUCHED_BY_FIRMWARE)];
      await qemuWrite(vm, 0, 'write -P 0xc2 0 64k');
      await qemuWrite(vm, 0, 'write -P 0xc3 128M 64k');
      expect(await vm.hmp('info snapshots')).toContain('live');
    } finally {
      await vm.quit();
    }
    await expectClean(image);
    await qemuIo(image, ['read -P 0xc2 0 64k', 'read -P 0xc3 128M 64k']);

    const target = await startVm({ dir: dir.path, tag: 'e', ramMiB: RAM_MIB, disks: [{ path: image }], incoming: true });
    try {
      const snap = await connectVm(target.snapSocket);
      const loaded = await snap.loadvm('live');
      await snap.close();
      expect(loaded.savedRunState).toBe('running');
      expect(loaded.status).toBe('running');
      await target.qmp.execute('stop');
      const dump = join(dir.path, 'live.ram');
      await dumpRam(target, dump);
      expect([await sha256File(dump, UNTOUCHED_BY_FIRMWARE)]).toEqual(ramAtSave);
      await qemuWrite(target, 0, 'read -P 0xc1 0 64k');
      await qemuWrite(target, 0, 'read -P 0 128M 64k');
    } finally {
      await target.quit();
    }
    await expectClean(image);
  });

  it('snapshots both of two qcow2 disks (the vmstate in the first) and restores both', async () => {
    const disks = [join(dir.path, 'two-0.qcow2'), join(dir.path, 'two-1.qcow2')];
    for (const d of disks) await qemuImg.create(d, 64 << 20);
    const vm = await startVm({ dir: dir.path, tag: 'f', ramMiB: RAM_MIB, memFile: mem, disks: disks.map((path) => ({ path })), running: true });
    try {
      await qemuWrite(vm, 0, 'write -P 0xd0 0 64k');
      await qemuWrite(vm, 1, 'write -P 0xd1 0 64k');
      const snap = await connectVm(vm.snapSocket);
      const result = await snap.savevm('both');
      await snap.close();
      expect(result.disks.map((d) => [d.device, d.vmStateBytes > 0])).toEqual([
        ['drive0', true],
        ['drive1', false],
      ]);
      await qemuWrite(vm, 0, 'write -P 0xe0 0 64k');
      await qemuWrite(vm, 1, 'write -P 0xe1 0 64k');
    } finally {
      await vm.quit();
    }
    for (const d of disks) await expectClean(d);
    expect((await qemuImg.snapshotList(disks[0]!)).map((s) => [s.name, s.vmStateSize > 0])).toEqual([['both', true]]);
    expect((await qemuImg.snapshotList(disks[1]!)).map((s) => [s.name, s.vmStateSize])).toEqual([['both', 0]]);

    const target = await startVm({ dir: dir.path, tag: 'g', ramMiB: RAM_MIB, disks: disks.map((path) => ({ path })), incoming: true });
    try {
      const snap = await connectVm(target.snapSocket);
      await snap.loadvm('both', { resume: false });
      await snap.close();
      expect(await target.status()).toBe('paused');
      await qemuWrite(target, 0, 'read -P 0xd0 0 64k');
      await qemuWrite(target, 1, 'read -P 0xd1 0 64k');
    } finally {
      await target.quit();
    }
    for (const d of disks) await expectClean(d);
  });
});
