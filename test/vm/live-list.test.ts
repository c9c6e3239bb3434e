/**
 * `snapstream list DISK --state-image FILE`: disk-only snapshots whose
 * vmstate the state image holds are marked live, the others disk-only (a
 * half left behind, or a plain disk-only snapshot). The disk's snapshots are
 * made by qemu-img; the state image's entry by snapstream's save stream.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { Readable } from 'node:stream';
import { createImage, openImage } from '../../src/index.js';
import { runBin } from '../cli/bin-harness.js';
import { qemuImg, requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';

const skip = requireTool('qemu-img');

describe.skipIf(skip !== undefined)('snapstream list --state-image', () => {
  let dir: TmpDir;
  beforeAll(async () => {
    dir = await tmpDir('live-list');
  });
  afterAll(async () => {
    await dir?.cleanup();
  });

  it('marks the disk-only halves of live snapshots, and the halves with no vmstate anywhere', async () => {
    const disk = join(dir.path, 'disk.qcow2');
    const state = join(dir.path, 'state.qcow2');
    await qemuImg.create(disk, 16 << 20);
    for (const name of ['whole', 'orphan']) await qemuImg.snapshot(disk, 'create', name);
    await createImage(state, { size: 1 << 20 });
    const image = await openImage(state);
    try {
      await pipeline(Readable.from([randomBytes(256 << 10)]), image.createSnapshotStream('whole'));
    } finally {
      await image.close();
    }
    expect((await qemuImg.snapshotList(state)).map((s) => s.name)).toEqual(['whole']);
    const json = await runBin(['list', disk, '--state-image', state, '--json']);
    expect(json.code, json.stderr).toBe(0);
    const rows = JSON.parse(json.stdout.toString()) as Array<{ name: string; live: string | null }>;
    expect(rows.map((r) => [r.name, r.live])).toEqual([
      ['whole', 'live'],
      ['orphan', 'disk-only'],
    ]);
    const table = await runBin(['list', disk, '--state-image', state]);
    expect(table.stdout.toString()).toMatch(/whole .*live \(vmstate in the state image\)/);
    expect(table.stdout.toString()).toMatch(/orphan .*disk-only/);
    const missing = await runBin(['list', disk, '--state-image', join(dir.path, 'none.qcow2')]);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/ENOENT|no such file/i);
  });
});
