/**
 * Runs the real `snapstream` bin (bin/snapstream.js over dist/) in a child
 * process, as a user or a pipeline would, with binary-safe output.
 */
import { spawn } from 'node:child_process';
import { existsSync, openSync, closeSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

export const REPO_DIR = fileURLToPath(new URL('../..', import.meta.url));
export const BIN = fileURLToPath(new URL('../../bin/snapstream.js', import.meta.url));
const BUILT_MAIN = fileURLToPath(new URL('../../dist/cli/main.js', import.meta.url));

/** A CLI run that hangs is a bug; generous for the demo on a slow disk. */
const DEFAULT_TIMEOUT_MS = 60_000;

export interface BinResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: Buffer;
  stderr: string;
}

export interface BinOptions {
  /** Bytes piped to stdin, which is then closed. */
  input?: Buffer | string;
  /** A file opened as stdin itself (`snapstream ... < FILE`), so stdin is a regular file. */
  stdinFile?: string;
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  timeoutMs?: number;
}

export function assertBuilt(): void {
  if (!existsSync(BUILT_MAIN)) throw new Error(`${BUILT_MAIN} is missing: run 'npm run build' first (npm test does)`);
}

export function runBin(args: readonly string[], options: BinOptions = {}): Promise<BinResult> {
  assertBuilt();
  return runCommand(process.execPath, [BIN, ...args], options);
}

/** `bash -c SCRIPT`, for pipelines (PIPESTATUS); SNAPSTREAM in the script is the bin. */
export function runShell(script: string, options: BinOptions = {}): Promise<BinResult> {
  assertBuilt();
  const env = { ...process.env, ...options.env, SNAPSTREAM: `${process.execPath} ${BIN}` };
  return runCommand('/bin/bash', ['-c', script], { ...options, env });
}

function runCommand(cmd: string, args: readonly string[], options: BinOptions): Promise<BinResult> {
  const stdinFd = options.stdinFile === undefined ? undefined : openSync(options.stdinFile, 'r');
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd: options.cwd ?? REPO_DIR,
      env: options.env ?? process.env,
      stdio: [stdinFd ?? 'pipe', 'pipe', 'pipe'],
    });
    if (stdinFd !== undefined) closeSync(stdinFd);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout!.on('data', (c: Buffer) => out.push(c));
    child.stderr!.on('data', (c: Buffer) => err.push(c));
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? DEFAULT_TIMEOUT_MS);
    child.once('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout: Buffer.concat(out), stderr: Buffer.concat(err).toString('utf8') });
    });
    if (child.stdin !== null) {
      child.stdin.on('error', () => {}); // the bin may exit before reading everything
      child.stdin.end(options.input);
    }
  });
}

/** stderr lines, without empty ones. */
export function errLines(result: BinResult): string[] {
  return result.stderr.split('\n').filter((l) => l.length > 0);
}
