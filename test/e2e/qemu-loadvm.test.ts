/**
 * End to end with real QEMU: a paused VM whose RAM is a known random file
 * sends its migration stream; snapstream saves it as an internal snapshot of
 * the VM's qcow2 image; a second QEMU, with other RAM, runs `loadvm` and must
 * end up with the original RAM, byte for byte.
 */
import { createReadStream } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, createSnapshotStream, openImage } from '../../src/index.js';
import { killAllVms, makeKnownRamStream, makeRandomMemFile, sha256File, withPausedVm } from '../helpers/qemu.js';
import { sha256OfFile } from '../helpers/streams.js';
import { qemuImg, qemuIo, requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';

const RAM_MIB = 64;
const RAM_BYTES = RAM_MIB << 20;
const skip = requireTool('qemu-system-x86_64', 'qemu-img', 'qemu-io');
const BIN = join(import.meta.dirname, '../../bin/snapstream.js');

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

describe.skipIf(skip !== undefined)('QEMU loadvm of a migration stream saved by snapstream', { timeout: 120_000 }, () => {
  let dir: TmpDir;
  let memFile: string;
  let streamFile: string;
  let memHash: string;

  beforeAll(async () => {
    dir = await tmpDir('e2e-loadvm');
    // VM A: known RAM, no drive (it must not hold the image we save into).
    ({ memFile, memHash, streamFile } = await makeKnownRamStream(dir.path, RAM_MIB, 4242, 'migration.bin'));
  });

  afterAll(async () => {
    await killAllVms();
    await dir?.cleanup();
  });

  async function loadInFreshVm(image: string, name: string): Promise<string> {
    const loaded = join(dir.path, `loaded-${name}.bin`);
    await makeRandomMemFile(loaded, RAM_BYTES, 777); // other RAM, so a no-op load cannot pass
    expect(await sha256File(loaded)).not.toBe(memHash);
    // share=on: loadvm's writes to guest RAM land in the file, which is then compared whole.
    await withPausedVm({ ramMiB: RAM_MIB, memFile: loaded, memShare: true, image }, async (vm) => {
      await vm.hmpChecked(`loadvm ${name}`);
    });
    return sha256File(loaded);
  }

  it('restores the guest RAM exactly from a snapshot written by createSnapshotStream into a qemu-img image', async () => {
    const image = join(dir.path, 'qemu-made.qcow2');
    await qemuImg.create(image, 256 << 20);
    await qemuIo(image, ['write -P 0xab 0 4M']);
    const out = createSnapshotStream(image, { snapshot: 'from-migration', vmClockNs: 123_456_789 });
    await pipeline(createReadStream(streamFile), out);
    expect(out.direct).toBe(true);
    await qemuIo(image, ['write -P 0xcd 0 4M']); // the disk moves on after the save

    const check = await qemuImg.check(image);
    expect(check.exitCode, JSON.stringify(check)).toBe(0);
    const [entry] = await qemuImg.snapshotList(image);
    expect(entry).toMatchObject({ name: 'from-migration', vmStateSize: (await readFile(streamFile)).length });

    const img = await openImage(image, { readOnly: true });
    try {
      const exported = join(dir.path, 'exported.bin');
      await pipeline(img.createVmStateReadStream('from-migration'), (await import('node:fs')).createWriteStream(exported));
      expect(await sha256OfFile(exported)).toBe(await sha256OfFile(streamFile));
    } finally {
      await img.close();
    }

    expect(await loadInFreshVm(image, 'from-migration')).toBe(memHash);
    // loadvm also reverted the disk to its state at the save.
    await qemuIo(image, ['read -P 0xab 0 4M']);
    expect((await qemuImg.check(image)).exitCode).toBe(0);
  });

  it('restores the guest RAM when QEMU migrates straight into `snapstream save` through exec:, into an image made by createImage', async () => {
    const image = join(dir.path, 'ours.qcow2');
    await createImage(image, { size: 128 << 20 });
    const done = join(dir.path, 'saver.exit');
    await withPausedVm({ ramMiB: RAM_MIB, memFile }, async (vm) => {
      await vm.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 2 ** 40 });
      const saver = `${shellQuote(process.execPath)} ${shellQuote(BIN)} save --quiet ${shellQuote(image)} piped -`;
      await vm.qmp.execute('migrate', { uri: `exec:${saver} 2>${shellQuote(done)}.err; echo $? > ${shellQuote(done)}` });
      for (let i = 0; i < 600; i++) {
        const status = (await vm.qmp.execute<{ status: string }>('query-migrate')).status;
        if (status === 'completed') break;
        if (status === 'failed') throw new Error('migration failed');
        await sleep(100);
      }
    });
    // QEMU reports completion when it has written the stream; the saver commits after.
    let code = '';
    for (let i = 0; i < 300 && code === ''; i++) {
      code = (await readFile(done, 'utf8').catch(() => '')).trim();
      if (code === '') await sleep(100);
    }
    expect(code, await readFile(`${done}.err`, 'utf8').catch(() => '')).toBe('0');
    expect((await qemuImg.check(image)).exitCode).toBe(0);
    expect((await qemuImg.snapshotList(image)).map((s) => s.name)).toEqual(['piped']);
    expect(await loadInFreshVm(image, 'piped')).toBe(memHash);
  });
});
