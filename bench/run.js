#!/usr/bin/env node
/**
 * npm run bench: the throughput comparison of DESIGN.md ("Performance
 * targets"), then the benny hot-path suite (bench/hot-path.js).
 *
 * Every writer writes the same QEMU-like page stream to a fresh file on the
 * work disk; the final fsync/fdatasync is inside the timed region. Writers run
 * round-robin, one repetition each per round, with the starting writer rotated
 * every round, so drift on a shared machine hits all of them alike. The
 * medians, the targets, the samples (bench/results/*.json) and a chart
 * (bench/results/raw.svg) come out at the end.
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, mkdirSync, rmSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { dirname, join, relative } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { CASES } from './cases/index.js';
import { parseOptions, USAGE } from './lib/args.js';
import { extentCount } from './lib/fsinfo.js';
import { printAsciiChart, printTable, printTargets } from './lib/report.js';
import { formatBytes, median, MiB } from './lib/stats.js';
import { renderSvg } from './lib/svg.js';
import { createWorkload, PAIR_BYTES, workloadOfSize } from './lib/workload.js';
import { TARGETS } from './targets.js';
import { settleDisk } from './lib/settle.js';
import { runLiveBench } from './live.js';
import { runVmBench } from './vm.js';
import { setBufferPoolIdleMs } from '../dist/io/buffer-pool.js';

const BENCH_DIR = dirname(fileURLToPath(import.meta.url));
const REPO_DIR = dirname(BENCH_DIR);
const RESULTS_DIR = join(BENCH_DIR, 'results');
/** Under the repository, hence on the work disk (tmpfs would not take O_DIRECT to a device). */
const TMP_DIR = join(BENCH_DIR, '.tmp', String(process.pid));
/** Untimed first pass per writer: JIT warm-up and first-touch of buffers. */
const WARMUP_BYTES = 16 * MiB;
/** DESIGN.md states the memory bound for a 4 GiB stream. */
const RSS_PROBE_MIB = 4096;
/**
 * The buffer pool keeps rings for the whole run (its default lets them go
 * after 10 s idle, and a round of the grid takes about a minute). The device
 * cells allocate their buffers once, untimed, and reuse them in every
 * repetition; so do the library's cases, through the pool. The cost of a
 * fresh ring is case (fc)'s.
 */
const BENCH_POOL_IDLE_MS = 60 * 60_000;

async function main() {
  const opts = parseOptions(process.argv.slice(2));
  if (opts.help) {
    console.log(USAGE);
    return;
  }
  setBufferPoolIdleMs(BENCH_POOL_IDLE_MS);
  if (opts.throughput) await runThroughput(opts);
  if (opts.hotPath) runHotPath(opts);
  if (opts.vm) await runVmBench({ reps: opts.vmReps });
  if (opts.vm) await runLiveBench({ reps: opts.vmReps });
}

function selectCases(opts) {
  const known = new Set(CASES.map((c) => c.id));
  for (const id of opts.only ?? []) if (!known.has(id)) throw new RangeError(`Expected a case id for --only (${[...known].join(', ')}), received '${id}'`);
  const chosen = [];
  for (const c of CASES) {
    if (opts.only !== undefined && !opts.only.includes(c.id)) continue;
    const reason = c.available?.();
    if (reason !== undefined) console.log(`  skip (${c.id}) ${c.label}: ${reason}`);
    else chosen.push(c);
  }
  return chosen;
}

