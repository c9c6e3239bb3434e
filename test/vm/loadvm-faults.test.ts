/**
 * loadvm under real faults, with a real QEMU 7.2 started with -incoming
 * defer: an AbortSignal mid-stream, a QEMU that refuses the stream (another
 * RAM size), a `migrate-incoming` that QEMU refuses while the vmstate reads
 * have already begun, and kill -9 of QEMU mid-stream. And a TMPDIR too long
 * for a socket path, which must not stop savevm or loadvm. Each ends in a coded error,
 * soon, with the process alive; the image stays clean for qemu-img check,
 * and the snapshot still loads into a fresh QEMU bit for bit (pmemsave
 * against the RAM file, qemu-io on the disk).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdirSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { connectVm, type LoadVmProgress } from '../../src/index.js';
import { descriptorsOn } from '../helpers/descriptors.js';
import { makeRandomMemFile, PC_ROM_WINDOW, sha256File } from '../helpers/qemu.js';
import { qemuImg, requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';
import { qemuWrite, startVm, type TestVm } from './harness.js';

const skip = requireTool('qemu-system-x86_64', 'qemu-img', 'qemu-io');
const RAM_MIB = 128;
const RAM_BYTES = RAM_MIB << 20;

async function ramDigest(file: string): Promise<string[]> {
  return [await sha256File(file, { start: 0, end: PC_ROM_WINDOW.start }), await sha256File(file, { start: PC_ROM_WINDOW.end, end: RAM_BYTES })];
}

/** Runs `fn` with TMPDIR set to `path` (os.tmpdir() reads it on every call). */
async function withTmpdir<T>(path: string, fn: () => Promise<T>): Promise<T> {
  const saved = process.env.TMPDIR;
  process.env.TMPDIR = path;
  try {
    return await fn();
  } finally {
    if (saved === undefined) delete process.env.TMPDIR;
    else process.env.TMPDIR = saved;
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe.skipIf(skip !== undefined)('loadvm faults', () => {
  let dir: TmpDir;
  let mem: string;
  let image: string;
  let count = 0;

  beforeAll(async () => {
    dir = await tmpDir('vm-load-faults');
    mem = join(dir.path, 'ram.bin');
    await makeRandomMemFile(mem, RAM_BYTES, 23);
    image = join(dir.path, 'disk.qcow2');
    await qemuImg.create(image, 256 << 20);
    const vm = await startVm({ dir: dir.path, tag: 'src', ramMiB: RAM_MIB, memFile: mem, disks: [{ path: image }] });
    try {
      await qemuWrite(vm, 0, 'write -P 0xa1 0 64k');
      const snap = await connectVm(vm.snapSocket);
      await snap.savevm('base');
      await snap.close();
      await vm.qmp.execute('cont');
      await qemuWrite(vm, 0, 'write -P 0xb2 0 64k');
    } finally {
      await vm.quit();
    }
  });
  afterAll(async () => dir.cleanup());

  function loader(ramMiB = RAM_MIB): Promise<TestVm> {
    return startVm({ dir: dir.path, tag: `l${++count}`, ramMiB, disks: [{ path: image }], incoming: true });
  }

  /** After a failed loadvm: the image is clean, and the snapshot loads into a fresh QEMU with the saved RAM and disk. */
  async function expectStillLoads(): Promise<void> {
    const check = await qemuImg.check(image);
    expect(check.corruptions ?? 0).toBe(0);
    expect(check.exitCode).toBe(0);
    expect((await qemuImg.snapshotList(image)).map((s) => s.name)).toEqual(['base']);
    const vm = await loader();
    try {
      const snap = await connectVm(vm.snapSocket);
      await snap.loadvm('base', { resume: false });
      await snap.close();
      const dump = join(dir.path, `dump${count}.ram`);
      await vm.pmemsave(0, RAM_BYTES, dump);
      expect(await ramDigest(dump)).toEqual(await ramDigest(mem));
      await qemuWrite(vm, 0, 'read -P 0xa1 0 64k');
    } finally {
      await vm.quit();
    }
  }

  it('an AbortSignal fired mid-stream: ABORTED at once, and the snapshot still loads afterwards', async () => {
    const vm = await loader();
    try {
      const controller = new AbortController();
      const snap = await connectVm(vm.snapSocket);
      let streamed = 0;
      const onProgress = (p: LoadVmProgress): void => {
        if (p.phase !== 'stream') return;
        streamed = p.bytes;
        controller.abort();
      };
      const t0 = performance.now();
      const err = await snap.loadvm('base', { signal: controller.signal, onProgress }).catch((e: unknown) => e);
      await snap.close();
      expect(err).toMatchObject({ code: 'ABORTED', message: expect.stringMatching(/aborted while streaming/) });
      expect(streamed).toBeGreaterThan(0);
      expect(streamed).toBeLessThan(RAM_BYTES);
      expect(performance.now() - t0).toBeLessThan(20_000);
    } finally {
      await vm.kill();
    }
    await expectStillLoads();
  });

  it('a QEMU that refuses the stream (another RAM size): MIGRATION_FAILED, and the snapshot still loads afterwards', async () => {
    const vm = await loader(RAM_MIB / 2);
    try {
      const snap = await connectVm(vm.snapSocket);
      const err = await snap.loadvm('base').catch((e: unknown) => e);
      await snap.close().catch(() => undefined);
      expect(err).toMatchObject({ code: 'MIGRATION_FAILED', message: expect.stringMatching(/QEMU did not accept the vmstate/) });
      // QEMU 7.2 gives up on a failed incoming migration and exits; its own words are on its stderr.
      expect(vm.stderr()).toMatch(/Length mismatch|load of migration failed/);
    } finally {
      await vm.kill();
    }
    await expectStillLoads();
  });

  it('kill -9 of QEMU mid-stream: a coded error soon, no hang, and the snapshot still loads afterwards', async () => {
    const vm = await loader();
    try {
      const snap = await connectVm(vm.snapSocket);
      let killed = false;
      const onProgress = (p: LoadVmProgress): void => {
        if (p.phase !== 'stream' || killed) return;
        killed = true;
        process.kill(vm.pid, 'SIGKILL');
      };
      const t0 = performance.now();
      const err = await snap.loadvm('base', { onProgress }).catch((e: unknown) => e);
      await snap.close().catch(() => undefined);
      expect(killed).toBe(true);
      expect(alive(vm.pid)).toBe(false);
      expect(['MIGRATION_FAILED', 'QMP_CLOSED']).toContain((err as { code?: string }).code);
      expect(performance.now() - t0).toBeLessThan(20_000);
    } finally {
      await vm.kill();
    }
    await expectStillLoads();
  });

  it('a migrate-incoming that QEMU refuses (it runs as another user) while the reads run: QMP_ERROR, nothing left open, and the snapshot still loads', async () => {
    // -runas drops QEMU to nobody after start-up: it cannot bind in our 0700 socket directory, after our vmstate reads have begun.
    const vm = await startVm({ dir: dir.path, tag: `l${++count}`, ramMiB: RAM_MIB, disks: [{ path: image }], incoming: true, extraArgs: ['-runas', 'nobody'] });
    const sockets = join(dir.path, 'sockets');
    mkdirSync(sockets);
    try {
      const snap = await connectVm(vm.snapSocket);
      const phases: string[] = [];
      const err = await withTmpdir(sockets, () => snap.loadvm('base', { onProgress: (p) => phases.push(p.phase) }).catch((e: unknown) => e));
      await snap.close().catch(() => undefined);
      expect(err).toMatchObject({ code: 'QMP_ERROR', message: expect.stringMatching(/Permission denied/) });
      expect(phases).not.toContain('stream'); // not one byte was sent
      expect(descriptorsOn(image)).toBe(0); // the reader and every disk are closed
      expect(readdirSync(sockets)).toEqual([]); // the socket's directory is gone
    } finally {
      await vm.kill();
    }
    await expectStillLoads();
  });

  it('with a TMPDIR too long for a unix socket path, savevm and loadvm put their socket under /tmp', async () => {
    const longTmp = join(dir.path, 'd'.repeat(100));
    mkdirSync(longTmp, { recursive: true });
    const vm = await loader();
    try {
      const snap = await connectVm(vm.snapSocket);
      await withTmpdir(longTmp, async () => {
        await snap.loadvm('base', { resume: false });
        await snap.savevm('long-tmp');
      });
      await snap.close();
      await qemuWrite(vm, 0, 'read -P 0xa1 0 64k');
      expect(readdirSync(longTmp)).toEqual([]);
    } finally {
      await vm.quit();
    }
    expect((await qemuImg.snapshotList(image)).map((s) => s.name)).toEqual(['base', 'long-tmp']);
    await qemuImg.snapshot(image, 'delete', 'long-tmp');
    await expectStillLoads();
  });
});
