/**
 * Hostile images (hostile-images.ts): every one must be refused with a coded
 * SnapshotError before a single byte of it changes, without a crash, a hang
 * or a memory blow-up. Opening validates the header, the active L1 and the
 * snapshot table; structures read later (L2 tables, refcount blocks) must at
 * least stop a save before it writes.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as api from '../../src/index.js';
import { SnapshotError } from '../../src/index.js';
import { openImage } from '../../src/qcow2/image.js';
import { fromChunks } from '../helpers/streams.js';
import { qemuImg, requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';
import { hostileCases, makeSeeds, type HostileCase } from './hostile-images.js';
import { privateBuild, REPO } from './private-build.js';

const execFileAsync = promisify(execFile);
/** The codes a refusal may carry: the damage is in the image, not in the caller or the OS. */
const REFUSAL_CODES = new Set(['QCOW2_CORRUPT', 'QCOW2_UNSUPPORTED', 'NOT_QCOW2', 'IMAGE_DIRTY']);
/** Generous per-operation bound: a valid open of these images takes milliseconds. */
const OP_TIMEOUT_MS = 10_000;
/** The brief's bound for the open path on the worst inputs, Node's own ~45 MiB included. */
const MAX_RSS_BYTES = 256 << 20;

const skip = requireTool('qemu-img', 'qemu-io');


let dir: TmpDir;
let cases: HostileCase[] = [];
const paths = new Map<string, string>();

beforeAll(async () => {
  if (skip !== undefined) return;
  dir = await tmpDir('hostile');
  const seeds = await makeSeeds(dir.path);
  cases = seeds.flatMap(hostileCases);
  let i = 0;
  for (const c of cases) {
    const path = join(dir.path, `case-${i++}.qcow2`);
    await writeFile(path, c.bytes);
    paths.set(c.name, path);
  }
});
afterAll(async () => {
  await dir?.cleanup();
});

function sha256(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}

async function fileSha(path: string): Promise<string> {
  return sha256(await readFile(path));
}

/** For a failure message: how the file differs, and what qemu-img check now says. */
async function whatChanged(path: string, before: Buffer): Promise<string> {
  const after = await readFile(path);
  let first = 0;
  while (first < Math.min(after.length, before.length) && after[first] === before[first]) first++;
  const check = await qemuImg.check(path).catch((e: unknown) => ({ exitCode: -1, error: String(e) }));
  const verdict = { 0: 'clean', 1: 'check failed', 2: 'CORRUPT', 3: 'leaks only' }[check.exitCode] ?? `exit ${check.exitCode}`;
  return `size ${before.length} -> ${after.length}, first difference at ${first}; qemu-img check: ${verdict}`;
}

async function openAndClose(path: string, options: { readOnly?: boolean }): Promise<{ ok: true; value: unknown } | { ok: false; error: unknown }> {
  return outcome(
    (async () => {
      const img = await openImage(path, options);
      await img.close();
    })(),
  );
}

/** Settles `promise` within OP_TIMEOUT_MS, or reports a hang. */
async function outcome(promise: Promise<unknown>): Promise<{ ok: true; value: unknown } | { ok: false; error: unknown }> {
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${OP_TIMEOUT_MS} ms (hang)`)), OP_TIMEOUT_MS);
  });
  try {
    return { ok: true, value: await Promise.race([promise, hang]) };
  } catch (error) {
    return { ok: false, error };
  } finally {
    clearTimeout(timer);
  }
}

function describeError(error: unknown): string {
  if (error instanceof SnapshotError) return `${error.code}: ${error.message}`;
  if (error instanceof Error) return `uncoded ${error.name}: ${error.message}`;
  return `non-error ${String(error)}`;
}

function isRefusal(error: unknown): boolean {
  return error instanceof SnapshotError && REFUSAL_CODES.has(String(error.code));
}

/** The public save path: `createSnapshotStream(image, { snapshot })`. */
async function attemptSave(path: string): Promise<{ ok: true; value: unknown } | { ok: false; error: unknown }> {
  const vmstate = fromChunks([Buffer.alloc(1 << 20, 0x42)]);
  return outcome(pipeline(vmstate, api.createSnapshotStream(path, { snapshot: 'x' })));
}

describe.skipIf(skip !== undefined)('hostile images', () => {
  it('are each refused with QCOW2_CORRUPT or QCOW2_UNSUPPORTED before any byte changes, within bounded time', async () => {
    const problems: string[] = [];
    let refusedAtOpen = 0;
    let refusedAtSave = 0;
    for (const c of cases) {
      const path = paths.get(c.name) as string;
      const before = sha256(c.bytes);
      const readOnly = await openAndClose(path, { readOnly: true });
      const writable = await openAndClose(path, {});
      for (const [what, result] of [['read-only open', readOnly], ['writable open', writable]] as const) {
        if (result.ok) {
          if (c.stage === 'open') problems.push(`${c.name}: ${what} accepted it`);
        } else if (!isRefusal(result.error)) {
          problems.push(`${c.name}: ${what} failed with ${describeError(result.error)}`);
        }
      }
      const save = await attemptSave(path);
      if (save.ok) problems.push(`${c.name}: a save into it succeeded`);
      else if (!isRefusal(save.error)) problems.push(`${c.name}: the save failed with ${describeError(save.error)}`);
      const after = await fileSha(path);
      if (after !== before) problems.push(`${c.name}: the file changed (${await whatChanged(path, c.bytes)})`);
      const openRefused = !readOnly.ok && isRefusal(readOnly.error) && !writable.ok && isRefusal(writable.error);
      if (openRefused) refusedAtOpen++;
      else if (!save.ok && isRefusal(save.error) && after === before) refusedAtSave++;
    }
    const refused = refusedAtOpen + refusedAtSave;
    const tried = cases.length;
    console.log(
      `[hostile] ${refused}/${tried} refused with a coded error and no byte changed ` +
        `(${refusedAtOpen} at open, ${refusedAtSave} only at save);`,
    );
    if (problems.length > 0) console.log(`[hostile] problems:\n  ${problems.join('\n  ')}`);
    expect(cases.length).toBeGreaterThan(150);
    expect(problems).toEqual([]);
  });

  it('opens the worst of them in a child process whose peak RSS stays under 256 MiB', async () => {
    // A private build, so the child runs exactly this tree's src/ whatever
    // state dist/ is in; build/ (the addon) is shared read-only.
    const dist = await privateBuild(join(dir.path, 'private'));
    const list = join(dir.path, 'list.json');
    await writeFile(list, JSON.stringify(cases.map((c) => paths.get(c.name))));
    const { stdout } = await execFileAsync(
      process.execPath,
      [join(REPO, 'test/reliability/fixtures/open-child.mjs'), dist, list],
      { timeout: 120_000, maxBuffer: 16 << 20 },
    );
    const report = JSON.parse(stdout) as { results: { code: string | null }[]; maxRssBytes: number };
    console.log(`[hostile] child opened ${report.results.length} images read-only; peak RSS ${(report.maxRssBytes / 2 ** 20).toFixed(1)} MiB`);
    expect(report.results.length).toBe(cases.length);
    expect(report.maxRssBytes).toBeLessThan(MAX_RSS_BYTES);
  });
});
