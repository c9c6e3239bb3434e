/**
 * Space reservation with fallocate(2). A reservation either succeeds whole or
 * leaves the file at the size it had: ENOSPC is reported before any stream
 * byte is written.
 */
import { ErrorCode, SnapshotError, isSnapshotError } from '../errors.js';
import type { TargetFile } from './target-file.js';

export interface ReserveOptions {
  signal?: AbortSignal | undefined;
  /** File size to restore when the reservation fails. */
  restoreSize: number;
}

export async function reserveSpace(file: TargetFile, offset: number, length: number, options: ReserveOptions): Promise<void> {
  if (file.isBlockDevice) {
    if (offset + length > file.size) {
      throw new SnapshotError(ErrorCode.ENOSPC, `'${file.path}' has ${file.size} bytes; ${offset + length} requested`, {
        path: file.path,
        offset,
      });
    }
    return;
  }
  if (options.signal?.aborted) throw new SnapshotError(ErrorCode.ABORTED, 'preallocation aborted', { path: file.path });
  try {
    await file.allocate(offset, length, 0);
  } catch (err) {
    // fallocate may have reserved some blocks and grown the file before
    // failing; put the size back so the target is left as it was.
    await file.truncate(options.restoreSize).catch(() => undefined);
    if (isSnapshotError(err, 'EOPNOTSUPP')) return; // no fallocate here: the stream's writes allocate as they go
    throw err;
  }
}
