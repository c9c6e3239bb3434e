/**
 * The savevm, loadvm and revert commands as a user runs them: the real bin,
 * a real QEMU, JSON on stdout, exit codes 0 / 1 / 2.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { qemuImg, qemuIo, requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';
import { qemuWrite, startVm } from '../vm/harness.js';
import { runBin } from './bin-harness.js';

const skip = requireTool('qemu-system-x86_64', 'qemu-img', 'qemu-io');

describe.skipIf(skip !== undefined)('snapstream savevm / loadvm / revert', () => {
  let dir: TmpDir;
  beforeAll(async () => {
    dir = await tmpDir('cli-vm');
  });
  afterAll(async () => dir.cleanup());

  it('savevm --json of a running VM, then loadvm --json into -incoming defer, exit 0', async () => {
    const image = join(dir.path, 'cli.qcow2');
    await qemuImg.create(image, 64 << 20);
    const vm = await startVm({ dir: dir.path, tag: 'src', ramMiB: 32, disks: [{ path: image }], running: true });
    try {
      await qemuWrite(vm, 0, 'write -P 0x31 0 64k');
      const saved = await runBin(['savevm', '--qmp', vm.snapSocket, '--json', 'cli-snap']);
      expect(saved.code, saved.stderr).toBe(0);
      const result = JSON.parse(saved.stdout.toString()) as { downtimeMs: number; vmStateBytes: number; status: string; disks: unknown[] };
      expect(result.status).toBe('running');
      expect(result.vmStateBytes).toBeGreaterThan(0);
      expect(result.disks).toHaveLength(1);
      const again = await runBin(['savevm', '--qmp', vm.snapSocket, 'cli-snap']);
      expect(again.code).toBe(1);
      expect(again.stderr).toMatch(/^snapstream: SNAPSHOT_EXISTS: /);
      await qemuWrite(vm, 0, 'write -P 0x32 0 64k');
    } finally {
      await vm.quit();
    }
    const target = await startVm({ dir: dir.path, tag: 'dst', ramMiB: 32, disks: [{ path: image }], incoming: true });
    try {
      const loaded = await runBin(['loadvm', '--qmp', target.snapSocket, '--json', 'cli-snap']);
      expect(loaded.code, loaded.stderr).toBe(0);
      expect(JSON.parse(loaded.stdout.toString())).toMatchObject({ name: 'cli-snap', savedRunState: 'running', status: 'running' });
      await qemuWrite(target, 0, 'read -P 0x31 0 64k');
    } finally {
      await target.quit();
    }
    expect((await qemuImg.check(image)).exitCode).toBe(0);
  });

  it('revert IMAGE NAME reverts the disk; a missing snapshot exits 1, a missing --qmp exits 2', async () => {
    const image = join(dir.path, 'revert.qcow2');
    await qemuImg.create(image, 64 << 20);
    await qemuIo(image, ['write -P 0x41 0 64k']);
    await qemuImg.snapshot(image, 'create', 'base');
    await qemuIo(image, ['write -P 0x42 0 64k']);
    const reverted = await runBin(['revert', image, 'base']);
    expect(reverted.code, reverted.stderr).toBe(0);
    expect(reverted.stderr).toContain("reverted");
    await qemuIo(image, ['read -P 0x41 0 64k']);
    const missing = await runBin(['revert', image, 'nope']);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/SNAPSHOT_NOT_FOUND/);
    const usage = await runBin(['savevm', 'x']);
    expect(usage.code).toBe(2);
    expect(usage.stderr).toMatch(/--qmp/);
  });
});
