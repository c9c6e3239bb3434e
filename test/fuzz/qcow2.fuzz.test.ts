/**
 * Seeded mutation fuzzing of the qcow2 header decoder/validator, the snapshot
 * table decoder and the whole read-only open path (fuzzer.ts says what it is
 * and is not). The default run is short (~30 s in all) for the test suite;
 * `npm run fuzz` sets FUZZ_SECONDS for a longer one. FUZZ_SEED picks another
 * deterministic sequence; findings are written under FUZZ_FINDINGS_DIR (or a
 * temp dir that is kept when there are findings) for replay.
 */
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';
import { makeSeeds, type SeedImage } from '../reliability/hostile-images.js';
import { fuzz, type TargetName } from './fuzzer.js';

const TOTAL_SECONDS = Number(process.env.FUZZ_SECONDS ?? 30);
const BASE_SEED = Number(process.env.FUZZ_SEED ?? 20240601);
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

describe.skipIf(skip !== undefined)('qcow2 fuzzing (seeded mutations of qemu-img images, not coverage-guided)', () => {
  for (const target of Object.keys(SHARE) as TargetName[]) {
    const seconds = TOTAL_SECONDS * SHARE[target];
    it(
      `${target}: every mutated input is accepted or refused with a qcow2 code, within bounds`,
      async () => {
        const stats = await fuzz(target, seeds, { seconds, seed: BASE_SEED + target.length, findingsDir });
        console.log(
          `[fuzz] ${target}: ${stats.executions} executions in ${seconds}s (seed ${BASE_SEED + target.length}); ` +
            `${stats.accepted} accepted, ${stats.refused} refused, ${stats.distinctRefusals} distinct refusal messages, ` +
            `${stats.findings.length} findings`,
        );
        for (const f of stats.findings.slice(0, 10)) console.log(`[fuzz]   ${f.problem}  (replay: ${f.file})`);
        if (stats.findings.length > 0) anyFindings = true;
        expect(stats.executions).toBeGreaterThan(100);
        expect(stats.findings.map((f) => f.problem)).toEqual([]);
      },
      (seconds + 60) * 1000,
    );
  }
});
