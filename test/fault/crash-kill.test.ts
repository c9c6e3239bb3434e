/**
 * Crash safety with real crashes: a saver child process (a private build of
 * src/, the public createSnapshotStream) streams a 32 MiB vmstate into a
 * qcow2 image and is killed with SIGKILL at a random moment. The replayed
 * crashes of test/qcow2/crash.test.ts cover every sync point of the commit
 * one by one; this is their counterpart with the real code, the real
 * process death and the real kernel.
 *
 * Where the kills land. A third of the trials kill at a uniform moment of
 * the data phase (from the child's "ready" line to its "data-done" line); a
 * third wait for "data-done" and kill inside the commit (vmstate fdatasync,
 * metadata, commit point, discarding what it freed), with a density that
 * grows toward its end (see COMMIT_WINDOW_FACTOR); a third wait for the
 * child's "deleting" line (after the save it deletes snapshot 'doomed') and
 * kill inside that delete: its commit and then the discard of the doomed
 * vmstate. The template has a freed hole, so the new vmstate and metadata
 * reuse freed clusters. A 4 KiB-cluster image with
 * 24 MiB of guest data in three places gives the commit thousands of
 * refcount updates, a dozen L2 tables to rewrite and new refcount blocks to
 * add, so it lasts tens of milliseconds and kills land across its sync
 * points. The child's marker lines, not the schedule, decide how a trial is
 * counted.
 *
 * After every kill, against qemu-img and qemu-io rather than our own reader:
 *   - qemu-img check finds no corruption and no leak: the commit writes only
 *     fresh clusters and switches to them with one header write
 *     (docs/crash-safety.md), so a kill leaves either image, never a mix;
 *   - the guest data, the disk of every earlier snapshot and the vmstate of
 *     the earlier snapstream snapshot are bit-identical, and
 *     `qemu-img info` lists the earlier snapshots exactly as before;
 *   - the new snapshot is absent, or complete: its size and sha256 match;
 *     'doomed' is present and complete, or (only after the save finished)
 *     gone;
 *   - a fresh save into the same image works, after which qemu-img check
 *     is clean again, and no sample of a vmstate that is not in the image
 *     (a deleted 'doomed', an interrupted 'new') can be found in the file:
 *     the fresh save (the next write) discarded what the kill left readable.
 *
 * Before the shadow commit, about 1 kill in 600 left a live refcount block
 * with refcount 0 and about 1 in 10 left OFLAG_COPIED mismatches (QEMU's own
 * savevm has that window); both came from in-place metadata updates, which
 * are gone. A failing trial keeps its image and names it.
 *
 * CRASH_TRIALS=200 runs more trials (docs/crash-safety.md says how, without
 * npm); CRASH_SEED replays a kill schedule (timing makes replays approximate).
 */
import { spawn } from 'node:child_process';
import { copyFile, mkdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { createInterface } from 'node:readline';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream, openImage } from '../../src/index.js';
import { randomBytesFromSeed } from '../helpers/qemu.js';
import { qemuImg, qemuIo, requireTool, run, runOk, tmpDir, type SnapshotListEntry, type TmpDir } from '../helpers/tools.js';
import { privateBuild } from '../reliability/private-build.js';
import { exportVmState, sha256 } from './vmstate-export.js';

const MiB = 1 << 20;
const VMSTATE_BYTES = 32 * MiB;
const VMSTATE_SEED = 20260101;
const EARLIER_VMSTATE_BYTES = 2 * MiB + 12345;
const EARLIER_SEED = 7;
const FRESH_VMSTATE_BYTES = MiB + 3;
/** Saved and deleted in the template: a freed hole the new save reuses. */
const SCRATCH_BYTES = 16 * MiB;
/** In the template; every child deletes it after its save. */
const DOOMED_BYTES = 8 * MiB + 777;
const DOOMED_SEED = 31;
/** 64-byte samples searched for in the image after a trial, spread over a vmstate. */
const REMANENCE_SAMPLES = 16;
const TRIALS = Number(process.env.CRASH_TRIALS ?? 20);
/** Most extra trials aimed at the commit or the delete when too few of the planned ones landed there. */
const TOP_UP_TRIALS = 8;
const SEED = crashSeed(process.env.CRASH_SEED);

