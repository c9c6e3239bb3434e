/**
 * The export streams open on an image. Exports read committed data only, so
 * they run beside saves, reverts and deletes of other snapshots; what they
 * conflict with is a delete of the very snapshot they read (its clusters
 * become free and may be reused), which the image refuses while one is open,
 * and close(), which stops them first. The other way round, a delete that
 * has started (it found no export) marks its snapshot until it ends, and an
 * export asked for meanwhile is refused as if the snapshot were gone: the
 * delete was called first, and it frees what the export would read.
 */
import { ErrorCode, SnapshotError } from '../errors.js';
import type { SnapshotEntry } from './snapshot-table.js';
import type { VmStateReadStream } from './vmstate-reader.js';

export class OpenExports {
  /** Open streams, by the id of the snapshot each reads. */
  private readonly _streams = new Map<VmStateReadStream, string>();

  add(stream: VmStateReadStream, snapshotId: string): VmStateReadStream {
    this._streams.set(stream, snapshotId);
    stream.once('close', () => this._streams.delete(stream));
    return stream;
  }

  /** Ids of snapshots whose delete has started and not yet ended. */
  private readonly _deleting = new Set<string>();

  /**
   * Starts the delete of `entry`: SNAPSHOT_IN_USE while an open export reads
   * it; otherwise exports of it are refused until the returned function runs
   * (when the delete has ended, whether it succeeded or not).
   */
  beginDelete(entry: SnapshotEntry, path: string): () => void {
    this.refuseDelete(entry, path);
    this._deleting.add(entry.id);
    return () => this._deleting.delete(entry.id);
  }

  /** SNAPSHOT_NOT_FOUND while a delete of `entry` runs (see beginDelete). */
  refuseExport(entry: SnapshotEntry, path: string): void {
    if (!this._deleting.has(entry.id)) return;
    throw new SnapshotError(ErrorCode.SNAPSHOT_NOT_FOUND, `snapshot ${entry.id} '${entry.name}' is being deleted`, { path });
  }

  /** SNAPSHOT_IN_USE while an open export reads `entry`. */
  private refuseDelete(entry: SnapshotEntry, path: string): void {
    for (const id of this._streams.values()) {
      if (id !== entry.id) continue;
      throw new SnapshotError(ErrorCode.SNAPSHOT_IN_USE, `snapshot ${entry.id} '${entry.name}' is being exported; delete it after the export ends`, {
        path,
      });
    }
  }

  /** Destroys every open export with `error` and resolves once each has closed (no read in flight). */
  async stopAll(error: SnapshotError): Promise<void> {
    const streams = [...this._streams.keys()];
    for (const stream of streams) stream.destroy(error);
    // Not events.once(): it rejects on the 'error' that destroy(error) emits before 'close'.
    await Promise.all(streams.map((stream) => (stream.closed ? undefined : new Promise((resolve) => stream.once('close', resolve)))));
  }
}
