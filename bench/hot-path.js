#!/usr/bin/env node
/**
 * benny suite: the JS hot path only (STYLE.md, "The hot path"), no disk.
 *
 * One op = 512 write() calls into a stream whose target costs (almost)
 * nothing, waiting for 'drain' when write() says so. Cases:
 * - a bare Writable copying into a 4 MiB buffer: the reference (DESIGN.md
 *   quotes 6-7 GiB/s for it on this machine);
 * - SnapshotStream over a null sink (writes complete at once): write(),
 *   _write/_writev, the ring copy, the submit;
 * - SnapshotStream over a tmpfs file through the native threads (positions
 *   wrap at 64 MiB so /dev/shm never fills): adds the addon round trip.
 * Results: bench/results/hot-path.json (benny's format, with details), or
 * hot-path.json in the folder given by --results DIR.
 */
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { finished } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import b from 'benny';
import { allocAligned } from '../dist/io/alignment.js';
import { takeZeroedBuffer } from '../dist/io/buffer-pool.js';
import { TargetFile } from '../dist/io/target-file.js';
import { validateStreamOptions } from '../dist/options.js';
import { SnapshotStream } from '../dist/stream/snapshot-stream.js';
import { createWorkload, HEADER_BYTES, PAGE_BYTES } from './lib/workload.js';

const resultsArg = process.argv.indexOf('--results');
const RESULTS_DIR = resultsArg > 0 && process.argv[resultsArg + 1] !== undefined ? process.argv[resultsArg + 1] : fileURLToPath(new URL('./results/', import.meta.url));
const WRITES_PER_OP = 512;
const HOT_PATH_TARGET = 1.2;
const RING_BUFFER_BYTES = 4 << 20;
/** tmpfs target positions wrap here: bounded memory whatever benny's run length. */
const TMPFS_WRAP_BYTES = 64 << 20;
const quick = process.argv.includes('--quick');

const workload = createWorkload({ totalBytes: 64 << 20 });

/** The reference: copy into one 4 MiB buffer, wrap when full, callback at once. */
class BareWritable extends Writable {
  constructor() {
    super({ objectMode: true, highWaterMark: 64 });
    this._buf = Buffer.allocUnsafeSlow(RING_BUFFER_BYTES);
    this._fill = 0;
  }

  _write(chunk, _encoding, callback) {
    const length = chunk.byteLength;
    let at = 0;
    while (at < length) {
      const n = Math.min(RING_BUFFER_BYTES - this._fill, length - at);
      this._buf.set(n === length ? chunk : chunk.subarray(at, at + n), this._fill);
      this._fill += n;
      at += n;
      if (this._fill === RING_BUFFER_BYTES) this._fill = 0;
    }
    callback();
  }
}

/** A sink around any object with TargetFile's write(buffer, position). */
function sinkOver(file) {
  return async () => ({
    file,
    baseOffset: 0,
    maxLength: undefined,
    finalize: async () => {},
    abort: async () => {},
    close: async () => {},
  });
}

const nullFile = {
  path: '(null)',
  direct: true,
  alignment: 4096,
  threads: 1,
  allocBuffer: (length) => allocAligned(length, 4096),
  takePooledBuffer: (length) => takeZeroedBuffer(length, 4096),
  write: () => Promise.resolve(),
  datasync: () => Promise.resolve(),
};

function wrappedFile(real) {
  return {
    path: real.path,
    direct: real.direct,
    alignment: real.alignment,
    threads: 1,
    allocBuffer: (length) => real.allocBuffer(length),
    takePooledBuffer: (length) => real.takePooledBuffer(length),
    write: (buffer, position) => real.write(buffer, position % TMPFS_WRAP_BYTES),
    datasync: () => real.datasync(),
  };
}

function snapshotStream(file) {
  const s = new SnapshotStream(validateStreamOptions({ bufferSize: RING_BUFFER_BYTES, buffers: 2 }), sinkOver(file));
  s.on('error', (err) => {
    console.error(err);
    process.exit(1);
  });
  return s;
}