/** The kill schedule's seed: CRASH_SEED when set (an integer, else the run stops), otherwise a fresh random one. */
function crashSeed(text: string | undefined): number {
  if (text === undefined || text === '') return Math.floor(Math.random() * 2 ** 31);
  const seed = Number(text);
  if (!Number.isSafeInteger(seed)) throw new RangeError(`Expected an integer for CRASH_SEED, received ${JSON.stringify(text)}`);
  return seed;
}
/**
 * Commit kills spread over 1.15x the median commit seen so far (calibration,
 * then every trial that reached 'finish'), so the window follows the
 * machine's load and a few kills land after 'finish'. Within it the density
 * grows linearly toward the end (delay = window * sqrt(u)), where the
 * metadata writes and the commit point are, rather than the vmstate
 * fdatasync that opens the phase.
 */
const COMMIT_WINDOW_FACTOR = 1.15;
const CALIBRATION_RUNS = 3;
/** Trials run two at a time (two cores); the kill is timed from the child's own marker lines, so load does not skew it. */
const LANES = 2;
const CHILD = fileURLToPath(new URL('./fixtures/kill-saver.mjs', import.meta.url));

/** Guest data of the template, as the active layer reads it after all writes below. */
const ACTIVE_READS = ['read -P 0x61 0 4M', 'read -P 0x63 4M 8M', 'read -P 0 12M 1M', 'read -P 0 99M 1M', 'read -P 0x62 100M 8M', 'read -P 0x64 200M 4M'];
/** Guest data in snapshot 'disk-only' (qemu-img snapshot -c), taken before 0x63 and 0x64 were written. */
const DISK_ONLY_READS = ['read -P 0x61 0 8M', 'read -P 0 8M 4M', 'read -P 0x62 100M 8M', 'read -P 0 200M 4M'];
/** Guest data in snapshot 'earlier' (our own save), taken before 0x64 was written. */
const EARLIER_READS = ['read -P 0x61 0 4M', 'read -P 0x63 4M 8M', 'read -P 0x62 100M 8M', 'read -P 0 200M 4M'];

const skip = requireTool('qemu-img', 'qemu-io');


/** xorshift32 for the kill schedule, so CRASH_SEED replays it. */
function scheduleRng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

interface ChildRun {
  /** Marker lines the child printed before it exited or died. */
  markers: string[];
  signal: NodeJS.Signals | null;
  code: number | null;
  dataDoneMs?: number;
  finishedMs?: number;
  deletingMs?: number;
  deletedMs?: number;
}

type KillPlan = { after: 'ready' | 'data-done' | 'deleting'; delayMs: number } | undefined;

/** Runs the saver child; with a plan, SIGKILLs it `delayMs` after the named marker line. */
async function runSaver(dist: string, image: string, plan: KillPlan): Promise<ChildRun> {
  const child = spawn(process.execPath, [CHILD, dist, image, 'new', String(VMSTATE_BYTES), String(VMSTATE_SEED), 'doomed'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const result: ChildRun = { markers: [], signal: null, code: null };
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString('utf8')));
  const exited = new Promise<void>((resolve) =>
    child.once('close', (code, signal) => {
      result.code = code;
      result.signal = signal;
      resolve();
    }),
  );
  const killer = setTimeout(() => child.kill('SIGKILL'), 30_000); // bound: a hung child fails the trial below
  for await (const line of createInterface({ input: child.stdout })) {
    const [marker, value] = line.split(' ');
    result.markers.push(marker as string);
    if (marker === 'data-done') result.dataDoneMs = Number(value);
    if (marker === 'finished') result.finishedMs = Number(value);
    if (marker === 'deleting') result.deletingMs = Number(value);
    if (marker === 'deleted') result.deletedMs = Number(value);
    if (plan !== undefined && marker === plan.after) setTimeout(() => child.kill('SIGKILL'), plan.delayMs);
  }
  await exited;
  clearTimeout(killer);
  if (result.markers.includes('failed') || (result.signal === null && result.code !== 0)) {
    throw new Error(`saver failed (code ${result.code}, signal ${result.signal}): ${result.markers.join(',')}\n${stderr}`);
  }
  return result;
}

interface CheckOutcome {
  corruptions: number;
  copiedMismatches: number;
  leaks: number;
  exitCode: number;
  text: string;
}

/** qemu-img check, with its stderr lines: the JSON counts corruptions but does not say which kind. */
async function check(path: string): Promise<CheckOutcome> {
  const result = await run('qemu-img', ['check', '--output=json', path]);
  const json = JSON.parse(result.stdout) as { corruptions?: number; leaks?: number; 'check-errors'?: number };
  expect(json['check-errors'] ?? 0, result.stderr).toBe(0);
  return {
    corruptions: json.corruptions ?? 0,
    copiedMismatches: result.stderr.split('\n').filter((l) => /^ERROR OFLAG_COPIED/.test(l)).length,
    leaks: json.leaks ?? 0,
    exitCode: result.code ?? -1,
    text: result.stderr,
  };
}


