/**
 * External tools for integration tests: finding them, running them with a
 * bounded time, and parsing qemu-img's JSON output.
 *
 * Policy for missing tools: on a developer machine a test that needs
 * qemu-img is skipped with a printed reason; on CI (`process.env.CI` set) the
 * same absence is an error, so a broken CI image cannot turn the integration
 * suite green by skipping it.
 */
import { spawn } from 'node:child_process';
import { accessSync, constants as fsConstants } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';

/** Tools the suites know about. Any other name on PATH also works. */
export type ToolName =
  | 'qemu-img'
  | 'qemu-io'
  | 'qemu-system-x86_64'
  | 'mkfs.ext4'
  | 'mkfs.xfs'
  | 'filefrag'
  | 'losetup'
  | 'mount'
  | 'umount'
  | (string & {});

/** Where root's tools live even when a non-login PATH omits them. */
const SBIN_DIRS = ['/usr/local/sbin', '/usr/sbin', '/sbin'];

/** Default bound for one tool run; qemu-img on test-sized images takes < 1 s. */
const DEFAULT_TIMEOUT_MS = 30_000;

/** Output cap per stream; `qemu-img map` of a fragmented image stays far below. */
const MAX_OUTPUT_BYTES = 64 << 20;

const toolCache = new Map<string, string | null>();

/** Absolute path of `name`, searching PATH and then the sbin directories. */
export function findTool(name: ToolName): string | undefined {
  const cached = toolCache.get(name);
  if (cached !== undefined) return cached ?? undefined;
  const dirs = [...(process.env.PATH ?? '').split(delimiter).filter(Boolean), ...SBIN_DIRS];
  let found: string | null = null;
  for (const dir of dirs) {
    const candidate = join(dir, name);
    try {
      accessSync(candidate, fsConstants.X_OK);
      found = candidate;
      break;
    } catch {
      // not in this directory
    }
  }
  toolCache.set(name, found);
  return found ?? undefined;
}

/** True when `process.env.CI` is set to anything but '' / '0' / 'false'. */
export function isCi(): boolean {
  const ci = process.env.CI;
  return ci !== undefined && ci !== '' && ci !== '0' && ci.toLowerCase() !== 'false';
}

/**
 * Checks that every named tool is installed.
 * Returns undefined when all are present, otherwise a skip reason (for
 * `describe.skipIf(reason)` / `ctx.skip(reason)`). On CI a missing tool throws.
 */
export function requireTool(...names: ToolName[]): string | undefined {
  const missing = names.filter((name) => findTool(name) === undefined);
  if (missing.length === 0) return undefined;
  const reason = `missing tool(s) on PATH: ${missing.join(', ')}`;
  if (isCi()) throw new Error(`${reason} (CI is set: integration tests must not be skipped)`);
  console.warn(`[skip] ${reason}`);
  return reason;
}

/** True when running as uid 0 (loop mounts, ramfs). */
export function isRoot(): boolean {
  return typeof process.getuid === 'function' && process.getuid() === 0;
}

export interface RunOptions {
  /** Written to the child's stdin, which is then closed. */
  input?: string | Buffer;
  /** Hard bound: the child's process group gets SIGKILL after this. */
  timeoutMs?: number;
  cwd?: string;
  env?: NodeJS.ProcessEnv;
}