async function runThroughput(opts) {
  const cases = selectCases(opts);
  const base = createWorkload({ totalBytes: opts.fastBytes });
  const sized = { fast: base, slow: workloadOfSize(base, opts.slowBytes) };
  const env = { node: process.version, cpus: os.cpus().length, kernel: os.release(), arch: process.arch, loadAvgStart: os.loadavg() };
  const config = {
    quick: opts.quick,
    reps: opts.reps,
    fastSize: formatBytes(opts.fastBytes),
    slowSize: formatBytes(opts.slowBytes),
    scratch: relative(REPO_DIR, dirname(TMP_DIR)),
    workload: 'per page: 8-byte header write, then 4 KiB page write; rates count header + page bytes',
  };
  console.log(`snapstream throughput: ${cases.length} writers x ${opts.reps} repetitions, round-robin`);
  const load = os.loadavg()[0];
  console.log(`  load average ${load.toFixed(2)} on ${env.cpus} CPUs${load > env.cpus / 2 ? ': the machine is busy, CPU-bound writers (e, f) will suffer more than the device cells' : ''}`);
  console.log(`  fast writers ${config.fastSize} of pages, slow writers (a, b, d) ${config.slowSize}; MiB/s of stream bytes (4104 per page), fsync included`);
  mkdirSync(TMP_DIR, { recursive: true });
  const samples = new Map(cases.map((c) => [c.id, []]));
  const hashes = new Map();
  try {
    const states = new Map();
    for (const c of cases) states.set(c.id, await c.prepare?.({ workload: sized[c.sizeClass], tmpDir: TMP_DIR }));
    if (!opts.quick) {
      process.stdout.write('  warm-up:');
      for (const c of cases) {
        await runOnce(c, workloadOfSize(base, WARMUP_BYTES), states.get(c.id), -1);
        process.stdout.write(` ${c.id}`);
      }
      process.stdout.write('\n');
    }
    for (let rep = 0; rep < opts.reps; rep++) {
      process.stdout.write(`  round ${rep + 1}/${opts.reps}:`);
      for (let j = 0; j < cases.length; j++) {
        const c = cases[(j + rep) % cases.length];
        const workload = sized[c.sizeClass];
        const s = await runOnce(c, workload, states.get(c.id), rep, opts.verify ? hashes : undefined);
        samples.get(c.id).push(s);
        process.stdout.write(` ${c.id}=${s.MiBps.toFixed(0)}`);
      }
      process.stdout.write('\n');
    }
  } finally {
    rmSync(TMP_DIR, { recursive: true, force: true });
    try {
      rmSync(dirname(TMP_DIR)); // only if empty: another run may be using it
    } catch {}
  }
  const results = cases.map((c) => {
    const s = samples.get(c.id);
    return {
      id: c.id,
      label: c.label,
      kind: c.kind ?? 'write',
      sizeClass: c.sizeClass,
      streamBytes: sized[c.sizeClass].pageCount * 4096,
      medianMiBps: median(s.map((x) => x.MiBps)),
      samples: s,
    };
  });
  env.loadAvgEnd = os.loadavg();
  const rssProbe = cases.some((c) => c.id === 'f') ? probeRss(opts) : undefined;
  report({ date: new Date().toISOString(), env, config, results, references: references(results), rssProbe }, opts.resultsDir ?? RESULTS_DIR);
}

/**
 * The device references of this run (DESIGN.md): the best median among the
 * device-write cells, and among the device-read cells.
 */
function references(results) {
  const best = (kind) => {
    const cells = results.filter((r) => r.kind === kind);
    if (cells.length === 0) return undefined;
    const top = cells.reduce((x, y) => (y.medianMiBps > x.medianMiBps ? y : x));
    return { id: top.id, medianMiBps: top.medianMiBps };
  };
  return { write: best('device-write'), read: best('device-read') };
}

/** The memory target, measured in a fresh process (bench/rss-probe.js) with (f)'s options. */
function probeRss(opts) {
  const streamMiB = opts.quick ? 128 : RSS_PROBE_MIB;
  mkdirSync(TMP_DIR, { recursive: true });
  try {
    const r = spawnSync(process.execPath, ['--expose-gc', join(BENCH_DIR, 'rss-probe.js'), join(TMP_DIR, 'rss.bin'), String(streamMiB)], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    if (r.status !== 0) return { error: `rss-probe exited with ${r.status}` };
    return JSON.parse(r.stdout.trim().split('\n').pop());
  } finally {
    rmSync(TMP_DIR, { recursive: true, force: true });
  }
}

async function runOnce(c, workload, state, rep, hashes) {
  const path = join(TMP_DIR, `${c.id}-${rep < 0 ? 'warmup' : rep}.bin`);
  const ctx = { workload, path, rep, tmpDir: TMP_DIR, helpers: { extentCount } };
  try {
    const elu0 = performance.eventLoopUtilization();
    const cpu0 = process.cpuUsage();
    const t0 = performance.now();
    const out = await c.run(ctx, state);
    const seconds = out.seconds ?? (performance.now() - t0) / 1000;
    const cpu = process.cpuUsage(cpu0);
    const loopBusy = performance.eventLoopUtilization(elu0).utilization;
    const expected = c.verifiable === false ? out.bytes : workload.streamBytes;
    const size = c.container === true ? out.bytes : statSync(path).size;
    if (out.bytes !== expected || size !== expected) {
      throw new Error(`(${c.id}) wrote ${out.bytes} bytes, file has ${size}, expected ${expected}`);
    }
    if (hashes !== undefined && c.verifiable !== false) await verify(c, path, workload, hashes);
    return {
      rep,
      seconds,
      bytes: out.bytes,
      MiBps: out.bytes / MiB / seconds,
      // All threads of the process (JS, native I/O, libuv), user + system.
      cpuSeconds: (cpu.user + cpu.system) / 1e6,
      // Share of the wall time the JS thread was busy; 1 for synchronous writers.
      loopBusy,
      ...(out.extra ? { extra: out.extra } : {}),
    };
  } finally {
    try {
      unlinkSync(path);
    } catch {}
    await settleDisk();
  }
}


/** Compares the file with the page stream by SHA-256 (the stream's hash is computed once per size). */
async function verify(c, path, workload, hashes) {
  let want = hashes.get(workload.pageCount);
  if (want === undefined) {
    const h = createHash('sha256');
    for (let i = 0; i < workload.pageCount; i++) {
      const k = workload.poolIndex(i);
      h.update(workload.headers[k]);
      h.update(workload.pages[k]);
    }
    want = h.digest('hex');
    hashes.set(workload.pageCount, want);
  }
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path)) h.update(chunk);
  const got = h.digest('hex');
  if (got !== want) throw new Error(`(${c.id}) output differs from the page stream`);
}

