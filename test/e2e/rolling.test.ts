/**
 * Rolling snapshots, ours against QEMU's own, in the same test: save a new
 * snapshot of a 128 MiB-RAM VM, delete the previous one, CYCLES times, on
 * 1 GiB images.
 *
 *   - QEMU: a paused VM whose RAM comes from a random file runs savevm/delvm
 *     on its own image.
 *   - snapstream: that VM's migration stream (the same format savevm writes)
 *     saved with createSnapshotStream, the previous snapshot deleted with
 *     deleteSnapshot.
 *
 * After every cycle both images pass `qemu-img check`. At the end our file's
 * allocated bytes (stat blocks) are at most 1.25x QEMU's and its length at
 * most 1.5x, and QEMU's loadvm of our newest snapshot restores the RAM bit
 * for bit. CI runs 12 cycles (ROLLING_CYCLES overrides).
 */
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream, openImage } from '../../src/index.js';
import { killAllVms, makeKnownRamStream, makeRandomMemFile, sha256File, startPausedVm, withPausedVm } from '../helpers/qemu.js';
import { qemuImg, requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';

const RAM_MIB = 128;
const RAM_BYTES = RAM_MIB << 20;
const IMAGE_BYTES = 1 << 30;
const CYCLES = Number(process.env.ROLLING_CYCLES ?? 12);
const skip = requireTool('qemu-system-x86_64', 'qemu-img');

interface Figures {
  cycle: number;
  lengthBytes: number;
  allocatedBytes: number;
}

async function figures(path: string, cycle: number): Promise<Figures> {
  const st = await stat(path);
  return { cycle, lengthBytes: st.size, allocatedBytes: st.blocks * 512 };
}

const mib = (bytes: number): string => `${(bytes / 2 ** 20).toFixed(1)} MiB`;

describe.skipIf(skip !== undefined)('rolling snapshots against QEMU savevm/delvm', { timeout: 600_000 }, () => {
  let dir: TmpDir;
  let memFile: string;
  let memHash: string;
  let streamFile: string;

  beforeAll(async () => {
    dir = await tmpDir('rolling');
    ({ memFile, memHash, streamFile } = await makeKnownRamStream(dir.path, RAM_MIB, 1010));
  });

  afterAll(async () => {
    await killAllVms();
    await dir?.cleanup();
  });

  it(`keeps the file within 1.5x and the allocation within 1.25x of QEMU's over ${CYCLES} cycles, clean after each`, async () => {
    const ours = join(dir.path, 'ours.qcow2');
    const theirs = join(dir.path, 'qemu.qcow2');
    await qemuImg.create(ours, IMAGE_BYTES);
    await qemuImg.create(theirs, IMAGE_BYTES);
    const ourFigures: Figures[] = [];
    const qemuFigures: Figures[] = [];

    const vm = await startPausedVm({ ramMiB: RAM_MIB, memFile, image: theirs });
    try {
      for (let cycle = 1; cycle <= CYCLES; cycle++) {
        await vm.savevm(`s${cycle}`);
        if (cycle > 1) await vm.hmpChecked(`delvm s${cycle - 1}`);
        // (qemu-img check -U of an image QEMU has open sees its unflushed caches as leaks: checked after quit.)
        qemuFigures.push(await figures(theirs, cycle));
      }
    } finally {
      await vm.quit();
    }
    expect((await qemuImg.check(theirs)).exitCode, "QEMU's own image").toBe(0);

    for (let cycle = 1; cycle <= CYCLES; cycle++) {
      await pipeline(createReadStream(streamFile), createSnapshotStream(ours, { snapshot: `s${cycle}` }));
      if (cycle > 1) {
        const img = await openImage(ours);
        try {
          await img.deleteSnapshot(`s${cycle - 1}`);
        } finally {
          await img.close();
        }
      }
      const check = await qemuImg.check(ours);
      expect(check.exitCode, `our image after cycle ${cycle}: ${JSON.stringify(check)}`).toBe(0);
      ourFigures.push(await figures(ours, cycle));
    }

    const table = ourFigures.map((o, i) => {
      const q = qemuFigures[i]!;
      return `cycle ${o.cycle}: ours ${mib(o.lengthBytes)} long, ${mib(o.allocatedBytes)} allocated; QEMU ${mib(q.lengthBytes)}, ${mib(q.allocatedBytes)}`;
    });
    console.log(`[rolling] ${RAM_MIB} MiB RAM, stream ${mib((await stat(streamFile)).size)}\n${table.join('\n')}`);
    const lastOurs = ourFigures[ourFigures.length - 1]!;
    const lastQemu = qemuFigures[qemuFigures.length - 1]!;
    expect(lastOurs.allocatedBytes).toBeLessThanOrEqual(1.25 * lastQemu.allocatedBytes);
    expect(lastOurs.lengthBytes).toBeLessThanOrEqual(1.5 * lastQemu.lengthBytes);
    // Bounded, not merely small at the end: no cycle grows past the bound either.
    const maxQemuLength = Math.max(...qemuFigures.map((f) => f.lengthBytes));
    for (const f of ourFigures) expect(f.lengthBytes, `cycle ${f.cycle}`).toBeLessThanOrEqual(1.5 * maxQemuLength);

    const snapshots = await qemuImg.snapshotList(ours);
    expect(snapshots.map((s) => s.name)).toEqual([`s${CYCLES}`]);
    const loaded = join(dir.path, 'loaded.bin');
    await makeRandomMemFile(loaded, RAM_BYTES, 2020);
    await withPausedVm({ ramMiB: RAM_MIB, memFile: loaded, memShare: true, image: ours }, async (vm2) => {
      await vm2.hmpChecked(`loadvm s${CYCLES}`);
    });
    expect(await sha256File(loaded)).toBe(memHash);
  });
});
