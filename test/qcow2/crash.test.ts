/**
 * Crash consistency of save and delete, tested by replay: every metadata
 * write and fdatasync of a real commit is recorded; then, for every sync
 * point k, the image is rebuilt as a crash would leave it: all writes before
 * sync k durable, plus none, all, or each single one of the writes issued
 * between sync k and sync k+1 (a crash may persist any of those).
 *
 * Every such image must mean what it meant before or after the commit: qemu-img
 * finds no refcount below its references (leaks and OFLAG_COPIED mismatches,
 * which QEMU's own savevm can leave too, are allowed and repairable), the
 * snapshot list is the old one or the new one, guest data is unchanged, and
 * a listed snapshot's vmstate reads back intact.
 */
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TargetFile } from '../../src/io/target-file.js';
import type { MetaFile } from '../../src/qcow2/file.js';
import { Image, openImage } from '../../src/qcow2/image.js';
import { pseudoRandom } from '../helpers/streams.js';
import { qemuImg, qemuIo, run } from '../helpers/tools.js';
import { guestWrite, qemuMissing, Workdir } from './fixtures.js';
import { SnapshotError } from '../../src/errors.js';
import { stat } from 'node:fs/promises';

type Event = { kind: 'write'; offset: number; data: Buffer } | { kind: 'sync' };

class RecordingFile implements MetaFile {
  readonly events: Event[] = [];
  constructor(private readonly _inner: TargetFile) {}
  get path(): string {
    return this._inner.path;
  }
  read(buffer: Uint8Array, position: number): Promise<number> {
    return this._inner.read(buffer, position);
  }
  async write(buffer: Uint8Array, position: number): Promise<void> {
    this.events.push({ kind: 'write', offset: position, data: Buffer.from(buffer) });
    await this._inner.write(buffer, position);
  }
  async datasync(): Promise<void> {
    this.events.push({ kind: 'sync' });
    await this._inner.datasync();
  }
  truncate(length: number): Promise<void> {
    return this._inner.truncate(length);
  }
  stat(): Promise<{ size: number }> {
    return this._inner.stat();
  }
  getLock(start: number, length: number, kind: 'read' | 'write') {
    return this._inner.getLock(start, length, kind);
  }
  setLock(start: number, length: number, kind: 'read' | 'write' | 'unlock'): Promise<void> {
    return this._inner.setLock(start, length, kind);
  }
  close(): Promise<void> {
    return this._inner.close();
  }
}

/** Fails the `failAt`-th write (1-based, counted once armed) with EIO, like a dying disk. */
class FailingFile extends RecordingFile {
  failAt = 0;
  private _writes = 0;
  override async write(buffer: Uint8Array, position: number): Promise<void> {
    if (this.failAt > 0 && ++this._writes === this.failAt) {
      throw new SnapshotError('EIO', `injected EIO at write ${this._writes}`, { syscall: 'pwrite', offset: position });
    }
    await super.write(buffer, position);
  }
}

function apply(base: Buffer, writes: Array<{ offset: number; data: Buffer }>): Buffer {
  const end = Math.max(base.length, ...writes.map((w) => w.offset + w.data.length));
  const out = Buffer.alloc(end);
  base.copy(out);
  for (const w of writes) w.data.copy(out, w.offset);
  return out;
}

/** Every image a crash during the recorded commit could leave behind. */
function* crashImages(base: Buffer, events: Event[]): Generator<{ label: string; bytes: Buffer }> {
  const syncs = events.flatMap((e, i) => (e.kind === 'sync' ? [i] : []));
  for (let k = 0; k <= syncs.length; k++) {
    const durableEnd = k === 0 ? 0 : syncs[k - 1]! + 1;
    const windowEnd = k < syncs.length ? syncs[k]! : events.length;
    const durable = events.slice(0, durableEnd).filter((e) => e.kind === 'write') as Array<{ offset: number; data: Buffer }>;
    const window = events.slice(durableEnd, windowEnd).filter((e) => e.kind === 'write') as Array<{ offset: number; data: Buffer }>;
    yield { label: `sync ${k}: none of ${window.length}`, bytes: apply(base, durable) };
    if (window.length === 0) continue;
    yield { label: `sync ${k}: all ${window.length}`, bytes: apply(base, [...durable, ...window]) };
    if (window.length > 1) {
      for (const [i, w] of window.entries()) yield { label: `sync ${k}: only write ${i}`, bytes: apply(base, [...durable, w]) };
    }
  }
}

/** qemu-img check stderr lines that are not leaks or OFLAG_COPIED mismatches. */
async function seriousProblems(path: string): Promise<string[]> {
  const { stdout, stderr } = await run('qemu-img', ['check', path]);
  return `${stderr}\n${stdout}`
    .split('\n')
    .filter((line) => /ERROR|corrupt/i.test(line))
    .filter((line) => !/OFLAG_COPIED|^\d+ errors were found|Leaked|leaked/.test(line))
    .filter((line) => !/^\s*$/.test(line) && !/errors were found on the image\.$/.test(line))
    .filter((line) => !/Data may be corrupted, or further writes to the image may corrupt it/.test(line));
}

async function exportVmState(path: string, name: string): Promise<Buffer> {
  const img = await openImage(path, { readOnly: true });
  try {
    const parts: Buffer[] = [];
    for await (const chunk of img.createVmStateReadStream(name)) parts.push(chunk as Buffer);
    return Buffer.concat(parts);
  } finally {
    await img.close();
  }
}

