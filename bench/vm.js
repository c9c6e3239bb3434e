#!/usr/bin/env node
/**
 * The savevm/loadvm case of `npm run bench` (DESIGN.md "Performance
 * targets"): a 1 GiB guest (RAM from a file of random bytes, so the stream
 * is 1 GiB), its disk attached with cache=none, QEMU under TCG.
 *
 * Per repetition, with the order of the first two alternating:
 *   savevm (ours)   connectVm().savevm(): downtime from `stop` to `cont`;
 *   savevm (HMP)    HMP `savevm` on the same VM: the command's duration
 *                   (QEMU stops and resumes the VM inside it);
 *   /dev/null       the same VM: `stop`, `migrate exec:cat > /dev/null` with
 *                   the bandwidth cap lifted, until `completed`: the time QEMU
 *                   needs to produce the stream;
 *   loadvm (ours)   a fresh QEMU with -incoming defer: connectVm().loadvm()
 *                   until the VM runs;
 *   loadvm (HMP)    a fresh QEMU (-S): HMP `loadvm` of the same snapshot;
 *   -incoming       a fresh QEMU with -incoming defer: `migrate-incoming
 *                   exec:cat FILE` of the exported vmstate (page-cached)
 *                   until `completed`;
 *   -incoming, disk the same from the disk: `exec:dd iflag=direct bs=16M`
 *                   of the same file, so QEMU's own reading of the stream
 *                   from the disk (not a target; it shows what the disk
 *                   costs, since our loadvm reads the image from the disk).
 *
 * The three load-side QEMUs take their RAM with prealloc=on: the host's
 * first touch of 1 GiB of fresh guest memory swung `-incoming` from 0.9 to
 * 3.2 s between identical runs here, and with the memory touched before the
 * timed phase the three are compared on loading alone.
 *
 *   node bench/vm.js [--reps N] [--ram MiB]
 */
import { spawnSync } from 'node:child_process';
import { createWriteStream, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { SETTLE_VM_MS, settleDisk } from './lib/settle.js';
import { connectVm, openImage } from '../dist/index.js';
import { hmpTimed, qemuAvailable, spread, startQemu, syncFile, waitMigration, writeRandomFile } from './lib/qemu-vm.js';

const BENCH_DIR = dirname(fileURLToPath(import.meta.url));
const RESULTS_DIR = join(BENCH_DIR, 'results');
const TMP_DIR = join(BENCH_DIR, '.tmp', `vm-${process.pid}`);
const MiB = 1 << 20;

export const VM_TARGETS = [
  { name: 'savevm downtime <= 0.4 x HMP savevm', measure: (m) => m.saveOurs / m.saveHmp, threshold: 0.4 },
  { name: 'savevm downtime <= 1.2 x /dev/null stream', measure: (m) => m.saveOurs / m.devNull, threshold: 1.2 },
  { name: 'loadvm <= 0.75 x HMP loadvm', measure: (m) => m.loadOurs / m.loadHmp, threshold: 0.75 },
  { name: 'loadvm <= 1.15 x -incoming from a cached file', measure: (m) => m.loadOurs / m.incoming, threshold: 1.15 },
];

async function saveSide(rep, ramMiB, memFile, image) {
  const vm = await startQemu({ tmpDir: TMP_DIR, ramMiB, memFile, image, running: true });
  const sample = {};
  try {
    await sleep(300);
    const ours = async () => {
      await settleDisk(SETTLE_VM_MS);
      const snap = await connectVm(vm.snapSocket);
      sample.saveOurs = (await snap.savevm(`ours-${rep}`)).downtimeMs;
      await snap.close();
    };
    const hmp = async () => {
      await settleDisk(SETTLE_VM_MS);
      sample.saveHmp = await hmpTimed(vm, `savevm hmp-${rep}`);
    };
    for (const step of rep % 2 === 0 ? [ours, hmp] : [hmp, ours]) await step();
    await settleDisk(SETTLE_VM_MS);
    const t = performance.now();
    await vm.qmp.execute('stop');
    await vm.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 2 ** 50 });
    await vm.qmp.execute('migrate', { uri: 'exec:cat > /dev/null' });
    await waitMigration(vm.qmp);
    sample.devNull = performance.now() - t;
  } finally {
    await vm.quit();
  }
  return sample;
}

