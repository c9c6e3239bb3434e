/**
 * Coverage-guided mutation fuzzing of the qcow2 header decoder/validator, the
 * snapshot table decoder and the whole read-only open path (fuzzer.ts says
 * what guides it and what it cannot see). The default run is short (~30 s in
 * all) for the test suite; `npm run fuzz` sets FUZZ_SECONDS for a longer one.
 * FUZZ_SEED picks another sequence; FUZZ_GUIDED=0 runs blind, for comparison.
 * Findings are written under FUZZ_FINDINGS_DIR (or a temp dir that is kept
 * when there are findings) for replay. The corpus starts from the seeds plus
 * test/fuzz/corpus/<target>.json; FUZZ_SAVE_CORPUS=1 rewrites those files.
 */
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';
import { makeSeeds, type SeedImage } from '../reliability/hostile-images.js';
import { fuzz, type FuzzStats, type TargetName } from './fuzzer.js';
import { loadCorpus, saveCorpus } from './corpus.js';

const TOTAL_SECONDS = Number(process.env.FUZZ_SECONDS ?? 30);
const BASE_SEED = Number(process.env.FUZZ_SEED ?? 20240601);
const GUIDED = process.env.FUZZ_GUIDED !== '0';
const CORPUS_DIR = new URL('./corpus/', import.meta.url);
/** Open is the widest target; the two pure decoders get a quarter each. */
const SHARE: Record<TargetName, number> = { open: 0.5, header: 0.25, 'snapshot-table': 0.25 };

const skip = requireTool('qemu-img', 'qemu-io');
let dir: TmpDir;
let seeds: SeedImage[] = [];
let findingsDir: string;
let anyFindings = false;

beforeAll(async () => {
  if (skip !== undefined) return;
  dir = await tmpDir('fuzz');
  seeds = await makeSeeds(dir.path);
  findingsDir = process.env.FUZZ_FINDINGS_DIR ?? (await mkdtemp(join(tmpdir(), 'snapstream-fuzz-findings-')));
  await mkdir(findingsDir, { recursive: true });
});
afterAll(async () => {
  await dir?.cleanup();
  if (!anyFindings && process.env.FUZZ_FINDINGS_DIR === undefined && findingsDir !== undefined) {
    await rm(findingsDir, { recursive: true, force: true });
  }
});

function report(stats: FuzzStats, seconds: number, seed: number): void {
  const c = stats.coverage;
  const pct = (a: number, b: number): string => `${((100 * a) / Math.max(1, b)).toFixed(1)}%`;
  console.log(
    `[fuzz] ${stats.target}: ${stats.executions} executions in ${seconds}s (${(stats.executions / stats.seconds).toFixed(0)}/s, ` +
      `seed ${seed}, ${GUIDED ? 'guided' : 'blind'}); +${stats.replays} replays (${stats.unattributed} batches unattributed), mean coverage take ${stats.meanTakeMs.toFixed(2)} ms; ` +
      `corpus ${stats.corpus.length} (${stats.kept} kept for new coverage); ` +
      `${stats.accepted} accepted, ${stats.refused} refused, ${stats.distinctRefusals} distinct refusal messages, ${stats.findingList.length} findings`,
  );
  if (c !== undefined) {
    console.log(
      `[fuzz] ${stats.target}: blocks ${c.blocksCovered}/${c.blocksKnown} (${pct(c.blocksCovered, c.blocksKnown)}) of those V8 has reported in ` +
        `${c.scripts} scripts (a function that never ran counts as one); functions ${c.functionsRan}/${c.functionsKnown}; ` +
        `bytes ${c.bytesCovered}/${c.bytesInFunctions} (${pct(c.bytesCovered, c.bytesInFunctions)}); ` +
        `${c.functionGranularityOnly} ran without block counters`,
    );
  }
  for (const line of stats.progress) console.log(`[fuzz]   ${line}`);
}

describe.skipIf(skip !== undefined)('qcow2 fuzzing (coverage-guided mutations of qemu-img images)', () => {
  for (const target of Object.keys(SHARE) as TargetName[]) {
    const seconds = TOTAL_SECONDS * SHARE[target];
    it(
      `${target}: every mutated input is accepted or refused with a qcow2 code, within bounds`,
      async () => {
        const seed = BASE_SEED + target.length;
        const corpusFile = new URL(`${target}.json`, CORPUS_DIR);
        const corpus = loadCorpus(seeds, await readFile(corpusFile, 'utf8').catch(() => undefined));
        const stats = await fuzz(target, seeds, { seconds, seed, findingsDir, guided: GUIDED, corpus });
        report(stats, seconds, seed);
        for (const f of stats.findingList.slice(0, 10)) console.log(`[fuzz]   ${f.problem}  (replay: ${f.file})`);
        if (stats.findingList.length > 0) anyFindings = true;
        if (process.env.FUZZ_SAVE_CORPUS === '1') {
          await mkdir(CORPUS_DIR, { recursive: true });
          await writeFile(corpusFile, saveCorpus(seeds, stats.corpus));
        }
        expect(stats.executions).toBeGreaterThan(100);
        expect(stats.findingList.map((f) => f.problem)).toEqual([]);
      },
      (seconds + 60) * 1000,
    );
  }
});
