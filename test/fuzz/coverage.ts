/**
 * V8 block coverage read through node:inspector, as the feedback signal of
 * the fuzzer (engine.ts).
 *
 * Precise coverage with `callCount: true, detailed: true` gives, per function
 * that ran, its range and every nested block range whose count differs from
 * the range around it (V8 drops a nested block that ran exactly as often as
 * its parent, and merges adjacent blocks with equal counts). So a source
 * position ran iff the innermost reported range holding it has a count > 0.
 * We keep, per targeted script, the set of positions that ever ran as sorted
 * disjoint intervals, and an execution is "new coverage" when it ran a
 * position that no earlier execution ran. Positions rather than range ids,
 * because the same blocks are reported cut differently as counts vary.
 *
 * `Profiler.takePreciseCoverage` returns the counts since the previous call
 * and resets them (Node 20 / V8 11.3, callCount mode), and `Session.post` on
 * the Profiler domain calls back synchronously on this thread, so `collect()`
 * is synchronous. Its cost does not depend on what ran: V8 walks every
 * function of every script in the isolate: 0.6-3 ms per call inside a vitest
 * worker (measured; ~0.15 ms in a bare node process), where one open of a
 * seed image takes ~0.1 ms. Hence the batching in engine.ts.
 *
 * Only functions compiled after `startPreciseCoverage` carry block counters;
 * anything compiled earlier reports function granularity only. Start the
 * coverage before the first call into the targeted code.
 */
import { Session } from 'node:inspector';

interface Range {
  startOffset: number;
  endOffset: number;
  count: number;
}
interface FunctionCoverage {
  functionName: string;
  ranges: Range[];
  isBlockCoverage: boolean;
}
interface ScriptCoverage {
  url: string;
  functions: FunctionCoverage[];
}

/** Sorted, disjoint [start, end) intervals of source positions. */
class IntervalSet {
  private _starts: number[] = [];
  private _ends: number[] = [];

  /** Index of the last interval starting at or before `pos`, or -1. */
  private _floor(pos: number): number {
    let lo = 0;
    let hi = this._starts.length - 1;
    let found = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if ((this._starts[mid] as number) <= pos) {
        found = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    return found;
  }

  contains(start: number, end: number): boolean {
    const i = this._floor(start);
    return i >= 0 && (this._ends[i] as number) >= end;
  }

  add(start: number, end: number): void {
    let i = this._floor(start);
    if (i < 0 || (this._ends[i] as number) < start) i++;
    let j = i;
    let s = start;
    let e = end;
    while (j < this._starts.length && (this._starts[j] as number) <= e) {
      s = Math.min(s, this._starts[j] as number);
      e = Math.max(e, this._ends[j] as number);
      j++;
    }
    this._starts.splice(i, j - i, s);
    this._ends.splice(i, j - i, e);
  }

  bytes(): number {
    let n = 0;
    for (let i = 0; i < this._starts.length; i++) n += (this._ends[i] as number) - (this._starts[i] as number);
    return n;
  }
}

interface ScriptState {
  covered: IntervalSet;
  /** Segment keys already known to lie inside `covered`: skips the search for the common case. */
  seenSegments: Set<number>;
  /** Every block range V8 has reported here ("start:end"), run or not. */
  knownBlocks: Set<string>;
  /** Function ranges V8 has reported here ("start:end"). */
  knownFunctions: Set<string>;
  ranFunctions: Set<string>;
  /** Functions that ran without block counters (compiled before coverage started). */
  functionGranularity: Set<string>;
  /** Union of the function ranges: the code that coverage can speak about. */
  code: IntervalSet;
}

export interface CoverageSummary {
  scripts: number;
  /** Known block ranges whose first position ever ran / all known block ranges. */
  blocksCovered: number;
  blocksKnown: number;
  functionsRan: number;
  functionsKnown: number;
  /** Source positions (of the transformed script) that ever ran / inside any function. */
  bytesCovered: number;
  bytesInFunctions: number;
  functionGranularityOnly: number;
}

let session: Session | undefined;

function post<T>(method: string, params?: object): T {
  if (session === undefined) throw new Error('coverage: no inspector session');
  let result: T | undefined;
  let failure: Error | null = null;
  session.post(method, params ?? {}, (error, r) => {
    failure = error;
    result = r as T;
  });
  if (failure !== null) throw failure;
  // Checked, not assumed: the callback must already have run.
  if (result === undefined) throw new Error(`coverage: ${method} did not answer synchronously`);
  return result;
}

/** Starts precise block coverage for the whole isolate, once; it is never stopped (stopping resets it). */
function ensureSession(): void {
  if (session !== undefined) return;
  session = new Session();
  session.connect();
  post('Profiler.enable');
  post('Profiler.startPreciseCoverage', { callCount: true, detailed: true });
}

export class BlockCoverage {
  private readonly _scripts = new Map<string, ScriptState>();
  /** Positions a `collect(false)` found new, for `commitPending()`. */
  private _pending: [ScriptState, number, number][] = [];
  private _takes = 0;
  private _takeMs = 0;

  /** `wanted` selects the scripts, by url, whose blocks count. Starts coverage now. */
  constructor(private readonly _wanted: (url: string) => boolean) {
    ensureSession();
    this.collect(); // drops counts from before this instance
  }

