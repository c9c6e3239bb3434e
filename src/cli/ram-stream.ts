/**
 * A QEMU-like RAM migration stream for the demo: what `migrate` or `savevm`
 * hands to its QEMUFile, written the way QEMU writes it.
 *
 * migration/ram.c save_page_header() puts an 8-byte big-endian word before
 * every page: the page's offset in its RAMBlock ORed with flags. The first
 * page of a block carries the block's name after the word; later pages set
 * RAM_SAVE_FLAG_CONTINUE instead. Then the 4 KiB page follows as its own
 * write. Those alternating 8-byte and 4 KiB writes are the pattern that makes
 * unbuffered writers slow, and the one snapstream packs into aligned buffers.
 *
 * Page contents come from a pool made once (random, sparse and text pages,
 * like real guest RAM), so generating 512 MiB costs almost nothing.
 */
import { randomFillSync } from 'node:crypto';

export const PAGE_BYTES = 4096;
export const HEADER_BYTES = 8;

/** migration/ram.c flag bits, in the low bits of the page offset. */
export const RAM_SAVE_FLAG_PAGE = 0x08;
export const RAM_SAVE_FLAG_EOS = 0x10;
export const RAM_SAVE_FLAG_CONTINUE = 0x20;
/** migration/savevm.c: QEMU_VM_FILE_MAGIC "QEVM", QEMU_VM_FILE_VERSION 3, QEMU_VM_EOF. */
const QEMU_VM_FILE_MAGIC = 0x5145564d;
const QEMU_VM_FILE_VERSION = 3;
const QEMU_VM_EOF = 0x1f;

const BLOCK_NAME = 'pc.ram';
/** 32 MiB of distinct pages: enough variety that nothing dedups, small enough to make in ~50 ms. */
const POOL_PAGES = 8192;
/** Odd, so coprime with the power-of-two pool: page i walks the pool in a scattered order. */
const STRIDE = 7919;

export interface RamStream {
  /** Pages in the stream. */
  pageCount: number;
  /** Exact length of the stream in bytes. */
  streamBytes: number;
  /** The stream as QEMU writes it: one chunk per QEMUFile write (views, no copies). */
  chunks(): Generator<Buffer>;
}

function makePool(): Buffer {
  const pool = Buffer.alloc(POOL_PAGES * PAGE_BYTES);
  randomFillSync(pool);
  const text = Buffer.from('Lorem ipsum dolor sit amet, /usr/lib/x86_64-linux-gnu/libc.so.6 GET /index.html HTTP/1.1\n');
  for (let k = 0; k < POOL_PAGES; k++) {
    const page = pool.subarray(k * PAGE_BYTES, (k + 1) * PAGE_BYTES);
    const kind = k % 10;
    if (kind < 2) {
      // Sparse: mostly zeros with a few live words, like page tables and heaps.
      const live = page.readUInt32LE(0);
      page.fill(0);
      page.writeUInt32LE(live, (live % 512) * 8);
    } else if (kind === 2) {
      for (let pos = (k * 13) % text.length, i = 0; i < PAGE_BYTES; i++, pos = (pos + 1) % text.length) page[i] = text[pos]!;
    }
  }
  return pool;
}

/** A stream of `pageCount` pages (at least 1) of one RAMBlock, framed as a QEMU savevm file. */
export function createRamStream(pageCount: number): RamStream {
  if (!Number.isSafeInteger(pageCount) || pageCount < 1) throw new RangeError(`Expected a positive page count, received ${pageCount}`);
  const pool = makePool();
  const fileHeader = Buffer.alloc(8);
  fileHeader.writeUInt32BE(QEMU_VM_FILE_MAGIC, 0);
  fileHeader.writeUInt32BE(QEMU_VM_FILE_VERSION, 4);
  const blockId = Buffer.concat([Buffer.from([BLOCK_NAME.length]), Buffer.from(BLOCK_NAME, 'latin1')]);
  const trailer = Buffer.alloc(HEADER_BYTES + 1);
  trailer.writeBigUInt64BE(BigInt(RAM_SAVE_FLAG_EOS), 0);
  trailer[HEADER_BYTES] = QEMU_VM_EOF;
  // All page headers in one allocation, made up front.
  const headers = Buffer.alloc(pageCount * HEADER_BYTES);
  for (let i = 0; i < pageCount; i++) {
    const flags = RAM_SAVE_FLAG_PAGE | (i === 0 ? 0 : RAM_SAVE_FLAG_CONTINUE);
    headers.writeBigUInt64BE(BigInt(i) * BigInt(PAGE_BYTES) + BigInt(flags), i * HEADER_BYTES);
  }
  const streamBytes = fileHeader.length + blockId.length + pageCount * (HEADER_BYTES + PAGE_BYTES) + trailer.length;
  return {
    pageCount,
    streamBytes,
    *chunks() {
      yield fileHeader;
      for (let i = 0; i < pageCount; i++) {
        yield headers.subarray(i * HEADER_BYTES, (i + 1) * HEADER_BYTES);
        if (i === 0) yield blockId;
        const k = (i * STRIDE) % POOL_PAGES;
        yield pool.subarray(k * PAGE_BYTES, (k + 1) * PAGE_BYTES);
      }
      yield trailer;
    },
  };
}
