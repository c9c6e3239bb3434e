/**
 * A seeded, coverage-guided mutation fuzzer for the qcow2 decoders and the
 * open path.
 *
 * What guides it: V8's own block coverage, read through node:inspector
 * (coverage.ts) and restricted to the scripts of src/qcow2/ and
 * src/errors.ts. An input is kept in the corpus when it ran a source position
 * of those scripts that no earlier input ran (engine.ts has the loop). It is
 * not libFuzzer or SanitizerCoverage: there are no edge counters, no
 * comparison tracing (cmplog) and no value profile, only which JavaScript
 * blocks ran. Native addon code is not covered at all: it is exercised by
 * the ASan build (`npm run test:asan`) instead. Jazzer.js could not be used:
 * @jazzer.js/core 4.0.0's only linux-x64 binary needs GLIBC_2.38 (Debian 12
 * has 2.36), and 2.1.0's install fetches from github.com, unreachable here.
 *
 * Inputs are patches over the qemu-img seed images (about 2 MiB each), applied
 * to one scratch copy per seed and undone after each run, so an execution
 * copies only the bytes it changes. Mutations: the structure-aware ones aimed
 * at the fixed header fields, the first snapshot entry, and the first L1 and
 * refcount table entries (offsets known from the seed) with values on every
 * limit the validator knows, plus the generic set in mutators.ts.
 *
 * Oracle, per input: the target either succeeds or throws a SnapshotError
 * coded QCOW2_CORRUPT / QCOW2_UNSUPPORTED / NOT_QCOW2 / IMAGE_DIRTY. Anything else (a RangeError from a
 * Buffer read out of bounds, a TypeError, an uncoded Error, an allocation
 * above MAX_ALLOC_BYTES, a write attempted on the read-only path, an input
 * taking longer than SLOW_INPUT_MS) is a finding and is saved for replay.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { SnapshotError } from '../../src/errors.js';
import { decodeHeader, probeClusterBits } from '../../src/qcow2/header.js';
import { validateHeader } from '../../src/qcow2/header-validate.js';
import { loadImageState } from '../../src/qcow2/image-state.js';
import type { MetaFile } from '../../src/qcow2/file.js';
import { decodeSnapshotTable } from '../../src/qcow2/snapshot-table.js';
import { H, S, type SeedImage } from '../reliability/hostile-images.js';
import { BlockCoverage } from './coverage.js';
import { runLoop, type LoopStats, type Outcome, type Rng } from './engine.js';
import { havoc, type Canvas } from './mutators.js';

export { Rng } from './engine.js';

const REFUSAL_CODES = new Set(['QCOW2_CORRUPT', 'QCOW2_UNSUPPORTED', 'NOT_QCOW2', 'IMAGE_DIRTY']);
/** QEMU's largest table is the 64 MiB snapshot table; nothing may allocate more from a header field. */
export const MAX_ALLOC_BYTES = 64 << 20;
/** An open of a ~2 MiB in-memory image takes well under a millisecond; 1 s means a loop. */
export const SLOW_INPUT_MS = 1000;
/** Extension past the seed's end: two 64 KiB clusters, enough to move a table past EOF and back. */
export const EXTEND_MAX_BYTES = 2 * 65536;
/** Past this many patches an input is re-expressed as the minimal diff against its seed. */
const MAX_PATCHES = 32;
/** Counts the snapshot-table target is called with: none, a few, and the limits. */
const TABLE_COUNTS: readonly number[] = [0, 1, 2, 3, 65536, 0xffffffff];

/** The scripts whose coverage guides: the qcow2 layer and the error table it throws from. */
export function isTargetScript(url: string): boolean {
  return /\/src\/qcow2\/[^/]+\.[jt]s$/.test(url) || /\/src\/errors\.[jt]s$/.test(url);
}

export type TargetName = 'header' | 'snapshot-table' | 'open';

/** An input: `patches`, in order, over seed `base`, cut or zero-extended to `length`. */
export interface ImageInput {
  base: number;
  length: number;
  patches: { at: number; bytes: Buffer }[];
  /** snapshot-table target only: the entry count, and where the table starts (-1: at the header's snapshots_offset). */
  tableCount: number;
  tableAt: number;
}

export interface Finding {
  target: TargetName;
  seed: string;
  iteration: number;
  problem: string;
  file: string;
}

export interface FuzzStats extends LoopStats<ImageInput> {
  target: TargetName;
  findingList: Finding[];
}