  get takes(): number {
    return this._takes;
  }
  get meanTakeMs(): number {
    return this._takes === 0 ? 0 : this._takeMs / this._takes;
  }

  /**
   * Takes (and resets) the counts since the last call; true when a never-run
   * position ran. With `commit` false the new positions are only detected, not
   * recorded, so that replaying the inputs one by one finds them again.
   */
  collect(commit = true): boolean {
    const t0 = performance.now();
    const { result } = post<{ result: ScriptCoverage[] }>('Profiler.takePreciseCoverage');
    this._takeMs += performance.now() - t0;
    this._takes++;
    this._pending = [];
    let novel = false;
    for (const script of result) {
      if (!this._wanted(script.url)) continue;
      let state = this._scripts.get(script.url);
      if (state === undefined) {
        state = {
          covered: new IntervalSet(), seenSegments: new Set(), knownBlocks: new Set(), knownFunctions: new Set(),
          ranFunctions: new Set(), functionGranularity: new Set(), code: new IntervalSet(),
        };
        this._scripts.set(script.url, state);
      }
      for (const fn of script.functions) {
        if (this._absorb(state, fn, commit)) novel = true;
      }
    }
    return novel;
  }

  private _absorb(state: ScriptState, fn: FunctionCoverage, commit: boolean): boolean {
    const outer = fn.ranges[0];
    if (outer === undefined) return false;
    const fnKey = `${outer.startOffset}:${outer.endOffset}`;
    if (!state.knownFunctions.has(fnKey)) {
      state.knownFunctions.add(fnKey);
      state.code.add(outer.startOffset, outer.endOffset);
    }
    for (const r of fn.ranges) state.knownBlocks.add(`${r.startOffset}:${r.endOffset}`);
    if (outer.count > 0) {
      state.ranFunctions.add(fnKey);
      if (!fn.isBlockCoverage) state.functionGranularity.add(fnKey);
    }
    let novel = false;
    forEachRunSegment(fn.ranges, (start, end) => {
      // Positions fit in 24 bits for any script here; start * 2^24 + end is an exact key.
      const key = start * 16777216 + end;
      if (state.seenSegments.has(key)) return;
      if (state.covered.contains(start, end)) {
        state.seenSegments.add(key);
      } else {
        novel = true;
        if (commit) {
          state.covered.add(start, end);
          state.seenSegments.add(key);
        } else this._pending.push([state, start, end]);
      }
    });
    return novel;
  }

  /** What the last `collect(false)` found new, to hand to `commit()` later. */
  pending(): readonly [object, number, number][] {
    return this._pending;
  }

  /**
   * Records positions a batch ran that no single replay of it ran again:
   * the batch ran them, but which input did cannot be told. Seen on one
   * branch of header-validate.ts once the open target had warmed it up;
   * without this, every later batch would be replayed for them.
   */
  commit(found: readonly [object, number, number][]): void {
    for (const [state, start, end] of found as readonly [ScriptState, number, number][]) {
      state.covered.add(start, end);
      state.seenSegments.add(start * 16777216 + end);
    }
  }

  summary(): CoverageSummary {
    const s: CoverageSummary = {
      scripts: this._scripts.size, blocksCovered: 0, blocksKnown: 0, functionsRan: 0, functionsKnown: 0,
      bytesCovered: 0, bytesInFunctions: 0, functionGranularityOnly: 0,
    };
    for (const state of this._scripts.values()) {
      s.blocksKnown += state.knownBlocks.size;
      for (const key of state.knownBlocks) {
        const start = Number(key.slice(0, key.indexOf(':')));
        if (state.covered.contains(start, start + 1)) s.blocksCovered++;
      }
      s.functionsKnown += state.knownFunctions.size;
      s.functionsRan += state.ranFunctions.size;
      s.bytesCovered += state.covered.bytes();
      s.bytesInFunctions += state.code.bytes();
      s.functionGranularityOnly += state.functionGranularity.size;
    }
    return s;
  }
}

/**
 * Calls `emit(start, end)` for each maximal stretch of a function whose
 * innermost range has a count > 0. V8 sorts a function's ranges by start,
 * outer before inner, and nests them properly: a stack sweep suffices.
 */
export function forEachRunSegment(ranges: readonly Range[], emit: (start: number, end: number) => void): void {
  const stack: Range[] = [];
  let pos = ranges[0]?.startOffset ?? 0;
  const close = (upTo: number): void => {
    const top = stack[stack.length - 1] as Range;
    if (upTo > pos && top.count > 0) emit(pos, upTo);
    pos = Math.max(pos, upTo);
  };
  for (const r of ranges) {
    while (stack.length > 0 && (stack[stack.length - 1] as Range).endOffset <= r.startOffset) {
      close((stack[stack.length - 1] as Range).endOffset);
      stack.pop();
    }
    if (stack.length > 0) close(r.startOffset);
    pos = Math.max(pos, r.startOffset);
    stack.push(r);
  }
  while (stack.length > 0) {
    close((stack[stack.length - 1] as Range).endOffset);
    stack.pop();
  }
}
