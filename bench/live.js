#!/usr/bin/env node
/**
 * The live savevm case of `npm run bench` (DESIGN.md "Performance targets":
 * live downtime <= 20 ms whatever the RAM size, RAM saved at >= 0.8x the
 * rate of a non-live savevm). For 1 GiB and 4 GiB guests whose anonymous RAM
 * holds random bytes (loaded with -incoming from the stream of a file-backed
 * VM: QEMU 7.2 refuses background snapshots of file-backed RAM), running
 * under TCG, the disk attached with cache=none. Per repetition, in
 * alternating order, on the same VM:
 *
 *   live      savevm { live: true, stateImage }: downtime from `stop` until
 *             the VM runs again; RAM rate = vmstate bytes / stream time;
 *   non-live  savevm (the hand-off): downtime from `stop` to `cont`, rate;
 *   HMP       HMP `savevm`: the command's duration (the VM is stopped in it).
 *
 *   node bench/live.js [--reps N] [--ram 1024,4096]
 */
import { spawn, spawnSync } from 'node:child_process';
import { createCipheriv } from 'node:crypto';
import { createWriteStream, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { connectVm } from '../dist/index.js';
import { QmpClient } from '../dist/vm/qmp.js';

const BENCH_DIR = dirname(fileURLToPath(import.meta.url));
const RESULTS_DIR = join(BENCH_DIR, 'results');
const TMP_DIR = join(BENCH_DIR, '.tmp', `live-${process.pid}`);
const MiB = 1 << 20;
/** DESIGN.md: milliseconds of downtime whatever the RAM size. */
const DOWNTIME_TARGET_MS = 20;
const RATE_TARGET = 0.8;

async function writeRandomFile(path, bytes) {
  const cipher = createCipheriv('aes-128-ctr', Buffer.alloc(16, 9), Buffer.alloc(16));
  const zeros = Buffer.alloc(4 * MiB);
  async function* chunks() {
    for (let done = 0; done < bytes; done += zeros.length) yield cipher.update(zeros);
  }
  await pipeline(chunks(), createWriteStream(path));
}

let count = 0;
async function startQemu({ ramMiB, memFile, image, incoming }) {
  const tag = `l${++count}`;
  const test = join(TMP_DIR, `${tag}-test.qmp`);
  const snap = join(TMP_DIR, `${tag}-snap.qmp`);
  const backend = memFile === undefined ? `memory-backend-ram,id=mem0,size=${ramMiB}M` : `memory-backend-file,id=mem0,size=${ramMiB}M,mem-path=${memFile},share=off`;
  const args = ['-machine', 'pc,memory-backend=mem0', '-object', backend, '-display', 'none', '-nodefaults', '-accel', 'tcg', '-S',
    '-qmp', `unix:${test},server=on,wait=off`, '-qmp', `unix:${snap},server=on,wait=off`];
  if (image !== undefined) args.push('-drive', `file=${image},format=qcow2,if=none,id=drive0,node-name=disk0,cache=none`);
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
    hmp: (line) => qmp.execute('human-monitor-command', { 'command-line': line }, { timeoutMs: 900_000 }),
    async quit() {
      await qmp.execute('quit').catch(() => undefined);
      await Promise.race([exited, sleep(5000)]);
      child.kill('SIGKILL');
      await exited;
      qmp.close();
    },
  };
}

async function waitMigration(qmp, timeoutMs = 600_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await qmp.execute('query-migrate');
    if (info.status === 'completed') return;
    if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`migration ${info.status}: ${info['error-desc']}`);
    if (Date.now() > deadline) throw new Error('migration timed out');
    await sleep(20);
  }
}

/** A running VM with random bytes in its anonymous RAM. */
async function randomRamVm(ramMiB, image) {
  const memFile = join(TMP_DIR, 'ram.bin');
  const stream = join(TMP_DIR, 'ram.stream');
  await writeRandomFile(memFile, ramMiB * MiB);
  const source = await startQemu({ ramMiB, memFile });
  try {
    await source.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 2 ** 50 });
    await source.qmp.execute('migrate', { uri: `exec:cat > ${stream}` });
    await waitMigration(source.qmp);
  } finally {
    await source.quit();
    rmSync(memFile, { force: true });
  }
  const vm = await startQemu({ ramMiB, image, incoming: 'defer' });
  await vm.qmp.execute('migrate-incoming', { uri: `exec:cat ${stream}` });
  await waitMigration(vm.qmp);
  rmSync(stream, { force: true });
  await vm.qmp.execute('cont');
  return vm;
}

