/**
 * Large I/O buffers on transparent huge pages (src/io/alignment.ts): aligned
 * to a huge page, advised MADV_HUGEPAGE, and backed by huge pages once
 * touched, as the kernel's own accounting (AnonHugePages) shows.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { allocAligned, HUGE_PAGE_BYTES, usesHugePages } from '../../src/io/alignment.js';
import { addon } from '../../src/io/native.js';

const MiB = 1 << 20;

function anonHugeBytes(): number {
  const kb = /AnonHugePages:\s+(\d+) kB/.exec(readFileSync('/proc/self/smaps_rollup', 'utf8'))?.[1];
  return Number(kb ?? 0) * 1024;
}

/** The window starts on a huge page boundary: the skip to the next boundary from the ArrayBuffer's start is its offset. */
function hugeAligned(view: Uint8Array): boolean {
  return addon.alignmentSkip(view.buffer as ArrayBuffer, HUGE_PAGE_BYTES) === view.byteOffset;
}

const noThp = HUGE_PAGE_BYTES === 0 ? 'the kernel offers no transparent huge pages to madvise' : undefined;

describe.skipIf(noThp !== undefined)('I/O buffers on transparent huge pages', () => {
  it('places a buffer of two huge pages or more on huge pages, and the kernel backs it with them', () => {
    expect(usesHugePages(16 * MiB)).toBe(true);
    const before = anonHugeBytes();
    const buffer = allocAligned(16 * MiB, 4096);
    expect(hugeAligned(buffer)).toBe(true);
    expect(buffer.every((b) => b === 0)).toBe(true); // zeroed, as allocAligned promises
    buffer.fill(0x5a);
    // Huge pages may be refused under fragmentation; most of 16 MiB must have them.
    expect(anonHugeBytes() - before).toBeGreaterThanOrEqual(8 * MiB);
  });

  it('does not ask huge pages for a buffer of one huge page, and aligns it as asked', () => {
    expect(usesHugePages(HUGE_PAGE_BYTES)).toBe(false);
    const small = allocAligned(HUGE_PAGE_BYTES, 4096);
    expect(addon.alignmentSkip(small.buffer as ArrayBuffer, 4096)).toBe(small.byteOffset);
    expect(small.byteLength).toBe(HUGE_PAGE_BYTES);
  });
});
