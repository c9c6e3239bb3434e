/**
 * SIGINT, SIGTERM and SIGHUP at every phase of save, write, export and
 * delete, sent to the real bin in a child process. What must hold (issue 13
 * items 4-6):
 *
 * - the exit code is the shell's for the signal: 130, 143, 129;
 * - save: the image is as before (qemu-img check clean, the same snapshot
 *   list, the file size back), or, when the input had already ended, the
 *   snapshot is complete (its vmstate read by the independent reader);
 * - write: a file the command created does not survive, with or without
 *   --preallocate; never a partial file;
 * - export: no partial output file; a blocked reader does not hang it;
 * - delete: the snapshot is there or gone, never half, and the image is clean;
 * - with a progress bar on a terminal (a pty from script(1)), the cursor and
 *   line wrapping are put back.
 *
 * Phases are states, not races: the child is signalled once it holds the
 * target open (read from /proc/PID/fd), once the target has grown (data is
 * streaming), or once stdin is closed.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, readlinkSync, realpathSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readSnapshotVmState } from '../helpers/qcow2-vmstate.js';
import { pseudoRandom } from '../helpers/streams.js';
import { findTool, qemuImg, requireTool, runOk, tmpDir, type TmpDir } from '../helpers/tools.js';
import { assertBuilt, BIN, REPO_DIR } from './bin-harness.js';

const MiB = 1 << 20;
const SIGNALS = [
  ['SIGINT', 130],
  ['SIGTERM', 143],
  ['SIGHUP', 129],
] as const;
type Sig = (typeof SIGNALS)[number][0];
const sha256 = (data: Uint8Array): string => createHash('sha256').update(data).digest('hex');
const skip = requireTool('qemu-img', 'qemu-io');

interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
  stderr: string;
}

interface Child {
  proc: ChildProcess;
  exited: Promise<Exit>;
}

function spawnBin(args: string[], stdout: 'pipe' | 'ignore' = 'ignore'): Child {
  assertBuilt();
  const proc = spawn(process.execPath, [BIN, ...args], { cwd: REPO_DIR, stdio: ['pipe', stdout, 'pipe'] });
  let stderr = '';
  proc.stderr?.on('data', (c: Buffer) => (stderr += c.toString('utf8')));
  proc.stdin?.on('error', () => undefined); // the child may exit before reading everything
  const killer = setTimeout(() => proc.kill('SIGKILL'), 60_000);
  const exited = new Promise<Exit>((resolve) =>
    proc.once('close', (code, signal) => {
      clearTimeout(killer);
      resolve({ code, signal, stderr });
    }),
  );
  return { proc, exited };
}

async function waitUntil(what: string, predicate: () => boolean, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await sleep(10);
  }
}

/** True once process `pid` holds `path` open. */
function holds(pid: number, path: string): boolean {
  const want = existsSync(path) ? realpathSync(path) : path;
  try {
    return readdirSync(`/proc/${pid}/fd`).some((fd) => {
      try {
        return readlinkSync(`/proc/${pid}/fd/${fd}`) === want;
      } catch {
        return false;
      }
    });
  } catch {
    return false;
  }
}

function sizeOf(path: string): number {
  try {
    return statSync(path).size;
  } catch {
    return -1;
  }
}

/** Writes `bytes` to the child's stdin and waits until the pipe took them. */
function feed(child: Child, bytes: Buffer): Promise<void> {
  return new Promise((resolve, reject) => child.proc.stdin?.write(bytes, (err) => (err ? reject(err) : resolve())));
}

/** The exit of a child signalled with `sig`: the shell's code, or death by the signal if it came before main(). */
function expectSignalExit(exit: Exit, sig: Sig, code: number, label: string): void {
  expect(exit.signal, `${label}: ${exit.stderr}`).toBeNull();
  expect(exit.code, `${label}: ${exit.stderr}`).toBe(code);
  if (/ABORTED/.test(exit.stderr)) expect(exit.stderr, label).toContain(`interrupted by ${sig}`);
}

