/**
 * Space reservation: fallocate(2), in chunks when someone watches.
 *
 * fallocate is O(1) per extent on ext4/xfs/btrfs and yields unfragmented
 * files. Users still want progress and cancel for many-GiB reservations, so
 * with a progress listener or an AbortSignal the range is reserved in chunks
 * (1 GiB by default, as libvirt does). Where the filesystem has no fallocate
 * (EOPNOTSUPP: ramfs, some FUSE and network filesystems) zeros are written
 * with large aligned writes instead, with the same progress and cancel.
 *
 * A reservation either completes or leaves the file at the size it had.
 */
import { ErrorCode, SnapshotError, isSnapshotError } from '../errors.js';
import { FALLOC_FL_KEEP_SIZE, type TargetFile } from './target-file.js';

/** Chunk for watched reservations: 1 GiB, as libvirt's volume allocation does. */
export const DEFAULT_PREALLOCATE_CHUNK = 1 << 30;
/** Zero-fill fallback write size: large enough to run at device speed. */
const ZERO_FILL_WRITE = 8 << 20;

export interface PreallocateProgress {
  bytesDone: number;
  bytesTotal: number;
  method: 'fallocate' | 'zero-fill';
}

export interface ReserveOptions {
  signal?: AbortSignal | undefined;
  onProgress?: ((progress: PreallocateProgress) => void) | undefined;
  /** Bytes per fallocate call when watched. */
  chunkBytes?: number;
  /** Reserve blocks without changing the file size (FALLOC_FL_KEEP_SIZE); no zero-fill fallback. */
  keepSize?: boolean;
  /** File size to restore when the reservation fails; defaults to the size at open. */
  restoreSize?: number;
}

function checkAborted(file: TargetFile, signal: AbortSignal | undefined, offset: number): void {
  if (signal?.aborted) {
    throw new SnapshotError(ErrorCode.ABORTED, `preallocation of '${file.path}' aborted`, {
      path: file.path,
      offset,
      cause: signal.reason,
    });
  }
}

async function fallocateRange(file: TargetFile, offset: number, length: number, options: ReserveOptions): Promise<void> {
  const watched = options.signal !== undefined || options.onProgress !== undefined;
  const chunk = watched ? (options.chunkBytes ?? DEFAULT_PREALLOCATE_CHUNK) : length;
  const mode = options.keepSize === true ? FALLOC_FL_KEEP_SIZE : 0;
  for (let done = 0; done < length; ) {
    checkAborted(file, options.signal, offset + done);
    const n = Math.min(chunk, length - done);
    await file.allocate(offset + done, n, mode);
    done += n;
    options.onProgress?.({ bytesDone: done, bytesTotal: length, method: 'fallocate' });
  }
}

async function zeroFillRange(file: TargetFile, offset: number, length: number, options: ReserveOptions): Promise<void> {
  const align = file.alignment;
  const zeros = file.allocBuffer(Math.min(ZERO_FILL_WRITE, Math.ceil(length / align) * align));
  for (let done = 0; done < length; ) {
    checkAborted(file, options.signal, offset + done);
    let n = Math.min(zeros.byteLength, length - done);
    // Direct I/O needs aligned lengths; the stream overwrites or truncates the excess.
    if (file.direct) n = Math.ceil(n / align) * align;
    await file.write(n === zeros.byteLength ? zeros : zeros.subarray(0, n), offset + done);
    done = Math.min(length, done + n);
    options.onProgress?.({ bytesDone: done, bytesTotal: length, method: 'zero-fill' });
  }
}

/**
 * Reserves [offset, offset + length) of `file`. ENOSPC (or ABORTED) leaves
 * the file at `restoreSize`, so nothing half-reserved stays behind.
 */
export async function reserveSpace(file: TargetFile, offset: number, length: number, options: ReserveOptions = {}): Promise<void> {
  if (length <= 0) return;
  if (file.isBlockDevice) {
    // A device's blocks exist already; only its size can refuse.
    if (offset + length > file.size) {
      throw new SnapshotError(ErrorCode.ENOSPC, `'${file.path}' holds ${file.size} bytes; ${offset + length} requested`, {
        path: file.path,
        offset,
      });
    }
    return;
  }
  const restoreSize = options.restoreSize ?? file.size;
  try {
    try {
      await fallocateRange(file, offset, length, options);
    } catch (err) {
      if (!isSnapshotError(err, ErrorCode.EOPNOTSUPP) || options.keepSize === true) throw err;
      await zeroFillRange(file, offset, length, options);
    }
  } catch (err) {
    // fallocate may have reserved some blocks and grown the file before
    // failing; put the size back so the target is left as it was.
    await file.truncate(restoreSize).catch(() => undefined);
    throw err;
  }
}