/** The disk of an internal snapshot, read by qemu-io from a `qemu-img convert -l` copy. */
async function readSnapshotDisk(path: string, snapshot: string, reads: string[]): Promise<void> {
  const copy = `${path}.${snapshot}.qcow2`;
  await runOk('qemu-img', ['convert', '-l', `snapshot.name=${snapshot}`, '-O', 'qcow2', path, copy]);
  try {
    await qemuIo(copy, reads);
  } finally {
    await rm(copy, { force: true });
  }
}

/** Copies a failing trial's image out of the temp dir (removed after the run) and names it in the error. */
async function keepForInspection(path: string, index: number, err: unknown): Promise<unknown> {
  const keptDir = join(tmpdir(), 'snapstream-crash-kill-kept');
  await mkdir(keptDir, { recursive: true });
  const kept = join(keptDir, `seed-${SEED}-trial-${index}.qcow2`);
  await copyFile(path, kept);
  if (err instanceof Error) err.message += `\n(image as the kill left it: ${kept})`;
  return err;
}

async function save(path: string, name: string, data: Buffer): Promise<void> {
  await pipeline(Readable.from([data.subarray(0, 4099), data.subarray(4099)]), createSnapshotStream(path, { snapshot: name }));
}

async function remove(path: string, name: string): Promise<void> {
  const img = await openImage(path);
  try {
    await img.deleteSnapshot(name);
  } finally {
    await img.close();
  }
}

function samplesOf(data: Buffer): Buffer[] {
  const step = Math.floor((data.length - 64) / REMANENCE_SAMPLES);
  return Array.from({ length: REMANENCE_SAMPLES }, (_, i) => data.subarray(i * step, i * step + 64));
}