describe.skipIf(skip !== undefined)('signals stop the CLI cleanly at every phase', () => {
  let dir: TmpDir;
  let n = 0;
  const earlier = pseudoRandom(MiB + 5, 1);
  const chunk = pseudoRandom(8 * MiB, 2);

  beforeAll(async () => {
    dir = await tmpDir('cli-signals');
  });
  afterAll(async () => dir?.cleanup());

  /** A fresh image holding one snapshot 'earlier' (ours), with its size and snapshot list. */
  async function image(): Promise<{ path: string; size: number; names: string[] }> {
    const path = join(dir.path, `img-${++n}.qcow2`);
    await qemuImg.create(path, 64 * MiB, { cluster_size: 65536 });
    const src = join(dir.path, `earlier-${n}.bin`);
    writeFileSync(src, earlier);
    await runOk(process.execPath, [BIN, 'save', '-q', path, 'earlier', src]);
    return { path, size: sizeOf(path), names: ['earlier'] };
  }

  async function expectImageAsBefore(img: { path: string; size: number; names: string[] }, label: string): Promise<void> {
    const check = await qemuImg.check(img.path);
    expect(check.exitCode, `${label}: ${JSON.stringify(check)}`).toBe(0);
    expect((await qemuImg.snapshotList(img.path)).map((s) => s.name), label).toEqual(img.names);
    expect(sizeOf(img.path), `${label}: the file size is back`).toBe(img.size);
    expect(sha256(await readSnapshotVmState(img.path, 'earlier')), label).toBe(sha256(earlier));
  }

  for (const [sig, code] of SIGNALS) {
    it(`save, ${sig} before any input: exit ${code}, the image as before`, async () => {
      const img = await image();
      const child = spawnBin(['save', img.path, 'new', '-']);
      await waitUntil('the image is open', () => holds(child.proc.pid as number, img.path));
      child.proc.kill(sig);
      expectSignalExit(await child.exited, sig, code, `save/${sig}/before-input`);
      await expectImageAsBefore(img, `save/${sig}/before-input`);
    });

    it(`save, ${sig} while the vmstate streams: exit ${code}, the image and its file size as before`, async () => {
      const img = await image();
      const child = spawnBin(['save', img.path, 'new', '-', '--buffer-size', '1M']);
      await waitUntil('the image is open', () => holds(child.proc.pid as number, img.path));
      await feed(child, chunk);
      await feed(child, chunk);
      await waitUntil('vmstate landed in the image', () => sizeOf(img.path) > img.size + 4 * MiB);
      child.proc.kill(sig);
      expectSignalExit(await child.exited, sig, code, `save/${sig}/streaming`);
      await expectImageAsBefore(img, `save/${sig}/streaming`);
    });

    it(`save, ${sig} once the input has ended: exit ${code}; the snapshot is complete or absent, never partial`, async () => {
      const img = await image();
      const child = spawnBin(['save', img.path, 'new', '-']);
      await waitUntil('the image is open', () => holds(child.proc.pid as number, img.path));
      child.proc.stdin?.end(chunk);
      child.proc.kill(sig);
      const exit = await child.exited;
      expect([0, code], exit.stderr).toContain(exit.code);
      const names = (await qemuImg.snapshotList(img.path)).map((s) => s.name);
      if (names.includes('new')) {
        expect(sha256(await readSnapshotVmState(img.path, 'new'))).toBe(sha256(chunk));
        expect((await qemuImg.check(img.path)).exitCode).toBe(0);
      } else {
        await expectImageAsBefore(img, `save/${sig}/ended`);
      }
    });

    for (const preallocate of [false, true]) {
      const flags = preallocate ? ['--expected-size', '64M', '--preallocate'] : [];
      it(`write${preallocate ? ' --preallocate' : ''}, ${sig} while streaming: exit ${code}, the file it created is gone`, async () => {
        const target = join(dir.path, `w-${++n}.raw`);
        const child = spawnBin(['write', target, '-', '--buffer-size', '1M', ...flags]);
        await waitUntil('the target is open', () => holds(child.proc.pid as number, target));
        await feed(child, chunk);
        await waitUntil('data landed', () => preallocate || sizeOf(target) > 0);
        child.proc.kill(sig);
        expectSignalExit(await child.exited, sig, code, `write/${sig}/streaming`);
        expect(existsSync(target), 'no partial file survives').toBe(false);
      });
    }

    it(`write, ${sig} before any input: exit ${code}, no file`, async () => {
      const target = join(dir.path, `w-${++n}.raw`);
      const child = spawnBin(['write', target, '-']);
      await waitUntil('the target is open', () => holds(child.proc.pid as number, target));
      child.proc.kill(sig);
      expectSignalExit(await child.exited, sig, code, `write/${sig}/before-input`);
      expect(existsSync(target)).toBe(false);
    });

    it(`write, ${sig} once the input has ended: the file is complete or absent, never partial`, async () => {
      const target = join(dir.path, `w-${++n}.raw`);
      const child = spawnBin(['write', target, '-']);
      await waitUntil('the target is open', () => holds(child.proc.pid as number, target));
      child.proc.stdin?.end(chunk);
      child.proc.kill(sig);
      const exit = await child.exited;
      expect([0, code], exit.stderr).toContain(exit.code);
      if (existsSync(target)) {
        expect(sha256(readFileSync(target))).toBe(sha256(chunk));
      }
    });

    it(`export to a reader that has stopped reading, ${sig}: exit ${code}, no hang`, async () => {
      const img = await image();
      const child = spawnBin(['export', img.path, 'earlier', '-'], 'pipe');
      // stdout is a pipe nobody reads: the export blocks once the pipe is full.
      await waitUntil('the image is open', () => holds(child.proc.pid as number, img.path));
      await sleep(200);
      child.proc.kill(sig);
      expectSignalExit(await child.exited, sig, code, `export/${sig}/blocked`);
      await expectImageAsBefore(img, `export/${sig}`);
    });

    it(`export into a FIFO whose reader does not read, ${sig}: exit ${code}`, async () => {
      const img = await image();
      const fifo = join(dir.path, `fifo-${++n}`);
      await runOk('mkfifo', [fifo]);
      const { open } = await import('node:fs/promises');
      const reader = await open(fifo, 'r+'); // a reader that never reads (r+ does not block on a FIFO)
      try {
        const child = spawnBin(['export', img.path, 'earlier', fifo]);
        await waitUntil('the FIFO is open', () => holds(child.proc.pid as number, fifo));
        await sleep(200);
        child.proc.kill(sig);
        expectSignalExit(await child.exited, sig, code, `export-fifo/${sig}`);
      } finally {
        await reader.close();
      }
    });

    it(`export to a file, ${sig} right after the start: the file is complete or absent`, async () => {
      const img = await image();
      const out = join(dir.path, `x-${++n}.bin`);
      const child = spawnBin(['export', img.path, 'earlier', out]);
      await waitUntil('the image is open', () => holds(child.proc.pid as number, img.path));
      child.proc.kill(sig);
      const exit = await child.exited;
      expect([0, code], exit.stderr).toContain(exit.code);
      if (existsSync(out)) {
        expect(sha256(readFileSync(out))).toBe(sha256(earlier));
      }
    });

    it(`create --preallocation full, ${sig} while it writes: exit ${code}, no half-made image`, async () => {
      const path = join(dir.path, `c-${++n}.qcow2`);
      const child = spawnBin(['create', path, '4G', '--preallocation', 'full']);
      await waitUntil('the image is growing', () => sizeOf(path) > 0 || child.proc.exitCode !== null);
      child.proc.kill(sig);
      const exit = await child.exited;
      if (exit.code === 0) {
        expect((await qemuImg.check(path)).exitCode).toBe(0); // it finished before the signal
      } else {
        expectSignalExit(exit, sig, code, `create/${sig}`);
        expect(existsSync(path), 'the file it created is removed').toBe(false);
      }
    });

    it(`delete, ${sig} once the image is open: exit ${code} or done; the snapshot is there or gone, the image clean`, async () => {
      const img = await image();
      const child = spawnBin(['delete', img.path, 'earlier']);
      await waitUntil('the image is open', () => holds(child.proc.pid as number, img.path) || child.proc.exitCode !== null);
      child.proc.kill(sig);
      const exit = await child.exited;
      expect(exit.signal, exit.stderr).toBeNull();
      expect([0, code], exit.stderr).toContain(exit.code);
      const check = await qemuImg.check(img.path);
      expect(check.exitCode, JSON.stringify(check)).toBe(0);
      const names = (await qemuImg.snapshotList(img.path)).map((s) => s.name);
      if (names.length === 1) expect(sha256(await readSnapshotVmState(img.path, 'earlier'))).toBe(sha256(earlier));
      else expect(names).toEqual([]);
      // What the last line says matches what happened.
      if (names.length === 0 && exit.code === code) expect(exit.stderr).toMatch(/deleted snapshot|after the operation had completed/);
    });
  }
});