export interface RunResult {
  stdout: string;
  stderr: string;
  /** Exit code, or null when killed by a signal. */
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** Thrown by `run` on timeout, spawn failure or oversized output. */
export class RunError extends Error {
  constructor(
    message: string,
    readonly command: string,
    readonly result?: RunResult,
  ) {
    super(message);
    this.name = 'RunError';
  }
}

/**
 * Runs `cmd args...` without a shell and resolves with its output and exit
 * code (a non-zero code is not an error: qemu-img check exits 2 and 3 with
 * useful JSON). Rejects with RunError on spawn failure or timeout, after the
 * whole process group has been killed and reaped.
 */
export function run(cmd: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const command = [cmd, ...args].join(' ');
  return new Promise((resolve, reject) => {
    const child = spawn(findTool(cmd) ?? cmd, args, {
      cwd: options.cwd,
      env: options.env ?? process.env,
      stdio: ['pipe', 'pipe', 'pipe'],
      detached: true, // own process group, so a timeout also kills grandchildren
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let outputBytes = 0;
    let failure: string | undefined;
    const killGroup = (why: string): void => {
      failure ??= why;
      try {
        if (child.pid !== undefined) process.kill(-child.pid, 'SIGKILL');
      } catch {
        child.kill('SIGKILL');
      }
    };
    const collect = (sink: Buffer[]) => (chunk: Buffer) => {
      outputBytes += chunk.length;
      if (outputBytes > MAX_OUTPUT_BYTES) killGroup(`output exceeded ${MAX_OUTPUT_BYTES} bytes`);
      else sink.push(chunk);
    };
    child.stdout.on('data', collect(out));
    child.stderr.on('data', collect(err));
    const timer = setTimeout(() => killGroup(`timed out after ${timeoutMs} ms`), timeoutMs);
    child.on('error', (error) => {
      clearTimeout(timer);
      reject(new RunError(`${command}: ${error.message}`, command));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      const result: RunResult = {
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        code,
        signal,
      };
      if (failure !== undefined) reject(new RunError(`${command}: ${failure}\n${result.stderr}`, command, result));
      else resolve(result);
    });
    child.stdin.on('error', () => {}); // EPIPE when the child ignores its input
    child.stdin.end(options.input);
  });
}

/** Like `run`, but rejects unless the exit code is 0 (or one of `okCodes`). */
export async function runOk(
  cmd: string,
  args: readonly string[],
  options: RunOptions & { okCodes?: readonly number[] } = {},
): Promise<RunResult> {
  const result = await run(cmd, args, options);
  const okCodes = options.okCodes ?? [0];
  if (result.code === null || !okCodes.includes(result.code)) {
    const command = [cmd, ...args].join(' ');
    throw new RunError(
      `${command}: exit ${result.code ?? result.signal}\n${result.stderr}${result.stdout}`,
      command,
      result,
    );
  }
  return result;
}

// ---------------------------------------------------------------- qemu-img

/** `qemu-img info --output=json`, the fields tests use (the rest stay in the object). */
export interface QemuImgInfo {
  filename: string;
  format: string;
  'virtual-size': number;
  'actual-size'?: number;
  'cluster-size'?: number;
  'dirty-flag'?: boolean;
  snapshots?: QemuImgSnapshotJson[];
  'format-specific'?: { type: string; data: Record<string, unknown> };
  [key: string]: unknown;
}

/** One element of qemu-img's `snapshots` array (QAPI SnapshotInfo). */
export interface QemuImgSnapshotJson {
  id: string;
  name: string;
  'vm-state-size': number;
  'date-sec': number;
  'date-nsec': number;
  'vm-clock-sec': number;
  'vm-clock-nsec': number;
  icount?: number;
}

/** Normalised snapshot entry, named like snapstream's `img.snapshots()`. */
export interface SnapshotListEntry {
  id: string;
  name: string;
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  vmClockNs: bigint;
  icount?: number;
}

/** `qemu-img check --output=json` (QAPI ImageCheck) plus the exit code. */
export interface QemuImgCheck {
  filename?: string;
  format?: string;
  'check-errors': number;
  corruptions?: number;
  leaks?: number;
  'corruptions-fixed'?: number;
  'leaks-fixed'?: number;
  'image-end-offset'?: number;
  'total-clusters'?: number;
  'allocated-clusters'?: number;
  'fragmented-clusters'?: number;
  /** 0 clean, 1 check could not complete, 2 corruptions, 3 leaks only. */
  exitCode: number;
  [key: string]: unknown;
}

/** One extent of `qemu-img map --output=json`. */
export interface QemuImgMapExtent {
  start: number;
  length: number;
  depth: number;
  present?: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  [key: string]: unknown;
}

export interface QemuImgOptions {
  /** `-U`: read an image that a running QEMU holds locked. */
  forceShare?: boolean;
  timeoutMs?: number;
}

function parseJson<T>(text: string, what: string): T {
  try {
    return JSON.parse(text) as T;
  } catch {
    throw new Error(`${what}: expected JSON, received ${JSON.stringify(text.slice(0, 200))}`);
  }
}

function shareFlag(options: QemuImgOptions): string[] {
  return options.forceShare === true ? ['-U'] : [];
}

export const qemuImg = {
  async info(path: string, options: QemuImgOptions = {}): Promise<QemuImgInfo> {
    const args = ['info', '--output=json', ...shareFlag(options), path];
    const { stdout } = await runOk('qemu-img', args, { timeoutMs: options.timeoutMs });
    return parseJson<QemuImgInfo>(stdout, 'qemu-img info');
  },

  /** Never rejects on exit codes 2 (corruptions) or 3 (leaks): the JSON says what is wrong. */
  async check(path: string, options: QemuImgOptions = {}): Promise<QemuImgCheck> {
    const args = ['check', '--output=json', ...shareFlag(options), path];
    const result = await run('qemu-img', args, { timeoutMs: options.timeoutMs });
    if (result.code === null || result.stdout.trim() === '') {
      throw new Error(`qemu-img check ${path}: exit ${result.code ?? result.signal}\n${result.stderr}`);
    }
    const parsed = parseJson<Record<string, unknown>>(result.stdout, 'qemu-img check');
    return { ...parsed, 'check-errors': Number(parsed['check-errors'] ?? 0), exitCode: result.code } as QemuImgCheck;
  },

  /** Snapshots as qemu-img sees them ([] when the image has none). */
  async snapshotList(path: string, options: QemuImgOptions = {}): Promise<SnapshotListEntry[]> {
    const info = await qemuImg.info(path, options);
    return (info.snapshots ?? []).map((s) => ({
      id: s.id,
      name: s.name,
      vmStateSize: s['vm-state-size'],
      dateSec: s['date-sec'],
      dateNsec: s['date-nsec'],
      vmClockNs: BigInt(s['vm-clock-sec']) * 1_000_000_000n + BigInt(s['vm-clock-nsec']),
      ...(s.icount === undefined ? {} : { icount: s.icount }),
    }));
  },

  async map(path: string, options: QemuImgOptions = {}): Promise<QemuImgMapExtent[]> {
    const args = ['map', '--output=json', ...shareFlag(options), path];
    const { stdout } = await runOk('qemu-img', args, { timeoutMs: options.timeoutMs });
    return parseJson<QemuImgMapExtent[]>(stdout, 'qemu-img map');
  },

  /** `qemu-img create -f qcow2`; `options` become `-o key=value,...`. */
  async create(
    path: string,
    sizeBytes: number,
    options: Record<string, string | number | boolean> = {},
  ): Promise<void> {
    const opts = Object.entries(options).map(([key, value]) => `${key}=${String(value)}`);
    const args = ['create', '-q', '-f', 'qcow2', ...(opts.length > 0 ? ['-o', opts.join(',')] : []), path, String(sizeBytes)];
    await runOk('qemu-img', args);
  },

  /** `qemu-img snapshot -c|-d|-a NAME`. */
  async snapshot(path: string, action: 'create' | 'delete' | 'apply', name: string): Promise<void> {
    const flag = { create: '-c', delete: '-d', apply: '-a' }[action];
    await runOk('qemu-img', ['snapshot', flag, name, path]);
  },
};

/**
 * Runs qemu-io commands (e.g. `write -P 0xab 0 64k`) against an image.
 * qemu-io reports failed commands on stdout with exit code 0 in 7.2, so this
 * rejects when the output contains a "failed"/"error" line.
 */
export async function qemuIo(
  path: string,
  cmds: readonly string[],
  options: QemuImgOptions & { format?: 'qcow2' | 'raw' } = {},
): Promise<string> {
  const args = ['-f', options.format ?? 'qcow2', ...shareFlag(options), ...cmds.flatMap((c) => ['-c', c]), path];
  const { stdout, stderr } = await runOk('qemu-io', args, { timeoutMs: options.timeoutMs });
  if (/\b(failed|error)\b/i.test(stdout) || /\b(failed|error)\b/i.test(stderr)) {
    throw new Error(`qemu-io ${path}: ${stdout}${stderr}`);
  }
  return stdout;
}

// ---------------------------------------------------------------- temp dirs

export interface TmpDir {
  path: string;
  /** Removes the directory tree; safe to call twice. */
  cleanup(): Promise<void>;
}

/**
 * A fresh directory under os.tmpdir(), which is on the real disk here (ext4,
 * so O_DIRECT works), not tmpfs. Pair with `afterAll(() => dir.cleanup())`.
 */
export async function tmpDir(prefix: string): Promise<TmpDir> {
  if (!/^[\w.-]+$/.test(prefix)) throw new TypeError(`Expected [A-Za-z0-9_.-]+ for prefix, received ${prefix}`);
  const path = await mkdtemp(join(tmpdir(), `snapstream-${prefix}-`));
  return {
    path,
    cleanup: () => rm(path, { recursive: true, force: true, maxRetries: 3 }),
  };
}

/** Runs `fn` with a temp dir and always removes it afterwards. */
export async function withTmpDir<T>(prefix: string, fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await tmpDir(prefix);
  try {
    return await fn(dir.path);
  } finally {
    await dir.cleanup();
  }
}
