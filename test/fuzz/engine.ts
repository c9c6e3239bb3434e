/**
 * The fuzzing loop, independent of what is fuzzed: AFL's shape with V8 block
 * coverage (coverage.ts) as the signal.
 *
 * Pick a corpus entry (half the time the least-picked of the newest
 * RECENT_WINDOW entries, which are the ones that reached something new; else
 * any entry), mutate it, run it through the oracle, and keep it when it ran a
 * source position no earlier input ran. With `guided: false` the corpus never
 * grows past the initial inputs: the same mutators, blind.
 *
 * Coverage is taken once per batch of inputs, because each take costs
 * 0.6-3 ms inside a vitest worker whatever ran (measured). The batch doubles
 * after a batch with nothing new (up to MAX_BATCH) and drops to one after a
 * batch with something new, whose inputs are then replayed one by one, each
 * with its own take, to find which of them to keep. A batch's positions are
 * the union of its inputs' positions, so batching should lose nothing; when
 * no replay reproduces what the batch ran, that is counted (`unattributed`)
 * and the positions are recorded anyway. Replays are counted apart from
 * executions of new inputs.
 */
import type { BlockCoverage, CoverageSummary } from './coverage.js';

/** At 64 inputs per take a ~1 ms take adds ~16 us to a ~65 us open; larger batches mostly make replays longer. */
const MAX_BATCH = 64;
/** New entries get half the picks among this many of the newest. */
const RECENT_WINDOW = 16;
/** How often a progress line is recorded. */
const PROGRESS_EVERY_MS = 5000;

/** mulberry32: small, fast, and the same sequence for the same seed everywhere. */
export class Rng {
  private _s: number;
  constructor(seed: number) {
    this._s = seed >>> 0;
  }
  next(): number {
    let t = (this._s = (this._s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)] as T;
  }
}

export interface Outcome {
  /** Set when the oracle refuses the behaviour: a finding. */
  problem?: string;
  /** The normalized refusal message when the input was refused as it should be. */
  refusal?: string;
}

export interface LoopOptions<I> {
  seconds: number;
  /** Stop after this many executions of new inputs too: a budget that does not depend on the machine's speed. */
  maxExecutions?: number;
  seed: number;
  /** Coverage to be guided by; undefined runs blind. */
  coverage: BlockCoverage | undefined;
  initial: readonly I[];
  mutate(rng: Rng, parent: I, other: () => I): I;
  execute(input: I): Promise<Outcome>;
  /** Called once per finding; return false to stop the loop. */
  onFinding(input: I, problem: string, execution: number): boolean;
}

interface Entry<I> {
  input: I;
  picks: number;
}

export interface LoopStats<I> {
  executions: number;
  /** Re-executions of a batch's inputs to attribute new coverage; not in `executions`. */
  replays: number;
  /** Batches whose new coverage no single replay reproduced (see BlockCoverage.commit). */
  unattributed: number;
  seconds: number;
  accepted: number;
  refused: number;
  distinctRefusals: number;
  findings: number;
  corpus: I[];
  /** Inputs kept for new coverage (the corpus minus the initial inputs). */
  kept: number;
  coverage: CoverageSummary | undefined;
  meanTakeMs: number;
  progress: string[];
}

function pickEntry<I>(rng: Rng, corpus: Entry<I>[], initialCount: number): Entry<I> {
  if (corpus.length > initialCount && rng.int(2) === 0) {
    let best = corpus[corpus.length - 1] as Entry<I>;
    for (let i = corpus.length - 1; i >= Math.max(initialCount, corpus.length - RECENT_WINDOW); i--) {
      const e = corpus[i] as Entry<I>;
      if (e.picks < best.picks) best = e;
    }
    return best;
  }
  return rng.pick(corpus);
}

export async function runLoop<I>(options: LoopOptions<I>): Promise<LoopStats<I>> {
  const rng = new Rng(options.seed);
  const corpus: Entry<I>[] = options.initial.map((input) => ({ input, picks: 0 }));
  if (corpus.length === 0) throw new Error('fuzz: an empty initial corpus');
  const refusals = new Set<string>();
  const coverage = options.coverage;
  const stats: LoopStats<I> = {
    executions: 0, replays: 0, unattributed: 0, seconds: 0, accepted: 0, refused: 0, distinctRefusals: 0, findings: 0,
    corpus: [], kept: 0, coverage: undefined, meanTakeMs: 0, progress: [],
  };
  const t0 = performance.now();
  const deadline = t0 + options.seconds * 1000;
  let nextProgress = t0 + PROGRESS_EVERY_MS;
  let batch: I[] = [];
  let batchSize = 1;
  let stop = false;

  const record = (): void => {
    const s = (performance.now() - t0) / 1000;
    const c = coverage?.summary();
    const cov = c === undefined ? 'blind' : `${c.blocksCovered}/${c.blocksKnown} blocks, ${c.bytesCovered}/${c.bytesInFunctions} bytes`;
    stats.progress.push(`${s.toFixed(1)}s: ${stats.executions} execs (${(stats.executions / s).toFixed(0)}/s), corpus ${corpus.length}, ${cov}`);
  };
  const check = (input: I, outcome: Outcome): void => {
    if (outcome.problem !== undefined) {
      stats.findings++;
      if (!options.onFinding(input, outcome.problem, stats.executions)) stop = true;
    } else if (outcome.refusal !== undefined) {
      stats.refused++;
      refusals.add(outcome.refusal);
    } else stats.accepted++;
  };

  if (coverage !== undefined) {
    // The initial inputs define the starting coverage; none of it counts as new.
    for (const e of corpus) await options.execute(e.input);
    coverage.collect();
  }
  const maxExecutions = options.maxExecutions ?? Number.POSITIVE_INFINITY;
  while (!stop && stats.executions < maxExecutions && performance.now() < deadline) {
    const parent = pickEntry(rng, corpus, options.initial.length);
    parent.picks++;
    const child = options.mutate(rng, parent.input, () => rng.pick(corpus).input);
    check(child, await options.execute(child));
    stats.executions++;
    if (performance.now() >= nextProgress) {
      record();
      nextProgress += PROGRESS_EVERY_MS;
    }
    if (coverage === undefined) continue;
    batch.push(child);
    if (batch.length < batchSize) continue;
    const single = batch.length === 1;
    if (!coverage.collect(single)) {
      batchSize = Math.min(batchSize * 2, MAX_BATCH);
    } else if (single) {
      corpus.push({ input: child, picks: 0 });
    } else {
      const found = coverage.pending();
      let attributed = false;
      for (const input of batch) {
        await options.execute(input);
        stats.replays++;
        if (coverage.collect()) {
          corpus.push({ input, picks: 0 });
          attributed = true;
        }
      }
      coverage.commit(found);
      if (!attributed) stats.unattributed++;
      batchSize = 1;
    }
    batch = [];
  }
  stats.seconds = (performance.now() - t0) / 1000;
  record();
  stats.distinctRefusals = refusals.size;
  stats.corpus = corpus.map((e) => e.input);
  stats.kept = corpus.length - options.initial.length;
  stats.coverage = coverage?.summary();
  stats.meanTakeMs = coverage?.meanTakeMs ?? 0;
  return stats;
}
