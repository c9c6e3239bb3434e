/**
 * TargetFile.setConcurrency: how many operations the native threads run at
 * once. Observed from outside the library: on a frozen filesystem (fsfreeze)
 * every write blocks inside pwrite64, so the number of this process's threads
 * sitting in that syscall (/proc/self/task/N/syscall) is the number running.
 */
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { TargetFile } from '../../src/io/target-file.js';
import { loopFsSkipReason, withLoopFs } from '../helpers/loopfs.js';
import { pseudoRandom } from '../helpers/streams.js';
import { requireTool, runOk, withTmpDir } from '../helpers/tools.js';

const SYS_PWRITE64 = 18; // x86_64
const skip = process.arch !== 'x64' ? 'syscall numbers are x86_64 ones' : (requireTool('fsfreeze') ?? loopFsSkipReason('ext4'));

async function threadsInPwrite(): Promise<number> {
  let n = 0;
  for (const tid of await readdir('/proc/self/task')) {
    const line = await readFile(`/proc/self/task/${tid}/syscall`, 'utf8').catch(() => '');
    if (line.split(' ')[0] === String(SYS_PWRITE64)) n++;
  }
  return n;
}

/** Polls until `count()` equals `want` or `ms` passes; returns the last count. */
async function settle(count: () => Promise<number>, want: number, ms: number): Promise<number> {
  const deadline = Date.now() + ms;
  let n = await count();
  while (n !== want && Date.now() < deadline) {
    await sleep(20);
    n = await count();
  }
  return n;
}

describe.skipIf(skip !== undefined)('TargetFile.setConcurrency', () => {
  it('runs at most n writes at once, lets queued ones start when raised, and keeps every byte', async () => {
    const result = await withLoopFs({ sizeBytes: 64 << 20, fsType: 'ext4' }, async (mnt) => {
      const path = join(mnt, 'limited.bin');
      const f = await TargetFile.open(path, { write: true, create: true, direct: false, threads: 3 });
      const data = [0, 1, 2].map((i) => pseudoRandom(1 << 20, 100 + i));
      let frozen = false;
      try {
        f.setConcurrency(1);
        await runOk('fsfreeze', ['--freeze', mnt]);
        frozen = true;
        const writes = data.map((d, i) => f.write(d, i << 20));
        // Give every thread time to enter pwrite if it were allowed to.
        await sleep(300);
        expect(await settle(threadsInPwrite, 1, 1000)).toBe(1);
        f.setConcurrency(3);
        expect(await settle(threadsInPwrite, 3, 5000)).toBe(3);
        await runOk('fsfreeze', ['--unfreeze', mnt]);
        frozen = false;
        await Promise.all(writes);
      } finally {
        if (frozen) await runOk('fsfreeze', ['--unfreeze', mnt]);
        await f.close();
      }
      const back = await readFile(path);
      expect(back.equals(Buffer.concat(data))).toBe(true);
      return true;
    });
    expect(result).toBe(true);
  });
});

describe('TargetFile.setConcurrency options', () => {
  it('refuses a concurrency outside 1..threads with a RangeError naming it', async () => {
    await withTmpDir('concurrency', async (dir) => {
      const f = await TargetFile.open(join(dir, 'range.bin'), { write: true, create: true, direct: 'auto', threads: 2 });
      try {
        for (const bad of [0, 3, 1.5, Number.NaN]) expect(() => f.setConcurrency(bad)).toThrow(/for concurrency/);
        expect(() => f.setConcurrency(3)).toThrow(RangeError);
        f.setConcurrency(1);
        f.setConcurrency(2);
      } finally {
        await f.close();
      }
    });
  });
});
