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

/** A case whose slowest repetition is below this share of its reference is flagged. */
export const SLOWEST_FLAG_RATIO = 0.75;

/** The reference a case is compared with: reads with the read reference, the rest with the write one. */
export function referenceOf(result, refs) {
  return result.kind === 'device-read' || result.kind === 'read' ? refs.read : refs.write;
}

/** True when a (non-device) case's slowest repetition fell below 0.75x its reference. */
export function flagged(result, refs) {
  const ref = referenceOf(result, refs);
  if (ref === undefined || result.kind.startsWith('device')) return false;
  return Math.min(...result.samples.map((s) => s.MiBps)) < SLOWEST_FLAG_RATIO * ref.medianMiBps;
}

export function printTable(results, refs, log = console.log) {
  const a = results.find((r) => r.id === 'a')?.medianMiBps;
  const labelWidth = Math.max(...results.map((r) => r.label.length), 6);
  const head = [pad('id', 9), pad('case', labelWidth), pad('size', 9, true), pad('n', 2, true), pad('min', 6, true), pad('median', 6, true),
    pad('max', 6, true), pad('vs ref', 13, true), pad('vs (a)', 7, true), pad('CPU s/GiB', 9, true), pad('JS busy', 7, true)].join('  ');
  for (const [kind, ref] of [['write', refs.write], ['read', refs.read]]) {
    if (ref !== undefined) log(`device ${kind} reference: ${ref.medianMiBps.toFixed(0)} MiB/s, the best median of the device ${kind} cells (${ref.id})`);
  }
  log(head);
  log('-'.repeat(head.length));
  for (const r of results) {
    const rates = r.samples.map((s) => s.MiBps);
    const ref = referenceOf(r, refs)?.medianMiBps;
    const slowest = ratio(Math.min(...rates), ref);
    const vs = `${ratio(r.medianMiBps, ref)} (${slowest})`;
    log([pad(r.id, 9), pad(r.label, labelWidth), pad(formatBytes(r.streamBytes), 9, true), pad(r.samples.length, 2, true),
      pad(Math.min(...rates).toFixed(0), 6, true), pad(r.medianMiBps.toFixed(0), 6, true), pad(Math.max(...rates).toFixed(0), 6, true),
      pad(vs, 13, true), pad(ratio(r.medianMiBps, a), 7, true), pad(cpuPerGiB(r.samples).toFixed(2), 9, true),
      pad(`${(median(r.samples.map((x) => x.loopBusy)) * 100).toFixed(0)}%`, 7, true), flagged(r, refs) ? ' ! slowest < 0.75x ref' : ''].join('  ').trimEnd());
  }
  log('MiB/s of stream bytes. vs ref: median (slowest) over the device reference of the same kind (write, or read for');
  log('readers); "!" flags a case whose slowest repetition is below 0.75x it. CPU s/GiB: process CPU time (all threads)');
  log('per GiB. JS busy: event-loop utilization, 100% for synchronous writers.');
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
    log(`  ${pad(r.id, 9)} ${'#'.repeat(n).padEnd(BAR_WIDTH)} ${r.medianMiBps.toFixed(0)} MiB/s`);
  }
}