function interestingValues(seed: SeedImage): bigint[] {
  const c = BigInt(seed.clusterSize);
  const size = BigInt(seed.bytes.length);
  return [
    0n, 1n, 7n, 8n, 9n, 103n, 104n, 105n, 512n, c - 1n, c, c + 1n, c + 8n, 2n * c,
    size - 1n, size, size + 1n, size + c,
    BigInt(seed.l1TableOffset), BigInt(seed.refcountTableOffset), BigInt(seed.snapshotsOffset),
    0x7fffn, 0xffffn, 0x10000n, 0x7fffffffn, 0x80000000n, 0xffffffffn, 0x100000000n,
    (1n << 53n) - 1n, 1n << 53n, (1n << 56n), (1n << 63n), (1n << 64n) - 1n,
  ];
}

/** Field positions worth aiming at: [offset, width in bytes]. */
function fieldsOf(seed: SeedImage): [number, 2 | 4 | 8][] {
  const fields: [number, 2 | 4 | 8][] = [
    [H.magic, 4], [H.version, 4], [H.backingFileOffset, 8], [H.backingFileSize, 4], [H.clusterBits, 4],
    [H.size, 8], [H.cryptMethod, 4], [H.l1Size, 4], [H.l1TableOffset, 8], [H.refcountTableOffset, 8],
    [H.refcountTableClusters, 4], [H.nbSnapshots, 4], [H.snapshotsOffset, 8],
  ];
  if (seed.version === 3) {
    fields.push(
      [H.incompatibleFeatures, 8], [H.compatibleFeatures, 8], [H.autoclearFeatures, 8], [H.refcountOrder, 4],
      [H.headerLength, 4], [seed.headerLength, 4], [seed.headerLength + 4, 4],
    );
  }
  const e = seed.snapshotsOffset;
  if (seed.nbSnapshots > 0) {
    fields.push([e + S.l1TableOffset, 8], [e + S.l1Size, 4], [e + S.idSize, 2], [e + S.nameSize, 2], [e + S.extraDataSize, 4], [e + S.vmStateSize, 4]);
  }
  fields.push([seed.l1TableOffset, 8], [seed.refcountTableOffset, 8], [seed.firstL2Offset, 8], [seed.firstRefblockOffset, 2]);
  return fields;
}

/** One zero-extended scratch copy per seed; inputs are applied to it and undone. */
class Scratch {
  readonly bytes: Buffer;
  constructor(readonly seed: SeedImage) {
    this.bytes = Buffer.alloc(seed.bytes.length + EXTEND_MAX_BYTES);
    seed.bytes.copy(this.bytes);
  }
  apply(patches: ImageInput['patches']): void {
    for (const p of patches) p.bytes.copy(this.bytes, p.at);
  }
  undo(patches: ImageInput['patches']): void {
    const seedLength = this.seed.bytes.length;
    for (const p of patches) {
      const end = p.at + p.bytes.length;
      if (p.at < seedLength) this.seed.bytes.copy(this.bytes, p.at, p.at, Math.min(end, seedLength));
      if (end > seedLength) this.bytes.fill(0, Math.max(p.at, seedLength), end);
    }
  }
  /** The changed runs of the scratch against the seed: the minimal patch list. */
  diff(): ImageInput['patches'] {
    const out: ImageInput['patches'] = [];
    const seedLength = this.seed.bytes.length;
    const CHUNK = 4096;
    for (let c = 0; c < this.bytes.length; c += CHUNK) {
      const end = Math.min(c + CHUNK, this.bytes.length);
      const ref = c < seedLength ? this.seed.bytes.subarray(c, Math.min(end, seedLength)) : Buffer.alloc(0);
      const cur = this.bytes.subarray(c, c + ref.length);
      if (ref.length === end - c && cur.equals(ref)) continue;
      let i = c;
      while (i < end) {
        while (i < end && this.bytes[i] === (i < seedLength ? this.seed.bytes[i] : 0)) i++;
        const start = i;
        while (i < end && this.bytes[i] !== (i < seedLength ? this.seed.bytes[i] : 0)) i++;
        if (i > start) out.push({ at: start, bytes: Buffer.from(this.bytes.subarray(start, i)) });
      }
    }
    return out;
  }
}

/** The bytes `input` holds at [from, from + count), without touching any scratch. */
function readInput(seeds: readonly SeedImage[], input: ImageInput, from: number, count: number): Buffer {
  const out = Buffer.alloc(count);
  const seed = (seeds[input.base] as SeedImage).bytes;
  if (from < seed.length) seed.copy(out, 0, from, Math.min(from + count, seed.length));
  for (const p of input.patches) {
    const lo = Math.max(from, p.at);
    const hi = Math.min(from + count, p.at + p.bytes.length);
    if (lo < hi) p.bytes.copy(out, lo - from, lo - p.at, hi - p.at);
  }
  return out;
}

