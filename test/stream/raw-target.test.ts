/**
 * Raw targets (issue 13 items 2, 8, 9): one writer at a time, nothing
 * unlinked that this stream did not create, only seekable targets, and the
 * bytes past the stream kept.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream, SnapshotError } from '../../src/index.js';
import { failure } from '../helpers/failure.js';
import { fromChunks, pseudoRandom } from '../helpers/streams.js';
import { requireTool, run, runOk, tmpDir, type TmpDir } from '../helpers/tools.js';
import { assertBuilt, BIN, REPO_DIR } from '../cli/bin-harness.js';

const MiB = 1 << 20;
const sha256 = (data: Uint8Array): string => createHash('sha256').update(data).digest('hex');
const RACE_TRIALS = Number(process.env.RAW_RACE_TRIALS ?? 20);

let dir: TmpDir;
let n = 0;
const fresh = (name: string) => join(dir.path, `${name}-${++n}`);
beforeAll(async () => {
  dir = await tmpDir('raw-target');
});
afterAll(async () => dir?.cleanup());

/** A stream held after its first MiB is on disk; finish() sends the rest. */
async function heldWriter(path: string, data: Buffer): Promise<{ finish(): Promise<void> }> {
  const source = new PassThrough();
  const out = createSnapshotStream(path, { bufferSize: MiB });
  const done = pipeline(source, out);
  done.catch(() => undefined);
  const onDisk = new Promise<void>((resolve) => out.once('progress', () => resolve()));
  source.write(data.subarray(0, 2 * MiB));
  await Promise.race([onDisk, done]);
  return {
    async finish() {
      source.end(data.subarray(2 * MiB));
      await done;
    },
  };
}

describe('one writer at a time', () => {
  it('a second stream on the same target gets TARGET_LOCKED while the first writes, and the first completes', async () => {
    const path = fresh('locked.raw');
    const data = pseudoRandom(6 * MiB + 3, 1);
    const first = await heldWriter(path, data);
    const err = await failure(pipeline(fromChunks([Buffer.from('intruder')]), createSnapshotStream(path)));
    expect(err.code).toBe('TARGET_LOCKED');
    await first.finish();
    expect(sha256(readFileSync(path))).toBe(sha256(data));
    // Once the first has finished, the target is free again.
    await pipeline(fromChunks([Buffer.from('next')]), createSnapshotStream(path));
    expect(readFileSync(path, 'utf8')).toBe('next');
  });

  it.skipIf(requireTool('qemu-io') !== undefined)("makes QEMU's lock check refuse the file while a stream writes it (qemu-io)", async () => {
    const path = fresh('qemu.raw');
    const data = pseudoRandom(4 * MiB, 2);
    const first = await heldWriter(path, data);
    const qemu = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x55 0 4k', path]);
    expect(`${qemu.stdout}${qemu.stderr}`).toMatch(/Failed to get ".*" lock/);
    await first.finish();
    expect(sha256(readFileSync(path))).toBe(sha256(data));
  });

  it(`two 'snapstream write' processes racing to create one file: one file, wholly one writer's, never gone (${RACE_TRIALS} trials)`, async () => {
    assertBuilt();
    const a = pseudoRandom(8 * MiB + 11, 3);
    const b = pseudoRandom(6 * MiB + 7, 4);
    const aPath = fresh('a.bin');
    const bPath = fresh('b.bin');
    writeFileSync(aPath, a);
    writeFileSync(bPath, b);
    const writer = (target: string, source: string) =>
      new Promise<{ code: number | null; stderr: string }>((resolve) => {
        const child = spawn(process.execPath, [BIN, 'write', '-q', target, source], { cwd: REPO_DIR, stdio: ['ignore', 'ignore', 'pipe'] });
        let stderr = '';
        child.stderr.on('data', (c: Buffer) => (stderr += c.toString('utf8')));
        child.once('close', (code) => resolve({ code, stderr }));
      });
    const outcomes = { bothWrote: 0, oneLocked: 0 };
    for (let trial = 0; trial < RACE_TRIALS; trial++) {
      const target = fresh('race.raw');
      const [ra, rb] = await Promise.all([writer(target, aPath), writer(target, bPath)]);
      const label = `trial ${trial}: a=${ra.code} ${ra.stderr} b=${rb.code} ${rb.stderr}`;
      for (const r of [ra, rb]) {
        if (r.code !== 0) {
          expect(r.code, label).toBe(1);
          expect(r.stderr, label).toMatch(/^snapstream: TARGET_LOCKED: /);
        }
      }
      expect(ra.code === 0 || rb.code === 0, label).toBe(true);
      expect(existsSync(target), `${label}: the winner's file is there`).toBe(true);
      const digest = sha256(readFileSync(target));
      // Wholly one writer's bytes: a writer that exited 0 last, or the only one that did.
      const winners = [ra.code === 0 ? sha256(a) : undefined, rb.code === 0 ? sha256(b) : undefined].filter((d) => d !== undefined);
      expect(winners, label).toContain(digest);
      if (ra.code === 0 && rb.code === 0) outcomes.bothWrote++;
      else outcomes.oneLocked++;
    }
    console.log(`[raw-target] ${RACE_TRIALS} races: one writer refused with TARGET_LOCKED in ${outcomes.oneLocked}, one after the other in ${outcomes.bothWrote}`);
  });
});

