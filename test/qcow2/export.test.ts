/**
 * Export: Image#createVmStateReadStream reads a snapshot's vmstate back byte
 * for byte, aligned, through its own O_DIRECT descriptor with read-ahead.
 * Oracles: QEMU's own savevm, and the independent reader in
 * test/helpers/qcow2-vmstate.ts.
 */
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream } from '../../src/index.js';
import { openImage, type Image } from '../../src/qcow2/image.js';
import { readSnapshotVmState, vmStateLayout } from '../helpers/qcow2-vmstate.js';
import { rootSkipReason, skipUnlessRan, Skipped, withRamfs } from '../helpers/loopfs.js';
import { pseudoRandom, sha256 } from '../helpers/streams.js';
import { qemuImg, requireTool, runOk, run } from '../helpers/tools.js';
import { be64, qemuMissing, readBytes, patchBytes, Workdir } from './fixtures.js';

const MiB = 1024 * 1024;
/** Linux x86_64 open flag, as /proc/self/fdinfo prints it (octal). */
const O_DIRECT = 0o40000;
const qemuSystemMissing = requireTool('qemu-system-x86_64', 'qemu-img');

async function collect(stream: Readable): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const chunk of stream) parts.push(chunk as Buffer);
  return Buffer.concat(parts);
}

/** Saves `data` as snapshot `name` through the public write path (createSnapshotStream(img, { snapshot })). */
async function saveOurs(path: string, name: string, data: Buffer): Promise<void> {
  const pieces = [];
  for (let pos = 0; pos < data.length; pos += 64 * 1024 + 7) pieces.push(data.subarray(pos, pos + 64 * 1024 + 7));
  await pipeline(Readable.from(pieces, { objectMode: true }), createSnapshotStream(path, { snapshot: name }));
}

async function exportAll(path: string, name: string, options: Parameters<Image['createVmStateReadStream']>[1] = {}): Promise<Buffer> {
  const img = await openImage(path, { readOnly: true });
  try {
    return await collect(img.createVmStateReadStream(name, options));
  } finally {
    await img.close();
  }
}