async function loadSide(rep, ramMiB, image, stateFile, sample) {
  // The exported vmstate, read once so that -incoming reads it from the page cache.
  const img = await openImage(image, { readOnly: true });
  await pipeline(img.createVmStateReadStream(`ours-${rep}`), createWriteStream(stateFile));
  await img.close();
  syncFile(stateFile);
  readFileSync(stateFile);
  const target = await startQemu({ tmpDir: TMP_DIR, ramMiB, image, running: true, incoming: 'defer', prealloc: true });
  try {
    await settleDisk(SETTLE_VM_MS);
    const snap = await connectVm(target.snapSocket);
    sample.loadOurs = (await snap.loadvm(`ours-${rep}`, { resume: true })).durationMs;
    await snap.close();
  } finally {
    await target.quit();
  }
  const hmpVm = await startQemu({ tmpDir: TMP_DIR, ramMiB, image, running: false, prealloc: true });
  try {
    await settleDisk(SETTLE_VM_MS);
    sample.loadHmp = await hmpTimed(hmpVm, `loadvm ours-${rep}`);
  } finally {
    await hmpVm.quit();
  }
  const incoming = await startQemu({ tmpDir: TMP_DIR, ramMiB, image, running: false, incoming: 'defer', prealloc: true });
  try {
    await settleDisk(SETTLE_VM_MS);
    const t = performance.now();
    await incoming.qmp.execute('migrate-incoming', { uri: `exec:cat ${stateFile}` });
    await waitMigration(incoming.qmp);
    sample.incoming = performance.now() - t;
  } finally {
    await incoming.quit();
  }
  const fromDisk = await startQemu({ tmpDir: TMP_DIR, ramMiB, image, running: false, incoming: 'defer', prealloc: true });
  try {
    await settleDisk(SETTLE_VM_MS);
    const t = performance.now();
    await fromDisk.qmp.execute('migrate-incoming', { uri: `exec:dd if=${stateFile} bs=16M iflag=direct status=none` });
    await waitMigration(fromDisk.qmp);
    sample.incomingDisk = performance.now() - t;
  } finally {
    await fromDisk.quit();
  }
}

export async function runVmBench({ reps = 3, ramMiB = 1024 } = {}) {
  const reason = qemuAvailable();
  if (reason !== undefined) {
    console.log(`  skip savevm/loadvm: ${reason}`);
    return undefined;
  }
  mkdirSync(TMP_DIR, { recursive: true });
  console.log(`\nsavevm/loadvm of a ${ramMiB} MiB guest (random RAM, cache=none, TCG): ${reps} repetitions`);
  const memFile = join(TMP_DIR, 'ram.bin');
  const samples = [];
  try {
    await writeRandomFile(memFile, ramMiB * MiB);
    for (let rep = 0; rep < reps; rep++) {
      const image = join(TMP_DIR, `disk-${rep}.qcow2`);
      spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '4G']);
      spawnSync('qemu-io', ['-c', 'write -P 0x5a 0 64M', image]);
      const sample = await saveSide(rep, ramMiB, memFile, image);
      await loadSide(rep, ramMiB, image, join(TMP_DIR, 'state.bin'), sample);
      samples.push(sample);
      console.log(`  rep ${rep + 1}: ${Object.entries(sample).map(([k, v]) => `${k} ${(v / 1000).toFixed(2)} s`).join(', ')}`);
      rmSync(image, { force: true });
    }
  } finally {
    rmSync(TMP_DIR, { recursive: true, force: true });
  }
  const keys = Object.keys(samples[0]);
  const summary = Object.fromEntries(keys.map((k) => [k, spread(samples.map((s) => s[k]))]));
  console.log('  seconds (min / median / max):');
  for (const k of keys) console.log(`    ${k.padEnd(12)} ${['min', 'median', 'max'].map((s) => (summary[k][s] / 1000).toFixed(2)).join(' / ')}`);
  const medians = Object.fromEntries(keys.map((k) => [k, summary[k].median]));
  for (const t of VM_TARGETS) {
    const value = t.measure(medians);
    console.log(`  ${value <= t.threshold ? 'ok  ' : 'MISS'} ${t.name}: ${value.toFixed(2)}x`);
  }
  console.log(`  (no target) loadvm / -incoming from the disk (dd iflag=direct): ${(medians.loadOurs / medians.incomingDisk).toFixed(2)}x`);
  const result = { date: new Date().toISOString(), ramMiB, reps, samples, summary };
  writeFileSync(join(RESULTS_DIR, 'vm.json'), `${JSON.stringify(result, null, 2)}\n`);
  console.log('  saved bench/results/vm.json');
  return result;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const { values } = parseArgs({ options: { reps: { type: 'string' }, ram: { type: 'string' } } });
  await runVmBench({ reps: values.reps === undefined ? 3 : Number(values.reps), ramMiB: values.ram === undefined ? 1024 : Number(values.ram) });
}
