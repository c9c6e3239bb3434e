/**
 * Every CLI command against every kind of target (issue 13, "Wrong
 * targets"): a regular file, a block device (a loop device), a character
 * device (/dev/null), a FIFO, stdout ('-') and a full disk (a loop-mounted
 * ext4 filled to 1 MiB). One table row per cell, each with the outcome a
 * user should get: the bytes where they belong (checked with sha256, the
 * independent qcow2 reader and qemu-img), or one coded line and exit 1 —
 * never a hang, never a half-written file, never bytes past the stream lost.
 */
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fillFs, loopFsSkipReason, skipUnlessRan, withLoopFs } from '../helpers/loopfs.js';
import { readSnapshotVmState } from '../helpers/qcow2-vmstate.js';
import { pseudoRandom } from '../helpers/streams.js';
import { qemuImg, requireTool, runOk, tmpDir, type TmpDir } from '../helpers/tools.js';
import { assertBuilt, type BinResult, errLines, REPO_DIR, runBin } from './bin-harness.js';

const MiB = 1 << 20;
const sha256 = (data: Uint8Array): string => createHash('sha256').update(data).digest('hex');
const skip = requireTool('qemu-img', 'qemu-io', 'losetup', 'mkfifo') ?? loopFsSkipReason('ext4');

/** Odd length: the last block is partial, so padding and tails are exercised. */
const DATA = pseudoRandom(3 * MiB + 1234, 77);
const DEVICE_BYTES = 16 * MiB;
const DEVICE_FILL = 0xee;

type Kind = 'file' | 'block' | 'char' | 'fifo' | 'stdout' | 'full';
const KINDS: Kind[] = ['file', 'block', 'char', 'fifo', 'stdout', 'full'];

/** Runs the bin while a reader drains a FIFO (the open would wait for one otherwise). */
async function runWithFifoReader(args: string[], fifo: string): Promise<{ result: BinResult; read: Buffer }> {
  const reading = readFile(fifo);
  const result = await runBin(args);
  return { result, read: await reading };
}

function expectRefused(r: BinResult, code: string, label: string): void {
  expect(r.code, `${label}: ${r.stderr}`).toBe(1);
  expect(errLines(r)[0], label).toMatch(new RegExp(`^snapstream: ${code}: `));
}