/** Descriptors of this process open on `path`, with their open flags. */
function fdsOn(path: string): { fd: string; flags: number }[] {
  const out: { fd: string; flags: number }[] = [];
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`) !== path) continue;
      const info = readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
      out.push({ fd, flags: parseInt(/flags:\s+([0-7]+)/.exec(info)?.[1] ?? '0', 8) });
    } catch {
      // closed meanwhile
    }
  }
  return out;
}

describe.skipIf(qemuMissing)('qcow2 export: createVmStateReadStream', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-export');
  });
  afterAll(async () => work?.cleanup());

  for (const clusterSize of [512, 4096, 65536, 2 * MiB]) {
    const sizes = [1, clusterSize - 1, clusterSize + 1, 5 * MiB + 12345];
    it(`reads back our own snapshots byte for byte (cluster ${clusterSize}; sizes ${sizes.join(', ')})`, async () => {
      const path = await work.image({ sizeBytes: 16 * MiB, clusterSize });
      const data = sizes.map((size, i) => pseudoRandom(size, clusterSize + i));
      for (const [i, d] of data.entries()) await saveOurs(path, `s${i}`, d);
      for (const [i, d] of data.entries()) {
        expect(sha256(await readSnapshotVmState(path, `s${i}`)), `oracle, size ${d.length}`).toBe(sha256(d));
        expect(sha256(await exportAll(path, `s${i}`)), `export, size ${d.length}`).toBe(sha256(d));
      }
      // Small chunks (many per run) and deep read-ahead take other paths through the same bytes.
      const big = data[data.length - 1]!;
      expect(sha256(await exportAll(path, `s${sizes.length - 1}`, { chunkBytes: 4096, readAhead: 5 }))).toBe(sha256(big));
      expect(sha256(await exportAll(path, `s${sizes.length - 1}`, { readAhead: 1, direct: false }))).toBe(sha256(big));
    });
  }

  it('refuses to export a disk-only snapshot (qemu-img snapshot -c) with SNAPSHOT_DISK_ONLY, naming it', async () => {
    const path = await work.image({ sizeBytes: 16 * MiB });
    await qemuImg.snapshot(path, 'create', 'disk-only');
    expect((await qemuImg.snapshotList(path)).map((s) => [s.name, s.vmStateSize])).toEqual([['disk-only', 0]]);
    const img = await openImage(path, { readOnly: true });
    try {
      expect(() => img.createVmStateReadStream('disk-only')).toThrow(expect.objectContaining({ code: 'SNAPSHOT_DISK_ONLY' }));
      expect(() => img.createVmStateReadStream('disk-only')).toThrow(/snapshot 'disk-only' \(id 1\) of '.+' is disk-only/);
    } finally {
      await img.close();
    }
  });

  it('refuses bad options synchronously, naming the option', async () => {
    const path = await work.image({ sizeBytes: 16 * MiB });
    await saveOurs(path, 'a', pseudoRandom(1000, 1));
    const img = await openImage(path, { readOnly: true });
    try {
      expect(() => img.createVmStateReadStream('a', { chunkBytes: 1.5 })).toThrow(TypeError);
      expect(() => img.createVmStateReadStream('a', { chunkBytes: 1024 })).toThrow(/options\.chunkBytes/);
      expect(() => img.createVmStateReadStream('a', { readAhead: 0 })).toThrow(RangeError);
      expect(() => img.createVmStateReadStream('a', { readAhead: 0 })).toThrow(/options\.readAhead/);
      expect(() => img.createVmStateReadStream('a', { direct: 'yes' as never })).toThrow(/options\.direct/);
    } finally {
      await img.close();
    }
  });

  it('uses O_DIRECT on the build disk, visible in /proc/self/fdinfo of its own descriptor', async () => {
    const path = await work.image({ sizeBytes: 16 * MiB });
    const data = pseudoRandom(12 * MiB + 3, 2);
    await saveOurs(path, 'd', data);
    const img = await openImage(path, { readOnly: true });
    try {
      const stream = img.createVmStateReadStream('d', { chunkBytes: MiB, direct: true });
      let seen: { fd: string; flags: number }[] = [];
      const parts: Buffer[] = [];
      stream.on('data', (chunk: Buffer) => {
        if (parts.length === 0) seen = fdsOn(path); // synchronously, while the stream holds its descriptor
        parts.push(chunk);
      });
      await new Promise((resolve, reject) => stream.once('end', resolve).once('error', reject));
      expect(sha256(parts)).toBe(sha256(data));
      expect(stream.direct).toBe(true);
      expect(seen.length).toBe(2); // the image's metadata descriptor, and the reader's
      expect(seen.filter((f) => (f.flags & O_DIRECT) !== 0).length).toBe(1);
    } finally {
      await img.close();
    }
  });

  it("falls back to the page cache where O_DIRECT is refused (direct 'auto'), and refuses direct: true there", async (ctx) => {
    const result = await withRamfs(async (dir) => {
      const path = join(dir, 'img.qcow2');
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', path, '16M']);
      const data = pseudoRandom(3 * MiB + 5, 3);
      await saveOurs(path, 'r', data);
      const img = await openImage(path, { readOnly: true });
      try {
        const stream = img.createVmStateReadStream('r');
        expect(sha256(await collect(stream))).toBe(sha256(data));
        expect(stream.direct).toBe(false);
        await expect(collect(img.createVmStateReadStream('r', { direct: true }))).rejects.toMatchObject({
          code: 'DIRECT_IO_UNSUPPORTED',
        });
      } finally {
        await img.close();
      }
    });
    skipUnlessRan(ctx, result);
  });

  it('works on tmpfs (/dev/shm) with the default direct: auto', async () => {
    const dir = join('/dev/shm', `snapstream-export-${process.pid}`);
    await mkdir(dir, { recursive: true });
    try {
      const path = join(dir, 'img.qcow2');
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', path, '16M']);
      const data = pseudoRandom(2 * MiB + 77, 4);
      await saveOurs(path, 't', data);
      expect(sha256(await exportAll(path, 't'))).toBe(sha256(data));
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('leaves no open descriptor when destroyed mid-stream, and none after an error', async () => {
    const path = await work.image({ sizeBytes: 16 * MiB });
    await saveOurs(path, 'x', pseudoRandom(20 * MiB, 5));
    const img = await openImage(path, { readOnly: true });
    try {
      const before = readdirSync('/proc/self/fd').length;
      for (let i = 0; i < 5; i++) {
        const stream = img.createVmStateReadStream('x', { chunkBytes: MiB, readAhead: 4 });
        await new Promise<void>((resolve) => {
          stream.once('data', () => {
            stream.destroy(); // reads of later chunks are in flight now
            resolve();
          });
        });
        await new Promise((resolve) => stream.once('close', resolve));
      }
      expect(readdirSync('/proc/self/fd').length).toBe(before);
      expect(fdsOn(path).length).toBe(1);
    } finally {
      await img.close();
    }
  });

  it('refuses a compressed vmstate cluster with QCOW2_UNSUPPORTED and emits the error once', async () => {
    const path = await work.image({ sizeBytes: 16 * MiB });
    await saveOurs(path, 'c', pseudoRandom(3 * 65536, 6));
    const layout = await vmStateLayout(path, 'c');
    const l1Index = layout.vmStateGuestOffset / (layout.clusterSize * (layout.clusterSize / 8));
    const l1Entry = (await readBytes(path, layout.snapshot.l1TableOffset + 8 * l1Index, 8)).readBigUInt64BE(0);
    const l2Offset = Number(l1Entry & 0x00ff_ffff_ffff_fe00n);
    // Entry 1 becomes a compressed descriptor (bit 62) of one sector at the cluster's old offset.
    await patchBytes(path, l2Offset + 8, be64((1n << 62n) | BigInt(layout.hostClusters[1]!)));
    const img = await openImage(path, { readOnly: true });
    try {
      const stream = img.createVmStateReadStream('c', { chunkBytes: 65536 });
      const errors: Error[] = [];
      stream.on('error', (err) => errors.push(err));
      stream.resume();
      await new Promise((resolve) => stream.once('close', resolve));
      expect(errors).toHaveLength(1);
      expect(errors[0]).toMatchObject({ code: 'QCOW2_UNSUPPORTED' });
      expect(fdsOn(path).length).toBe(1);
    } finally {
      await img.close();
    }
  });
});

describe.skipIf(qemuSystemMissing)('qcow2 export of snapshots written by QEMU savevm', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-export-qemu');
  });
  afterAll(async () => work?.cleanup());

  for (const clusterSize of [512, 65536]) {
    it(`reads QEMU's own vmstate byte for byte (cluster ${clusterSize})`, async () => {
      const path = await work.image({ sizeBytes: 32 * MiB, clusterSize });
      const { withPausedVm } = await import('../helpers/qemu.js');
      await withPausedVm({ ramMiB: 32, image: path }, async (vm) => vm.savevm('vm1'));
      const oracle = await readSnapshotVmState(path, 'vm1');
      expect(oracle.length).toBeGreaterThan(0);
      for (const options of [{}, { chunkBytes: 8192, readAhead: 3 }, { direct: false as const }]) {
        expect(sha256(await exportAll(path, 'vm1', options)), JSON.stringify(options)).toBe(sha256(oracle));
      }
    });
  }
});

