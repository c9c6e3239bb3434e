/**
 * Alignment discovery and aligned memory.
 *
 * O_DIRECT needs the buffer address, the file offset and the length aligned.
 * statx(STATX_DIOALIGN) reports both alignments on Linux >= 6.1 for the
 * filesystems that implement it; block devices report their logical sector
 * size via BLKSSZGET; 4096 is the safe default everywhere else (it is a
 * multiple of every logical block size Linux supports up to 4 KiB sectors).
 */
import assert from 'node:assert/strict';
import { isPowerOfTwo } from '../validate.js';
import { addon, type OpenFacts } from './native.js';

export const DEFAULT_ALIGNMENT = 4096;
/** The largest alignment we accept from the kernel; anything larger is suspect. */
export const MAX_ALIGNMENT = 1 << 20;

/**
 * The MMU page size. Buffers for direct I/O start on a page boundary even
 * where the kernel accepts less (ext4 reports a 512-byte memory alignment):
 * a buffer that starts mid-page makes every page of a large write straddle
 * two, one more page per request and no segment on a page boundary. On a
 * virtio disk measured here that cost more than half the write rate: 4 MiB
 * O_DIRECT writes of new blocks took 23 ms from a 512-aligned buffer and
 * 7 ms from a page-aligned one, the same file system, file and sizes.
 */
export const PAGE_BYTES = isPowerOfTwo(addon.pageSize) && addon.pageSize <= MAX_ALIGNMENT ? addon.pageSize : DEFAULT_ALIGNMENT;

/**
 * Transparent huge pages for large I/O buffers. An O_DIRECT write pins every
 * page of its buffer, and the kernel (and a virtual disk's host) handles each
 * page; from 2 MiB pages a 16 MiB write is 8 of them instead of 4096. Measured
 * on the virtio disk of docs/performance.md (fifth round), 1 GiB in 16 MiB
 * O_DIRECT writes, each buffer refilled by memcpy before its write: the writes
 * took 0.18-0.29 s from huge pages against 0.46-0.81 s from 4 KiB pages.
 *
 * 0 when the kernel offers none (THP compiled out or 'never'), or when its
 * huge page is too large to align to (512 MiB with 64 KiB base pages).
 */
export const HUGE_PAGE_BYTES = isPowerOfTwo(addon.hugePageSize) && addon.hugePageSize <= 2 * MAX_ALIGNMENT ? addon.hugePageSize : 0;

/**
 * Buffers of at least two huge pages go on huge pages: they are aligned to
 * one (over-allocated by up to one huge page of address space, which nothing
 * touches) and advised MADV_HUGEPAGE. Smaller ones would waste more than they
 * gain.
 */
export function usesHugePages(length: number): boolean {
  return HUGE_PAGE_BYTES > 0 && length >= 2 * HUGE_PAGE_BYTES;
}

/** Where a buffer of `length` bytes starts: on a huge page when it goes on huge pages, else at `alignment`. */
export function placementAlignment(length: number, alignment: number): number {
  return usesHugePages(length) ? Math.max(alignment, HUGE_PAGE_BYTES) : alignment;
}

/** Filesystems that accept O_DIRECT opens but keep the data in page cache. */
const PAGE_CACHE_ONLY_FS = new Map<number, string>([
  [0x01021994, 'tmpfs'], // tmpfs gained "trivial" O_DIRECT in Linux 6.6: still page cache
  [0x858458f6, 'ramfs'],
]);

export interface DirectAlignment {
  /** Required alignment of file offsets and lengths, bytes. */
  offsetBytes: number;
  /** Required alignment of buffer addresses, bytes. */
  memoryBytes: number;
}

/** Why O_DIRECT cannot work for this file, or undefined when it can. */
export function directUnsupportedReason(facts: OpenFacts): string | undefined {
  // statfs of a device node describes /dev (devtmpfs), not the device.
  const fs = facts.isRegular ? PAGE_CACHE_ONLY_FS.get(facts.fsType) : undefined;
  if (fs !== undefined) return `${fs} has no device to bypass the page cache to`;
  if (facts.dioReported && facts.dioOffsetAlign === 0) return 'the filesystem reports no direct I/O support';
  if (!facts.isRegular && !facts.isBlockDevice) return 'only regular files and block devices support O_DIRECT';
  return undefined;
}

export function directAlignment(facts: OpenFacts): DirectAlignment {
  let offsetBytes = DEFAULT_ALIGNMENT;
  let memoryBytes = DEFAULT_ALIGNMENT;
  if (facts.dioReported && facts.dioOffsetAlign > 0) {
    offsetBytes = facts.dioOffsetAlign;
    memoryBytes = Math.max(facts.dioMemAlign, 1);
  } else if (facts.isBlockDevice && facts.logicalBlockSize > 0) {
    offsetBytes = facts.logicalBlockSize;
    memoryBytes = facts.logicalBlockSize;
  }
  if (!isPowerOfTwo(offsetBytes) || offsetBytes > MAX_ALIGNMENT) offsetBytes = DEFAULT_ALIGNMENT;
  if (!isPowerOfTwo(memoryBytes) || memoryBytes > MAX_ALIGNMENT) memoryBytes = DEFAULT_ALIGNMENT;
  return { offsetBytes, memoryBytes };
}

/** Address alignment of a buffer for direct I/O: what the kernel requires, and at least a page. */
export function ioBufferAlignment(memoryBytes: number, offsetBytes: number): number {
  return Math.max(memoryBytes, offsetBytes, PAGE_BYTES);
}

export function alignUp(value: number, alignment: number): number {
  return Math.ceil(value / alignment) * alignment;
}

export function alignDown(value: number, alignment: number): number {
  return Math.floor(value / alignment) * alignment;
}

/**
 * A zeroed Uint8Array of `length` bytes whose address is a multiple of
 * `alignment`. The memory is an ordinary JS ArrayBuffer, over-allocated by
 * `alignment` bytes; the addon tells how far into it the aligned window starts.
 * ArrayBuffer backing stores do not move, so the window stays aligned.
 */
export function allocAligned(length: number, alignment: number): Uint8Array {
  if (!Number.isSafeInteger(length) || length < 0) throw new RangeError(`Expected a byte length, received ${length}`);
  if (!isPowerOfTwo(alignment)) throw new RangeError(`Expected a power-of-two alignment, received ${alignment}`);
  const huge = usesHugePages(length);
  const align = placementAlignment(length, alignment);
  // Zeroed: fresh from mmap, the slack around the window stays untouched; memory the allocator
  // hands back from its heap, calloc clears in full (docs/performance.md, seventh round).
  const backing = new ArrayBuffer(length + align);
  const skip = addon.alignmentSkip(backing, align);
  assert.ok(Number.isInteger(skip) && skip >= 0 && skip < align, 'alignment skip out of range');
  // Advice only, before the first touch: where the kernel declines, the buffer stays in small pages.
  if (huge) addon.adviseHugePages(backing, skip, length, HUGE_PAGE_BYTES);
  return new Uint8Array(backing, skip, length);
}
