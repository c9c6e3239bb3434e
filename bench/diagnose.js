#!/usr/bin/env node
/**
 * Where the time goes in one stream run (docs/performance.md). Not a
 * benchmark: one process, one configuration, instrumented.
 *
 *   node bench/diagnose.js [--size MiB] [--buffers N] [--buffer-size MiB] [--threads N] [--flush-interval MiB] [--fresh-ring] [--reps N] [--dir DIR]
 *
 * --fresh-ring: every run allocates its ring afresh, as before the buffer pool
 * (src/io/buffer-pool.ts); by default a run reuses the ring of the run before.
 *
 * Per run it prints the rate, the event-loop utilisation, process CPU, and
 * from timestamps taken around TargetFile.write (submit = the call, done = the
 * promise reaction on the JS thread):
 * - the JS side's gap from a write's completion to the next submit;
 * - the I/O thread's idle time, as seen from JS: with one thread and FIFO
 *   order, the thread idles between writes i-1 and i when submit(i) comes
 *   after done(i-1) (upper bound: done(i-1) is observed late);
 * - how long the producer was held (no FREE buffer) in total.
 * Pair it with `strace -f -ttt -T -e trace=pwrite64` or `perf` for the
 * kernel's view.
 */
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import os from 'node:os';
import { createSnapshotStream } from '../dist/index.js';
import { TargetFile } from '../dist/io/target-file.js';
import { setBufferPoolEnabled } from '../dist/io/buffer-pool.js';
import { pumpPages } from './lib/pump.js';
import { createWorkload } from './lib/workload.js';
import { median } from './lib/stats.js';
import { settleDisk } from './lib/settle.js';

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: '1024' },
    buffers: { type: 'string' },
    'buffer-size': { type: 'string' },
    threads: { type: 'string' },
    'flush-interval': { type: 'string' },
    'fresh-ring': { type: 'boolean', default: false },
    reps: { type: 'string', default: '3' },
    dir: { type: 'string', default: join(import.meta.dirname, '.tmp', `diag-${process.pid}`) },
  },
});
const MiB = 2 ** 20;
const workload = createWorkload({ totalBytes: Number(values.size) * MiB });
const options = { direct: true };
if (values.buffers !== undefined) options.buffers = Number(values.buffers);
if (values['buffer-size'] !== undefined) options.bufferSize = Number(values['buffer-size']) * MiB;
if (values['flush-interval'] !== undefined) options.flushInterval = Number(values['flush-interval']) * MiB;
setBufferPoolEnabled(!values['fresh-ring']);

// --threads: native I/O threads of the stream's target (writes the disk sees at once).
if (values.threads !== undefined) {
  const open = TargetFile.open;
  TargetFile.open = (path, opts) => open.call(TargetFile, path, { ...opts, threads: Number(values.threads) });
}

// Timestamps around every write the stream makes (positions are unique).
let events = [];
const write = TargetFile.prototype.write;
TargetFile.prototype.write = function (buffer, position) {
  const e = { submit: performance.now(), done: 0, bytes: buffer.byteLength };
  events.push(e);
  return write.call(this, buffer, position).finally(() => {
    e.done = performance.now();
  });
};

mkdirSync(values.dir, { recursive: true });
try {
  for (let rep = 0; rep < Number(values.reps); rep++) {
    events = [];
    const path = join(values.dir, `diag-${rep}.bin`);
    const load = os.loadavg()[0];
    const elu0 = performance.eventLoopUtilization();
    const cpu0 = process.cpuUsage();
    const t0 = performance.now();
    const out = createSnapshotStream(path, options);
    let ring;
    out.once('progress', () => (ring = out._ring));
    let heldMs = 0;
    await pumpPages(out, workload, () => {
      const h0 = performance.now();
      out.once('drain', () => (heldMs += performance.now() - h0));
    });
    const ms = performance.now() - t0;
    const cpu = process.cpuUsage(cpu0);
    const elu = performance.eventLoopUtilization(elu0).utilization;
    rmSync(path, { force: true });
    const gaps = [];
    const idle = [];
    const service = [];
    for (let i = 1; i < events.length; i++) {
      const prev = events[i - 1];
      const e = events[i];
      idle.push(Math.max(0, e.submit - prev.done));
      service.push(e.done - Math.max(e.submit, prev.done));
      // The completion that freed the buffer this submit reuses: the most recent done before it.
      let last = 0;
      for (let j = i - 1; j >= 0; j--) if (events[j].done <= e.submit && events[j].done > last) last = events[j].done;
      if (last > 0) gaps.push(e.submit - last);
    }
    const sum = (a) => a.reduce((x, y) => x + y, 0);
    const q = (a) => `median ${median(a).toFixed(3)} max ${Math.max(...a).toFixed(2)}`;
    console.log(
      JSON.stringify({
        rep,
        load: Number(load.toFixed(2)),
        MiBps: Math.round(out.bytesWritten / MiB / (ms / 1000)),
        ms: Math.round(ms),
        writes: events.length,
        elu: Number(elu.toFixed(3)),
        cpuS: Number(((cpu.user + cpu.system) / 1e6).toFixed(3)),
        ioThreadIdleMs: Math.round(sum(idle)),
        ioIdleGaps: idle.filter((x) => x > 0.05).length,
        serviceMsPerWrite: q(service),
        doneToNextSubmitMs: q(gaps),
        producerHeldMs: Math.round(heldMs),
        // Start to the first write's submit (open, ring, first buffer filled), and the last write's
        // completion to the end (tail, fdatasync, close).
        firstSubmitMs: Math.round(events[0].submit - t0),
        lastDoneToEndMs: Math.round(t0 + ms - Math.max(...events.map((e) => e.done))),
        flushes: ring?.flushes,
        depthDecisions: ring?.tuner.decisions,
      }),
    );
    // As the bench does: the delete's discards must not land on the next run.
    await settleDisk();
  }
} finally {
  rmSync(values.dir, { recursive: true, force: true });
}
