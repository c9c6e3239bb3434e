/**
 * QEMU guests for the savevm/loadvm and live-checkpoint benchmarks: random
 * guest RAM, a guest with two QMP sockets (one for the bench, one for
 * snapstream), HMP timing and migration waits. One copy for bench/vm.js and
 * bench/live.js.
 */
import { spawn, spawnSync } from 'node:child_process';
import { createCipheriv } from 'node:crypto';
import { closeSync, createWriteStream, fsyncSync, openSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpClient } from '../../dist/vm/qmp.js';

const MiB = 1 << 20;
/** HMP savevm of 1 GiB took over 2 minutes on a saturated disk here: give each HMP command 15 minutes. */
const HMP_TIMEOUT_MS = 900_000;

/** undefined when QEMU can run here, else the reason to skip. */
export function qemuAvailable() {
  const probe = spawnSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' });
  return probe.status === 0 ? undefined : 'qemu-system-x86_64 not found';
}

/** `bytes` of AES-CTR keystream: incompressible, reproducible guest RAM. */
export async function writeRandomFile(path, bytes) {
  const cipher = createCipheriv('aes-128-ctr', Buffer.alloc(16, 7), Buffer.alloc(16));
  const zeros = Buffer.alloc(4 * MiB);
  async function* chunks() {
    for (let done = 0; done < bytes; done += zeros.length) yield cipher.update(zeros);
  }
  await pipeline(chunks(), createWriteStream(path));
  syncFile(path);
}

/** fsync(2) of a file written through the page cache, so its writeback cannot overlap a timed phase. */
export function syncFile(path) {
  const fd = openSync(path, 'r+');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

let vmCount = 0;

/**
 * A TCG guest. RAM from `memFile` when given (share=off), else anonymous.
 * `image` is attached with cache=none as node disk0; `incoming` is passed to
 * -incoming ('defer' or a URI); the guest starts paused unless `running`;
 * `prealloc` touches anonymous RAM at startup (memory-backend-ram prealloc=on).
 */
export async function startQemu({ tmpDir, ramMiB, memFile, image, running = false, incoming, prealloc = false }) {
  const tag = `q${++vmCount}`;
  const test = join(tmpDir, `${tag}-test.qmp`);
  const snap = join(tmpDir, `${tag}-snap.qmp`);
  const backend =
    memFile === undefined
      ? `memory-backend-ram,id=mem0,size=${ramMiB}M${prealloc ? ',prealloc=on' : ''}`
      : `memory-backend-file,id=mem0,size=${ramMiB}M,mem-path=${memFile},share=off`;
  const args = ['-machine', 'pc,memory-backend=mem0', '-object', backend, '-display', 'none', '-nodefaults', '-accel', 'tcg',
    '-qmp', `unix:${test},server=on,wait=off`, '-qmp', `unix:${snap},server=on,wait=off`];
  if (image !== undefined) args.push('-drive', `file=${image},format=qcow2,if=none,id=drive0,node-name=disk0,cache=none`);
  if (!running) args.push('-S');
  if (incoming !== undefined) args.push('-incoming', incoming);
  const child = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'inherit'] });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  let qmp;
  for (let i = 0; ; i++) {
    try {
      qmp = await QmpClient.connect(test, { timeoutMs: 2000 });
      break;
    } catch (err) {
      if (i > 100) throw err;
      await sleep(50);
    }
  }
  return {
    qmp,
    snapSocket: snap,
    hmp: (line) => qmp.execute('human-monitor-command', { 'command-line': line }, { timeoutMs: HMP_TIMEOUT_MS }),
    async quit() {
      await qmp.execute('quit').catch(() => undefined);
      await Promise.race([exited, sleep(5000)]);
      child.kill('SIGKILL');
      await exited;
      qmp.close();
    },
  };
}

/** Polls query-migrate every `pollMs` until 'completed'; throws on failure, cancel or timeout. */
export async function waitMigration(qmp, { timeoutMs = 600_000, pollMs = 5 } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await qmp.execute('query-migrate');
    if (info.status === 'completed') return;
    if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`migration ${info.status}: ${info['error-desc']}`);
    if (Date.now() > deadline) throw new Error('migration timed out');
    await sleep(pollMs);
  }
}

/** Milliseconds an HMP command takes; HMP savevm/loadvm print nothing on success. */
export async function hmpTimed(vm, line) {
  const t = performance.now();
  const out = await vm.hmp(line);
  if (out.trim() !== '') throw new Error(`HMP ${line}: ${out}`);
  return performance.now() - t;
}

/** min, median (lower middle) and max. */
export function spread(values) {
  const sorted = [...values].sort((a, b) => a - b);
  return { min: sorted[0], median: sorted[Math.floor((sorted.length - 1) / 2)], max: sorted[sorted.length - 1] };
}
