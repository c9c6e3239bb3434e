/**
 * Prefaulter (src/io/prefaulter.ts): maps a buffer's pages in on its own
 * native thread, as the kernel's accounting shows (the buffer's mapping
 * becomes resident), without changing a byte of it.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { allocAligned } from '../../src/io/alignment.js';
import { Prefaulter } from '../../src/io/prefaulter.js';
import { pseudoRandom } from '../helpers/streams.js';

const MiB = 1 << 20;

/**
 * Resident bytes of this process's mappings advised MADV_HUGEPAGE (VmFlags
 * "hg"), from the kernel: allocAligned advises exactly the windows of large
 * buffers, so this moves with them and not with the runtime's own memory.
 */
function residentAdvisedBytes(): number {
  let total = 0;
  let rssKb = 0;
  for (const line of readFileSync('/proc/self/smaps', 'utf8').split('\n')) {
    const rss = /^Rss:\s+(\d+) kB/.exec(line);
    if (rss !== null) rssKb = Number(rss[1]);
    else if (line.startsWith('VmFlags:') && line.split(/\s+/).includes('hg')) total += rssKb * 1024;
  }
  return total;
}

const sha256 = (bytes: Uint8Array): string => createHash('sha256').update(bytes).digest('hex');

let prefaulters: Prefaulter[] = [];
function prefaulter(): Prefaulter {
  const p = new Prefaulter();
  prefaulters.push(p);
  return p;
}

afterEach(() => {
  for (const p of prefaulters) if (p.pending === 0) p.dispose();
  prefaulters = [];
});

/** MADV_POPULATE_WRITE is Linux 5.14; an older kernel makes the prefaulter a no-op (probed once). */
let unsupported: string | undefined;
beforeAll(async () => {
  const probe = new Prefaulter();
  await probe.prefault(allocAligned(64 * 1024, 4096));
  if (!probe.supported) unsupported = 'the kernel has no MADV_POPULATE_WRITE (Linux 5.14)';
  probe.dispose();
});

describe('Prefaulter', () => {
  it('maps an untouched buffer in: resident memory grows by its size, and its bytes stay zero', async (ctx) => {
    if (unsupported !== undefined) ctx.skip();
    // 64 MiB (+ alignment) comes straight from mmap: no byte of its window is resident before.
    const buffer = allocAligned(64 * MiB, 4096);
    const before = residentAdvisedBytes();
    await prefaulter().prefault(buffer);
    expect(residentAdvisedBytes() - before).toBeGreaterThanOrEqual(60 * MiB);
    expect(buffer.every((b) => b === 0)).toBe(true);
  });

  // Guards against a prefault that writes (zeros, or a touch per page) instead of advising.
  it('leaves the contents of a written buffer as they were', async () => {
    const data = pseudoRandom(8 * MiB + 4096, 11);
    const buffer = allocAligned(data.length, 4096);
    buffer.set(data);
    await prefaulter().prefault(buffer);
    expect(sha256(buffer)).toBe(sha256(data));
  });

  it('takes buffers that are not page-aligned, and empty ones, without a descriptor', async () => {
    const p = prefaulter();
    const buffer = allocAligned(3 * 4096, 4096);
    buffer.fill(7);
    await p.prefault(buffer.subarray(100, 9000)); // the one whole page inside; the bytes around it untouched
    await p.prefault(buffer.subarray(0, 0));
    expect(buffer.every((b) => b === 7)).toBe(true);
  });

  it('refuses to stop with a prefault in flight, then stops, and does nothing after', async () => {
    const p = prefaulter();
    const pending = p.prefault(allocAligned(8 * MiB, 4096));
    expect(p.pending).toBe(1);
    expect(() => p.dispose()).toThrow(/in flight/);
    await pending;
    expect(p.pending).toBe(0);
    p.dispose();
    p.dispose(); // idempotent
    await expect(p.prefault(allocAligned(4096, 4096))).resolves.toBeUndefined();
    expect(p.pending).toBe(0);
  });
});
