/**
 * Memory for the export's Readable chunks (src/qcow2/vmstate-reader.ts):
 * native slabs that return to a free list when V8 collects the consumer's
 * chunk, so the next chunk reuses memory already mapped instead of fresh
 * memory to clear (native/slabs.cc; docs/performance.md, eighth round).
 *
 * A slab is uninitialised: the reader overwrites every byte of it before a
 * consumer sees it. Where the runtime refuses external buffers (a V8
 * sandbox), the reader falls back to zeroed JS memory (TargetFile.allocBuffer),
 * as before.
 */
import { alignUp, HUGE_PAGE_BYTES, placementAlignment, usesHugePages } from './alignment.js';
import { addon } from './native.js';

/** Free slabs idle this long are given back to the C library. */
export const SLAB_IDLE_MS = 10_000;

let slabsRefused = false;
let slabsEnabled = true;
let trimTimer: NodeJS.Timeout | undefined;

/**
 * A slab of `length` bytes at a multiple of `alignment` (a power of two), or
 * of a huge page when it spans two or more, and whether it is new memory
 * (its pages not mapped yet) rather than one used before; undefined where
 * slabs are off or refused, and the caller then allocates as it would
 * otherwise. Its bytes are undefined: the caller writes all of them. The
 * slab's tail past `length` (to a whole `alignment`), which a consumer could
 * reach through `.buffer`, is zeroed here.
 */
export function allocSlab(length: number, alignment: number): { view: Uint8Array; fresh: boolean } | undefined {
  if (!slabsEnabled || slabsRefused || length <= 0) return undefined;
  const huge = usesHugePages(length);
  const align = placementAlignment(length, alignment);
  const slabLength = alignUp(length, align);
  let slab: { buffer: ArrayBuffer; fresh: boolean };
  try {
    slab = addon.allocSlab(slabLength, align, huge ? HUGE_PAGE_BYTES : 0);
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    // Refused by the runtime (external buffers): JS memory from now on.
    if (code === 'SLAB_REFUSED') slabsRefused = true;
    // Out of memory: this chunk tries JS memory, the next a slab again. Anything else
    // (a TypeError or RangeError of our own arguments) is a bug, not a refusal.
    if (code === 'SLAB_REFUSED' || code === 'SLAB_NO_MEMORY') return undefined;
    throw err;
  }
  scheduleTrim();
  if (slabLength > length) new Uint8Array(slab.buffer, length).fill(0);
  return { view: new Uint8Array(slab.buffer, 0, length), fresh: slab.fresh };
}

/** Turns slabs off (benchmarks: the export as it was before them) or back on. */
export function setChunkSlabsEnabled(enabled: boolean): void {
  slabsEnabled = enabled;
}

/** Gives idle free slabs back once the process stops exporting; never keeps the process alive. */
function scheduleTrim(): void {
  if (trimTimer !== undefined) return;
  trimTimer = setTimeout(trim, SLAB_IDLE_MS);
  trimTimer.unref();
}

function trim(): void {
  trimTimer = undefined;
  const free = addon.trimSlabs(SLAB_IDLE_MS);
  // Slabs still free, or chunks not collected yet that will come back: look again later.
  if (free > 0 || addon.slabStats().live > 0) scheduleTrim();
}
