/**
 * Crash consistency of save and delete, tested by replay: every metadata
 * write and fdatasync of a real commit is recorded; then, for every sync
 * point k, the image is rebuilt as a crash would leave it: all writes before
 * sync k durable, plus none, all, each single one, or each prefix of the
 * writes issued between sync k and sync k+1 (a crash may persist any of those).
 *
 * Every such image must mean exactly what it meant before or after the
 * commit, with nothing to repair: our check() and qemu-img check both find
 * zero corruptions and zero leaks (QEMU's own savevm can leave OFLAG_COPIED
 * mismatches and leaks here; the shadow commit must not), the snapshot list
 * is the old one or the new one, guest data is unchanged, and every listed
 * snapshot's vmstate and disk read back bit-identical.
 */
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TargetFile } from '../../src/io/target-file.js';
import type { MetaFile } from '../../src/qcow2/file.js';
import { FALLOC_FL_PUNCH_HOLE } from '../../src/qcow2/discard.js';
import { Image, openImage } from '../../src/qcow2/image.js';
import { exportVmState } from '../fault/vmstate-export.js';
import { pseudoRandom } from '../helpers/streams.js';
import { qemuImg, qemuIo, run } from '../helpers/tools.js';
import { guestWrite, qemuMissing, Workdir } from './fixtures.js';
import { SnapshotError } from '../../src/errors.js';
import { stat } from 'node:fs/promises';
import { loadImageState } from '../../src/qcow2/image-state.js';
import { RefcountStore } from '../../src/qcow2/refcount.js';

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
  /** A punched range reads as zeros afterwards: replayed as a write of zeros (the discard phase). */
  async allocate(position: number, length: number, mode: number): Promise<void> {
    if ((mode & FALLOC_FL_PUNCH_HOLE) !== 0) this.events.push({ kind: 'write', offset: position, data: Buffer.alloc(length) });
    await this._inner.allocate(position, length, mode);
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
      for (let j = 2; j < window.length; j++) {
        yield { label: `sync ${k}: first ${j} writes`, bytes: apply(base, [...durable, ...window.slice(0, j)]) };
      }
    }
  }
}

/** The header write that switches the metadata (bytes 36..72). */
const isCommitWrite = (e: Event): boolean => e.kind === 'write' && e.offset === 36;

/** A broken commit for the negative control: the header switch issued before the fresh structures' sync. */
function headerFirst(events: Event[]): Event[] {
  const header = events.filter(isCommitWrite);
  expect(header.length, 'exactly one header write').toBe(1);
  return [...header, ...events.filter((e) => !isCommitWrite(e))];
}

interface Expectation {
  before: string[];
  after: string[];
  /** vmstate every listed snapshot of that name must read back. */
  vmstates: Map<string, Buffer>;
  /** qemu-io read commands each listed snapshot must satisfy when applied. */
  disks: Map<string, string[]>;
  /** qemu-io reads the active disk must satisfy. */
  active: string[];
  /** For a revert: the active disk may instead satisfy these (the operation completed). */
  activeAfter?: string[];
}

async function ourCheck(path: string): Promise<{ corruptions: number; leaks: number; checkErrors: number; messages: string[] }> {
  const img = await openImage(path, { readOnly: true });
  try {
    return await img.check();
  } finally {
    await img.close();
  }
}

/** Everything wrong with one crashed image, as readable lines; [] when it meets the strict property. */
async function problemsOf(path: string, want: Expectation): Promise<string[]> {
  const problems: string[] = [];
  const qemu = await qemuImg.check(path).catch((err: unknown) => ({ exitCode: -1, error: String(err) }));
  if (qemu.exitCode !== 0) problems.push(`qemu-img check: ${JSON.stringify(qemu)}`);
  const ours = await ourCheck(path).catch((err: unknown) => ({ corruptions: -1, leaks: -1, checkErrors: -1, messages: [String(err)] }));
  if (ours.corruptions !== 0 || ours.leaks !== 0 || ours.checkErrors !== 0) {
    problems.push(`check(): ${ours.corruptions} corruptions, ${ours.leaks} leaks: ${ours.messages.slice(0, 3).join('; ')}`);
  }
  if (problems.length > 0) return problems;
  const names = (await qemuImg.snapshotList(path)).map((s) => s.name);
  if (![want.before, want.after].some((list) => JSON.stringify(list) === JSON.stringify(names))) {
    problems.push(`snapshot list ${JSON.stringify(names)}`);
  }
  const activeBefore = await qemuIo(path, want.active).then(() => undefined, (err: unknown) => String(err));
  if (activeBefore !== undefined) {
    const after = want.activeAfter === undefined ? activeBefore : await qemuIo(path, want.activeAfter).then(() => undefined, (err: unknown) => String(err));
    if (after !== undefined) problems.push(`active disk: ${activeBefore}`);
  }
  for (const name of names) {
    const vm = want.vmstates.get(name);
    if (vm === undefined) continue;
    const read = await exportVmState(path, name).catch((err: unknown) => err);
    if (!(read instanceof Buffer)) problems.push(String(read));
    else if (!read.equals(vm)) problems.push(`vmstate of '${name}' differs`);
  }
  for (const name of names) {
    const reads = want.disks.get(name);
    if (reads === undefined) continue;
    const applied = `${path}.applied`;
    await copyFile(path, applied);
    await qemuImg.snapshot(applied, 'apply', name);
    await qemuIo(applied, reads).catch((err: unknown) => problems.push(`disk of '${name}': ${String(err)}`));
    const after = await qemuImg.check(applied);
    if (after.exitCode !== 0) problems.push(`after loading '${name}': ${JSON.stringify(after)}`);
  }
  return problems;
}

