/**
 * `node bench/run.js --quick` (the bench's smoke run) works on this tree, the
 * hot-path suite included:
 * every registered case runs once on a small stream, each output that can be
 * checked is compared byte for byte with the stream (SHA-256, bench/run.js
 * --verify), and the samples come out. A case broken by a change to the
 * library (a signature, an option) fails here rather than in the next
 * `npm run bench`. Rates are not judged: speed is the bench's business.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runOk, tmpDir, type TmpDir } from '../helpers/tools.js';

const ROOT = join(import.meta.dirname, '..', '..');

interface BenchResult {
  id: string;
  samples: Array<{ bytes: number; seconds: number }>;
}

describe('bench/run.js --quick', () => {
  let dir: TmpDir;
  beforeAll(async () => {
    dir = await tmpDir('bench-quick');
  });
  afterAll(async () => dir?.cleanup());

  it('runs every registered case on a small stream and verifies what it wrote', async () => {
    const { CASES } = (await import(join(ROOT, 'bench', 'cases', 'index.js'))) as { CASES: Array<{ id: string; available?: () => string | undefined }> };
    const r = await runOk(process.execPath, [join(ROOT, 'bench', 'run.js'), '--quick', '--no-hot-path', '--results', dir.path], { cwd: ROOT, timeoutMs: 600_000 });
    const run = JSON.parse(readFileSync(join(dir.path, 'latest.json'), 'utf8')) as { results: BenchResult[] };
    const ran = new Map(run.results.map((res) => [res.id, res]));
    // A case may be unavailable here (fio not installed): then it says why and is left out.
    const expected = CASES.filter((c) => c.available?.() === undefined).map((c) => c.id);
    expect(expected.length).toBeGreaterThan(20);
    for (const id of expected) {
      const res = ran.get(id);
      expect(res, `case ${id} ran\n${r.stdout}`).toBeDefined();
      expect(res!.samples).toHaveLength(1);
      expect(res!.samples[0]!.bytes, id).toBeGreaterThan(0);
      expect(res!.samples[0]!.seconds, id).toBeGreaterThan(0);
    }
    expect(r.stdout).toContain('targets');
  }, 660_000);

  it('runs the hot-path suite (its stand-in targets included) and saves its results where asked', async () => {
    const out = join(dir.path, 'hot');
    const r = await runOk(process.execPath, [join(ROOT, 'bench', 'run.js'), '--quick', '--hot-path-only', '--results', out], { cwd: ROOT, timeoutMs: 300_000 });
    expect(r.stdout).toMatch(/target: (PASS|MISS) {2}SnapshotStream \(null sink\) 8 B \+ 4 KiB at [\d.]+x/);
    const saved = JSON.parse(readFileSync(join(out, 'hot-path.json'), 'utf8')) as { results: Array<{ name: string; ops: number }> };
    expect(saved.results.map((x) => x.name)).toHaveLength(5);
    for (const x of saved.results) expect(x.ops, x.name).toBeGreaterThan(0);
  }, 330_000);
});