describe('targets without offsets', () => {
  it.skipIf(requireTool('mkfifo') !== undefined)('refuses a FIFO at once with EINVAL, without waiting for a reader or taking input', async () => {
    const fifo = fresh('t.fifo');
    await runOk('mkfifo', [fifo]);
    let pulled = 0;
    async function* source() {
      pulled++;
      yield Buffer.from('x');
    }
    const err = await failure(pipeline(source(), createSnapshotStream(fifo)));
    expect(err.code).toBe('EINVAL');
    expect(err.message).toMatch(/FIFO/);
    expect(pulled).toBeLessThanOrEqual(1);
  });

  it('refuses a character device (/dev/null) with EINVAL instead of failing after writing everything', async () => {
    const err = await failure(pipeline(fromChunks([pseudoRandom(5 * MiB, 5)]), createSnapshotStream('/dev/null')));
    expect(err.code).toBe('EINVAL');
    expect(err.message).toMatch(/character device/);
  });
});

describe('bytes past the stream are kept', () => {
  for (const direct of [true, false] as const) {
    it(`writing at an offset into a longer file keeps its head and its tail, and its size (direct ${direct})`, async () => {
      const path = fresh('offset.raw');
      const before = pseudoRandom(64 * 1024 + 123, 6);
      writeFileSync(path, before);
      const data = pseudoRandom(5000, 7);
      await pipeline(fromChunks([data]), createSnapshotStream(path, { offset: 8192, direct: direct === true ? 'auto' : false }));
      const after = readFileSync(path);
      expect(after.length).toBe(before.length);
      expect(after.subarray(0, 8192).equals(before.subarray(0, 8192))).toBe(true);
      expect(after.subarray(8192, 8192 + data.length).equals(data)).toBe(true);
      expect(after.subarray(8192 + data.length).equals(before.subarray(8192 + data.length))).toBe(true);
    });
  }

  it('writing at an offset past the end of a shorter file ends the file with the stream', async () => {
    const path = fresh('grow.raw');
    const before = pseudoRandom(3000, 8);
    writeFileSync(path, before);
    const data = pseudoRandom(10_000, 9);
    await pipeline(fromChunks([data]), createSnapshotStream(path, { offset: 4096 }));
    const after = readFileSync(path);
    expect(after.length).toBe(4096 + data.length);
    expect(after.subarray(0, 3000).equals(before)).toBe(true);
    expect(after.subarray(4096).equals(data)).toBe(true);
  });

  it('from offset 0 the stream is the whole file: a longer old file is cut to the stream', async () => {
    const path = fresh('replace.raw');
    writeFileSync(path, pseudoRandom(100_000, 10));
    const data = pseudoRandom(7000, 11);
    await pipeline(fromChunks([data]), createSnapshotStream(path));
    expect(readFileSync(path).equals(data)).toBe(true);
  });
});
