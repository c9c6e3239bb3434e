/**
 * The corpus on disk: each input as its seed's label and its patches over
 * that seed, hex-encoded, so a corpus of hundreds of inputs stays small
 * (a whole image is ~2 MiB). The seeds are rebuilt by qemu-img each run and
 * differ only in timestamps, so patches keep their meaning across runs.
 */
import type { SeedImage } from '../reliability/hostile-images.js';
import { EXTEND_MAX_BYTES, type ImageInput } from './fuzzer.js';

interface StoredInput {
  seed: string;
  length: number;
  tableCount: number;
  tableAt: number;
  patches: [number, string][];
}

export function saveCorpus(seeds: readonly SeedImage[], corpus: readonly ImageInput[]): string {
  const stored: StoredInput[] = corpus
    .filter((input) => input.patches.length > 0 || input.length !== (seeds[input.base] as SeedImage).bytes.length)
    .map((input) => ({
      seed: (seeds[input.base] as SeedImage).label,
      length: input.length,
      tableCount: input.tableCount,
      tableAt: input.tableAt,
      patches: input.patches.map((p) => [p.at, p.bytes.toString('hex')]),
    }));
  return `${JSON.stringify(stored, null, 0).replace(/\},\{/g, '},\n{')}\n`;
}

/** Inputs of `text` whose seed label is among `seeds`; none when `text` is undefined. */
export function loadCorpus(seeds: readonly SeedImage[], text: string | undefined): ImageInput[] {
  if (text === undefined) return [];
  const stored = JSON.parse(text) as StoredInput[];
  const out: ImageInput[] = [];
  for (const s of stored) {
    const base = seeds.findIndex((seed) => seed.label === s.seed);
    // A seed of another size (another qemu-img) would leave patches past the scratch.
    const capacity = (seeds[base]?.bytes.length ?? 0) + EXTEND_MAX_BYTES;
    if (base < 0 || s.length > capacity || s.patches.some(([at, hex]) => at + hex.length / 2 > capacity)) continue;
    out.push({
      base,
      length: s.length,
      tableCount: s.tableCount,
      tableAt: s.tableAt,
      patches: s.patches.map(([at, hex]) => ({ at, bytes: Buffer.from(hex, 'hex') })),
    });
  }
  return out;
}
