/**
 * One image, two writers: whoever comes second is refused, fast, and the
 * first one's save is untouched (DESIGN.md "QEMU's locking protocol").
 *
 * - a second snapstream saver, in this process or in another one, fails with
 *   IMAGE_LOCKED well under a second while the first is mid-stream, and the
 *   first still commits a snapshot qemu-img accepts;
 * - a running QEMU with the image attached makes a save fail with
 *   IMAGE_LOCKED before anything is written;
 * - a QEMU started while a save streams refuses the image with a lock error,
 *   and the save then completes cleanly.
 *
 * The first saver is held mid-stream by its producer: a PassThrough the test
 * feeds by hand, so "mid-stream" is a state, not a race.
 */
import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream, type SnapshotStream } from '../../src/index.js';
import { killAllVms, randomBytesFromSeed, startPausedVm, withPausedVm } from '../helpers/qemu.js';
import { qemuImg, qemuIo, requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';
import { privateBuild } from './private-build.js';
import { exportVmState, sha256 } from '../fault/vmstate-export.js';

const MiB = 1 << 20;
const VMSTATE_BYTES = 24 * MiB;
/** The first saver is paused after this much; several ring buffers have gone to disk by then. */
const HELD_AFTER_BYTES = 8 * MiB;
/**
 * "Fails fast": opening, taking the lock bytes and probing them is a handful
 * of syscalls (measured: a few ms). A saver that waited for the lock would
 * wait forever (the first save is held), so a wide margin still tells the
 * two apart: 2 s holds on a loaded machine (the file runs in the serial
 * project, vitest.config.ts).
 */
const LOCKED_WITHIN_MS = 2000;
const SAVER_CHILD = fileURLToPath(new URL('../fault/fixtures/kill-saver.mjs', import.meta.url));

const skip = requireTool('qemu-img', 'qemu-io', 'qemu-system-x86_64');



/** A save held mid-stream: HELD_AFTER_BYTES are written (and on disk); finish() sends the rest and waits for the commit. */
async function startHeldSave(path: string, name: string, data: Buffer): Promise<{ finish(): Promise<void> }> {
  const source = new PassThrough({ highWaterMark: MiB });
  const out: SnapshotStream = createSnapshotStream(path, { snapshot: name, bufferSize: MiB, buffers: 2 });
  const done = pipeline(source, out);
  done.catch(() => undefined); // observed by finish()
  const onDisk = new Promise<void>((resolve) =>
    out.on('progress', ({ bytesWritten }) => {
      if (bytesWritten >= HELD_AFTER_BYTES - MiB) resolve();
    }),
  );
  source.write(data.subarray(0, HELD_AFTER_BYTES));
  await Promise.race([onDisk, done]);
  return {
    async finish() {
      source.end(data.subarray(HELD_AFTER_BYTES));
      await done;
    },
  };
}

/** A second save's outcome and how long it took to be refused. */
async function attemptSave(path: string, name: string): Promise<{ error: unknown; elapsedMs: number }> {
  const t0 = performance.now();
  const error = await pipeline(PassThrough.from([Buffer.alloc(MiB, 0x5a)]), createSnapshotStream(path, { snapshot: name })).then(
    () => undefined,
    (err: unknown) => err,
  );
  return { error, elapsedMs: performance.now() - t0 };
}

/** The image is clean and holds exactly `names`; the last one's vmstate is `data`. */
async function expectCommitted(path: string, names: string[], data: Buffer): Promise<void> {
  const check = await qemuImg.check(path);
  expect(check.exitCode, JSON.stringify(check)).toBe(0);
  expect((await qemuImg.snapshotList(path)).map((s) => s.name)).toEqual(names);
  expect(sha256(await exportVmState(path, names[names.length - 1] as string))).toBe(sha256(data));
  await qemuIo(path, ['read -P 0x61 0 1M']);
}

describe.skipIf(skip !== undefined)('two writers on one image', () => {
  let dir: TmpDir;
  let n = 0;
  const data = randomBytesFromSeed(VMSTATE_BYTES, 11);
  beforeAll(async () => {
    dir = await tmpDir('concurrent-savers');
  });
  afterAll(async () => {
    await killAllVms();
    await dir?.cleanup();
  });

  async function image(): Promise<string> {
    const path = join(dir.path, `img-${++n}.qcow2`);
    await qemuImg.create(path, 64 * MiB, { cluster_size: 65536 });
    await qemuIo(path, ['write -P 0x61 0 1M']);
    return path;
  }

  it('refuses a second saver in the same process with IMAGE_LOCKED, fast, and the first still commits', async () => {
    const path = await image();
    const first = await startHeldSave(path, 'first', data);
    const second = await attemptSave(path, 'second');
    console.log(`[concurrent-savers] in-process second saver refused after ${second.elapsedMs.toFixed(1)} ms`);
    expect(second.error).toMatchObject({ name: 'SnapshotError', code: 'IMAGE_LOCKED' });
    expect(second.elapsedMs).toBeLessThan(LOCKED_WITHIN_MS);
    await first.finish();
    await expectCommitted(path, ['first'], data);
  });

  it('refuses a second saver in another process with IMAGE_LOCKED, fast, and the first still commits', async () => {
    const dist = await privateBuild(join(dir.path, 'build'));
    const path = await image();
    const first = await startHeldSave(path, 'first', data);
    const child = spawn(process.execPath, [SAVER_CHILD, dist, path, 'second', String(MiB), '3'], { stdio: ['ignore', 'pipe', 'inherit'] });
    let stdout = '';
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString('utf8')));
    const code = await new Promise<number | null>((resolve) => child.once('close', resolve));
    // kill-saver prints "failed <code> <ms since ready> <message>".
    const failed = /^failed (\S+) ([\d.]+) /m.exec(stdout);
    expect(failed, stdout).not.toBeNull();
    const [, errorCode, elapsedMs] = failed as RegExpExecArray;
    console.log(`[concurrent-savers] second saver process refused ${elapsedMs} ms after start-up`);
    expect(code).toBe(1);
    expect(errorCode).toBe('IMAGE_LOCKED');
    expect(Number(elapsedMs)).toBeLessThan(LOCKED_WITHIN_MS);
    await first.finish();
    await expectCommitted(path, ['first'], data);
  });

  it('refuses to save with IMAGE_LOCKED while a running QEMU has the image attached, writing nothing', async () => {
    const path = await image();
    await withPausedVm({ ramMiB: 32, image: path }, async () => {
      const before = await readFile(path);
      const attempt = await attemptSave(path, 'while-qemu-runs');
      expect(attempt.error).toMatchObject({ name: 'SnapshotError', code: 'IMAGE_LOCKED' });
      expect(String((attempt.error as Error).message)).toMatch(/lock/i);
      expect(attempt.elapsedMs).toBeLessThan(LOCKED_WITHIN_MS);
      expect((await readFile(path)).equals(before)).toBe(true);
    });
    expect((await qemuImg.check(path)).exitCode).toBe(0);
    expect(await qemuImg.snapshotList(path)).toEqual([]);
  });

  it('makes a QEMU started mid-save refuse the image with a lock error, and the save completes cleanly', async () => {
    const path = await image();
    const save = await startHeldSave(path, 'mid-save', data);
    let qemuError: unknown;
    try {
      const vm = await startPausedVm({ ramMiB: 32, image: path });
      await vm.kill(); // reaching this line means QEMU took the image: the assertion below fails
    } catch (err) {
      qemuError = err;
    }
    expect(qemuError, 'QEMU must not start on an image snapstream is writing').toBeInstanceOf(Error);
    // QEMU 7.2: 'Failed to get "write" lock' / 'Is another process using the image [...]?'
    expect(String((qemuError as Error).message)).toMatch(/Failed to get ".*" lock/);
    await save.finish();
    await expectCommitted(path, ['mid-save'], data);
    // With the save done, the locks are gone: QEMU now opens the image and sees the snapshot.
    await withPausedVm({ ramMiB: 32, image: path }, async (vm) => {
      expect(await vm.hmp('info snapshots')).toMatch(/mid-save/);
    });
  });
});
