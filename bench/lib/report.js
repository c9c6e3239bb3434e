/** Terminal output of a throughput run: the table, the targets, an ASCII bar chart. */
import { formatBytes, median } from './stats.js';

/** Median process CPU seconds (all threads) per GiB written. */
function cpuPerGiB(samples) {
  return median(samples.map((x) => x.cpuSeconds / (x.bytes / 2 ** 30)));
}

function pad(s, n, right = false) {
  s = String(s);
  return right ? s.padStart(n) : s.padEnd(n);
}

function ratio(value, ref) {
  return ref === undefined || !(ref > 0) ? '-' : `${(value / ref).toFixed(2)}x`;
}

export function printTable(results, log = console.log) {
  const g = results.find((r) => r.id === 'g')?.medianMiBps;
  const a = results.find((r) => r.id === 'a')?.medianMiBps;
  const labelWidth = Math.max(...results.map((r) => r.label.length), 6);
  const head = [pad('id', 3), pad('writer', labelWidth), pad('size', 9, true), pad('n', 2, true), pad('MiB/s', 8, true),
    pad('min..max', 15, true), pad('vs (g)', 7, true), pad('vs (a)', 7, true), pad('CPU s/GiB', 9, true), pad('JS busy', 7, true)].join('  ');
  log(head);
  log('-'.repeat(head.length));
  for (const r of results) {
    const rates = r.samples.map((s) => s.MiBps);
    const range = `${Math.min(...rates).toFixed(0)}..${Math.max(...rates).toFixed(0)}`;
    log([pad(r.id, 3), pad(r.label, labelWidth), pad(formatBytes(r.streamBytes), 9, true), pad(r.samples.length, 2, true),
      pad(r.medianMiBps.toFixed(0), 8, true), pad(range, 15, true), pad(ratio(r.medianMiBps, g), 7, true),
      pad(ratio(r.medianMiBps, a), 7, true), pad(cpuPerGiB(r.samples).toFixed(2), 9, true),
      pad(`${(median(r.samples.map((x) => x.loopBusy)) * 100).toFixed(0)}%`, 7, true)].join('  '));
  }
  log('CPU s/GiB: process CPU time (all threads) per GiB written. JS busy: event-loop utilization, 100% for synchronous writers.');
}

export function printTargets(checks, log = console.log) {
  for (const c of checks) {
    const verdict = c.status === 'skipped' ? 'SKIP' : c.pass ? 'PASS' : 'MISS';
    const shown = c.status === 'skipped' ? c.reason : `${c.formatted}${c.detail ? ` (${c.detail})` : ''}`;
    log(`  ${verdict}  ${c.name}: ${shown}`);
  }
}

const BAR_WIDTH = 50;

export function printAsciiChart(results, log = console.log) {
  const max = Math.max(...results.map((r) => r.medianMiBps));
  for (const r of results) {
    const n = Math.max(1, Math.round((r.medianMiBps / max) * BAR_WIDTH));
    log(`  ${pad(r.id, 3)} ${'#'.repeat(n).padEnd(BAR_WIDTH)} ${r.medianMiBps.toFixed(0)} MiB/s`);
  }
}