/** A Canvas over a scratch that records every write as a patch. */
class PatchCanvas implements Canvas {
  readonly added: ImageInput['patches'] = [];
  constructor(
    private readonly _scratch: Scratch,
    public length: number,
  ) {}
  get capacity(): number {
    return this._scratch.bytes.length;
  }
  byteAt(at: number): number {
    return this._scratch.bytes[at] as number;
  }
  write(at: number, bytes: Uint8Array): void {
    const n = Math.min(bytes.length, this.capacity - at);
    if (at < 0 || n <= 0) return;
    const copy = Buffer.from(bytes.subarray(0, n));
    copy.copy(this._scratch.bytes, at);
    this.added.push({ at, bytes: copy });
  }
}

/** One to four stacked mutations of `parent`: structure-aware 60% of the time, generic otherwise. */
function mutateInput(
  rng: Rng, seeds: readonly SeedImage[], scratches: readonly Scratch[], parent: ImageInput, other: () => ImageInput,
): ImageInput {
  const scratch = scratches[parent.base] as Scratch;
  const seed = scratch.seed;
  const fields = fieldsOf(seed);
  const values = interestingValues(seed);
  scratch.apply(parent.patches);
  const canvas = new PatchCanvas(scratch, parent.length);
  const spliceFrom = () => {
    const o = other();
    return { length: o.length, read: (from: number, count: number) => readInput(seeds, o, from, count) };
  };
  const rounds = 1 + rng.int(4);
  for (let r = 0; r < rounds; r++) {
    const kind = rng.int(10);
    if (kind <= 3) {
      const [offset, width] = rng.pick(fields);
      const v = rng.pick(values);
      writeField(canvas, offset, width, rng.int(4) === 0 ? v + BigInt(rng.int(3) - 1) : v);
    } else if (kind === 4) {
      const [offset, width] = rng.pick(fields);
      const at = offset + width - 1 - rng.int(width);
      canvas.write(at, Uint8Array.of(canvas.byteAt(at) ^ (1 << rng.int(8))));
    } else if (kind === 5) {
      const [offset, width] = rng.pick(fields);
      writeField(canvas, offset, width, BigInt(rng.int(2 ** 31)) * BigInt(rng.pick([1, seed.clusterSize, 512])));
    } else {
      // The metadata-rich first clusters get half the generic point mutations.
      havoc(rng, canvas, 4 * seed.clusterSize, spliceFrom);
    }
  }
  let patches = [...parent.patches, ...canvas.added];
  if (patches.length > MAX_PATCHES) patches = scratch.diff();
  scratch.undo(parent.patches);
  scratch.undo(canvas.added);
  const child: ImageInput = { ...parent, length: canvas.length, patches };
  if (rng.int(8) === 0) child.tableCount = rng.pick(TABLE_COUNTS);
  if (rng.int(8) === 0) child.tableAt = rng.int(4) === 0 ? -1 : rng.int(child.length);
  return child;
}

function writeField(canvas: Canvas, offset: number, width: 2 | 4 | 8, value: bigint): void {
  if (offset + width > canvas.length) return;
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt.asUintN(64, value));
  canvas.write(offset, b.subarray(8 - width));
}

/** The MetaFile slice over bytes in memory: the whole open path with no disk and no locks. */
export function memoryFile(bytes: Buffer, onWrite: () => void): MetaFile {
  return {
    path: '<fuzz>',
    async read(buffer: Uint8Array, position: number): Promise<number> {
      if (position >= bytes.length) return 0;
      const n = Math.min(buffer.length, bytes.length - position);
      buffer.set(bytes.subarray(position, position + n));
      return n;
    },
    async write(): Promise<void> {
      onWrite();
    },
    async datasync(): Promise<void> {},
    async truncate(): Promise<void> {
      onWrite();
    },
    async stat(): Promise<{ size: number }> {
      return { size: bytes.length };
    },
    async getLock() {
      return null;
    },
    async setLock(): Promise<void> {},
    async close(): Promise<void> {},
  };
}

