import { spawn, type ChildProcess } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TargetFile } from '../../src/io/target-file.js';
import { openImage } from '../../src/qcow2/image.js';
import { findTool, qemuImg, requireTool, run } from '../helpers/tools.js';
import { qemuMissing, Workdir } from './fixtures.js';

/** Starts `qemu-io [-r] -c 'sleep 60000' path` and resolves once its lock bytes are visible. */
async function holdWithQemuIo(path: string, readOnly: boolean): Promise<ChildProcess> {
  const args = [...(readOnly ? ['-r'] : []), '-f', 'qcow2', '-c', 'sleep 60000', path];
  const child = spawn(findTool('qemu-io') ?? 'qemu-io', args, { stdio: 'ignore' });
  const probe = await TargetFile.open(path, { write: false, direct: false });
  try {
    for (let i = 0; i < 200; i++) {
      if ((await probe.getLock(100, 1, 'write')) !== null) return child;
      await new Promise((r) => setTimeout(r, 25));
    }
  } finally {
    await probe.close();
  }
  child.kill('SIGKILL');
  throw new Error('qemu-io never took its locks');
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGKILL');
  await exited;
}

describe.skipIf(qemuMissing)("QEMU's image locking protocol", () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-lock');
  });
  afterAll(async () => work.cleanup());

  it('refuses with IMAGE_LOCKED while a QEMU writer holds the image, for writing and for reading', async () => {
    const path = await work.image({ sizeBytes: 16 << 20 });
    const holder = await holdWithQemuIo(path, false);
    try {
      await expect(openImage(path)).rejects.toMatchObject({ code: 'IMAGE_LOCKED' });
      await expect(openImage(path, { readOnly: true })).rejects.toThrow(
        new RegExp(`is locked: process ${holder.pid} \\(qemu-io, a qemu-io process\\) holds the "write" permission`),
      );
      const shared = await openImage(path, { forceShare: true });
      expect(shared.snapshots()).toEqual([]);
      await shared.close();
    } finally {
      await stop(holder);
    }
    const img = await openImage(path);
    await img.close();
  });

  it('refuses to write while a QEMU reader holds the image, but reads alongside it', async () => {
    const path = await work.image({ sizeBytes: 16 << 20 });
    const holder = await holdWithQemuIo(path, true);
    try {
      await expect(openImage(path)).rejects.toMatchObject({ code: 'IMAGE_LOCKED' });
      const img = await openImage(path, { readOnly: true });
      await img.close();
    } finally {
      await stop(holder);
    }
  });

  it('makes qemu-io and qemu-img refuse the image while snapstream holds it for writing', async () => {
    const path = await work.image({ sizeBytes: 16 << 20 });
    const img = await openImage(path);
    try {
      const io = await run('qemu-io', ['-f', 'qcow2', '-c', 'read 0 512', path]);
      expect(io.stdout + io.stderr).toMatch(/lock/i);
      const info = await run('qemu-img', ['info', path]);
      expect(info.code).not.toBe(0);
      expect(info.stderr).toMatch(/Failed to get shared "write" lock/);
      expect((await qemuImg.info(path, { forceShare: true }))['virtual-size']).toBe(16 << 20);
      // The holder is this process: the message says so instead of suspecting a QEMU.
      await expect(openImage(path)).rejects.toMatchObject({ code: 'IMAGE_LOCKED' });
      await expect(openImage(path)).rejects.toThrow(
        new RegExp(`locked: process ${process.pid} \\(\\S+, this process: another Image or snapshot stream of it is still open\\)`),
      );
    } finally {
      await img.close();
    }
    const io = await run('qemu-io', ['-f', 'qcow2', '-c', 'read 0 512', path]);
    expect(io.stdout).toMatch(/read 512\/512 bytes/);
  });
});

const vmMissing = qemuMissing ?? requireTool('qemu-system-x86_64');

describe.skipIf(vmMissing)('locking against a running QEMU', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-lock-vm');
  });
  afterAll(async () => work.cleanup());

  it('refuses with IMAGE_LOCKED while qemu-system-x86_64 has the image attached', async () => {
    const { withPausedVm } = await import('../helpers/qemu.js');
    const path = await work.image({ sizeBytes: 16 << 20 });
    await withPausedVm({ ramMiB: 32, image: path }, async () => {
      await expect(openImage(path)).rejects.toMatchObject({ code: 'IMAGE_LOCKED' });
      await expect(openImage(path)).rejects.toThrow(/locked: process \d+ \(qemu-system-x86, a running QEMU\)/);
      await expect(openImage(path, { readOnly: true })).rejects.toMatchObject({ code: 'IMAGE_LOCKED' });
    });
    const img = await openImage(path);
    await img.close();
  });

  it('reads an image a running QEMU holds with { readOnly: true, forceShare: true }, as qemu-img -U does', async () => {
    const { withPausedVm } = await import('../helpers/qemu.js');
    const { pipeline } = await import('node:stream/promises');
    const { fromChunks, pseudoRandom, sha256 } = await import('../helpers/streams.js');
    const path = await work.image({ sizeBytes: 16 << 20 });
    const vmstate = pseudoRandom(700_001, 12);
    const writer = await openImage(path);
    try {
      await pipeline(fromChunks([vmstate]), writer.createSnapshotStream('before-boot'));
    } finally {
      await writer.close();
    }
    await withPausedVm({ ramMiB: 32, image: path }, async () => {
      await expect(openImage(path, { readOnly: true })).rejects.toMatchObject({ code: 'IMAGE_LOCKED' });
      const img = await openImage(path, { readOnly: true, forceShare: true });
      try {
        expect(img.snapshots().map((s) => s.name)).toEqual(['before-boot']);
        const chunks: Buffer[] = [];
        for await (const chunk of img.createVmStateReadStream('before-boot')) chunks.push(chunk as Buffer);
        expect(sha256(chunks)).toBe(sha256(vmstate));
        await expect(img.deleteSnapshot('before-boot')).rejects.toMatchObject({ code: 'IMAGE_READ_ONLY' });
      } finally {
        await img.close();
      }
      expect((await qemuImg.snapshotList(path, { forceShare: true })).map((s) => s.name)).toEqual(['before-boot']);
    });
  });

  it('makes QEMU refuse to start on an image snapstream holds for writing', async () => {
    const { startPausedVm } = await import('../helpers/qemu.js');
    const path = await work.image({ sizeBytes: 16 << 20 });
    const img = await openImage(path);
    try {
      await expect(startPausedVm({ ramMiB: 32, image: path })).rejects.toThrow(/lock/i);
    } finally {
      await img.close();
    }
  });
});
