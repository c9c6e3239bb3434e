/**
 * The checkpoint instant of a live savevm, against a real QEMU 7.2 with a
 * running guest: RAM and disk written after the VM runs again must not
 * reach the snapshot. RAM is written through QEMU's gdbstub, the disk
 * through HMP qemu-io, both while the test holds the VM with a QMP `stop`.
 * The outcome is checked in the vmstate bytes (read by the test's own qcow2
 * reader), then after loadvm in a fresh QEMU (pmemsave) and with qemu-io on
 * the disk after that QEMU quits. A savevm that resumes the guest before
 * QEMU write-protects its RAM (the deliberately wrong order of an internal
 * test hook) must fail the same check.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { connectVm } from '../../src/index.js';
import { saveVmLive } from '../../src/vm/live-savevm.js';
import { Monitor } from '../../src/vm/monitor.js';
import { readSnapshotVmState } from '../helpers/qcow2-vmstate.js';
import { qemuImg, qemuIo, requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';
import { startVm, type TestVm } from './harness.js';
import { drainEvents, holdAndWrite, pagesFound, pattern, REGION_ADDRESS, REGION_BYTES, REGION_PAGES, startLiveVm, startLoader, type LiveVm } from './live-harness.js';

const skip = requireTool('qemu-system-x86_64', 'qemu-img', 'qemu-io');
const RAM_MIB = 256;
/** A loaded shared disk makes QEMU's flushes take seconds; the bound is for a hang, not for speed. */
const SAVE_TIMEOUT_MS = 240_000;

interface Overwrite {
  /** query-migrate status when the VM ran again (the save still going). */
  migrationStatus: string;
  runState: string;
}

/** As soon as the VM runs again (a RESUME event on the test's socket): hold it, overwrite RAM and disk, let it go. */
function overwriteOnResume(live: LiveVm, ram: Buffer, diskByte: number): Promise<Overwrite> {
  return live.vm.qmp.waitEvent('RESUME', SAVE_TIMEOUT_MS).then(async () => {
    const status = await live.vm.qmp.execute<{ status: string }>('query-migrate');
    const run = await live.vm.qmp.execute<{ status: string }>('query-status');
    await holdAndWrite(live, ram, diskByte);
    return { migrationStatus: status.status, runState: run.status };
  });
}

/** A running VM holding the first patterns, and a watcher that writes the second ones once the VM runs again. */
async function prepare(dir: string, tag: string): Promise<{ live: LiveVm; stateImage: string; first: Buffer; second: Buffer; overwrite: Promise<Overwrite> }> {
  const live = await startLiveVm(dir, tag, RAM_MIB);
  const first = pattern();
  const second = pattern();
  await holdAndWrite(live, first, 0xa1);
  await drainEvents(live.vm.qmp, 'RESUME');
  const overwrite = overwriteOnResume(live, second, 0xb2);
  overwrite.catch(() => undefined);
  return { live, stateImage: join(dir, `${tag}-state.qcow2`), first, second, overwrite };
}

async function waitJob(vm: TestVm, id: string): Promise<{ status: string; error?: string }> {
  for (;;) {
    const job = (await vm.qmp.execute<Array<{ id: string; status: string; error?: string }>>('query-jobs')).find((j) => j.id === id);
    if (job === undefined || job.status === 'concluded') return job ?? { status: 'missing', error: 'no such job' };
    await sleep(100);
  }
}

async function expectClean(path: string): Promise<void> {
  const check = await qemuImg.check(path);
  expect(check.exitCode, JSON.stringify(check)).toBe(0);
}

