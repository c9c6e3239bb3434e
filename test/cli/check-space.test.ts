/**
 * `snapstream check` reports the space, through the real bin: file length,
 * allocated bytes, free clusters (and those still holding data), and the
 * unreferenced clusters past the image end that an interrupted save leaves.
 * The figures are checked against qemu-img check's image-end-offset and
 * stat, and against the next write, which gives that space back.
 */
import { appendFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream, openImage } from '../../src/index.js';
import { pseudoRandom } from '../helpers/streams.js';
import { qemuImg, requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';
import { runBin } from './bin-harness.js';

const MiB = 1 << 20;
const skip = requireTool('qemu-img');

interface Space {
  fileLengthBytes: number;
  allocatedBytes: number;
  freeBytes: number;
  freeDataBytes: number;
  pastEndBytes: number;
  pastEndDataBytes: number;
}

async function checkJson(image: string): Promise<{ imageEndOffset: number; space: Space }> {
  const r = await runBin(['check', '--json', image]);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout.toString('utf8')) as { imageEndOffset: number; space: Space };
}

describe.skipIf(skip !== undefined)('snapstream check: space', () => {
  let dir: TmpDir;
  beforeAll(async () => {
    dir = await tmpDir('cli-check-space');
  });
  afterAll(async () => dir.cleanup());

  it('reports the bytes an interrupted save left past the image end, and the next write gives them back', async () => {
    const image = join(dir.path, 'img.qcow2');
    await qemuImg.create(image, 64 * MiB);
    await pipeline(Readable.from([pseudoRandom(3 * MiB, 1)]), createSnapshotStream(image, { snapshot: 'one' }));
    // What a saver killed in its data phase leaves: vmstate bytes past the last cluster in use.
    appendFileSync(image, pseudoRandom(8 * MiB, 2));

    const qemu = await qemuImg.check(image);
    expect(qemu.exitCode).toBe(0);
    const { space, imageEndOffset } = await checkJson(image);
    expect(imageEndOffset).toBe(qemu['image-end-offset']);
    const st = statSync(image);
    expect(space.fileLengthBytes).toBe(st.size);
    expect(space.allocatedBytes).toBe(st.blocks * 512);
    expect(space.pastEndBytes).toBe(st.size - qemu['image-end-offset']!);
    expect(space.pastEndBytes).toBeGreaterThanOrEqual(8 * MiB);
    expect(space.pastEndDataBytes).toBeGreaterThanOrEqual(8 * MiB);

    const text = { stdout: (await runBin(['check', image])).stdout.toString('utf8') };
    expect(text.stdout).toMatch(/No errors were found/);
    expect(text.stdout).toMatch(new RegExp(`${space.pastEndBytes} bytes past the image end, unreferenced \\(${space.pastEndDataBytes} holding data\\)`));
    expect(text.stdout).toMatch(new RegExp(`file length ${st.size} bytes, ${st.blocks * 512} allocated on disk`));

    // The next write of an image opened for writing (here a delete) gives that space back first.
    const img = await openImage(image);
    await img.deleteSnapshot('one');
    await img.close();
    const after = await checkJson(image);
    expect(after.space.pastEndBytes).toBe(0);
    expect(after.space.fileLengthBytes).toBe((await qemuImg.check(image))['image-end-offset']);
  });

  it('reports the free clusters a delete left, none of them still holding data, and allocation below the length', async () => {
    const image = join(dir.path, 'holes.qcow2');
    await qemuImg.create(image, 64 * MiB);
    const a = pseudoRandom(4 * MiB, 3);
    await pipeline(Readable.from([a]), createSnapshotStream(image, { snapshot: 'a' }));
    await pipeline(Readable.from([pseudoRandom(MiB, 4)]), createSnapshotStream(image, { snapshot: 'b' }));
    const img = await openImage(image);
    await img.deleteSnapshot('a');
    await img.close();
    const clean = await checkJson(image);
    expect(clean.space.freeBytes).toBeGreaterThanOrEqual(4 * MiB);
    expect(clean.space.freeDataBytes).toBe(0);
    // The allocation follows the data: the hole is punched.
    expect(clean.space.allocatedBytes).toBeLessThan(clean.space.fileLengthBytes - 3 * MiB);
  });
});
