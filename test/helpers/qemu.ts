/**
 * Paused QEMU VMs for integration tests: known RAM in, vmstate out.
 *
 * What was established on QEMU 7.2 (Debian 1:7.2+dfsg-7+deb12u18), proven by
 * qemu.test.ts next to this file:
 *
 * - Command line (built by `startPausedVm`):
 *     qemu-system-x86_64 -machine pc,memory-backend=mem0
 *       -object memory-backend-file,id=mem0,size=64M,mem-path=MEM,share=off
 *       -S -display none -nodefaults -accel tcg
 *       -qmp unix:SOCK,server=on,wait=off
 *       -drive file=IMG,format=qcow2,if=none,id=drive0,node-name=disk0
 *   TCG start-up to QMP ready takes ~0.1 s. With share=off the guest RAM starts
 *   as a private copy of MEM and MEM is never written.
 * - savevm needs no guest device on the drive: `-drive if=none` is enough.
 *   It needs a writable qcow2 drive (the vmstate goes to the first
 *   snapshot-capable drive). Both the HMP `savevm NAME` / `loadvm NAME` (via
 *   QMP `human-monitor-command`) and the QMP jobs `snapshot-save` /
 *   `snapshot-load` / `snapshot-delete` (since 6.0; they take node names,
 *   hence `node-name=disk0`) work on a VM paused with -S, and the VM stays
 *   paused. HMP reports failure only as text in the `return` string
 *   ("Error: ..."), so `hmpChecked` treats any non-empty output as failure.
 *   HMP `savevm` with an existing name replaces that snapshot.
 * - The RAMBlock is named after the memory backend id ("mem0"), not "pc.ram"
 *   as with `-m`. The loading VM must use the same id and size, else loadvm
 *   fails with 'Unknown ramblock "mem0", cannot accept migration'. A blank
 *   loader uses `-object memory-backend-ram,id=mem0,size=64M`.
 * - After a completed migration the source's block nodes are inactive
 *   (status "postmigrate"), so savevm must come BEFORE migrateToFile.
 * - The default `max-bandwidth` is 128 MiB/s (134217728); migrateToFile
 *   raises it, after which 64 MiB migrates in ~0.1 s.
 * - Stream format: `migrate exec:cat > FILE` and savevm write the same
 *   format: magic "QEVM", version 3, the configuration section
 *   ("pc-i440fx-7.2"), the "ram" section (RAMBlock list "mem0",
 *   "/rom@etc/acpi/tables", "pc.bios", "pc.rom", ..., then pages each behind
 *   an 8-byte big-endian address|flags header), then device sections and EOF.
 *   For a paused 64 MiB guest both are ~67,553,600 bytes (observed 67,553,603
 *   and 67,553,585 across runs); the head (up to the first page) and the
 *   device-state tail are byte-identical, and they differ only in how many
 *   RAM iteration boundaries (a QEMU_VM_SECTION_PART header plus
 *   RAM_SAVE_FLAG_EOS) there are and where they fall, which depends on
 *   timing. So the bytes are not reproducible run to run (neither are two
 *   savevm runs), but the format is the same.
 * - Key result: a stream produced by `migrate exec:cat > FILE`, stored as the
 *   vmstate of an internal snapshot (with vm_state_size set to its length),
 *   is accepted by `loadvm`, and the guest RAM comes back exactly.
 * - `pmemsave` reads guest-physical memory, not the RAMBlock: with the pc
 *   machine, 0xc0000-0xfffff shows the option ROM / BIOS shadow (PAM), not
 *   RAM, so compare RAM content outside that window (`PC_ROM_WINDOW`), or
 *   give the loader a `memory-backend-file` with share=on and compare files.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { createCipheriv, createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpClient } from './qmp.js';
import { findTool, tmpDir, type TmpDir } from './tools.js';

/** Guest-physical range where the pc machine maps ROM over RAM at reset. */
export const PC_ROM_WINDOW = { start: 0xc0000, end: 0x100000 } as const;

/** A paused VM gives up promptly on quit; anything slower is a hang. */
const QUIT_TIMEOUT_MS = 5_000;

/** 64 MiB migrates in ~0.1 s once the bandwidth cap is lifted. */
const DEFAULT_MIGRATE_TIMEOUT_MS = 60_000;
const MIGRATE_POLL_MS = 20;

/** Effectively unlimited; QEMU's default of 128 MiB/s would make 1 GiB take 8 s. */
const MAX_BANDWIDTH_BYTES_PER_S = 2 ** 40;

const SAVEVM_TIMEOUT_MS = 60_000;

