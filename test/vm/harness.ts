/**
 * QEMU VMs for the savevm/loadvm tests: RAM from a file of known random
 * content (memory-backend-file, share=off: the file is never written), or
 * blank RAM for a loader; disks attached with cache=none (O_DIRECT); and two
 * -qmp sockets, one for the test (test/helpers/qmp.ts, independent of the
 * library's client) and one for snapstream, since QEMU serves one client per
 * socket. Every VM is killed at process exit.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpClient } from '../helpers/qmp.js';
import { findTool } from '../helpers/tools.js';

export interface DiskSpec {
  path: string;
  format?: 'qcow2' | 'raw';
  readOnly?: boolean;
}

export interface VmSpec {
  /** Directory for the sockets. */
  dir: string;
  ramMiB: number;
  /** Known RAM content (share=off); blank RAM when absent. */
  memFile?: string;
  disks: DiskSpec[];
  /** Start the guest (no -S). */
  running?: boolean;
  /** `-incoming defer`. */
  incoming?: boolean;
  /** Name for the sockets (several VMs may share a dir). */
  tag?: string;
  /** More QEMU arguments (e.g. a gdbstub chardev). */
  extraArgs?: string[];
}

export interface TestVm {
  readonly pid: number;
  /** The test's own QMP connection. */
  readonly qmp: QmpClient;
  /** The socket snapstream connects to. */
  readonly snapSocket: string;
  readonly testSocket: string;
  hmp(line: string): Promise<string>;
  /** HMP command that must print nothing (savevm, loadvm); rejects with its output otherwise. */
  hmpChecked(line: string): Promise<void>;
  status(): Promise<string>;
  /** QMP pmemsave of [addr, addr + size) into `file`. */
  pmemsave(addr: number, size: number, file: string): Promise<void>;
  quit(): Promise<void>;
  kill(): Promise<void>;
  stderr(): string;
}

const live = new Set<ChildProcess>();
process.once('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

export function vmArgs(spec: VmSpec, testSocket: string, snapSocket: string): string[] {
  const backend =
    spec.memFile === undefined
      ? `memory-backend-ram,id=mem0,size=${spec.ramMiB}M`
      : `memory-backend-file,id=mem0,size=${spec.ramMiB}M,mem-path=${spec.memFile},share=off`;
  const args = ['-machine', 'pc,memory-backend=mem0', '-object', backend, '-display', 'none', '-nodefaults', '-accel', 'tcg'];
  args.push('-qmp', `unix:${testSocket},server=on,wait=off`, '-qmp', `unix:${snapSocket},server=on,wait=off`);
  spec.disks.forEach((disk, i) => {
    const ro = disk.readOnly === true ? ',read-only=on' : '';
    args.push('-drive', `file=${disk.path},format=${disk.format ?? 'qcow2'},if=none,id=drive${i},node-name=disk${i},cache=none${ro}`);
  });
  if (spec.running !== true) args.push('-S');
  if (spec.incoming === true) args.push('-incoming', 'defer');
  if (spec.extraArgs !== undefined) args.push(...spec.extraArgs);
  return args;
}

export async function startVm(spec: VmSpec): Promise<TestVm> {
  const binary = findTool('qemu-system-x86_64');
  if (binary === undefined) throw new Error('qemu-system-x86_64 not found');
  const tag = spec.tag ?? 'vm';
  const testSocket = join(spec.dir, `${tag}-test.qmp`);
  const snapSocket = join(spec.dir, `${tag}-snap.qmp`);
  const child = spawn(binary, vmArgs(spec, testSocket, snapSocket), { stdio: ['ignore', 'ignore', 'pipe'] });
  live.add(child);
  let stderr = '';
  child.stderr?.on('data', (chunk: Buffer) => {
    if (stderr.length < 1 << 16) stderr += chunk.toString('utf8');
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  let qmp: QmpClient;
  try {
    qmp = await Promise.race([
      QmpClient.connect(testSocket, { timeoutMs: 10_000 }),
      exited.then(() => {
        throw new Error(`qemu exited during start-up: ${stderr}`);
      }),
    ]);
  } catch (error) {
    child.kill('SIGKILL');
    await exited;
    live.delete(child);
    throw error;
  }
  let stopped: Promise<void> | undefined;
  const stop = (graceful: boolean): Promise<void> => {
    stopped ??= (async () => {
      if (graceful) {
        await qmp.execute('quit', undefined, { timeoutMs: 5_000 }).catch(() => undefined);
        await Promise.race([exited, sleep(5_000)]);
      }
      qmp.close();
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
      live.delete(child);
    })();
    return stopped;
  };
  const hmp = (line: string): Promise<string> => qmp.execute<string>('human-monitor-command', { 'command-line': line }, { timeoutMs: 60_000 });
  return {
    pid: child.pid as number,
    qmp,
    snapSocket,
    testSocket,
    hmp,
    async hmpChecked(line) {
      const out = await hmp(line);
      if (out.trim() !== '') throw new Error(`HMP ${line}: ${out.trim()}`);
    },
    async status() {
      return (await qmp.execute<{ status: string }>('query-status')).status;
    },
    async pmemsave(addr, size, file) {
      await qmp.execute('pmemsave', { val: addr, size, filename: file }, { timeoutMs: 60_000 });
    },
    quit: () => stop(true),
    kill: () => stop(false),
    stderr: () => stderr,
  };
}

/** Writes through QEMU itself (HMP qemu-io on drive `drive`); rejects on any error text. */
export async function qemuWrite(vm: TestVm, drive: number, command: string): Promise<void> {
  const out = await vm.hmp(`qemu-io drive${drive} "${command}"`);
  if (/error|failed|Error/i.test(out)) throw new Error(`qemu-io ${command}: ${out}`);
}

/** Polls until `predicate` holds for the VM's status, within `timeoutMs`. */
export async function waitStatus(vm: TestVm, predicate: (status: string) => boolean, timeoutMs = 10_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const status = await vm.status();
    if (predicate(status)) return status;
    if (Date.now() > deadline) throw new Error(`VM status stayed '${status}'`);
    await sleep(20);
  }
}