describe.skipIf(skip !== undefined)('every command against every target type', () => {
  let dir: TmpDir;
  let n = 0;
  let dataPath: string;
  const fresh = (name: string) => join(dir.path, `${name}-${++n}`);

  beforeAll(async () => {
    assertBuilt();
    dir = await tmpDir('cli-targets');
    dataPath = join(dir.path, 'data.bin');
    writeFileSync(dataPath, DATA);
  });
  afterAll(async () => dir?.cleanup());

  /** A loop device over a 16 MiB file filled with DEVICE_FILL; `fn` gets its path. */
  async function withDevice<T>(fn: (device: string, backing: string) => Promise<T>): Promise<T> {
    const backing = fresh('device.img');
    writeFileSync(backing, Buffer.alloc(DEVICE_BYTES, DEVICE_FILL));
    const device = (await runOk('losetup', ['--find', '--show', backing])).stdout.trim();
    try {
      return await fn(device, backing);
    } finally {
      await runOk('losetup', ['-d', device]).catch(() => undefined);
    }
  }

  /** A qcow2 image holding snapshot 'vm' whose vmstate is DATA, at `path` (a file or a device). */
  async function imageWithSnapshot(path: string): Promise<void> {
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', path, '8M']);
    const r = await runBin(['save', '-q', path, 'vm', dataPath]);
    expect(r.code, r.stderr).toBe(0);
  }

  /** The device's bytes: the stream first, then its owner's bytes untouched (read-modify-write of the last block). */
  function expectOnDevice(backing: string, label: string): void {
    const back = readFileSync(backing);
    expect(sha256(back.subarray(0, DATA.length)), label).toBe(sha256(DATA));
    expect(back.subarray(DATA.length).every((b) => b === DEVICE_FILL), `${label}: bytes past the stream kept`).toBe(true);
  }

  /** `fn(mountDir)` on a filesystem with about 1 MiB free. */
  async function onFullDisk(ctx: { skip(note?: string): never }, fn: (mnt: string) => Promise<void>): Promise<void> {
    skipUnlessRan(
      ctx,
      await withLoopFs({ sizeBytes: 32 * MiB, fsType: 'ext4' }, async (mnt) => {
        await fn(mnt);
      }),
    );
  }

  describe('write', () => {
    const cases: Record<Kind, (ctx: { skip(note?: string): never }) => Promise<void>> = {
      file: async () => {
        const out = fresh('w.raw');
        const r = await runBin(['write', out, dataPath]);
        expect(r.code, r.stderr).toBe(0);
        expect(sha256(readFileSync(out))).toBe(sha256(DATA));
      },
      block: async () =>
        withDevice(async (device, backing) => {
          const r = await runBin(['write', device, dataPath]);
          expect(r.code, r.stderr).toBe(0);
          expectOnDevice(backing, 'write to a block device');
        }),
      char: async () => {
        const r = await runBin(['write', '/dev/null', dataPath]);
        expect(r.code, r.stderr).toBe(0);
        expect(r.stderr).toMatch(/wrote 3\.00 MiB to \/dev\/null \(sequential/);
      },
      fifo: async () => {
        const fifo = fresh('w.fifo');
        await runOk('mkfifo', [fifo]);
        const { result, read } = await runWithFifoReader(['write', fifo, dataPath], fifo);
        expect(result.code, result.stderr).toBe(0);
        expect(sha256(read)).toBe(sha256(DATA)); // unpadded: exactly the stream
      },
      stdout: async () => {
        const r = await runBin(['write', '-', dataPath]);
        expect(r.code, r.stderr).toBe(0);
        expect(sha256(r.stdout)).toBe(sha256(DATA));
        expect(existsSync(join(REPO_DIR, '-'))).toBe(false);
      },
      full: async (ctx) =>
        onFullDisk(ctx, async (mnt) => {
          await fillFs(mnt, MiB);
          const out = join(mnt, 'w.raw');
          expectRefused(await runBin(['write', out, dataPath]), 'ENOSPC', 'write to a full disk');
          expect(existsSync(out), 'the partial file it created is gone').toBe(false);
        }),
    };
    for (const kind of KINDS) it(`to ${kind}`, async (ctx) => cases[kind](ctx));
  });

  describe('export', () => {
    let image: string;
    beforeAll(async () => {
      image = fresh('export.qcow2');
      await imageWithSnapshot(image);
    });
    const cases: Record<Kind, (ctx: { skip(note?: string): never }) => Promise<void>> = {
      file: async () => {
        const out = fresh('x.bin');
        const r = await runBin(['export', image, 'vm', out]);
        expect(r.code, r.stderr).toBe(0);
        expect(sha256(readFileSync(out))).toBe(sha256(DATA));
        expect(errLines(r).at(-1)).toMatch(/^exported snapshot 'vm' \(id 1\) of .*: 3\.00 MiB to /);
      },
      block: async () =>
        withDevice(async (device, backing) => {
          const r = await runBin(['export', image, 'vm', device]);
          expect(r.code, r.stderr).toBe(0);
          expectOnDevice(backing, 'export to a block device');
        }),
      char: async () => {
        const r = await runBin(['export', image, 'vm', '/dev/null']);
        expect(r.code, r.stderr).toBe(0);
        expect(errLines(r).at(-1)).toMatch(/3\.00 MiB to \/dev\/null/);
      },
      fifo: async () => {
        const fifo = fresh('x.fifo');
        await runOk('mkfifo', [fifo]);
        const { result, read } = await runWithFifoReader(['export', image, 'vm', fifo], fifo);
        expect(result.code, result.stderr).toBe(0);
        expect(sha256(read)).toBe(sha256(DATA));
      },
      stdout: async () => {
        const r = await runBin(['export', image, 'vm', '-']);
        expect(r.code, r.stderr).toBe(0);
        expect(sha256(r.stdout)).toBe(sha256(DATA));
      },
      full: async (ctx) =>
        onFullDisk(ctx, async (mnt) => {
          await fillFs(mnt, MiB);
          const out = join(mnt, 'x.bin');
          expectRefused(await runBin(['export', image, 'vm', out]), 'ENOSPC', 'export to a full disk');
          expect(existsSync(out)).toBe(false);
        }),
    };
    for (const kind of KINDS) it(`to ${kind}`, async (ctx) => cases[kind](ctx));
  });

  describe('the image commands (save, list, check, delete) on each kind of IMAGE', () => {
    /** What every image command does on an IMAGE that cannot hold one: one coded line, no hang. */
    async function refusedEverywhere(image: string, code: string): Promise<void> {
      for (const args of [['save', image, 'vm', dataPath], ['list', image], ['check', image], ['delete', image, 'vm'], ['export', image, 'vm', fresh('o')]]) {
        expectRefused(await runBin(args, { timeoutMs: 20_000 }), code, args.join(' '));
      }
    }

    /** save, list, check, export and delete all work on a qcow2 image at `path`. */
    async function allWork(path: string): Promise<void> {
      await imageWithSnapshot(path);
      expect(sha256(await readSnapshotVmState(path, 'vm'))).toBe(sha256(DATA));
      const list = await runBin(['list', path]);
      expect(list.code, list.stderr).toBe(0);
      expect(list.stdout.toString()).toMatch(/\bvm\b/);
      expect((await runBin(['check', path])).code).toBe(0);
      expect((await runBin(['delete', '-q', path, 'vm'])).code).toBe(0);
      expect(await qemuImg.snapshotList(path)).toEqual([]);
      expect((await qemuImg.check(path)).exitCode).toBe(0);
    }

    it('a regular file: all work', async () => allWork(fresh('img.qcow2')));
    it('a block device: all work', async () => withDevice(async (device) => allWork(device)));
    it('a character device: EINVAL, before any open', async () => refusedEverywhere('/dev/null', 'EINVAL'));
    it('a FIFO: EINVAL at once (an open would wait for a writer)', async () => {
      const fifo = fresh('img.fifo');
      await runOk('mkfifo', [fifo]);
      await refusedEverywhere(fifo, 'EINVAL');
    });
    it("'-' is a file name for IMAGE, not stdout: ENOENT when there is none", async () => {
      const r = await runBin(['list', '-']);
      expectRefused(r, 'ENOENT', 'list -');
    });
    it('a full disk: save fails with ENOSPC and leaves the image as it was; list and check still work', async (ctx) =>
      onFullDisk(ctx, async (mnt) => {
        const image = join(mnt, 'img.qcow2');
        await imageWithSnapshot(image);
        const size = statSync(image).size;
        await fillFs(mnt, MiB);
        expectRefused(await runBin(['save', image, 'big', dataPath]), 'ENOSPC', 'save on a full disk');
        expect(statSync(image).size).toBe(size);
        expect((await qemuImg.snapshotList(image)).map((s) => s.name)).toEqual(['vm']);
        expect((await qemuImg.check(image)).exitCode).toBe(0);
        expect((await runBin(['list', image])).code).toBe(0);
        expect((await runBin(['check', image])).code).toBe(0);
        const del = await runBin(['delete', '-q', image, 'vm']);
        // A delete writes fresh metadata: it completes, or fails whole.
        if (del.code !== 0) expectRefused(del, 'ENOSPC', 'delete on a full disk');
        expect((await qemuImg.check(image)).exitCode).toBe(0);
      }),
    );
  });
});
