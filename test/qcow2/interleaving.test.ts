/**
 * Operations on one open Image in random interleavings: saves that stream
 * slowly, deletes, reverts, checks, exports and close(), started without waiting for
 * one another. Whatever order they run in, each step must leave an image
 * that qemu-img checks clean, whose snapshot list is the one before plus the
 * saves that succeeded minus the deletes that did, and whose every vmstate
 * reads back (with the independent reader) as the bytes written for it.
 * Failures are allowed only with the codes that mean "not there", "in use"
 * or "closed", never a corruption or an internal error.
 *
 * The seed is printed; SNAPSTREAM_INTERLEAVE_SEED=N replays a run, and
 * SNAPSTREAM_INTERLEAVE_ROUNDS sets its length.
 */
import { pipeline } from 'node:stream/promises';
import { Readable, Writable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openImage, SnapshotError, type Image } from '../../src/index.js';
import { readSnapshotVmState } from '../helpers/qcow2-vmstate.js';
import { pseudoRandom, sha256 } from '../helpers/streams.js';
import { qemuImg, qemuIo } from '../helpers/tools.js';
import { guestWrite, qemuMissing, Workdir } from './fixtures.js';

const MiB = 1 << 20;
const SEED = Number(process.env.SNAPSTREAM_INTERLEAVE_SEED ?? Math.floor(Math.random() * 2 ** 31));
const ROUNDS = Number(process.env.SNAPSTREAM_INTERLEAVE_ROUNDS ?? 8);

/** mulberry32: a small seeded generator, so a failing run can be replayed. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

type Outcome = { op: string; name: string; ok: boolean; code?: string; message?: string };

/** A source that yields `data` in random pieces with random pauses, so a save stays open a while. */
function slowSource(data: Buffer, random: () => number): Readable {
  return Readable.from(
    (async function* () {
      for (let pos = 0; pos < data.length; ) {
        const n = Math.min(data.length - pos, 1 + Math.floor(random() * 256 * 1024));
        yield data.subarray(pos, pos + n);
        pos += n;
        if (random() < 0.3) await sleep(Math.floor(random() * 8));
      }
    })(),
  );
}

function outcomeOf(op: string, name: string, run: Promise<unknown>): Promise<Outcome> {
  return run.then(
    () => ({ op, name, ok: true }),
    (err: unknown) => ({
      op,
      name,
      ok: false,
      code: err instanceof SnapshotError ? err.code : `uncoded ${String(err)}`,
      message: String((err as Error)?.message ?? err),
    }),
  );
}

/** What may go wrong for each operation when it races others; anything else is a defect. */
const ALLOWED: Record<string, readonly string[]> = {
  save: ['IMAGE_CLOSED', 'SNAPSHOT_EXISTS'],
  delete: ['SNAPSHOT_NOT_FOUND', 'SNAPSHOT_IN_USE', 'IMAGE_CLOSED'],
  export: ['SNAPSHOT_NOT_FOUND', 'IMAGE_CLOSED'],
  check: ['IMAGE_CLOSED'],
  revert: ['SNAPSHOT_NOT_FOUND', 'IMAGE_CLOSED'],
};