async function hmpTimed(vm, line) {
  const t = performance.now();
  const out = await vm.hmp(line);
  if (out.trim() !== '') throw new Error(`HMP ${line}: ${out}`);
  return performance.now() - t;
}

async function measure(vm, rep, ramMiB) {
  const sample = {};
  const live = async () => {
    const snap = await connectVm(vm.snapSocket);
    const r = await snap.savevm(`live-${rep}`, { live: true, stateImage: join(TMP_DIR, `state-${ramMiB}.qcow2`) });
    await snap.close();
    sample.liveDowntimeMs = r.downtimeMs;
    sample.liveRateMBs = r.rateBytesPerSec / 1e6;
    Object.assign(sample, Object.fromEntries(Object.entries(r.downtimePhases).map(([k, v]) => [`live_${k}`, v])));
  };
  const nonLive = async () => {
    const snap = await connectVm(vm.snapSocket);
    const r = await snap.savevm(`ours-${rep}`);
    await snap.close();
    sample.nonLiveDowntimeMs = r.downtimeMs;
    sample.nonLiveRateMBs = r.rateBytesPerSec / 1e6;
    await vm.hmp(`delvm ours-${rep}`);
  };
  const hmp = async () => {
    sample.hmpDowntimeMs = await hmpTimed(vm, `savevm hmp-${rep}`);
    await vm.hmp(`delvm hmp-${rep}`);
  };
  for (const step of rep % 2 === 0 ? [live, nonLive, hmp] : [hmp, nonLive, live]) await step();
  return sample;
}

function stats(values) {
  const sorted = [...values].sort((a, b) => a - b);
  return { min: sorted[0], median: sorted[Math.floor((sorted.length - 1) / 2)], max: sorted[sorted.length - 1] };
}

export async function runLiveBench({ reps = 3, sizes = [1024, 4096] } = {}) {
  const probe = spawnSync('qemu-system-x86_64', ['--version']);
  if (probe.status !== 0) {
    console.log('  skip live savevm: qemu-system-x86_64 not found');
    return undefined;
  }
  mkdirSync(TMP_DIR, { recursive: true });
  const results = [];
  try {
    for (const ramMiB of sizes) {
      console.log(`\nlive savevm of a ${ramMiB} MiB guest (random anonymous RAM, cache=none, TCG): ${reps} repetitions`);
      const image = join(TMP_DIR, `disk-${ramMiB}.qcow2`);
      spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '4G']);
      const vm = await randomRamVm(ramMiB, image);
      const samples = [];
      try {
        for (let rep = 0; rep < reps; rep++) {
          const sample = await measure(vm, rep, ramMiB);
          samples.push(sample);
          console.log(`  rep ${rep + 1}: ${Object.entries(sample).map(([k, v]) => `${k} ${v.toFixed(1)}`).join(', ')}`);
        }
      } finally {
        await vm.quit();
        rmSync(image, { force: true });
      }
      const summary = Object.fromEntries(Object.keys(samples[0]).map((k) => [k, stats(samples.map((s) => s[k]))]));
      for (const [k, s] of Object.entries(summary)) console.log(`    ${k.padEnd(22)} min ${s.min.toFixed(1)} / median ${s.median.toFixed(1)} / max ${s.max.toFixed(1)}`);
      const downtime = summary.liveDowntimeMs.median;
      const rate = summary.liveRateMBs.median / summary.nonLiveRateMBs.median;
      console.log(`  ${downtime <= DOWNTIME_TARGET_MS ? 'ok  ' : 'MISS'} live downtime <= ${DOWNTIME_TARGET_MS} ms: ${downtime.toFixed(1)} ms`);
      console.log(`  ${rate >= RATE_TARGET ? 'ok  ' : 'MISS'} live RAM rate >= ${RATE_TARGET} x non-live: ${rate.toFixed(2)}x`);
      results.push({ ramMiB, samples, summary });
    }
  } finally {
    rmSync(TMP_DIR, { recursive: true, force: true });
  }
  const result = { date: new Date().toISOString(), reps, results };
  writeFileSync(join(RESULTS_DIR, 'live.json'), `${JSON.stringify(result, null, 2)}\n`);
  console.log('  saved bench/results/live.json');
  return result;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const { values } = parseArgs({ options: { reps: { type: 'string' }, ram: { type: 'string' } } });
  await runLiveBench({ reps: values.reps === undefined ? 3 : Number(values.reps), sizes: values.ram === undefined ? [1024, 4096] : values.ram.split(',').map(Number) });
}