describe.skipIf(qemuMissing)('crash consistency (replayed crashes at every sync point)', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-crash');
  });
  afterAll(async () => work.cleanup());

  const oldVm = pseudoRandom(180_000, 41);
  const newVm = pseudoRandom(200_000, 42);
  const oldDisk = ['read -P 0x61 0 1M', 'read -P 0x62 1M 1M', 'read -P 0x64 8M 64k'];
  const activeDisk = ['read -P 0x63 0 256k', 'read -P 0x61 256k 768k', 'read -P 0x62 1M 1M', 'read -P 0x64 8M 64k'];

  /** One of our snapshots with a vmstate and compressed guest data, then guest writes that the next save must un-COPY. */
  async function imageWithHistory(): Promise<string> {
    const path = await work.image({ sizeBytes: 64 << 20, clusterSize: 65536 });
    await guestWrite(path, 'write -P 0x61 0 1M', 'write -P 0x62 1M 1M', 'write -c -P 0x64 8M 64k');
    await saveAt(path, 'old', oldVm);
    await guestWrite(path, 'write -P 0x63 0 256k', 'write -P 0x65 32M 64k', 'write -z 32M 64k');
    return path;
  }

  async function saveAt(path: string, name: string, vm: Buffer, file?: RecordingFile): Promise<Buffer> {
    const img = file === undefined ? await openImage(path) : await Image.fromFile(file);
    let base = Buffer.alloc(0);
    try {
      const { baseOffset } = await img.beginSave(name);
      const data = await TargetFile.open(path, { write: true, direct: false });
      await data.write(vm, baseOffset);
      await data.datasync();
      await data.close();
      base = await readFile(path);
      if (file !== undefined) file.events.length = 0;
      await img.commitSave({ vmStateSize: vm.length });
    } finally {
      await img.close();
    }
    return base;
  }

  async function expectEveryCrashClean(what: string, base: Buffer, events: Event[], want: Expectation): Promise<number> {
    let images = 0;
    for (const { label, bytes } of crashImages(base, events)) {
      const path = work.path('crashed');
      await writeFile(path, bytes);
      expect(await problemsOf(path, want), `${what}, ${label}`).toEqual([]);
      images++;
    }
    return images;
  }

  /** Writes other than the header switch that touch a cluster with a non-zero refcount in the image before the commit. */
  async function writesIntoLiveClusters(base: Buffer, events: Event[]): Promise<string[]> {
    const path = work.path('base');
    await writeFile(path, base);
    const file = await TargetFile.open(path, { write: false, direct: false });
    try {
      const { layout, header, fileSizeBytes } = await loadImageState(file);
      const rc = await RefcountStore.load(file, layout, header.refcountTableOffset, header.refcountTableClusters, fileSizeBytes);
      const live: string[] = [];
      // Before the commit point only: afterwards the discard punches what the commit freed.
      for (const e of events.slice(0, events.findIndex(isCommitWrite))) {
        if (e.kind !== 'write') continue;
        for (let c = layout.clusterIndex(e.offset); c <= layout.clusterIndex(e.offset + e.data.length - 1); c++) {
          if ((await rc.getAsync(c)) !== 0) live.push(`write at ${e.offset} touches cluster ${c}`);
        }
      }
      return live;
    } finally {
      await file.close();
    }
  }

  async function recordSave(): Promise<{ base: Buffer; events: Event[] }> {
    const path = await imageWithHistory();
    const recorder = new RecordingFile(await TargetFile.open(path, { write: true, direct: false }));
    const base = await saveAt(path, 'new', newVm, recorder);
    return { base, events: recorder.events };
  }

  const saveExpectation: Expectation = {
    before: ['old'],
    after: ['old', 'new'],
    vmstates: new Map([
      ['old', oldVm],
      ['new', newVm],
    ]),
    disks: new Map([
      ['old', oldDisk],
      ['new', activeDisk],
    ]),
    active: activeDisk,
  };

  it('a save interrupted at any point leaves the old image or the new snapshot: no corruption, no leak', async () => {
    const { base, events } = await recordSave();
    const syncs = events.filter((e) => e.kind === 'sync').length;
    expect(syncs, 'fresh structures synced, then the header switch synced').toBe(2);
    expect(events.filter(isCommitWrite)).toHaveLength(1);
    expect(await writesIntoLiveClusters(base, events), 'no live cluster is modified in place').toEqual([]);
    const images = await expectEveryCrashClean('save', base, events, saveExpectation);
    expect(images).toBeGreaterThan(6);
  });

  it('the replay catches a misordered commit (header switched before the fresh structures are durable)', async () => {
    const { base, events } = await recordSave();
    const failures: string[] = [];
    for (const { label, bytes } of crashImages(base, headerFirst(events))) {
      const path = work.path('misordered');
      await writeFile(path, bytes);
      const problems = await problemsOf(path, saveExpectation);
      if (problems.length > 0) failures.push(`${label}: ${problems[0]}`);
    }
    expect(failures.length).toBeGreaterThan(0);
  });

  it('a delete interrupted at any point leaves the snapshot or removes it: no corruption, no leak', async () => {
    const path = await imageWithHistory();
    await saveAt(path, 'drop', newVm);
    await guestWrite(path, 'write -P 0x66 4M 64k');
    const base = await readFile(path);
    const recorder = new RecordingFile(await TargetFile.open(path, { write: true, direct: false }));
    const img = await Image.fromFile(recorder);
    try {
      await img.deleteSnapshot('drop');
    } finally {
      await img.close();
    }
    expect(recorder.events.filter((e) => e.kind === 'sync').length).toBe(2);
    expect(await writesIntoLiveClusters(base, recorder.events), 'no live cluster is modified in place').toEqual([]);
    await expectEveryCrashClean('delete', base, recorder.events, {
      before: ['old', 'drop'],
      after: ['old'],
      vmstates: new Map([...saveExpectation.vmstates, ['drop', newVm]]),
      disks: new Map([
        ['old', oldDisk],
        ['drop', activeDisk],
      ]),
      active: [...activeDisk, 'read -P 0x66 4M 64k'],
    });
  });

  it('a revert interrupted at any point leaves the disk as it was or as the snapshot: no corruption, no leak', async () => {
    const path = await imageWithHistory();
    const base = await readFile(path);
    const recorder = new RecordingFile(await TargetFile.open(path, { write: true, direct: false }));
    const img = await Image.fromFile(recorder);
    try {
      await img.revertSnapshot('old');
    } finally {
      await img.close();
    }
    expect(recorder.events.filter((e) => e.kind === 'sync').length).toBe(2);
    expect(recorder.events.filter(isCommitWrite)).toHaveLength(1);
    expect(await writesIntoLiveClusters(base, recorder.events), 'no live cluster is modified in place').toEqual([]);
    const images = await expectEveryCrashClean('revert', base, recorder.events, {
      before: ['old'],
      after: ['old'],
      vmstates: new Map([['old', oldVm]]),
      disks: new Map([['old', oldDisk]]),
      active: activeDisk,
      activeAfter: oldDisk,
    });
    expect(images).toBeGreaterThan(6);
  });

  it('a save whose commit fails with EIO at any write leaves a clean image (no corruption, no leak), truncated back before the header switch', async () => {
    const template = await work.image({ sizeBytes: 64 << 20, clusterSize: 65536 });
    await guestWrite(template, 'write -P 0x61 0 1M', 'write -P 0x62 1M 1M');
    await qemuImg.snapshot(template, 'create', 'old');
    await guestWrite(template, 'write -P 0x63 0 256k');
    const vm = pseudoRandom(150_000, 7);
    for (let failAt = 1; ; failAt++) {
      const path = work.path('eio');
      await copyFile(template, path);
      const sizeBefore = (await stat(path)).size;
      const file = new FailingFile(await TargetFile.open(path, { write: true, direct: false }));
      const img = await Image.fromFile(file);
      let failed = false;
      try {
        const { baseOffset } = await img.beginSave('new');
        const data = await TargetFile.open(path, { write: true, direct: false });
        await data.write(vm, baseOffset);
        await data.datasync();
        await data.close();
        file.failAt = failAt;
        await img.commitSave({ vmStateSize: vm.length }).catch((err: unknown) => {
          expect(err).toMatchObject({ code: 'EIO' });
          failed = true;
        });
        const after = await img.check();
        expect([after.corruptions, after.leaks], `write ${failAt}: ${after.messages.join('\n')}`).toEqual([0, 0]);
        if (failed && !img.snapshots().some((s) => s.name === 'new') && file.events.filter((e) => e.kind === 'sync').length === 0) {
          expect((await stat(path)).size, `write ${failAt}`).toBe(sizeBefore);
        }
      } finally {
        await img.close();
      }
      expect((await qemuImg.check(path)).exitCode, `write ${failAt}`).toBe(0);
      await qemuIo(path, ['read -P 0x63 0 256k', 'read -P 0x61 256k 768k', 'read -P 0x62 1M 1M']);
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