/** One op: WRITES_PER_OP writes of the given pattern; resolves when write() may go on. */
function batch(out, pattern) {
  let page = 0;
  const next = () => {
    const k = workload.poolIndex(page++);
    if (pattern === 'page') return workload.pages[k];
    if (pattern === 'header') return workload.headers[k];
    return null;
  };
  return async () => {
    for (let i = 0; i < WRITES_PER_OP; i++) {
      let chunk;
      if (pattern === 'pair') chunk = (i & 1) === 0 ? workload.headers[workload.poolIndex(page)] : workload.pages[workload.poolIndex(page++)];
      else chunk = next();
      if (!out.write(chunk)) await once(out, 'drain');
    }
  };
}

const BYTES_PER_OP = {
  pair: (WRITES_PER_OP / 2) * (HEADER_BYTES + PAGE_BYTES),
  page: WRITES_PER_OP * PAGE_BYTES,
  header: WRITES_PER_OP * HEADER_BYTES,
};

async function main() {
  const shmDir = mkdtempSync(join('/dev/shm', 'snapstream-bench-'));
  const tmpfsFile = await TargetFile.open(join(shmDir, 'hot-path.bin'), { write: true, create: true, direct: false, threads: 2 });
  const streams = {
    bare: new BareWritable(),
    nullPair: snapshotStream(nullFile),
    nullPage: snapshotStream(nullFile),
    nullHeader: snapshotStream(nullFile),
    tmpfsPair: snapshotStream(wrappedFile(tmpfsFile)),
  };
  const cases = [
    ['bare Writable -> 4 MiB buffer, 8 B + 4 KiB', streams.bare, 'pair'],
    ['SnapshotStream -> null sink, 8 B + 4 KiB', streams.nullPair, 'pair'],
    ['SnapshotStream -> null sink, 4 KiB', streams.nullPage, 'page'],
    ['SnapshotStream -> null sink, 8 B', streams.nullHeader, 'header'],
    ['SnapshotStream -> tmpfs (native), 8 B + 4 KiB', streams.tmpfsPair, 'pair'],
  ];
  const patternOf = new Map(cases.map(([name, , pattern]) => [name, pattern]));
  try {
    await b.suite(
      `snapstream hot path: ${WRITES_PER_OP} write() calls per op`,
      b.configure({ cases: quick ? { minSamples: 3, maxTime: 0.3 } : { minSamples: 10, maxTime: 2 } }),
      ...cases.map(([name, out, pattern]) => {
        // benny calls the outer function more than once to detect the case's
        // kind; the streams are made once above, so that costs nothing.
        const op = batch(out, pattern);
        return b.add(name, () => op);
      }),
      b.cycle(),
      b.complete((summary) => {
        console.log('\nper write() call and as a copy rate:');
        for (const r of summary.results) {
          const pattern = patternOf.get(r.name);
          const ns = 1e9 / (r.ops * WRITES_PER_OP);
          const mibps = (r.ops * BYTES_PER_OP[pattern]) / 2 ** 20;
          console.log(`  ${r.name.padEnd(48)} ${ns.toFixed(0).padStart(5)} ns/write  ${mibps.toFixed(0).padStart(6)} MiB/s`);
        }
        // DESIGN.md / issue 12: the 8 B + 4 KiB hot path within 1.2x a bare Writable copying into a buffer.
        const nsOf = (name) => 1e9 / (summary.results.find((r) => r.name === name).ops * WRITES_PER_OP);
        const ratio = nsOf(cases[1][0]) / nsOf(cases[0][0]);
        console.log(`\ntarget: ${ratio <= HOT_PATH_TARGET ? 'PASS' : 'MISS'}  SnapshotStream (null sink) 8 B + 4 KiB at ${ratio.toFixed(2)}x the bare Writable's time per write (<= ${HOT_PATH_TARGET}x)`);
      }),
      b.save({ file: 'hot-path', folder: RESULTS_DIR, details: true, format: 'json' }),
    );
  } finally {
    for (const s of Object.values(streams)) {
      s.end();
      await finished(s).catch(() => undefined);
    }
    await tmpfsFile.close();
    rmSync(shmDir, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
