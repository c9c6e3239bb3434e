/**
 * A bounded, seeded mutation fuzzer for the qcow2 decoders and the open path.
 *
 * NOT coverage-guided. Jazzer.js could not be used here: @jazzer.js/core 4.0.0
 * installs, but its only linux-x64 binary needs GLIBC_2.38 (Debian 12 has
 * 2.36) and fails to load; 2.1.0 builds from source, and its install fetches
 * prebuilds from github.com and then libFuzzer's compiler-rt from github.com,
 * neither of which is reachable from this machine (npm registry only).
 * Instead, mutations are aimed where coverage would lead anyway: the fixed
 * header fields, the first snapshot entry, the first L1 and refcount table
 * entries (offsets known from the seed), with values chosen to sit on every
 * limit the validator knows (0, 1, alignment +-1, cluster size, file size,
 * 2^31, 2^32-1, 2^53, 2^63...), plus generic bit flips, byte runs, splices and
 * truncations. As a rough stand-in for coverage, each run counts the distinct
 * refusal messages it reached.
 *
 * Oracle, per input: the target either succeeds or throws a SnapshotError
 * coded QCOW2_CORRUPT / QCOW2_UNSUPPORTED. Anything else (a RangeError from a
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

const REFUSAL_CODES = new Set(['QCOW2_CORRUPT', 'QCOW2_UNSUPPORTED']);
/** QEMU's largest table is the 64 MiB snapshot table; nothing may allocate more from a header field. */
export const MAX_ALLOC_BYTES = 64 << 20;
/** An open of a ~2 MiB in-memory image takes well under a millisecond; 1 s means a loop. */
export const SLOW_INPUT_MS = 1000;

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

export type TargetName = 'header' | 'snapshot-table' | 'open';

export interface Finding {
  target: TargetName;
  seed: string;
  iteration: number;
  problem: string;
  file: string;
}

