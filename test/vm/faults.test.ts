/**
 * savevm under real faults: the migration cancelled from outside, a full
 * filesystem (loop mount), kill -9 of the snapstream process in the stream
 * phase and at the commit, a QMP connection that drops, and a QEMU that
 * runs as another user and cannot reach our socket. After each the
 * VM runs (it was running), QEMU writes to its disk again, and qemu-img
 * check is clean after QEMU quits (no corruption; at most leaks).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { createServer, connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { connectVm, type SaveVmProgress } from '../../src/index.js';
import { assertBuilt, BIN } from '../cli/bin-harness.js';
import { loopFsSkipReason, Skipped, withLoopFs } from '../helpers/loopfs.js';
import { makeRandomMemFile } from '../helpers/qemu.js';
import { qemuImg, requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';
import { qemuWrite, startVm, waitStatus, type TestVm } from './harness.js';

const skip = requireTool('qemu-system-x86_64', 'qemu-img');
const RAM_MIB = 128;

async function expectRecovered(vm: TestVm, image: string, name: string): Promise<void> {
  expect(await vm.status()).toBe('running');
  await qemuWrite(vm, 0, 'write -P 0x77 1M 64k');
  await qemuWrite(vm, 0, 'write -P 0x78 48M 1M');
  expect(await vm.hmp('info snapshots')).not.toContain(name);
  await vm.quit();
  const check = await qemuImg.check(image);
  expect(check.corruptions ?? 0).toBe(0);
  expect([0, 3]).toContain(check.exitCode);
  expect((await qemuImg.snapshotList(image)).map((s) => s.name)).not.toContain(name);
}

/** Polls the test's QMP until the migration's status and transferred bytes satisfy `when`. */
async function waitMigration(vm: TestVm, when: (info: { status?: string; ram?: { transferred?: number } }) => boolean): Promise<void> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const info = await vm.qmp.execute<{ status?: string; ram?: { transferred?: number } }>('query-migrate');
    if (when(info)) return;
    if (Date.now() > deadline) throw new Error(`migration never reached the point: ${JSON.stringify(info)}`);
    await sleep(2);
  }
}

