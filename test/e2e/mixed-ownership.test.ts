/**
 * Mixed ownership: QEMU's own savevm/delvm and snapstream's save/delete take
 * turns on one image. After every step `qemu-img check` is clean; snapstream
 * reuses the space of a QEMU snapshot it deleted, QEMU reuses the space of a
 * snapstream snapshot it deleted (neither file grows by a vmstate), and
 * QEMU's loadvm restores both kinds bit for bit.
 */
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream, openImage } from '../../src/index.js';
import { killAllVms, makeKnownRamStream, makeRandomMemFile, sha256File, withPausedVm } from '../helpers/qemu.js';
import { qemuImg, requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';

const RAM_MIB = 64;
const RAM_BYTES = RAM_MIB << 20;
const skip = requireTool('qemu-system-x86_64', 'qemu-img');

describe.skipIf(skip !== undefined)('QEMU and snapstream taking turns on one image', { timeout: 300_000 }, () => {
  let dir: TmpDir;
  let memFile: string;
  let memHash: string;
  let streamFile: string;
  let streamBytes: number;

  beforeAll(async () => {
    dir = await tmpDir('mixed');
    ({ memFile, memHash, streamFile } = await makeKnownRamStream(dir.path, RAM_MIB, 5150));
    streamBytes = (await stat(streamFile)).size;
  });

  afterAll(async () => {
    await killAllVms();
    await dir?.cleanup();
  });

  const length = async (path: string): Promise<number> => (await stat(path)).size;
  async function clean(path: string, step: string): Promise<void> {
    const check = await qemuImg.check(path);
    expect(check.exitCode, `${step}: ${JSON.stringify(check)}`).toBe(0);
  }
  async function ourDelete(path: string, name: string): Promise<void> {
    const img = await openImage(path);
    try {
      await img.deleteSnapshot(name);
    } finally {
      await img.close();
    }
  }
  async function qemuLoads(path: string, name: string): Promise<string> {
    const loaded = join(dir.path, `loaded-${name}.bin`);
    await makeRandomMemFile(loaded, RAM_BYTES, 99);
    await withPausedVm({ ramMiB: RAM_MIB, memFile: loaded, memShare: true, image: path }, async (vm) => {
      await vm.hmpChecked(`loadvm ${name}`);
    });
    return sha256File(loaded);
  }

  it('stays clean, each reuses the space the other freed, and QEMU loads both', async () => {
    const image = join(dir.path, 'mixed.qcow2');
    await qemuImg.create(image, 512 << 20);

    await withPausedVm({ ramMiB: RAM_MIB, memFile, image }, (vm) => vm.savevm('q1'));
    await clean(image, 'QEMU saved q1');

    await pipeline(createReadStream(streamFile), createSnapshotStream(image, { snapshot: 's1' }));
    await clean(image, 'we saved s1');

    await ourDelete(image, 'q1');
    await clean(image, 'we deleted q1');
    const beforeS2 = await length(image);
    await pipeline(createReadStream(streamFile), createSnapshotStream(image, { snapshot: 's2' }));
    await clean(image, 'we saved s2');
    const ourGrowth = (await length(image)) - beforeS2;
    expect(ourGrowth, 'our save into the space of QEMU\'s deleted snapshot').toBeLessThan(streamBytes / 2);

    const beforeQ2 = await length(image);
    await withPausedVm({ ramMiB: RAM_MIB, memFile, image }, async (vm) => {
      await vm.hmpChecked('delvm s1');
      await vm.savevm('q2');
    });
    await clean(image, 'QEMU deleted s1 and saved q2');
    const qemuGrowth = (await length(image)) - beforeQ2;
    expect(qemuGrowth, 'QEMU\'s save into the space of our deleted snapshot').toBeLessThan(streamBytes / 2);
    console.log(`[mixed] stream ${streamBytes} B; file growth: ours into QEMU's freed space ${ourGrowth} B, QEMU's into ours ${qemuGrowth} B`);

    expect((await qemuImg.snapshotList(image)).map((s) => s.name)).toEqual(['s2', 'q2']);
    expect(await qemuLoads(image, 's2')).toBe(memHash);
    expect(await qemuLoads(image, 'q2')).toBe(memHash);
    await clean(image, 'after both loads');
  });
});