describe.skipIf(qemuMissing)('operations on one image in any interleaving', () => {
  let work: Workdir;
  beforeAll(async () => {
    work = await Workdir.create('qcow2-interleave');
  });
  afterAll(async () => work?.cleanup());

  it(`keeps the image consistent and the snapshots as the outcomes say (seed ${SEED}, ${ROUNDS} rounds)`, async () => {
    console.log(`[interleave] seed ${SEED} (replay: SNAPSTREAM_INTERLEAVE_SEED=${SEED})`);
    const random = rng(SEED);
    const path = await work.image({ sizeBytes: 32 * MiB });
    await guestWrite(path, 'write -P 0x5a 0 2M');
    /** The model: snapshot name -> sha256 of its vmstate. */
    const model = new Map<string, string>();
    const contents = new Map<string, Buffer>();
    let serial = 0;
    const tally = new Map<string, number>();

    for (let round = 0; round < ROUNDS; round++) {
      const img = await openImage(path);
      const launched: Promise<Outcome>[] = [];
      const inFlight = new Set<string>();
      const ops = 4 + Math.floor(random() * 7);
      let closedMidway = false;
      for (let k = 0; k < ops; k++) {
        const pick = random();
        const existing = [...model.keys()];
        if (pick < 0.35 || existing.length === 0) {
          // A new save, or now and then one whose name is taken (with the same bytes, so that a
          // delete racing it leaves the name's content unambiguous whichever runs first).
          const reuse = existing.length > 0 && random() < 0.1;
          const name = reuse ? existing[Math.floor(random() * existing.length)]! : `s${serial++}`;
          const data = reuse ? contents.get(name)! : pseudoRandom(1 + Math.floor(random() * 2 * MiB), SEED + serial * 7919);
          contents.set(name, data);
          inFlight.add(name);
          launched.push(outcomeOf('save', name, pipeline(slowSource(data, random), img.createSnapshotStream(name))));
        } else if (pick < 0.6) {
          const pool = [...existing, ...inFlight, 'never-there'];
          const name = pool[Math.floor(random() * pool.length)]!;
          launched.push(outcomeOf('delete', name, img.deleteSnapshot(name)));
        } else if (pick < 0.68) {
          // The disk back to a snapshot (the guest data is the same in all, so the model does not change).
          const name = existing[Math.floor(random() * existing.length)]!;
          launched.push(outcomeOf('revert', name, img.revertSnapshot(name)));
        } else if (pick < 0.85) {
          const name = existing[Math.floor(random() * existing.length)]!;
          launched.push(outcomeOf('export', name, exportSha(img, name).then((sha) => expect(sha, `export ${name}`).toBe(model.get(name)))));
        } else if (pick < 0.95) {
          launched.push(outcomeOf('check', '', img.check().then((r) => expect(r).toMatchObject({ corruptions: 0, checkErrors: 0 }))));
        } else {
          closedMidway = true;
          launched.push(outcomeOf('close', '', img.close()));
        }
        if (random() < 0.5) await sleep(Math.floor(random() * 15));
      }
      const outcomes = await Promise.all(launched);
      await img.close();
      for (const o of outcomes) tally.set(`${o.op} ${o.ok ? 'ok' : o.code}`, (tally.get(`${o.op} ${o.ok ? 'ok' : o.code}`) ?? 0) + 1);
      const problems = outcomes.filter((o) => !o.ok && !(ALLOWED[o.op] ?? []).includes(o.code ?? ''));
      expect(problems, `round ${round}, seed ${SEED}`).toEqual([]);
      if (!closedMidway) expect(outcomes.filter((o) => o.code === 'IMAGE_CLOSED'), `round ${round}`).toEqual([]);

      // Apply what succeeded: a save adds its name, a delete removes it. Where both succeeded for one
      // name, either ran first: the image says which, and both outcomes are consistent.
      const saved = new Set(outcomes.filter((o) => o.op === 'save' && o.ok).map((o) => o.name));
      const deleted = new Set(outcomes.filter((o) => o.op === 'delete' && o.ok).map((o) => o.name));
      const listed = new Set((await qemuImg.snapshotList(path)).map((s) => s.name));
      for (const name of new Set([...saved, ...deleted])) {
        const present = saved.has(name) && deleted.has(name) ? listed.has(name) : saved.has(name);
        if (present) model.set(name, sha256(contents.get(name)!));
        else model.delete(name);
      }
      await expectImageMatches(path, model, `round ${round}, seed ${SEED}`);
    }
    console.log(`[interleave] outcomes: ${[...tally].map(([k, v]) => `${k} ${v}`).join(', ')}`);
  });
});

async function exportSha(img: Image, name: string): Promise<string> {
  const chunks: Buffer[] = [];
  await pipeline(
    img.createVmStateReadStream(name),
    new Writable({
      write(chunk: Buffer, _encoding, callback) {
        chunks.push(chunk);
        callback();
      },
    }),
  );
  return sha256(chunks);
}

async function expectImageMatches(path: string, model: Map<string, string>, where: string): Promise<void> {
  const check = await qemuImg.check(path);
  expect(check.exitCode, `${where}: qemu-img check ${JSON.stringify(check)}`).toBe(0);
  const listed = (await qemuImg.snapshotList(path)).map((s) => s.name).sort();
  expect(listed, where).toEqual([...model.keys()].sort());
  for (const [name, sha] of model) expect(sha256(await readSnapshotVmState(path, name)), `${where}: vmstate of ${name}`).toBe(sha);
  // Every snapshot and every revert kept the guest data written before the first round.
  await qemuIo(path, ['read -P 0x5a 0 2M']);
}