export interface StartVmOptions {
  /** Guest RAM in MiB. */
  ramMiB: number;
  /** Back RAM with this file (private copy, share=off). Default: anonymous, zeroed RAM. */
  memFile?: string;
  /** With memFile: share=on makes RAM writes (e.g. loadvm) land in the file. */
  memShare?: boolean;
  /** qcow2 image attached as drive0 / node disk0 (needed for savevm / loadvm). */
  image?: string;
  /** Drive cache mode; 'none' uses O_DIRECT on the image. Default 'writeback'. */
  cache?: 'none' | 'writeback' | 'writethrough' | 'unsafe' | 'directsync';
  /** `-incoming` URI, e.g. 'defer' or 'exec:cat FILE'. */
  incoming?: string;
  /** Bound for start-up until QMP is ready. */
  timeoutMs?: number;
}

export interface MigrationStatus {
  status: string;
  'total-time'?: number;
  ram?: { total: number; transferred: number; remaining: number; [key: string]: unknown };
  'error-desc'?: string;
  [key: string]: unknown;
}

export interface Vm {
  readonly qmp: QmpClient;
  readonly pid: number;
  readonly args: readonly string[];
  /** Everything QEMU printed on stderr so far (diagnostics). */
  readonly stderr: () => string;
  /** HMP command via `human-monitor-command`; returns its text output. */
  hmp(commandLine: string): Promise<string>;
  /** HMP command that must print nothing (savevm, loadvm, delvm); rejects with the text otherwise. */
  hmpChecked(commandLine: string): Promise<void>;
  /** `snapshot-save` QMP job on drive disk0 (vmstate and disk). */
  savevm(name: string): Promise<void>;
  /** `snapshot-load` QMP job. */
  loadvm(name: string): Promise<void>;
  /** Lifts the bandwidth cap, migrates to `exec:cat > path`, waits for completion. */
  migrateToFile(path: string, options?: { timeoutMs?: number }): Promise<MigrationStatus>;
  /** With `incoming: 'defer'`: loads a migration stream file; resolves when done. */
  migrateFromFile(path: string, options?: { timeoutMs?: number }): Promise<MigrationStatus>;
  /** QMP `pmemsave`: guest-physical memory [addr, addr+size) into `file`. */
  pmemsave(addr: number, size: number, file: string): Promise<void>;
  /** QMP `query-status` .status, e.g. 'prelaunch', 'paused', 'postmigrate'. */
  status(): Promise<string>;
  /** SIGKILL and reap. Idempotent. */
  kill(): Promise<void>;
  /** QMP `quit`, falling back to SIGKILL; always reaps. Idempotent. */
  quit(): Promise<void>;
}

const liveVms = new Set<Vm>();

/** Kills every VM started by this module that is still running (for afterAll). */
export async function killAllVms(): Promise<void> {
  await Promise.all([...liveVms].map((vm) => vm.kill()));
}