describe.skipIf(skip !== undefined)('a saver killed with SIGKILL at a random moment', () => {
  let dir: TmpDir;
  let dist: string;
  let template: string;
  let snapshotsBefore: SnapshotListEntry[];
  const vmstate = randomBytesFromSeed(VMSTATE_BYTES, VMSTATE_SEED);
  const vmstateSha = sha256(vmstate);
  const earlier = randomBytesFromSeed(EARLIER_VMSTATE_BYTES, EARLIER_SEED);
  const doomed = randomBytesFromSeed(DOOMED_BYTES, DOOMED_SEED);

  beforeAll(async () => {
    dir = await tmpDir('crash-kill');
    dist = await privateBuild(dir.path);
    template = join(dir.path, 'template.qcow2');
    await qemuImg.create(template, 256 * MiB, { cluster_size: 4096 });
    await qemuIo(template, ['write -P 0x61 0 8M', 'write -P 0x62 100M 8M']);
    await qemuImg.snapshot(template, 'create', 'disk-only');
    await qemuIo(template, ['write -P 0x63 4M 8M']);
    await save(template, 'scratch', randomBytesFromSeed(SCRATCH_BYTES, 5));
    await save(template, 'earlier', earlier);
    await remove(template, 'scratch'); // a 16 MiB hole: 'doomed' takes half, the new save the rest
    await save(template, 'doomed', doomed);
    await qemuIo(template, ['write -P 0x64 200M 4M']);
    expect((await check(template)).exitCode).toBe(0);
    snapshotsBefore = await qemuImg.snapshotList(template);
    expect(snapshotsBefore.map((s) => s.name)).toEqual(['disk-only', 'earlier', 'doomed']);
  });
  afterAll(async () => dir?.cleanup());

  /** Everything that must hold after any kill. Returns what qemu-img check saw and which snapshots exist. */
  async function verifyAfterKill(path: string, label: string): Promise<{ present: boolean; doomedPresent: boolean; check: CheckOutcome }> {
    const outcome = await check(path);
    expect(outcome.corruptions, `${label}: qemu-img check\n${outcome.text}`).toBe(0);
    expect(outcome.leaks, `${label}: qemu-img check\n${outcome.text}`).toBe(0);
    await qemuIo(path, ACTIVE_READS);
    await readSnapshotDisk(path, 'disk-only', DISK_ONLY_READS);
    await readSnapshotDisk(path, 'earlier', EARLIER_READS);
    const listed = await qemuImg.snapshotList(path);
    const present = listed.some((s) => s.name === 'new');
    const doomedPresent = listed.some((s) => s.name === 'doomed');
    const kept = snapshotsBefore.filter((s) => doomedPresent || s.name !== 'doomed');
    expect(listed.filter((s) => s.name !== 'new'), label).toEqual(kept);
    expect(sha256(await exportVmState(path, 'earlier')), label).toBe(sha256(earlier));
    if (doomedPresent) expect(sha256(await exportVmState(path, 'doomed')), label).toBe(sha256(doomed));
    else expect(present, `${label}: 'doomed' is deleted only after the save finished`).toBe(true);
    const img = await openImage(path, { readOnly: true });
    const ours = img.snapshots().map((s) => s.name);
    await img.close();
    expect(ours, label).toEqual(listed.map((s) => s.name));
    if (present) {
      // Present means complete: the right size, every byte, and a disk state equal to the active one.
      const newId = String(Number(snapshotsBefore[snapshotsBefore.length - 1]!.id) + 1);
      expect(listed[listed.length - 1], label).toMatchObject({ name: 'new', id: newId, vmStateSize: VMSTATE_BYTES });
      expect(sha256(await exportVmState(path, 'new')), label).toBe(vmstateSha);
      await readSnapshotDisk(path, 'new', ACTIVE_READS);
    }
    return { present, doomedPresent, check: outcome };
  }

  /** After the next write (the fresh save): no sample of a vmstate the image no longer holds is left in the file. */
  async function verifyNoRemanence(path: string, label: string, gone: Buffer[]): Promise<void> {
    const bytes = await readFile(path);
    for (const data of gone) {
      const left = samplesOf(data).filter((sample) => bytes.includes(sample)).length;
      expect(left, `${label}: samples of a vmstate that is not in the image`).toBe(0);
    }
  }

  /** A save after the crash works, and leaves no corruption at all (it recomputes COPIED). */
  async function verifyFreshSave(path: string, label: string): Promise<void> {
    const fresh = randomBytesFromSeed(FRESH_VMSTATE_BYTES, 99);
    await save(path, 'after', fresh);
    const outcome = await check(path);
    expect(outcome.corruptions, `${label}: after a fresh save\n${outcome.text}`).toBe(0);
    expect(sha256(await exportVmState(path, 'after')), label).toBe(sha256(fresh));
    await qemuIo(path, ACTIVE_READS);
  }

  interface Tally {
    inData: number;
    inCommit: number;
    afterFinish: number;
    inDelete: number;
    afterDelete: number;
    doomedGone: number;
    present: number;
    presentAfterCommitKill: number;
    leakyTrials: number;
    leakedClusters: number;
    copiedTrials: number;
    copiedMismatches: number;
  }

  async function trial(index: number, plan: NonNullable<KillPlan>, tally: Tally, commitsMs: number[]): Promise<void> {
    const path = join(dir.path, `trial-${index}.qcow2`);
    await copyFile(template, path);
    const res = await runSaver(dist, path, plan);
    if (res.finishedMs !== undefined) commitsMs.push(res.finishedMs - (res.dataDoneMs as number));
    const phase = res.markers.includes('deleted')
      ? 'afterDelete'
      : res.markers.includes('deleting')
        ? 'inDelete'
        : res.markers.includes('finished')
          ? 'afterFinish'
          : res.markers.includes('data-done')
            ? 'inCommit'
            : 'inData';
    const label = `trial ${index} (CRASH_SEED=${SEED}): kill ${plan.delayMs.toFixed(1)} ms after ${plan.after}, landed ${phase}`;
    const { present, doomedPresent, check: seen } = await verifyAfterKill(path, label).catch(async (err: unknown) => {
      throw await keepForInspection(path, index, err);
    });
    if (phase === 'inData') expect(present, `${label}: no snapshot before its vmstate is written`).toBe(false);
    if (phase !== 'inData' && phase !== 'inCommit') expect(present, `${label}: 'finish' means committed`).toBe(true);
    if (phase === 'afterDelete') expect(doomedPresent, `${label}: 'deleted' means gone`).toBe(false);
    tally[phase]++;
    if (!doomedPresent) tally.doomedGone++;
    if (present) tally.present++;
    if (present && phase === 'inCommit') tally.presentAfterCommitKill++;
    if (seen.leaks > 0) tally.leakyTrials++;
    tally.leakedClusters += seen.leaks;
    if (seen.copiedMismatches > 0) tally.copiedTrials++;
    tally.copiedMismatches += seen.copiedMismatches;
    await verifyFreshSave(path, label);
    await verifyNoRemanence(path, label, [...(doomedPresent ? [] : [doomed]), ...(present ? [] : [vmstate])]).catch(async (err: unknown) => {
      throw await keepForInspection(path, index, err);
    });
    await rm(path, { force: true });
  }

  it(
    `leaves the old image or the complete new snapshot, with no corruption and no leak (${TRIALS} trials)`,
    async () => {
      // First, so a run that fails or times out still says how to replay it.
      console.log(`[crash-kill] CRASH_SEED=${SEED} (run with CRASH_SEED=${SEED} to replay this kill schedule)`);
      // Calibration: uninterrupted saves measure the data phase and the commit (median of three).
      const runs: ChildRun[] = [];
      for (let i = 0; i < CALIBRATION_RUNS; i++) {
        const path = join(dir.path, `calibrate-${i}.qcow2`);
        await copyFile(template, path);
        const res = await runSaver(dist, path, undefined);
        expect(res.markers).toEqual(['ready', 'data-done', 'finished', 'deleting', 'deleted']);
        expect((await verifyAfterKill(path, `calibration ${i}`)).present).toBe(true);
        runs.push(res);
      }
      const median = (values: number[]): number => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)] as number;
      const dataMs = median(runs.map((r) => r.dataDoneMs as number));
      const commitsMs = runs.map((r) => (r.finishedMs as number) - (r.dataDoneMs as number));
      const deleteMs = median(runs.map((r) => (r.deletedMs as number) - (r.deletingMs as number)));

      const rng = scheduleRng(SEED);
      const fractions = Array.from({ length: TRIALS }, () => rng());
      const planFor = (i: number): NonNullable<KillPlan> => {
        const u = fractions[i] as number;
        if (i % 3 === 0) return { after: 'ready', delayMs: u * dataMs };
        if (i % 3 === 1) return { after: 'data-done', delayMs: Math.sqrt(u) * median(commitsMs) * COMMIT_WINDOW_FACTOR };
        // The delete: its metadata, the commit point, then the discard of the doomed vmstate at its end.
        return { after: 'deleting', delayMs: Math.sqrt(u) * deleteMs * COMMIT_WINDOW_FACTOR };
      };
      const tally: Tally = {
        inData: 0,
        inCommit: 0,
        afterFinish: 0,
        inDelete: 0,
        afterDelete: 0,
        doomedGone: 0,
        present: 0,
        presentAfterCommitKill: 0,
        leakyTrials: 0,
        leakedClusters: 0,
        copiedTrials: 0,
        copiedMismatches: 0,
      };
      let next = 0;
      const lane = async (): Promise<void> => {
        while (next < TRIALS) {
          const index = next++;
          await trial(index, planFor(index), tally, commitsMs);
        }
      };
      await Promise.all(Array.from({ length: LANES }, lane));
      // The kills are timed from medians, and under load a commit or a delete can run shorter than
      // that, so a kill aimed at its end lands after it. Rather than accept a run that interrupted
      // them less often, top up with kills aimed inside the median (at most TOP_UP_TRIALS more).
      const quota = Math.floor(TRIALS / 6);
      let ran = TRIALS;
      for (let extra = 0; extra < TOP_UP_TRIALS && (tally.inCommit < quota || tally.inDelete < quota); extra++) {
        const u = rng();
        const plan: NonNullable<KillPlan> =
          tally.inCommit < quota ? { after: 'data-done', delayMs: Math.sqrt(u) * median(commitsMs) } : { after: 'deleting', delayMs: Math.sqrt(u) * deleteMs };
        await trial(ran++, plan, tally, commitsMs);
      }
      console.log(
        `[crash-kill] CRASH_SEED=${SEED}: ${ran} trials (${ran - TRIALS} of them topping up); killed in data ${tally.inData}, in commit ${tally.inCommit} ` +
          `(new snapshot present after ${tally.presentAfterCommitKill} of those), after finish ${tally.afterFinish}, ` +
          `in the delete ${tally.inDelete}, after it ${tally.afterDelete} ('doomed' gone after ${tally.doomedGone}); ` +
          `snapshot present after kill ${tally.present}; leaks in ${tally.leakyTrials} trials ` +
          `(${tally.leakedClusters} clusters); OFLAG_COPIED mismatches in ${tally.copiedTrials} trials ` +
          `(${tally.copiedMismatches} entries); median data phase ${dataMs.toFixed(0)} ms, median commit ${median(commitsMs).toFixed(0)} ms, ` +
          `median delete ${deleteMs.toFixed(0)} ms`,
      );
      expect(tally.inData + tally.inCommit + tally.afterFinish + tally.inDelete + tally.afterDelete).toBe(ran);
      // Enough kills must land where metadata is written for the test to mean something.
      expect(tally.inCommit, 'kills that interrupted the commit').toBeGreaterThanOrEqual(quota);
      expect(tally.inDelete, 'kills that interrupted the delete').toBeGreaterThanOrEqual(quota);
    },
    // Each trial now also deletes and searches the image for remanence: ~6 s per trial per lane under load.
    120_000 + (TRIALS + TOP_UP_TRIALS) * 12_000,
  );
});