export interface FuzzStats {
  target: TargetName;
  executions: number;
  accepted: number;
  refused: number;
  distinctRefusals: number;
  findings: Finding[];
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

function writeField(buf: Buffer, offset: number, width: 2 | 4 | 8, value: bigint): void {
  if (offset + width > buf.length) return;
  if (width === 8) buf.writeBigUInt64BE(BigInt.asUintN(64, value), offset);
  else if (width === 4) buf.writeUInt32BE(Number(BigInt.asUintN(32, value)), offset);
  else buf.writeUInt16BE(Number(BigInt.asUintN(16, value)), offset);
}

/** One to four stacked mutations of a seed. */
export function mutate(rng: Rng, seed: SeedImage, others: readonly SeedImage[]): Buffer {
  let buf = Buffer.from(seed.bytes);
  const fields = fieldsOf(seed);
  const values = interestingValues(seed);
  const rounds = 1 + rng.int(4);
  for (let r = 0; r < rounds; r++) {
    const kind = rng.int(10);
    if (kind <= 3) {
      const [offset, width] = rng.pick(fields);
      const v = rng.pick(values);
      writeField(buf, offset, width, rng.int(4) === 0 ? v + BigInt(rng.int(3) - 1) : v);
    } else if (kind === 4) {
      const [offset, width] = rng.pick(fields);
      const bit = rng.int(width * 8);
      const at = offset + width - 1 - (bit >> 3);
      if (at < buf.length) buf[at] = (buf[at] as number) ^ (1 << (bit & 7));
    } else if (kind === 5) {
      // A bit flip anywhere in the metadata-rich first clusters.
      const at = rng.int(Math.min(buf.length, 4 * seed.clusterSize));
      buf[at] = (buf[at] as number) ^ (1 << rng.int(8));
    } else if (kind === 6) {
      const at = rng.int(buf.length);
      buf.fill(rng.pick([0x00, 0xff, 0x7f, 0x80]), at, Math.min(buf.length, at + 1 + rng.int(64)));
    } else if (kind === 7) {
      buf = buf.subarray(0, rng.int(buf.length + 1));
    } else if (kind === 8 && others.length > 0) {
      // Splice a run from another seed (different cluster size or version).
      const other = rng.pick(others).bytes;
      const from = rng.int(other.length);
      const length = Math.min(1 + rng.int(4096), other.length - from);
      const to = rng.int(Math.max(1, buf.length - length));
      other.copy(buf, to, from, from + length);
    } else {
      const [offset, width] = rng.pick(fields);
      writeField(buf, offset, width, BigInt(rng.int(2 ** 31)) * BigInt(rng.pick([1, seed.clusterSize, 512])));
    }
  }
  return Buffer.from(buf);
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

/** Runs `target` on `input`; resolves to undefined (fine) or a problem description. */
async function exercise(target: TargetName, input: Buffer, rng: Rng): Promise<{ problem?: string; refusal?: string }> {
  let wrote = false;
  try {
    if (target === 'header') {
      const probe = input.subarray(0, Math.min(104, input.length));
      const bits = probeClusterBits(Buffer.from(probe));
      const header = decodeHeader(input.subarray(0, Math.min(2 ** bits, input.length)));
      validateHeader(header, input.length);
    } else if (target === 'snapshot-table') {
      const count = rng.pick([0, 1, 2, 3, 65536, 0xffffffff]);
      const offset = rng.int(4) === 0 ? rng.int(input.length) : Number(input.readBigUInt64BE(H.snapshotsOffset) % BigInt(input.length || 1));
      decodeSnapshotTable(input.subarray(offset), count, 64 << 20);
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
 * Fuzzes `target` for `seconds`, deterministically from `seed`. Buffer.alloc
 * is watched for the duration: any request above MAX_ALLOC_BYTES is a finding
 * (an allocation sized by an unchecked field), and it is refused so the run
 * survives it.
 */
export async function fuzz(
  target: TargetName,
  seeds: readonly SeedImage[],
  options: { seconds: number; seed: number; findingsDir: string },
): Promise<FuzzStats> {
  const rng = new Rng(options.seed);
  const stats: FuzzStats = { target, executions: 0, accepted: 0, refused: 0, distinctRefusals: 0, findings: [] };
  const refusals = new Set<string>();
  const realAlloc = Buffer.alloc;
  let oversized: number | undefined;
  Buffer.alloc = ((size: number, ...rest: unknown[]) => {
    if (size > MAX_ALLOC_BYTES) {
      oversized = size;
      throw new Error(`fuzz: allocation of ${size} bytes refused`);
    }
    return (realAlloc as (...a: unknown[]) => Buffer)(size, ...rest);
  }) as typeof Buffer.alloc;
  const deadline = performance.now() + options.seconds * 1000;
  try {
    while (performance.now() < deadline) {
      const seed = rng.pick(seeds);
      const input = mutate(rng, seed, seeds);
      oversized = undefined;
      const t0 = performance.now();
      const result = await exercise(target, input, rng);
      const ms = performance.now() - t0;
      stats.executions++;
      let problem = result.problem;
      if (oversized !== undefined) problem = `allocation of ${oversized} bytes requested from input`;
      else if (ms > SLOW_INPUT_MS) problem = `one input took ${ms.toFixed(0)} ms`;
      if (problem !== undefined) {
        const file = join(options.findingsDir, `${target}-${options.seed}-${stats.executions}.qcow2`);
        writeFileSync(file, input);
        stats.findings.push({ target, seed: seed.label, iteration: stats.executions, problem, file });
        if (stats.findings.length >= 20) break; // enough to act on
      } else if (result.refusal !== undefined) {
        stats.refused++;
        refusals.add(result.refusal);
      } else {
        stats.accepted++;
      }
    }
  } finally {
    Buffer.alloc = realAlloc;
  }
  stats.distinctRefusals = refusals.size;
  return stats;
}
