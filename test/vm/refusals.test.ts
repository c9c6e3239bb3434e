/**
 * Every savevm/loadvm refusal, with its code, before the VM is stopped:
 * the test's own QMP connection sees no STOP event and the image is as
 * before (qemu-img).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { connectVm, SnapshotError } from '../../src/index.js';
import { makeRandomMemFile } from '../helpers/qemu.js';
import { qemuImg, requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';
import { startVm, type DiskSpec, type TestVm } from './harness.js';

const skip = requireTool('qemu-system-x86_64', 'qemu-img');

describe.skipIf(skip !== undefined)('savevm and loadvm refusals', () => {
  let dir: TmpDir;
  let count = 0;

  beforeAll(async () => {
    dir = await tmpDir('vm-refuse');
  });
  afterAll(async () => dir.cleanup());

  async function image(format: 'qcow2' | 'raw' = 'qcow2'): Promise<DiskSpec> {
    const path = join(dir.path, `disk${++count}.${format}`);
    if (format === 'qcow2') await qemuImg.create(path, 64 << 20);
    else await (await import('node:fs/promises')).writeFile(path, Buffer.alloc(1 << 20));
    return { path, format };
  }

  /** Runs `setup`, then expects savevm to fail with `code` and `message`, with the VM never stopped. */
  async function expectSaveRefused(
    vm: TestVm,
    code: string,
    message: RegExp,
    options: Parameters<Awaited<ReturnType<typeof connectVm>>['savevm']>[1] = {},
    name = 'refused',
  ): Promise<void> {
    const before = await vm.status();
    const snap = await connectVm(vm.snapSocket);
    try {
      const error = await snap.savevm(name, options).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(error).toBeInstanceOf(SnapshotError);
      expect((error as SnapshotError).code).toBe(code);
      expect((error as SnapshotError).message).toMatch(message);
    } finally {
      await snap.close();
    }
    expect(vm.qmp.events.filter((e) => e.event === 'STOP')).toEqual([]);
    expect(await vm.status()).toBe(before);
  }

  async function withVm(
    disks: DiskSpec[],
    fn: (vm: TestVm) => Promise<void>,
    extra: { running?: boolean; incoming?: boolean; memFile?: string } = {},
  ): Promise<void> {
    const vm = await startVm({ dir: dir.path, tag: `r${++count}`, ramMiB: 32, disks, running: extra.running ?? true, ...extra });
    try {
      await fn(vm);
    } finally {
      await vm.quit();
    }
  }

  it('refuses a raw writable disk beside a qcow2 one (VM_UNSUPPORTED), and takes a raw disk attached read-only', async () => {
    const qcow2 = await image();
    const raw = await image('raw');
    await withVm([qcow2, raw], async (vm) => {
      await expectSaveRefused(vm, 'VM_UNSUPPORTED', /drive1.*raw, not qcow2/);
    });
    expect(await qemuImg.snapshotList(qcow2.path)).toEqual([]);
    await withVm([qcow2, { ...raw, readOnly: true }], async (vm) => {
      const snap = await connectVm(vm.snapSocket);
      const result = await snap.savevm('ro-raw');
      await snap.close();
      expect(result.disks.map((d) => d.device)).toEqual(['drive0']);
    });
  });

  it('refuses a name that exists (SNAPSHOT_EXISTS), a VM in postmigrate and one waiting for an incoming migration (VM_STATE)', async () => {
    const disk = await image();
    await qemuImg.snapshot(disk.path, 'create', 'taken');
    await withVm([disk], async (vm) => {
      await expectSaveRefused(vm, 'SNAPSHOT_EXISTS', /taken/, {}, 'taken');
      await expectSaveRefused(vm, 'SNAPSHOT_EXISTS', /'1'/, {}, '1');
    });
    await withVm([disk], async (vm) => {
      const snap = await connectVm(vm.snapSocket);
      await snap.savevm('first');
      await snap.close();
      expect(await vm.status()).toBe('postmigrate');
      await expectSaveRefused(vm, 'VM_STATE', /postmigrate.*'cont' it first/);
      // The reason, from QEMU itself (before 10.0): a second migration from postmigrate is refused.
      const major = (vm.qmp.greeting.QMP as { version: { qemu: { major: number } } }).version.qemu.major;
      if (major < 10) {
        await expect(vm.qmp.execute('migrate', { uri: 'exec:cat > /dev/null' })).rejects.toMatchObject({
          desc: expect.stringMatching(/paused due to previous migration/),
        });
      }
    }, { running: false });
    await withVm([disk], async (vm) => {
      await expectSaveRefused(vm, 'VM_STATE', /incoming migration.*loadvm/);
    }, { incoming: true });
  });

  it('refuses an active block job, an NBD export and a running migration (VM_STATE), a persistent dirty bitmap and multifd (VM_UNSUPPORTED)', async () => {
    const disk = await image();
    await withVm([disk], async (vm) => {
      await vm.qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'bm0', persistent: true });
      await expectSaveRefused(vm, 'VM_UNSUPPORTED', /persistent dirty bitmap 'bm0'/);
      await vm.qmp.execute('block-dirty-bitmap-remove', { node: 'disk0', name: 'bm0' });

      await vm.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: join(dir.path, 'nbd.sock') } } });
      await vm.qmp.execute('block-export-add', { type: 'nbd', id: 'exp0', 'node-name': 'disk0' });
      await expectSaveRefused(vm, 'VM_STATE', /block export 'exp0'/);
      await vm.qmp.execute('block-export-del', { id: 'exp0' });
      await vm.qmp.execute('nbd-server-stop');

      const target = join(dir.path, 'mirror.qcow2');
      await vm.qmp.execute('drive-mirror', { device: 'drive0', target, format: 'qcow2', sync: 'full', speed: 1, 'job-id': 'mirror0' });
      await expectSaveRefused(vm, 'VM_STATE', /mirror job \('mirror0'/);
      await vm.qmp.execute('block-job-cancel', { device: 'mirror0', force: true });
      await vm.qmp.waitEvent('BLOCK_JOB_CANCELLED', 10_000).catch(() => vm.qmp.waitEvent('BLOCK_JOB_COMPLETED', 10_000));
      await vm.qmp.execute('job-dismiss', { id: 'mirror0' }).catch(() => undefined);

      await vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }] });
      await expectSaveRefused(vm, 'VM_UNSUPPORTED', /multifd/);
      await vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: false }] });

    });
    // 32 MiB of random RAM at 1 byte/s: the migration stays active for as long as the test needs.
    const mem = join(dir.path, 'random.ram');
    await makeRandomMemFile(mem, 32 << 20, 3);
    await withVm([disk], async (vm) => {
      await vm.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 1 });
      await vm.qmp.execute('migrate', { uri: `exec:cat > /dev/null` });
      await expectSaveRefused(vm, 'VM_STATE', /migration is already running/);
      await vm.qmp.execute('migrate_cancel');
    }, { memFile: mem });
    expect(await qemuImg.snapshotList(disk.path)).toEqual([]);
  });

  it('refuses loadvm on a VM not started with -incoming defer, of a missing snapshot, and of a disk-only one', async () => {
    const disk = await image();
    await qemuImg.snapshot(disk.path, 'create', 'disk-only');
    await withVm([disk], async (vm) => {
      const snap = await connectVm(vm.snapSocket);
      await expect(snap.loadvm('disk-only')).rejects.toMatchObject({ code: 'VM_STATE', message: expect.stringMatching(/-incoming defer/) });
      await snap.close();
    });
    await withVm([disk], async (vm) => {
      const snap = await connectVm(vm.snapSocket);
      await expect(snap.loadvm('nope')).rejects.toMatchObject({ code: 'SNAPSHOT_NOT_FOUND', message: expect.stringMatching(/drive0.*'nope'/) });
      await expect(snap.loadvm('disk-only')).rejects.toMatchObject({ code: 'SNAPSHOT_DISK_ONLY', message: expect.stringMatching(/disk-only/) });
      await snap.close();
      expect(await vm.status()).toBe('inmigrate');
    }, { incoming: true, running: false });
  });

  it('throws option mistakes synchronously, naming the option', async () => {
    const disk = await image();
    await withVm([disk], async (vm) => {
      const snap = await connectVm(vm.snapSocket);
      expect(() => snap.savevm('')).toThrow(TypeError);
      expect(() => snap.savevm('x', { signal: 5 as unknown as AbortSignal })).toThrow(/options\.signal/);
      expect(() => snap.savevm('x', { onProgress: 'no' as unknown as () => void })).toThrow(/options\.onProgress/);
      expect(() => snap.loadvm('x', { resume: 'yes' as unknown as boolean })).toThrow(/options\.resume/);
      await expect(snap.savevm('x', { vmstateDisk: 'drive9' })).rejects.toThrow(/drive0.*options\.vmstateDisk.*drive9/);
      await snap.close();
    });
    expect(() => connectVm('')).toThrow(TypeError);
    await expect(connectVm(join(dir.path, 'missing.qmp'))).rejects.toMatchObject({ code: 'QMP_CLOSED', message: expect.stringMatching(/ENOENT/) });
  });
});