function checkTargets(results, refs, rssProbe) {
  const byId = Object.fromEntries(results.map((r) => [r.id, r]));
  if (rssProbe !== undefined && rssProbe.error === undefined) byId.rssProbe = rssProbe;
  if (refs.write !== undefined) byId.writeRef = refs.write;
  if (refs.read !== undefined) byId.readRef = refs.read;
  return TARGETS.map((t) => {
    const missing = t.needs.filter((id) => byId[id] === undefined);
    if (missing.length > 0) return { name: t.name, status: 'skipped', reason: `needs (${missing.join('), (')})` };
    const m = t.measure(byId);
    const value = typeof m === 'number' ? m : m.value;
    return {
      name: t.name,
      status: 'checked',
      value,
      threshold: t.threshold,
      pass: value >= t.threshold,
      formatted: t.format(value),
      detail: typeof m === 'number' ? undefined : m.detail,
    };
  });
}

function report(run, resultsDir) {
  const { results } = run;
  console.log(`\nload average ${run.env.loadAvgStart[0].toFixed(2)} at start, ${run.env.loadAvgEnd[0].toFixed(2)} at end (${run.env.cpus} CPUs)`);
  printTable(results, run.references);
  console.log('');
  printAsciiChart(results);
  console.log('\ntargets (DESIGN.md "Performance targets"; a miss does not fail the run):');
  run.targets = checkTargets(results, run.references, run.rssProbe);
  printTargets(run.targets);
  for (const r of results) {
    const rss = r.samples.map((s) => s.extra?.rssGrowthBytes).filter((v) => v !== undefined);
    if (rss.length > 0) {
      const ring = r.samples[0].extra.ringBytes;
      console.log(`  (${r.id}) peak RSS growth per run: ${rss.map((v) => (v / MiB).toFixed(1)).join(', ')} MiB; bound ${(ring / MiB + 32).toFixed(0)} MiB (ring ${ring / MiB} MiB + 32 MiB), for a ${formatBytes(r.streamBytes)} stream`);
    }
  }
  for (const r of results) {
    const extents = r.samples.map((s) => s.extra?.extents).filter((v) => v !== undefined);
    const prealloc = r.samples.map((s) => s.extra?.preallocSeconds).filter((v) => v !== undefined);
    if (extents.length > 0) console.log(`  (${r.id}) extents after the run (filefrag): ${extents.join(', ')}${prealloc.length > 0 ? `; preallocation took ${prealloc.map((v) => `${(v * 1000).toFixed(0)} ms`).join(', ')}` : ''}`);
  }
  const probe = run.rssProbe;
  if (probe !== undefined && probe.error === undefined) {
    console.log(`  (f) fresh-process probe: ${formatBytes(probe.streamBytes)} stream, peak RSS growth ${(probe.growthBytes / MiB).toFixed(1)} MiB; bound ${(probe.ringBytes / MiB + 32).toFixed(0)} MiB (${(probe.streamBytes / MiB / probe.seconds).toFixed(0)} MiB/s, not part of the medians)`);
  } else if (probe !== undefined) {
    console.log(`  (f) RSS probe failed: ${probe.error}`);
  }
  mkdirSync(resultsDir, { recursive: true });
  const stamp = run.date.replace(/[:.]/g, '-');
  const json = `${JSON.stringify(run, null, 2)}\n`;
  writeFileSync(join(resultsDir, `raw-${stamp}.json`), json);
  writeFileSync(join(resultsDir, 'latest.json'), json);
  writeFileSync(join(resultsDir, 'raw.svg'), renderSvg(run));
  const shown = resultsDir === RESULTS_DIR ? 'bench/results' : resultsDir;
  console.log(`\nsaved ${shown}/raw-${stamp}.json, ${shown}/latest.json, ${shown}/raw.svg`);
}

function runHotPath(opts) {
  console.log('\nbenny hot-path suite (bench/hot-path.js)');
  const args = ['--expose-gc', join(BENCH_DIR, 'hot-path.js'), ...(opts.quick ? ['--quick'] : []), ...(opts.resultsDir !== undefined ? ['--results', opts.resultsDir] : [])];
  const r = spawnSync(process.execPath, args, { stdio: 'inherit' });
  if (r.status !== 0) process.exitCode = r.status ?? 1;
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
