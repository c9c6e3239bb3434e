/**
 * The QEMU-like RAM stream: per page, one 8-byte header write, then one
 * 4 KiB page write (migration/ram.c: save_page_header() then the page).
 *
 * Page contents come from a pool generated once, up front, so that random
 * number generation is never inside a timed region. The pool is larger than
 * the last-level cache (64 MiB) so that the copy reads cold memory, as QEMU
 * reads guest RAM. Page i of the stream uses pool page (i * STRIDE) mod
 * poolPages, a permutation, so consecutive writes do not walk the pool in order.
 */
import assert from 'node:assert/strict';

export const PAGE_BYTES = 4096;
export const HEADER_BYTES = 8;
export const PAIR_BYTES = PAGE_BYTES + HEADER_BYTES;
/** RAM_SAVE_FLAG_PAGE (migration/ram.c); the flag bits sit in the low bits of the address. */
const RAM_SAVE_FLAG_PAGE = 0x08;
/** Odd, so it is coprime with the power-of-two pool size: the walk visits every pool page. */
const STRIDE = 7919;

export const DEFAULT_POOL_BYTES = 64 << 20;

/** xorshift32: deterministic, fast, good enough to defeat compression and dedup. */
function fillPseudoRandom(words, seed) {
  let x = seed >>> 0 || 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x;
  }
}

/**
 * Builds the pools and pre-made views. Nothing is allocated per write when a
 * writer walks `pages` / `headers`: every chunk is a view created here.
 */
export function createWorkload({ totalBytes, poolBytes = DEFAULT_POOL_BYTES, seed = 0x5eed }) {
  assert.ok(poolBytes % PAGE_BYTES === 0 && (poolBytes / PAGE_BYTES) % 2 === 0, 'pool geometry');
  const poolPages = poolBytes / PAGE_BYTES;
  assert.ok((poolPages & (poolPages - 1)) === 0, 'pool page count must be a power of two');
  const pool = Buffer.allocUnsafeSlow(poolBytes);
  fillPseudoRandom(new Uint32Array(pool.buffer, pool.byteOffset, poolBytes / 4), seed);
  const headerPool = Buffer.allocUnsafeSlow(poolPages * HEADER_BYTES);
  const pages = new Array(poolPages);
  const headers = new Array(poolPages);
  for (let k = 0; k < poolPages; k++) {
    pages[k] = pool.subarray(k * PAGE_BYTES, (k + 1) * PAGE_BYTES);
    headerPool.writeBigUInt64BE(BigInt(k * PAGE_BYTES + RAM_SAVE_FLAG_PAGE), k * HEADER_BYTES);
    headers[k] = headerPool.subarray(k * HEADER_BYTES, (k + 1) * HEADER_BYTES);
  }
  return workloadOfSize({ pool, pages, headers, poolPages }, totalBytes);
}

/** The same pools, another stream length (a whole number of pages). */
export function workloadOfSize(base, totalBytes) {
  const pageCount = Math.max(1, Math.floor(totalBytes / PAGE_BYTES));
  return {
    pool: base.pool,
    pages: base.pages,
    headers: base.headers,
    poolPages: base.poolPages,
    pageCount,
    /** Logical bytes of the stream: headers plus pages. */
    streamBytes: pageCount * PAIR_BYTES,
    /** Pool index of stream page i. */
    poolIndex(i) {
      return (i * STRIDE) & (base.poolPages - 1);
    },
  };
}

/** The expected bytes of the stream at [0, length): used to verify output in --verify runs. */
export function expectedStreamBytes(workload, length) {
  const out = Buffer.alloc(length);
  let pos = 0;
  for (let i = 0; pos < length; i++) {
    const k = workload.poolIndex(i);
    pos += workload.headers[k].copy(out, pos);
    pos += workload.pages[k].copy(out, pos);
  }
  return out;
}