describe.skipIf(qemuMissing)('crash consistency (replayed crashes at every sync point)', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-crash');
  });
  afterAll(async () => work.cleanup());

  async function verify(
    label: string,
    bytes: Buffer,
    expectNames: { before: string[]; after: string[] },
    vmstate?: { name: string; data: Buffer },
  ): Promise<void> {
    const path = work.path('crashed');
    await writeFile(path, bytes);
    expect(await seriousProblems(path), label).toEqual([]);
    const names = (await qemuImg.snapshotList(path)).map((s) => s.name);
    expect([expectNames.before, expectNames.after], label).toContainEqual(names);
    await qemuIo(path, ['read -P 0x61 0 1M', 'read -P 0x62 1M 1M']);
    if (vmstate !== undefined && names.includes(vmstate.name)) {
      expect((await exportVmState(path, vmstate.name)).equals(vmstate.data), label).toBe(true);
    }
    await run('qemu-img', ['check', '-r', 'all', path]);
    expect((await qemuImg.check(path)).exitCode, label).toBe(0);
  }

  it('a save interrupted at any point leaves the old image or the new snapshot, never worse than leaks', async () => {
    const path = await work.image({ sizeBytes: 64 << 20, clusterSize: 65536 });
    await guestWrite(path, 'write -P 0x61 0 1M', 'write -P 0x62 1M 1M');
    await qemuImg.snapshot(path, 'create', 'old');
    const vm = pseudoRandom(200_000, 42);
    const recorder = new RecordingFile(await TargetFile.open(path, { write: true, direct: false }));
    const img = await Image.fromFile(recorder);
    let base: Buffer;
    try {
      const { hostOffset } = await img.beginSave('new');
      const data = await TargetFile.open(path, { write: true, direct: false });
      await data.write(vm, hostOffset);
      await data.datasync();
      await data.close();
      base = await readFile(path);
      recorder.events.length = 0;
      await img.commitSave({ vmStateSize: vm.length });
    } finally {
      await img.close();
    }
    expect(recorder.events.filter((e) => e.kind === 'sync').length).toBeGreaterThanOrEqual(5);
    for (const { label, bytes } of crashImages(base, recorder.events)) {
      await verify(`save, ${label}`, bytes, { before: ['old'], after: ['old', 'new'] }, { name: 'new', data: vm });
    }
  });

  it('a delete interrupted at any point leaves the snapshot or removes it, never worse than leaks', async () => {
    const path = await work.image({ sizeBytes: 64 << 20, clusterSize: 65536 });
    await guestWrite(path, 'write -P 0x61 0 1M', 'write -P 0x62 1M 1M');
    await qemuImg.snapshot(path, 'create', 'keep');
    await guestWrite(path, 'write -P 0x63 4M 1M');
    await qemuImg.snapshot(path, 'create', 'drop');
    await guestWrite(path, 'write -P 0x61 0 1M');
    const base = await readFile(path);
    const copy = work.path('delete-copy');
    await copyFile(path, copy);
    const recorder = new RecordingFile(await TargetFile.open(copy, { write: true, direct: false }));
    const img = await Image.fromFile(recorder);
    try {
      await img.deleteSnapshot('drop');
    } finally {
      await img.close();
    }
    for (const { label, bytes } of crashImages(base, recorder.events)) {
      await verify(`delete, ${label}`, bytes, { before: ['keep', 'drop'], after: ['keep'] });
    }
  });

  it('a save whose commit fails with EIO at any write leaves a usable image, truncated back when nothing was referenced', async () => {
    const template = await work.image({ sizeBytes: 64 << 20, clusterSize: 65536 });
    await guestWrite(template, 'write -P 0x61 0 1M', 'write -P 0x62 1M 1M');
    await qemuImg.snapshot(template, 'create', 'old');
    const vm = pseudoRandom(150_000, 7);
    for (let failAt = 1; ; failAt++) {
      const path = work.path('eio');
      await copyFile(template, path);
      const sizeBefore = (await stat(path)).size;
      const file = new FailingFile(await TargetFile.open(path, { write: true, direct: false }));
      const img = await Image.fromFile(file);
      let failed = false;
      try {
        const { hostOffset } = await img.beginSave('new');
        const data = await TargetFile.open(path, { write: true, direct: false });
        await data.write(vm, hostOffset);
        await data.datasync();
        await data.close();
        file.failAt = failAt;
        await img.commitSave({ vmStateSize: vm.length }).catch((err: unknown) => {
          expect(err).toMatchObject({ code: 'EIO' });
          failed = true;
        });
        const after = await img.check();
        expect(after.corruptions, after.messages.join('\n')).toBe(
          after.messages.filter((m) => m.includes('OFLAG_COPIED')).length,
        );
        if (failed && !img.snapshots().some((s) => s.name === 'new') && file.events.filter((e) => e.kind === 'sync').length === 0) {
          expect((await stat(path)).size, `write ${failAt}`).toBe(sizeBefore);
        }
      } finally {
        await img.close();
      }
      await run('qemu-img', ['check', '-r', 'all', path]);
      expect((await qemuImg.check(path)).exitCode, `write ${failAt}`).toBe(0);
      const again = await openImage(path);
      try {
        await again.deleteSnapshot('old');
      } finally {
        await again.close();
      }
      expect((await qemuImg.check(path)).exitCode, `write ${failAt}`).toBe(0);
      if (!failed) {
        expect(failAt, 'commit performs several metadata writes').toBeGreaterThan(5);
        break;
      }
    }
  });
});
