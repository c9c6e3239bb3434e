/**
 * Running VMs for the live savevm tests: anonymous guest RAM (QEMU 7.2
 * refuses background snapshots of file-backed RAM), a gdbstub on a unix
 * chardev to write guest RAM, HMP qemu-io to write the disk, and the two
 * QMP sockets of harness.ts (the test's own, and snapstream's).
 */
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import type { QmpClient } from '../helpers/qmp.js';
import { qemuImg } from '../helpers/tools.js';
import { GdbClient } from './live-gdb.js';
import { qemuWrite, startVm, type TestVm } from './harness.js';

/** Guest-physical address of the RAM region the tests write: 32 MiB, far above what SeaBIOS touches. */
export const REGION_ADDRESS = 32 << 20;
/** Eight pages: each must appear in the vmstate as it was at the checkpoint. */
export const REGION_BYTES = 32 << 10;
const PAGE_BYTES = 4096;

export interface LiveVm {
  vm: TestVm;
  gdb: GdbClient;
  disk: string;
}

/** A running VM with one qcow2 disk (drive0) and a gdbstub connected (the stub's stop is undone). */
export async function startLiveVm(dir: string, tag: string, ramMiB: number, diskBytes = 64 << 20): Promise<LiveVm> {
  const disk = join(dir, `${tag}.qcow2`);
  await qemuImg.create(disk, diskBytes);
  const gdbSocket = join(dir, `${tag}-gdb.sock`);
  const vm = await startVm({
    dir,
    ramMiB,
    disks: [{ path: disk }],
    running: true,
    tag,
    extraArgs: ['-chardev', `socket,id=gdb0,path=${gdbSocket},server=on,wait=off`, '-gdb', 'chardev:gdb0'],
  });
  const gdb = await GdbClient.connect(gdbSocket);
  await vm.qmp.execute('cont');
  return { vm, gdb, disk };
}

/** A fresh loader for a live snapshot: same machine, `-incoming defer`. */
export function startLoader(dir: string, tag: string, ramMiB: number, disk: string): Promise<TestVm> {
  return startVm({ dir, ramMiB, disks: [{ path: disk }], incoming: true, tag });
}

export function pattern(): Buffer {
  return randomBytes(REGION_BYTES);
}

/** Holds the VM with QMP `stop`, writes `ram` into the region and `diskByte` over the first 64 KiB of drive0, `cont`s. */
export async function holdAndWrite(live: LiveVm, ram: Buffer, diskByte: number): Promise<void> {
  await live.vm.qmp.execute('stop');
  await live.gdb.writePhys(REGION_ADDRESS, ram);
  await qemuWrite(live.vm, 0, `write -P 0x${diskByte.toString(16)} 0 64k`);
  await live.vm.qmp.execute('cont');
}

/** How many of the region's pages appear, byte for byte, in `stream`. */
export function pagesFound(stream: Buffer, region: Buffer): number {
  let found = 0;
  for (let at = 0; at < region.length; at += PAGE_BYTES) {
    if (stream.indexOf(region.subarray(at, at + PAGE_BYTES)) >= 0) found += 1;
  }
  return found;
}

export const REGION_PAGES = REGION_BYTES / PAGE_BYTES;

/** Consumes every queued event named `name`, so that the next wait sees only new ones. */
export async function drainEvents(qmp: QmpClient, name: string): Promise<void> {
  while (qmp.events.some((e) => e.event === name)) await qmp.waitEvent(name, 1);
}

/** QMP event timestamp in milliseconds. */
export function eventMs(event: { timestamp?: { seconds: number; microseconds: number } }): number {
  const t = event.timestamp ?? { seconds: 0, microseconds: 0 };
  return t.seconds * 1000 + t.microseconds / 1000;
}