describe.skipIf(skip !== undefined)('live savevm: the checkpoint instant', () => {
  let dir: TmpDir;
  beforeAll(async () => {
    dir = await tmpDir('live-instant');
  });
  afterAll(async () => {
    await dir?.cleanup();
  });

  it('holds RAM and disk as they were at the checkpoint, and loadvm restores them', { timeout: 600_000 }, async () => {
    const { live, stateImage, first, second, overwrite } = await prepare(dir.path, 'ok');
    try {
      const vm = await connectVm(live.vm.snapSocket);
      const result = await vm.savevm('instant', { live: true, stateImage }).finally(() => vm.close());
      const seen = await overwrite;
      expect(result.live).toBe(true);
      expect(result.status).toBe('running');
      // The overwrite ran while the snapshot was still being taken, with the guest running.
      expect(seen.runState).toBe('running');
      expect(['setup', 'active']).toContain(seen.migrationStatus);
      const stream = await readSnapshotVmState(stateImage, 'instant');
      expect(stream.length).toBe(result.vmStateBytes);
      expect(pagesFound(stream, first)).toBe(REGION_PAGES);
      expect(pagesFound(stream, second)).toBe(0);
      // The VM itself holds the second patterns now (a gdbstub byte stops a running VM and is lost: stop first).
      await live.vm.qmp.execute('stop');
      expect((await live.gdb.readPhys(REGION_ADDRESS, REGION_BYTES)).equals(second)).toBe(true);
      await live.vm.qmp.execute('cont');
      expect((await qemuImg.snapshotList(live.disk, { forceShare: true })).map((s) => [s.name, s.vmStateSize])).toEqual([['instant', 0]]);
    } finally {
      live.gdb.close();
      await live.vm.quit();
    }
    await expectClean(live.disk);
    await expectClean(stateImage);
    await qemuIo(live.disk, ['read -P 0xb2 0 64k']);

    const loader = await startLoader(dir.path, 'ok-load', RAM_MIB, live.disk);
    try {
      const vm = await connectVm(loader.snapSocket);
      const loaded = await vm.loadvm('instant', { stateImage }).finally(() => vm.close());
      expect(loaded.savedRunState).toBe('running');
      expect(loaded.status).toBe('running');
      const dump = join(dir.path, 'ok-region.bin');
      await loader.pmemsave(REGION_ADDRESS, REGION_BYTES, dump);
      expect((await readFile(dump)).equals(first)).toBe(true);
    } finally {
      await loader.quit();
    }
    await qemuIo(live.disk, ['read -P 0xa1 0 64k']);
    await expectClean(live.disk);

    // QEMU alone restores it too: the snapshot-load job, the state image added as a node and named as vmstate.
    await qemuIo(live.disk, ['write -P 0xc3 0 64k']);
    const plain = await startVm({ dir: dir.path, ramMiB: RAM_MIB, disks: [{ path: live.disk }], tag: 'ok-qemu' });
    try {
      await plain.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'state', file: { driver: 'file', filename: stateImage } });
      await plain.qmp.execute('snapshot-load', { 'job-id': 'restore', tag: 'instant', vmstate: 'state', devices: ['disk0', 'state'] });
      const job = await waitJob(plain, 'restore');
      expect(job.error).toBeUndefined();
      const dump = join(dir.path, 'ok-qemu-region.bin');
      await plain.pmemsave(REGION_ADDRESS, REGION_BYTES, dump);
      expect((await readFile(dump)).equals(first)).toBe(true);
    } finally {
      await plain.quit();
    }
    await qemuIo(live.disk, ['read -P 0xa1 0 64k']);
  });

  it('catches a savevm that resumes the guest before write tracking: the wrong order fails the same check', { timeout: 600_000 }, async () => {
    const { live, stateImage, first, second, overwrite } = await prepare(dir.path, 'wrong');
    try {
      const monitor = await Monitor.connect(live.vm.snapSocket);
      try {
        await saveVmLive(monitor, 'wrong', { live: true, stateImage }, { resumeBeforeTracking: true, beforeMigrate: async () => void (await overwrite) });
      } finally {
        monitor.close();
      }
      const stream = await readSnapshotVmState(stateImage, 'wrong');
      // The same check as above, failing: the RAM saved is the RAM after the checkpoint.
      expect(pagesFound(stream, first)).toBe(0);
      expect(pagesFound(stream, second)).toBe(REGION_PAGES);
    } finally {
      live.gdb.close();
      await live.vm.quit();
    }
  });
});
