/**
 * The addon when the JavaScript environment goes away under it: a worker
 * thread terminated while its writes are queued and running. The native
 * threads finish or drop the operations, the buffers and callbacks they pin
 * are released on the JS thread (issue 9, item 5; `npm run test:asan` runs
 * this under ASan/UBSan), the descriptor is closed, and the process carries on.
 */
import { readdir, readlink } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
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

describe('the native file when its environment is torn down', () => {
  for (const threads of [1, 4]) {
    it(`survives a worker terminated with writes queued and running (${threads} I/O thread(s)), and closes the descriptor`, async () => {
      const path = join(dir.path, `teardown-${threads}.bin`);
      for (let round = 0; round < 5; round++) {
        const worker = new Worker(WORKER, { eval: true, workerData: { addonPath, path, threads, writes: 64 } });
        const exited = new Promise<number>((resolve) => worker.once('exit', resolve));
        const errors: unknown[] = [];
        worker.on('error', (err) => errors.push(err));
        await new Promise<void>((resolve, reject) => {
          worker.once('message', () => resolve());
          worker.once('exit', (code) => reject(new Error(`worker exited early with ${code}`)));
        });
        await worker.terminate();
        await exited;
        expect(errors).toEqual([]);
        expect(await openFdsTo(path)).toBe(0);
      }
    });
  }
});