const scriptTool = findTool('script');

describe.skipIf(skip !== undefined || scriptTool === undefined)('the terminal after Ctrl-C with a progress bar (a pty from script(1))', () => {
  let dir: TmpDir;
  beforeAll(async () => {
    dir = await tmpDir('cli-signals-pty');
  });
  afterAll(async () => dir?.cleanup());

  it('shows the cursor and turns line wrapping back on, and exits 130', async () => {
    const image = join(dir.path, 'pty.qcow2');
    await qemuImg.create(image, 64 * MiB, { cluster_size: 65536 });
    // exec: node is script's child, so the signal goes to it alone.
    const command = `exec '${process.execPath}' '${BIN}' save '${image}' pty /dev/zero --expected-size 1G`;
    const proc = spawn(scriptTool as string, ['-q', '-e', '-c', command, '/dev/null'], { cwd: REPO_DIR, stdio: ['pipe', 'pipe', 'pipe'] });
    let output = '';
    proc.stdout.on('data', (c: Buffer) => (output += c.toString('latin1')));
    const exited = new Promise<number | null>((resolve) => proc.once('close', (code) => resolve(code)));
    const killer = setTimeout(() => proc.kill('SIGKILL'), 60_000);
    try {
      const nodePid = (): number | undefined => {
        try {
          const children = readdirSync(`/proc/${proc.pid}/task`).flatMap((t) =>
            readFileSync(`/proc/${proc.pid}/task/${t}/children`, 'utf8').trim().split(/\s+/),
          );
          const pid = Number(children.find((c: string) => c !== ''));
          return Number.isInteger(pid) && pid > 0 ? pid : undefined;
        } catch {
          return undefined;
        }
      };
      await waitUntil('the progress bar is drawn', () => output.includes('\x1b[?25l') && sizeOf(image) > 8 * MiB);
      const pid = nodePid();
      expect(pid, 'node under script').toBeDefined();
      process.kill(pid as number, 'SIGINT');
      expect(await exited).toBe(130);
    } finally {
      clearTimeout(killer);
    }
    const hiddenAt = output.lastIndexOf('\x1b[?25l');
    const noWrapAt = output.lastIndexOf('\x1b[?7l');
    expect(hiddenAt).toBeGreaterThanOrEqual(0);
    expect(output.indexOf('\x1b[?25h', hiddenAt), 'cursor shown again').toBeGreaterThan(hiddenAt);
    expect(output.indexOf('\x1b[?7h', noWrapAt), 'line wrapping back on').toBeGreaterThan(noWrapAt);
    expect(output).toContain('interrupted by SIGINT');
    expect((await qemuImg.snapshotList(image)).map((s) => s.name)).toEqual([]);
    expect((await qemuImg.check(image)).exitCode).toBe(0);
  });
});