// A test runner that exits with VMs alive would leak QEMU processes.
process.once('exit', () => {
  for (const vm of liveVms) {
    try {
      process.kill(vm.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
});

/** The QEMU argument list `startPausedVm` uses (exported for docs and debugging). */
export function pausedVmArgs(options: StartVmOptions, qmpSocket: string): string[] {
  if (!Number.isInteger(options.ramMiB) || options.ramMiB < 16) {
    throw new RangeError(`Expected an integer >= 16 for ramMiB, received ${options.ramMiB}`);
  }
  const backend =
    options.memFile === undefined
      ? `memory-backend-ram,id=mem0,size=${options.ramMiB}M`
      : `memory-backend-file,id=mem0,size=${options.ramMiB}M,mem-path=${qemuOptValue(options.memFile)},` +
        `share=${options.memShare === true ? 'on' : 'off'}`;
  const args = [
    '-machine', 'pc,memory-backend=mem0',
    '-object', backend,
    '-S', '-display', 'none', '-nodefaults', '-accel', 'tcg',
    '-qmp', `unix:${qemuOptValue(qmpSocket)},server=on,wait=off`,
  ];
  if (options.image !== undefined) {
    args.push(
      '-drive',
      `file=${qemuOptValue(options.image)},format=qcow2,if=none,id=drive0,node-name=disk0,cache=${options.cache ?? 'writeback'}`,
    );
  }
  if (options.incoming !== undefined) args.push('-incoming', options.incoming);
  return args;
}

/** QEMU option values escape ',' by doubling it. */
function qemuOptValue(value: string): string {
  return value.replaceAll(',', ',,');
}

/** Single-quotes a path for the `exec:` migration URI, which runs under /bin/sh. */
function shellQuote(value: string): string {
  return `'${value.replaceAll("'", `'\\''`)}'`;
}

/** Starts QEMU paused (-S) and connects QMP. Rejects (after reaping QEMU) if it does not come up. */
export async function startPausedVm(options: StartVmOptions): Promise<Vm> {
  const binary = findTool('qemu-system-x86_64');
  if (binary === undefined) throw new Error('qemu-system-x86_64 not found on PATH');
  const dir: TmpDir = await tmpDir('qmp');
  const socketPath = join(dir.path, 'qmp.sock');
  const args = pausedVmArgs(options, socketPath);
  const child = spawn(binary, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (chunk: Buffer) => {
    if (stderr.length < 1 << 20) stderr += chunk.toString('utf8');
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const spawnError = new Promise<never>((_, reject) => child.once('error', reject));
  let qmp: QmpClient;
  try {
    qmp = await Promise.race([
      QmpClient.connect(socketPath, { timeoutMs: options.timeoutMs ?? 10_000 }),
      spawnError,
      exited.then(() => {
        throw new Error(`qemu exited during start-up (code ${child.exitCode}): ${stderr}`);
      }),
    ]);
  } catch (error) {
    await killAndReap(child, exited);
    await dir.cleanup();
    throw new Error(`startPausedVm: ${(error as Error).message}\nargs: ${args.join(' ')}\n${stderr}`, { cause: error });
  }
  const vm = makeVm(child, exited, qmp, args, () => stderr, dir);
  liveVms.add(vm);
  return vm;
}

/** Starts a paused VM, runs `fn`, and always quits (then kills) and reaps it. */
export async function withPausedVm<T>(options: StartVmOptions, fn: (vm: Vm) => Promise<T>): Promise<T> {
  const vm = await startPausedVm(options);
  try {
    return await fn(vm);
  } finally {
    await vm.quit();
  }
}

async function killAndReap(child: ChildProcess, exited: Promise<void>): Promise<void> {
  if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  await exited;
}

function makeVm(
  child: ChildProcess,
  exited: Promise<void>,
  qmp: QmpClient,
  args: readonly string[],
  stderr: () => string,
  dir: TmpDir,
): Vm {
  let stopped: Promise<void> | undefined;
  const stop = (graceful: boolean): Promise<void> => {
    stopped ??= (async () => {
      if (graceful) {
        await qmp.execute('quit', undefined, { timeoutMs: QUIT_TIMEOUT_MS }).catch(() => undefined);
        await Promise.race([exited, sleep(QUIT_TIMEOUT_MS)]);
      }
      qmp.close();
      await killAndReap(child, exited);
      await dir.cleanup();
      liveVms.delete(vm);
    })();
    return stopped;
  };

  const hmp = (commandLine: string): Promise<string> =>
    qmp.execute<string>('human-monitor-command', { 'command-line': commandLine }, { timeoutMs: SAVEVM_TIMEOUT_MS });

  const vm: Vm = {
    qmp,
    pid: child.pid as number,
    args,
    stderr,
    hmp,
    async hmpChecked(commandLine) {
      const output = await hmp(commandLine);
      if (output.trim() !== '') throw new Error(`HMP ${commandLine}: ${output.trim()}`);
    },
    savevm: (name) =>
      runSnapshotJob(qmp, 'snapshot-save', { tag: name, vmstate: 'disk0', devices: ['disk0'] }),
    loadvm: (name) =>
      runSnapshotJob(qmp, 'snapshot-load', { tag: name, vmstate: 'disk0', devices: ['disk0'] }),
    migrateToFile: (path, options = {}) => migrateToFile(qmp, path, options.timeoutMs),
    async migrateFromFile(path, options = {}) {
      await qmp.execute('migrate-incoming', { uri: `exec:cat ${shellQuote(path)}` });
      return waitMigration(qmp, options.timeoutMs ?? DEFAULT_MIGRATE_TIMEOUT_MS);
    },
    async pmemsave(addr, size, file) {
      await qmp.execute('pmemsave', { val: addr, size, filename: file }, { timeoutMs: SAVEVM_TIMEOUT_MS });
    },
    async status() {
      return (await qmp.execute<{ status: string }>('query-status')).status;
    },
    kill: () => stop(false),
    quit: () => stop(true),
  };
  return vm;
}

let jobCounter = 0;

/** Runs a snapshot-* job to conclusion and rejects with the job's error, if any. */
async function runSnapshotJob(qmp: QmpClient, command: string, args: Record<string, unknown>): Promise<void> {
  const jobId = `${command}-${++jobCounter}`;
  await qmp.execute(command, { 'job-id': jobId, ...args });
  await qmp.waitEvent('JOB_STATUS_CHANGE', SAVEVM_TIMEOUT_MS, (e) => e.data?.id === jobId && e.data?.status === 'concluded');
  const jobs = await qmp.execute<Array<{ id: string; error?: string }>>('query-jobs');
  const job = jobs.find((j) => j.id === jobId);
  await qmp.execute('job-dismiss', { id: jobId });
  if (job?.error !== undefined) throw new Error(`${command} ${String(args.tag)}: ${job.error}`);
}

async function migrateToFile(qmp: QmpClient, path: string, timeoutMs = DEFAULT_MIGRATE_TIMEOUT_MS): Promise<MigrationStatus> {
  await qmp.execute('migrate-set-parameters', { 'max-bandwidth': MAX_BANDWIDTH_BYTES_PER_S });
  await qmp.execute('migrate', { uri: `exec:cat > ${shellQuote(path)}` });
  return waitMigration(qmp, timeoutMs);
}

/** Polls query-migrate until completed; rejects on failed/cancelled or timeout. */
async function waitMigration(qmp: QmpClient, timeoutMs: number): Promise<MigrationStatus> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await qmp.execute<MigrationStatus>('query-migrate');
    if (info.status === 'completed') return info;
    if (info.status === 'failed' || info.status === 'cancelled') {
      throw new Error(`migration ${info.status}: ${info['error-desc'] ?? 'no error-desc'}`);
    }
    if (Date.now() >= deadline) {
      await qmp.execute('migrate_cancel').catch(() => undefined);
      throw new Error(`migration not completed within ${timeoutMs} ms (status ${info.status})`);
    }
    await sleep(MIGRATE_POLL_MS);
  }
}

// ---------------------------------------------------------------- known RAM

/**
 * A migration stream of known content: `<dir>/ram.bin` gets `ramMiB` of
 * seeded random bytes, and a paused VM with that RAM (and no drive, so it
 * holds no image) migrates into `<dir>/<streamName>`. Returns both paths
 * and the RAM's sha256, the reference a restored guest is compared with.
 */
export async function makeKnownRamStream(
  dir: string,
  ramMiB: number,
  seed: number,
  streamName = 'stream.bin',
): Promise<{ memFile: string; memHash: string; streamFile: string }> {
  const memFile = join(dir, 'ram.bin');
  const streamFile = join(dir, streamName);
  const memHash = await makeRandomMemFile(memFile, ramMiB << 20, seed);
  await withPausedVm({ ramMiB, memFile }, async (vm) => {
    const status = await vm.migrateToFile(streamFile);
    if (status.status !== 'completed') throw new Error(`the migration into ${streamFile} ended '${status.status}'`);
  });
  return { memFile, memHash, streamFile };
}

/** Bytes generated per write; large enough to amortise, small enough to not matter. */
const MEM_FILE_CHUNK_BYTES = 4 << 20;

/**
 * Writes `bytes` of deterministic pseudo-random data: AES-128-CTR keystream
 * keyed by `seed` (~1 GB/s, versus ~200 MB/s for a JS xorshift). Same seed,
 * same bytes, on every machine. Returns the sha256 of the content.
 */
export async function makeRandomMemFile(path: string, bytes: number, seed: number): Promise<string> {
  if (!Number.isSafeInteger(bytes) || bytes < 0) throw new RangeError(`Expected a byte count for bytes, received ${bytes}`);
  const cipher = createCipheriv('aes-128-ctr', seedKey(seed), Buffer.alloc(16));
  const hash = createHash('sha256');
  const zeros = Buffer.alloc(MEM_FILE_CHUNK_BYTES);
  const file = await open(path, 'w');
  try {
    for (let done = 0; done < bytes; ) {
      const length = Math.min(MEM_FILE_CHUNK_BYTES, bytes - done);
      const chunk = cipher.update(zeros.subarray(0, length));
      hash.update(chunk);
      await file.write(chunk, 0, chunk.length, done);
      done += length;
    }
  } catch (error) {
    await file.close();
    await rm(path, { force: true });
    throw error;
  }
  await file.close();
  return hash.digest('hex');
}

/** The same bytes makeRandomMemFile writes, in memory (for small sizes). */
export function randomBytesFromSeed(bytes: number, seed: number): Buffer {
  return createCipheriv('aes-128-ctr', seedKey(seed), Buffer.alloc(16)).update(Buffer.alloc(bytes));
}

function seedKey(seed: number): Buffer {
  const key = Buffer.alloc(16);
  key.writeDoubleBE(seed, 0);
  key.write('snapstream', 8, 'latin1');
  return key;
}

/** sha256 (hex) of a file, or of [start, end) of it. */
export function sha256File(path: string, range: { start?: number; end?: number } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    const end = range.end === undefined ? undefined : range.end - 1; // createReadStream's end is inclusive
    createReadStream(path, { start: range.start, end })
      .on('data', (chunk) => hash.update(chunk))
      .on('error', reject)
      .on('end', () => resolve(hash.digest('hex')));
  });
}
