/**
 * Giving freed clusters back, so that a deleted snapshot's bytes cannot be
 * read from the image again (QEMU does the same by default with
 * pass-discard-snapshot=on: update_refcount() queues QCOW2_DISCARD_SNAPSHOT
 * ranges, qcow2_process_discards() hands them to the file).
 *
 *   - A regular file: fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE).
 *     The blocks go back to the filesystem and the range reads as zeros.
 *   - A block device: the same call asks the device to zero the range
 *     without writing (blkdev_fallocate: write-zeroes with unmap, never a
 *     plain discard, so the range is guaranteed to read as zeros); where the
 *     device cannot, FALLOC_FL_ZERO_RANGE, which the kernel completes by
 *     writing zeros.
 *   - Neither supported (ramfs, some FUSE and network filesystems): zeros are
 *     written over the range. The space stays allocated, the bytes are gone.
 *
 * Only clusters that the committed metadata counts as free are ever passed
 * here, and only after the commit point.
 */
import { isSnapshotError } from '../errors.js';
import type { ByteExtent } from './allocator.js';
import type { MetaFile } from './file.js';

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

/** Zero-write fallback: 1 MiB per write keeps the syscall count low without a large buffer. */
const ZERO_WRITE_BYTES = 1 << 20;
/** Reads of free space when looking for bytes that are still there. */
const SCAN_BYTES = 1 << 20;

export type DiscardMethod = 'punch' | 'zero-range' | 'zero-write';

/** errnos that mean "this file cannot do that fallocate mode", as opposed to a failing disk. */
const UNSUPPORTED = new Set(['EOPNOTSUPP', 'ENOTSUP', 'ENOSYS', 'ENOTTY']);

/** Sorted, merged, non-empty ranges. */
export function mergeExtents(extents: readonly ByteExtent[]): ByteExtent[] {
  const sorted = extents.filter((e) => e.length > 0).sort((a, b) => a.offset - b.offset);
  const out: ByteExtent[] = [];
  for (const e of sorted) {
    const last = out[out.length - 1];
    if (last !== undefined && e.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, e.offset + e.length - last.offset);
    } else {
      out.push({ offset: e.offset, length: e.length });
    }
  }
  return out;
}

export class Discarder {
  private readonly _file: MetaFile;
  /** The cheapest method this file has accepted so far; falls back once per file. */
  private _method: DiscardMethod;
  private _zeros: Buffer | undefined;

  constructor(file: MetaFile) {
    this._file = file;
    this._method = 'punch';
  }

  /** How the last range was discarded. */
  get method(): DiscardMethod {
    return this._method;
  }

  /**
   * Makes every byte of `extents` read as zero, giving the blocks back where
   * the file allows it. Ranges past `fileSizeBytes` are clipped (nothing is
   * there). The caller syncs afterwards. Returns the bytes discarded.
   */
  async discard(extents: readonly ByteExtent[], fileSizeBytes: number): Promise<number> {
    let bytes = 0;
    for (const e of mergeExtents(extents)) {
      const length = Math.min(e.offset + e.length, fileSizeBytes) - e.offset;
      if (length <= 0) continue;
      await this.discardOne(e.offset, length);
      bytes += length;
    }
    return bytes;
  }

  /**
   * Like discard(), but first reads each range and discards only the parts
   * that still hold non-zero bytes: for free space found at open, where
   * punching or zeroing everything again would cost a full write on devices
   * without cheap zeroing. Returns the bytes that needed it.
   */
  async scrub(extents: readonly ByteExtent[], fileSizeBytes: number): Promise<number> {
    let bytes = 0;
    for (const dirty of await findNonZero(this._file, extents, fileSizeBytes)) {
      await this.discardOne(dirty.offset, dirty.length);
      bytes += dirty.length;
    }
    return bytes;
  }

  private async discardOne(offset: number, length: number): Promise<void> {
    for (;;) {
      try {
        if (this._method === 'zero-write') return await this.writeZeros(offset, length);
        const mode = this._method === 'punch' ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
        return await this._file.allocate(offset, length, mode);
      } catch (err) {
        if (!isSnapshotError(err) || !UNSUPPORTED.has(err.code)) throw err;
        this._method = this._method === 'punch' ? 'zero-range' : 'zero-write';
      }
    }
  }

  private async writeZeros(offset: number, length: number): Promise<void> {
    this._zeros ??= Buffer.alloc(Math.min(ZERO_WRITE_BYTES, length));
    if (this._zeros.length < Math.min(ZERO_WRITE_BYTES, length)) this._zeros = Buffer.alloc(Math.min(ZERO_WRITE_BYTES, length));
    for (let done = 0; done < length; ) {
      const n = Math.min(this._zeros.length, length - done);
      await this._file.write(n === this._zeros.length ? this._zeros : this._zeros.subarray(0, n), offset + done);
      done += n;
    }
  }
}

/**
 * The parts of `extents` (clipped to the file) whose bytes are not all zero,
 * at SCAN_BYTES granularity: free space that was never punched, so a deleted
 * vmstate could still be read from it. Holes read as zeros without disk I/O.
 */
export async function findNonZero(file: MetaFile, extents: readonly ByteExtent[], fileSizeBytes: number): Promise<ByteExtent[]> {
  const out: ByteExtent[] = [];
  const buffer = Buffer.alloc(SCAN_BYTES);
  for (const e of mergeExtents(extents)) {
    const end = Math.min(e.offset + e.length, fileSizeBytes);
    for (let at = e.offset; at < end; at += SCAN_BYTES) {
      const n = Math.min(SCAN_BYTES, end - at);
      const view = n === SCAN_BYTES ? buffer : buffer.subarray(0, n);
      const got = await file.read(view, at);
      if (!isAllZero(view.subarray(0, got))) {
        const last = out[out.length - 1];
        if (last !== undefined && last.offset + last.length === at) last.length += n;
        else out.push({ offset: at, length: n });
      }
    }
  }
  return out;
}

const ZEROS = Buffer.alloc(SCAN_BYTES);

function isAllZero(bytes: Buffer): boolean {
  return bytes.equals(ZEROS.subarray(0, bytes.length));
}
