/**
 * The addon when the JavaScript environment goes away under it: a worker
 * thread terminated while its writes are queued and running. The native
 * threads finish or drop the operations, the buffers and callbacks they pin
 * are released on the JS thread (issue 9, item 5; `npm run test:asan` runs
 * this under ASan/UBSan), the descriptor is closed, and the process carries on.
 * Reads into chunk slabs (native/slabs.cc) keep their slabs from being filed
 * or freed until the reads have ended, although Node finalizes the slabs'
 * ArrayBuffers before the native threads are joined.
 */
import { readdir, readlink, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { addon } from '../../src/io/native.js';
import { tmpDir, type TmpDir } from '../helpers/tools.js';

let dir: TmpDir;
beforeAll(async () => {
  dir = await tmpDir('teardown');
});
afterAll(async () => {
  await dir.cleanup();
});

// The addon the library loads (src/io/native.ts), resolved the same way.
const addonPath = process.env.SNAPSTREAM_ADDON_PATH ?? createRequire(import.meta.url).resolve('../../build/Release/snapstream.node');

// Queues `writes` 1 MiB writes on `threads` native threads, reports 'queued',
// then waits; a second message makes it also drop its handles and collect.
const WORKER = `
const { parentPort, workerData } = require('node:worker_threads');
const addon = require(workerData.addonPath);
const file = new addon.NativeFile(workerData.threads);
file.open(workerData.path, { write: true, create: true, exclusive: false, truncate: false, direct: false, mode: 0o600 }, (errno) => {
  if (errno !== 0) throw new Error('open failed: ' + errno);
  for (let i = 0; i < workerData.writes; i++) {
    const buffer = new Uint8Array(1 << 20).fill(i & 0xff);
    file.write(buffer, i * (1 << 20), () => {});
  }
  parentPort.postMessage('queued');
});
setInterval(() => {}, 1000);
`;

async function openFdsTo(path: string): Promise<number> {
  let count = 0;
  for (const fd of await readdir('/proc/self/fd')) {
    const target = await readlink(join('/proc/self/fd', fd)).catch(() => '');
    if (target === path) count++;
  }
  return count;
}

/** Starts a worker, terminates it once it reports its operations queued; returns the errors it raised. */
async function terminateOnceQueued(source: string, workerData: Record<string, unknown>): Promise<unknown[]> {
  const worker = new Worker(source, { eval: true, workerData });
  const exited = new Promise<number>((resolve) => worker.once('exit', resolve));
  const errors: unknown[] = [];
  worker.on('error', (err) => errors.push(err));
  await new Promise<void>((resolve, reject) => {
    worker.once('message', () => resolve());
    worker.once('exit', (code) => reject(new Error(`worker exited early with ${code}`)));
  });
  await worker.terminate();
  await exited;
  return errors;
}

describe('the native file when its environment is torn down', () => {
  for (const threads of [1, 4]) {
    it(`survives a worker terminated with writes queued and running (${threads} I/O thread(s)), and closes the descriptor`, async () => {
      const path = join(dir.path, `teardown-${threads}.bin`);
      for (let round = 0; round < 5; round++) {
        expect(await terminateOnceQueued(WORKER, { addonPath, path, threads, writes: 64 })).toEqual([]);
        expect(await openFdsTo(path)).toBe(0);
      }
    });
  }
});

// Queues `reads` 1 MiB reads into slabs of its own on one native thread, reports 'queued', then waits.
const SLAB_WORKER = `
const { parentPort, workerData } = require('node:worker_threads');
const addon = require(workerData.addonPath);
const file = new addon.NativeFile(1);
const held = [];
file.open(workerData.path, { write: false, create: false, exclusive: false, truncate: false, direct: false, mode: 0o600 }, (errno) => {
  if (errno !== 0) throw new Error('open failed: ' + errno);
  for (let i = 0; i < workerData.reads; i++) {
    const slab = new Uint8Array(addon.allocSlab(1 << 20, 4096, 0).buffer);
    held.push(slab);
    file.read(slab, i * (1 << 20), () => {});
  }
  parentPort.postMessage('queued');
});
setInterval(() => {}, 1000);
`;

describe('chunk slabs when their environment is torn down', () => {
  it('keeps a slab a queued or running read uses until the read has ended (ASan: no use after free)', async () => {
    const path = join(dir.path, 'slab-source.bin');
    await writeFile(path, new Uint8Array(64 << 20).fill(0x3c));
    // Fill the free list up to its cap with slabs of another size, so that a
    // slab filed early would be freed at once, under the read (ASan's report).
    const filler = Array.from({ length: 16 }, () => addon.allocSlab(4 << 20, 4096, 0));
    filler.length = 0;
    const { setFlagsFromString } = await import('node:v8');
    const { runInNewContext } = await import('node:vm');
    setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as () => void;
    for (let i = 0; i < 3; i++) {
      gc();
      await new Promise((resolve) => setImmediate(resolve));
    }
    expect(addon.slabStats().freeBytes).toBe(64 << 20);
    for (let round = 0; round < 5; round++) {
      const before = addon.slabStats();
      expect(await terminateOnceQueued(SLAB_WORKER, { addonPath, path, reads: 64 })).toEqual([]);
      const after = addon.slabStats();
      // Every slab of the worker was filed once its read had ended: none stays live, and with
      // the free list full each was given back to the C library.
      expect(after.live).toBe(before.live);
      expect(after.allocated - before.allocated).toBe(64);
      expect(after.released - before.released).toBe(64);
    }
  });
});