describe.skipIf(skip !== undefined)('savevm faults', () => {
  let dir: TmpDir;
  let mem: string;
  let count = 0;

  beforeAll(async () => {
    dir = await tmpDir('vm-faults');
    mem = join(dir.path, 'ram.bin');
    await makeRandomMemFile(mem, RAM_MIB << 20, 5);
  });
  afterAll(async () => dir.cleanup());

  async function runningVm(imageDir = dir.path, extraArgs: string[] = []): Promise<{ vm: TestVm; image: string }> {
    const image = join(imageDir, `fault${++count}.qcow2`);
    await qemuImg.create(image, 256 << 20);
    const vm = await startVm({ dir: dir.path, tag: `f${count}`, ramMiB: RAM_MIB, memFile: mem, disks: [{ path: image }], running: true, extraArgs });
    await qemuWrite(vm, 0, 'write -P 0x70 0 1M');
    return { vm, image };
  }

  it('a migration cancelled from outside: nothing committed, the VM resumed', async () => {
    const { vm, image } = await runningVm();
    try {
      const snap = await connectVm(vm.snapSocket);
      let cancelled = false;
      const onProgress = (p: SaveVmProgress): void => {
        if (p.phase === 'stream' && p.bytes > 0 && !cancelled) {
          cancelled = true;
          void vm.qmp.execute('migrate_cancel');
        }
      };
      await expect(snap.savevm('cancelled', { onProgress })).rejects.toMatchObject({ code: 'MIGRATION_FAILED', message: expect.stringMatching(/cancelled.*nothing was committed/) });
      await snap.close();
      expect(cancelled).toBe(true);
      await expectRecovered(vm, image, 'cancelled');
    } finally {
      await vm.kill();
    }
  });

  it('a QEMU that runs as another user (-runas) cannot reach our 0700 socket directory: a coded error, nothing committed, the VM resumed', async () => {
    const { vm, image } = await runningVm(dir.path, ['-runas', 'nobody']);
    try {
      const snap = await connectVm(vm.snapSocket);
      const t0 = Date.now();
      const err = await snap.savevm('other-user').catch((e: unknown) => e);
      await snap.close();
      // QEMU's own words, at once: not the 10 s wait for a connection that cannot come.
      expect(err).toMatchObject({ code: 'MIGRATION_FAILED', message: expect.stringMatching(/before it connected to our socket: .*Permission denied.*nothing was committed/) });
      expect(Date.now() - t0).toBeLessThan(5000);
      await expectRecovered(vm, image, 'other-user');
    } finally {
      await vm.kill();
    }
  });

  it('an AbortSignal fired mid-stream (what Ctrl-C does in the CLI): ABORTED, nothing committed, the VM resumed', async () => {
    const { vm, image } = await runningVm();
    try {
      const snap = await connectVm(vm.snapSocket);
      const controller = new AbortController();
      const onProgress = (p: SaveVmProgress): void => {
        if (p.phase === 'stream' && p.bytes > 0) controller.abort();
      };
      await expect(snap.savevm('aborted', { signal: controller.signal, onProgress })).rejects.toMatchObject({ code: 'ABORTED' });
      await snap.close();
      expect((await vm.qmp.execute<{ status: string }>('query-migrate')).status).toMatch(/cancelled|failed/);
      await expectRecovered(vm, image, 'aborted');
    } finally {
      await vm.kill();
    }
  });

  it('ENOSPC in the middle of the stream (small loop mount): nothing committed, the space given back, the VM resumed and writing', async (ctx) => {
    const reason = loopFsSkipReason('ext4');
    if (reason !== undefined) ctx.skip();
    const result = await withLoopFs({ sizeBytes: 96 << 20, fsType: 'ext4' }, async (mount) => {
      const { vm, image } = await runningVm(mount);
      try {
        const snap = await connectVm(vm.snapSocket);
        await expect(snap.savevm('full')).rejects.toMatchObject({ code: 'ENOSPC' });
        await snap.close();
        await expectRecovered(vm, image, 'full');
      } finally {
        await vm.kill();
      }
    });
    if (result instanceof Skipped) ctx.skip();
  });

  /** Runs the CLI savevm and SIGKILLs it once the migration reaches `when`. */
  async function killCliWhen(vm: TestVm, name: string, when: Parameters<typeof waitMigration>[1]): Promise<void> {
    assertBuilt();
    const child = spawn(process.execPath, [BIN, 'savevm', '--qmp', vm.snapSocket, '--quiet', name], { stdio: 'ignore' });
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    try {
      await waitMigration(vm, when);
    } finally {
      child.kill('SIGKILL');
      await exited;
    }
  }

  it('kill -9 of snapstream in the stream phase: the migration fails, nothing is committed, cont resumes the VM', async () => {
    const { vm, image } = await runningVm();
    try {
      await killCliWhen(vm, 'killed', (info) => info.status === 'active' && (info.ram?.transferred ?? 0) > 8 << 20);
      await waitMigration(vm, (info) => info.status === 'failed' || info.status === 'cancelled');
      // Nobody is left to resume it: the VM stays stopped until someone says cont (README, safety rules).
      expect(await vm.status()).not.toBe('running');
      await vm.qmp.execute('cont');
      await expectRecovered(vm, image, 'killed');
    } finally {
      await vm.kill();
    }
  });

  it('kill -9 of snapstream at the commit: the snapshot is complete or absent, cont resumes the VM, the image is clean', async () => {
    const { vm, image } = await runningVm();
    try {
      await killCliWhen(vm, 'at-commit', (info) => info.status === 'completed');
      const status = await vm.status();
      if (status !== 'running') await vm.qmp.execute('cont');
      expect(await vm.status()).toBe('running');
      await qemuWrite(vm, 0, 'write -P 0x79 2M 64k');
      await vm.quit();
      const check = await qemuImg.check(image);
      expect(check.corruptions ?? 0).toBe(0);
      expect([0, 3]).toContain(check.exitCode);
      const listed = (await qemuImg.snapshotList(image)).filter((s) => s.name === 'at-commit');
      expect(listed.length <= 1).toBe(true);
      if (listed.length === 1) expect(listed[0]!.vmStateSize).toBeGreaterThan(RAM_MIB << 20);
    } finally {
      await vm.kill();
    }
  });

  it('a QMP connection that drops mid-stream: snapstream reconnects, cancels, commits nothing and resumes the VM', async () => {
    const { vm, image } = await runningVm();
    // A relay in front of QEMU's second QMP socket, so that the test can cut snapstream's connection.
    const relayPath = join(dir.path, 'relay.qmp');
    const pairs: Socket[][] = [];
    const relay = createServer((client) => {
      const upstream = connect(vm.snapSocket);
      pairs.push([client, upstream]);
      client.pipe(upstream).pipe(client);
      client.on('error', () => upstream.destroy()).on('close', () => upstream.destroy());
      upstream.on('error', () => client.destroy()).on('close', () => client.destroy());
    });
    await new Promise<void>((resolve) => relay.listen(relayPath, resolve));
    try {
      const snap = await connectVm(relayPath);
      let cut = false;
      const onProgress = (p: SaveVmProgress): void => {
        if (p.phase === 'stream' && p.bytes > 0 && !cut) {
          cut = true;
          for (const socket of pairs[0]!) socket.destroy();
        }
      };
      await expect(snap.savevm('dropped', { onProgress })).rejects.toMatchObject({ code: 'QMP_CLOSED', message: expect.stringMatching(/QMP connection closed/) });
      await snap.close();
      expect(pairs.length).toBeGreaterThanOrEqual(2);
      await waitStatus(vm, (s) => s === 'running');
      await expectRecovered(vm, image, 'dropped');
    } finally {
      relay.close();
      await vm.kill();
    }
  });
});
