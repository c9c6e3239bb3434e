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
 *   QEMU alone  a background-snapshot migration into /dev/null with nothing
 *             of ours: QEMU stops the guest itself, and query-migrate's
 *             `downtime` says for how long. No ordering of ours can pause the
 *             guest for less than this; it is printed next to the target.
 *
 *   node bench/live.js [--reps N] [--ram 1024,4096]
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { SETTLE_VM_MS, settleDisk } from './lib/settle.js';
import { connectVm } from '../dist/index.js';
import { hmpTimed, spread, startQemu, waitMigration, writeRandomFile } from './lib/qemu-vm.js';

const BENCH_DIR = dirname(fileURLToPath(import.meta.url));
const RESULTS_DIR = join(BENCH_DIR, 'results');
const TMP_DIR = join(BENCH_DIR, '.tmp', `live-${process.pid}`);
const MiB = 1 << 20;
/** DESIGN.md: milliseconds of downtime whatever the RAM size. */
const DOWNTIME_TARGET_MS = 20;
const RATE_TARGET = 0.8;

/** A running VM with random bytes in its anonymous RAM. */
async function randomRamVm(ramMiB, image) {
  const memFile = join(TMP_DIR, 'ram.bin');
  const stream = join(TMP_DIR, 'ram.stream');
  await writeRandomFile(memFile, ramMiB * MiB);
  const source = await startQemu({ tmpDir: TMP_DIR, ramMiB, memFile });
  try {
    await source.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 2 ** 50 });
    await source.qmp.execute('migrate', { uri: `exec:cat > ${stream}` });
    await waitMigration(source.qmp);
  } finally {
    await source.quit();
    rmSync(memFile, { force: true });
  }
  const vm = await startQemu({ tmpDir: TMP_DIR, ramMiB, image, incoming: 'defer' });
  await vm.qmp.execute('migrate-incoming', { uri: `exec:cat ${stream}` });
  await waitMigration(vm.qmp);
  rmSync(stream, { force: true });
  await vm.qmp.execute('cont');
  return vm;
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
  const qemuAlone = async () => {
    await vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'background-snapshot', state: true }] });
    try {
      await vm.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 2 ** 50 });
      await vm.qmp.execute('migrate', { uri: 'exec:cat > /dev/null' });
      await waitMigration(vm.qmp, { pollMs: 20 });
      const info = await vm.qmp.execute('query-migrate');
      sample.qemuAloneDowntimeMs = info.downtime;
      sample.qemuAloneSetupMs = info['setup-time'];
    } finally {
      await vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'background-snapshot', state: false }] });
    }
  };
  for (const step of rep % 2 === 0 ? [live, qemuAlone, nonLive, hmp] : [hmp, nonLive, qemuAlone, live]) {
    await settleDisk(SETTLE_VM_MS);
    await step();
  }
  return sample;
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
      const summary = Object.fromEntries(Object.keys(samples[0]).map((k) => [k, spread(samples.map((s) => s[k]))]));
      for (const [k, s] of Object.entries(summary)) console.log(`    ${k.padEnd(22)} min ${s.min.toFixed(1)} / median ${s.median.toFixed(1)} / max ${s.max.toFixed(1)}`);
      const downtime = summary.liveDowntimeMs.median;
      const rate = summary.liveRateMBs.median / summary.nonLiveRateMBs.median;
      console.log(`  ${downtime <= DOWNTIME_TARGET_MS ? 'ok  ' : 'MISS'} live downtime <= ${DOWNTIME_TARGET_MS} ms: ${downtime.toFixed(1)} ms` +
        ` (QEMU alone pauses the guest ${summary.qemuAloneDowntimeMs.median.toFixed(1)} ms after a ${summary.qemuAloneSetupMs.median.toFixed(1)} ms setup)`);
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
