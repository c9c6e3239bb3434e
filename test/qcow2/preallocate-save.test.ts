/**
 * createSnapshotStream(image, { snapshot, preallocate: 'space', expectedSize }):
 * the vmstate run and its metadata are reserved before the first byte, so a
 * full disk fails at once with the image untouched, and whatever a shorter
 * stream leaves unused is given back after the commit.
 */
import { createHash } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, createSnapshotStream } from '../../src/index.js';
import { Skipped, withLoopFs } from '../helpers/loopfs.js';
import { qemuImg, qemuIo } from '../helpers/tools.js';
import { qemuMissing, Workdir } from './fixtures.js';

const MiB = 1 << 20;
const CHUNK_BYTES = 64 * 1024;

/** `bytes` of vmstate in 64 KiB chunks; `pulled` counts what the stream took. */
function source(bytes: number): { readable: Readable; pulled: () => number } {
  let pulled = 0;
  const chunk = Buffer.alloc(CHUNK_BYTES, 0x3c);
  const readable = Readable.from(
    (function* () {
      for (; pulled < bytes; ) {
        pulled += CHUNK_BYTES;
        yield chunk;
      }
    })(),
  );
  return { readable, pulled: () => pulled };
}

async function sha256(path: string): Promise<string> {
  return createHash('sha256').update(await readFile(path)).digest('hex');
}

describe.skipIf(qemuMissing)("qcow2 save with preallocate: 'space'", () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-prealloc-save');
  });
  afterAll(async () => work.cleanup());

  it('gives back the unused reservation after the commit: no leaks, the file ends at the last cluster', async () => {
    const path = work.path('short');
    await createImage(path, { size: 64 * MiB });
    await qemuIo(path, ['write -P 0x11 0 1M']);
    const { readable } = source(10 * MiB);
    await pipeline(readable, createSnapshotStream(path, { snapshot: 's1', preallocate: 'space', expectedSize: 200 * MiB }));
    const check = await qemuImg.check(path);
    expect(check.exitCode, JSON.stringify(check)).toBe(0);
    expect(check.leaks ?? 0).toBe(0);
    expect((await stat(path)).size).toBe(check['image-end-offset']);
    expect((await qemuImg.snapshotList(path)).map((s) => [s.name, s.vmStateSize])).toEqual([['s1', 10 * MiB]]);
    await qemuIo(path, ['read -P 0x11 0 1M']);
  });

  it('commits a stream of exactly expectedSize cleanly (4 KiB clusters: many vmstate L2 tables)', async () => {
    const path = work.path('exact');
    await createImage(path, { size: 1536 * MiB, clusterSize: 4096 });
    const { readable } = source(24 * MiB);
    await pipeline(readable, createSnapshotStream(path, { snapshot: 'x', preallocate: 'space', expectedSize: 24 * MiB }));
    const check = await qemuImg.check(path);
    expect([check.exitCode, check.leaks ?? 0]).toEqual([0, 0]);
    expect((await stat(path)).size).toBe(check['image-end-offset']);
  });

  it('fails at once with ENOSPC on a full filesystem: no input consumed past the buffers, the image byte-identical', async (ctx) => {
    const result = await withLoopFs({ sizeBytes: 64 * MiB, fsType: 'ext4' }, async (dir) => {
      const path = join(dir, 'disk.qcow2');
      await createImage(path, { size: 32 * MiB });
      await qemuIo(path, ['write -P 0x77 0 2M']);
      await qemuImg.snapshot(path, 'create', 'before');
      const before = await sha256(path);
      const sizeBefore = (await stat(path)).size;
      const { readable, pulled } = source(1024 * MiB);
      const out = createSnapshotStream(path, { snapshot: 'big', preallocate: 'space', expectedSize: 1024 * MiB });
      await expect(pipeline(readable, out)).rejects.toMatchObject({ code: 'ENOSPC' });
      // Writable's 256 KiB high-water mark plus the generator's look-ahead; nothing reached the ring.
      expect(pulled()).toBeLessThanOrEqual(1 * MiB);
      expect(out.bytesWritten).toBe(0);
      expect((await stat(path)).size).toBe(sizeBefore);
      expect(await sha256(path)).toBe(before);
      const check = await qemuImg.check(path);
      expect(check.exitCode, JSON.stringify(check)).toBe(0);
      expect((await qemuImg.snapshotList(path)).map((s) => s.name)).toEqual(['before']);
    });
    if (result instanceof Skipped) ctx.skip(result.reason);
  });
});