/** Runs `target` on `input`: an Outcome the oracle has judged. */
async function exercise(target: TargetName, input: Buffer, tableCount: number, tableAt: number): Promise<Outcome> {
  let wrote = false;
  try {
    if (target === 'header') {
      const probe = input.subarray(0, Math.min(104, input.length));
      const bits = probeClusterBits(Buffer.from(probe));
      const header = decodeHeader(input.subarray(0, Math.min(2 ** bits, input.length)));
      validateHeader(header, input.length);
    } else if (target === 'snapshot-table') {
      // The harness's own read of snapshots_offset must not throw on an image cut shorter than the header.
      const field = input.length >= H.snapshotsOffset + 8 ? input.readBigUInt64BE(H.snapshotsOffset) : 0n;
      const offset = tableAt >= 0 ? Math.min(tableAt, input.length) : Number(field % BigInt(input.length || 1));
      decodeSnapshotTable(input.subarray(offset), tableCount, 64 << 20);
    } else {
      await loadImageState(memoryFile(input, () => (wrote = true)));
    }
    if (wrote) return { problem: 'the read-only open path attempted a write' };
    return {};
  } catch (error) {
    if (wrote) return { problem: 'the read-only open path attempted a write' };
    if (error instanceof SnapshotError && REFUSAL_CODES.has(String(error.code))) {
      return { refusal: error.message.replace(/\d+/g, 'N') };
    }
    const e = error as Error;
    return { problem: `${error instanceof SnapshotError ? `SnapshotError ${error.code}` : e?.name ?? typeof error}: ${e?.message ?? String(error)}` };
  }
}


/**
 * Fuzzes `target` for `seconds`, deterministically from `seed` (given the
 * same corpus and timing of batches), starting from the seeds plus `corpus`.
 * Buffer.alloc is watched for the duration: any request above
 * MAX_ALLOC_BYTES is a finding (an allocation sized by an unchecked field),
 * and it is refused so the run survives it.
 */
export async function fuzz(
  target: TargetName,
  seeds: readonly SeedImage[],
  options: { seconds: number; seed: number; findingsDir: string; guided?: boolean; corpus?: readonly ImageInput[] },
): Promise<FuzzStats> {
  const scratches = seeds.map((s) => new Scratch(s));
  const findingList: Finding[] = [];
  // A map per run: the targets share the inspector session, not what counts as new.
  const coverage = options.guided === false ? undefined : new BlockCoverage(isTargetScript);
  const initial: ImageInput[] = seeds.map((s, base) => ({ base, length: s.bytes.length, patches: [], tableCount: 1, tableAt: -1 }));
  initial.push(...(options.corpus ?? []));
  const realAlloc = Buffer.alloc;
  let oversized: number | undefined;
  Buffer.alloc = ((size: number, ...rest: unknown[]) => {
    if (size > MAX_ALLOC_BYTES) {
      oversized = size;
      throw new Error(`fuzz: allocation of ${size} bytes refused`);
    }
    return (realAlloc as (...a: unknown[]) => Buffer)(size, ...rest);
  }) as typeof Buffer.alloc;
  const execute = async (input: ImageInput): Promise<Outcome> => {
    const scratch = scratches[input.base] as Scratch;
    scratch.apply(input.patches);
    oversized = undefined;
    const t0 = performance.now();
    try {
      const outcome = await exercise(target, scratch.bytes.subarray(0, input.length), input.tableCount, input.tableAt);
      const ms = performance.now() - t0;
      if (oversized !== undefined) return { problem: `allocation of ${oversized} bytes requested from input` };
      if (ms > SLOW_INPUT_MS) return { problem: `one input took ${ms.toFixed(0)} ms` };
      return outcome;
    } finally {
      scratch.undo(input.patches);
    }
  };
  try {
    const stats = await runLoop<ImageInput>({
      seconds: options.seconds,
      seed: options.seed,
      coverage,
      initial,
      mutate: (rng, parent, other) => mutateInput(rng, seeds, scratches, parent, other),
      execute,
      onFinding: (input, problem, iteration) => {
        const file = join(options.findingsDir, `${target}-${options.seed}-${iteration}.qcow2`);
        writeFileSync(file, materialize(seeds, input));
        findingList.push({ target, seed: (seeds[input.base] as SeedImage).label, iteration, problem, file });
        return findingList.length < 20; // enough to act on
      },
    });
    return { ...stats, target, findingList };
  } finally {
    Buffer.alloc = realAlloc;
  }
}

/** The whole image an input stands for, e.g. to save a finding. */
export function materialize(seeds: readonly SeedImage[], input: ImageInput): Buffer {
  return readInput(seeds, input, 0, input.length);
}