/**
 * A disk whose logical sectors are 4 KiB, so O_DIRECT needs 4096-byte
 * alignment and 512-byte clusters are smaller than it: the reader must read
 * aligned supersets and slice them.
 */
async function with4kSectorFs<T>(fn: (dir: string) => Promise<T>): Promise<T | Skipped> {
  const missing = requireTool('losetup', 'mkfs.ext4', 'mount', 'umount');
  const skip = missing ?? rootSkipReason('a 4 KiB-sector loop device');
  if (skip !== undefined) return new Skipped(skip);
  const work = await Workdir.create('export-4k');
  const backing = join(work.dir.path, 'backing.img');
  const mnt = join(work.dir.path, 'mnt');
  await mkdir(mnt);
  await writeFile(backing, '');
  await runOk('truncate', ['-s', '256M', backing]);
  const device = (await runOk('losetup', ['--find', '--show', '--sector-size', '4096', backing])).stdout.trim();
  try {
    await runOk('mkfs.ext4', ['-q', '-F', device]);
    await runOk('mount', [device, mnt]);
    try {
      return await fn(mnt);
    } finally {
      if ((await run('umount', [mnt])).code !== 0) await run('umount', ['-l', mnt]);
    }
  } finally {
    await run('losetup', ['-d', device]);
    await work.cleanup();
  }
}

describe.skipIf(qemuSystemMissing)('qcow2 export: clusters smaller than the O_DIRECT alignment', () => {
  it('reads 512-byte-cluster vmstate (QEMU savevm and ours) on a 4 KiB-sector disk byte for byte', async (ctx) => {
    const work = await Workdir.create('export-4k-src');
    try {
      const theirs = await work.image({ sizeBytes: 32 * MiB, clusterSize: 512 });
      const { withPausedVm } = await import('../helpers/qemu.js');
      await withPausedVm({ ramMiB: 32, image: theirs }, async (vm) => vm.savevm('vm1'));
      const oracle = await readSnapshotVmState(theirs, 'vm1');
      // savevm's runs start between 4 KiB boundaries, so aligned supersets are really read.
      expect((await vmStateLayout(theirs, 'vm1')).hostClusters.some((h) => h % 4096 !== 0)).toBe(true);
      const result = await with4kSectorFs(async (dir) => {
        const path = join(dir, 'img.qcow2');
        await writeFile(path, await readFile(theirs));
        const ours = pseudoRandom(3 * MiB + 511, 7);
        await saveOurs(path, 'ours', ours);
        const img = await openImage(path, { readOnly: true });
        try {
          const stream = img.createVmStateReadStream('vm1', { direct: true });
          expect(sha256(await collect(stream))).toBe(sha256(oracle));
          expect(stream.alignment).toBe(4096);
          for (const options of [{ direct: true as const }, { direct: true as const, chunkBytes: 4096, readAhead: 3 }]) {
            expect(sha256(await collect(img.createVmStateReadStream('ours', options)))).toBe(sha256(ours));
          }
        } finally {
          await img.close();
        }
      });
      skipUnlessRan(ctx, result);
    } finally {
      await work.cleanup();
    }
  });
});
