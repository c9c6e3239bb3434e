/**
 * A save that runs out of room, for real: a small loop-mounted ext4 that
 * fills up (ENOSPC), and a file-size limit (RLIMIT_FSIZE, EFBIG). Each must
 * fail with that code, and afterwards the image must mean exactly what it
 * meant before (DESIGN.md "Failure": at most leaked clusters): qemu-img check
 * finds no corruption, the guest data reads back, the earlier snapshot is
 * unchanged, and no new snapshot appears.
 */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as api from '../../src/index.js';
import { SnapshotError } from '../../src/index.js';
import { fillFs, skipUnlessRan, withLoopFs } from '../helpers/loopfs.js';
import { qemuImg, qemuIo, requireTool, tmpDir, type SnapshotListEntry, type TmpDir } from '../helpers/tools.js';
import { privateBuild, REPO } from './private-build.js';

const MiB = 1 << 20;
const VMSTATE_BYTES = 32 * MiB;
const execFileAsync = promisify(execFile);
const skip = requireTool('qemu-img', 'qemu-io');

let dir: TmpDir;
beforeAll(async () => {
  if (skip === undefined) dir = await tmpDir('full-disk-save');
});
afterAll(async () => {
  await dir?.cleanup();
});

/** An image with guest data and one snapshot ('s1'), as qemu-img and qemu-io make it. */
async function makeImage(path: string): Promise<void> {
  await qemuImg.create(path, 256 * MiB, { cluster_size: 65536 });
  await qemuIo(path, ['write -P 0xab 0 2M', 'write -P 0xcd 64M 1M']);
  await qemuImg.snapshot(path, 'create', 's1');
  await qemuIo(path, ['write -P 0xef 0 64k']);
}

async function expectMeansWhatItDid(path: string, snapshotsBefore: SnapshotListEntry[]): Promise<void> {
  const check = await qemuImg.check(path);
  expect(check.corruptions ?? 0, JSON.stringify(check)).toBe(0);
  expect([0, 3]).toContain(check.exitCode); // clean, or leaked clusters only
  await qemuIo(path, ['read -P 0xef 0 64k', 'read -P 0xab 64k 1984k', 'read -P 0xcd 64M 1M', 'read -P 0 96M 64k']);
  expect(await qemuImg.snapshotList(path)).toEqual(snapshotsBefore);
}

/** The public save path: `createSnapshotStream(image, { snapshot })`. */
async function save(path: string, name: string, bytes: number): Promise<unknown> {
  const chunk = Buffer.alloc(MiB, 0x6b);
  const source = Readable.from(
    (function* () {
      for (let sent = 0; sent < bytes; sent += MiB) yield chunk;
    })(),
  );
  return pipeline(source, api.createSnapshotStream(path, { snapshot: name }));
}

describe.skipIf(skip !== undefined)('a save that runs out of room', () => {
  it('fails with ENOSPC on a full filesystem and leaves the image meaning what it did', async (ctx) => {
    const result = await withLoopFs({ sizeBytes: 64 * MiB, fsType: 'ext4' }, async (mnt) => {
      const path = join(mnt, 'disk.qcow2');
      await makeImage(path);
      const before = await qemuImg.snapshotList(path);
      await fillFs(mnt, 8 * MiB); // room for a quarter of the vmstate
      const err = await save(path, 'full', VMSTATE_BYTES).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(SnapshotError);
      expect((err as SnapshotError).code).toBe('ENOSPC');
      await expectMeansWhatItDid(path, before);
    });
    skipUnlessRan(ctx, result);
  });

  it('fails with EFBIG under RLIMIT_FSIZE and leaves the image meaning what it did', async () => {
    const path = join(dir.path, 'disk.qcow2');
    await makeImage(path);
    const before = await qemuImg.snapshotList(path);
    const { size } = await import('node:fs/promises').then((fs) => fs.stat(path));
    const dist = await privateBuild(join(dir.path, 'private'));
    // ulimit -f counts 1024-byte blocks. SIGXFSZ is ignored so write(2) returns
    // EFBIG instead of killing the process (node ignores it already; the trap
    // makes the test independent of that).
    const limitBlocks = Math.ceil((size + 4 * MiB) / 1024);
    const child = join(REPO, 'test/reliability/fixtures/save-child.mjs');
    const script = `trap '' XFSZ; ulimit -f ${limitBlocks}; exec "$0" "$@"`;
    const { stdout } = await execFileAsync('bash', ['-c', script, process.execPath, child, dist, path, 'big', String(VMSTATE_BYTES)], {
      timeout: 60_000,
    });
    const outcome = JSON.parse(stdout) as { ok: boolean; code: string | null; message: string };
    expect(outcome.ok, outcome.message).toBe(false);
    expect(outcome.code, outcome.message).toBe('EFBIG');
    await expectMeansWhatItDid(path, before);
  });
});
