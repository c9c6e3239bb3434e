#!/usr/bin/env node
/**
 * Peak RSS growth of one createSnapshotStream run, in a fresh process so that
 * memory freed by other writers cannot hide inside the baseline.
 * DESIGN.md ("Memory"): growth <= buffers x bufferSize + 32 MiB for a 4 GiB stream.
 *
 *   node --expose-gc bench/rss-probe.js <file> <streamMiB> [buffers] [bufferSizeMiB]
 * prints one JSON line: { streamBytes, ringBytes, baselineBytes, peakBytes, growthBytes, seconds }
 */
import { unlinkSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { createSnapshotStream } from '../dist/index.js';
import { DEFAULT_BUFFER_SIZE, DEFAULT_BUFFERS } from '../dist/options.js';
import { pumpPages } from './lib/pump.js';
import { startRssSampler } from './lib/rss.js';
import { createWorkload } from './lib/workload.js';

const [path, streamMiB, buffers = String(DEFAULT_BUFFERS), bufferSizeMiB = String(DEFAULT_BUFFER_SIZE / 2 ** 20)] = process.argv.slice(2);
const workload = createWorkload({ totalBytes: Number(streamMiB) * 2 ** 20 });
const options = { direct: true, buffers: Number(buffers), bufferSize: Number(bufferSizeMiB) * 2 ** 20 };
globalThis.gc?.();
const t0 = performance.now();
const rss = startRssSampler();
const out = createSnapshotStream(path, options);
out.on('progress', rss.sample);
try {
  await pumpPages(out, workload, rss.sample);
} finally {
  try {
    unlinkSync(path);
  } catch {}
}
const mem = rss.stop();
const seconds = (performance.now() - t0) / 1000;
console.log(JSON.stringify({ streamBytes: out.bytesWritten, ringBytes: options.buffers * options.bufferSize, ...mem, seconds }));
