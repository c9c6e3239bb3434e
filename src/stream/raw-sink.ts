/**
 * The raw sink: a file or block device written from `offset` on. At the end
 * a regular file is truncated to its exact logical length (dropping the tail
 * padding and any over-reservation) and synced.
 */
import { unlink } from 'node:fs/promises';
import { ErrorCode, SnapshotError } from '../errors.js';
import { reserveSpace } from '../io/preallocate.js';
import { TargetFile } from '../io/target-file.js';
import { QCOW_MAGIC } from '../qcow2-magic.js';
import type { StreamConfig } from './options.js';
import { STREAM_IO_THREADS, type SinkFactory, type StreamSink } from './sink.js';

/** What a raw target needs beyond the stream's own options. */
export interface RawTargetConfig extends StreamConfig {
  /** Aligned file offset of logical byte 0. */
  readonly offset: number;
  /** Permission bits for a file this stream creates. */
  readonly mode: number;
  /** 'raw' allows writing over a file that looks like a qcow2 image. */
  readonly format: 'raw' | 'qcow2' | undefined;
}

class RawSink implements StreamSink {
  readonly file: TargetFile;
  readonly baseOffset: number;
  readonly maxLength: number | undefined;
  private readonly _created: boolean;

  constructor(file: TargetFile, baseOffset: number, created: boolean) {
    this.file = file;
    this.baseOffset = baseOffset;
    this._created = created;
    this.maxLength = file.isBlockDevice ? Math.max(0, file.size - baseOffset) : undefined;
  }

  async finalize(logicalLength: number): Promise<void> {
    if (!this.file.isBlockDevice) await this.file.truncate(this.baseOffset + logicalLength);
    // Data, and the length just set, become durable before 'finish' is emitted.
    await this.file.datasync();
  }

  async abort(): Promise<void> {
    // A file this stream created holds nothing but a partial stream: remove
    // it rather than leave something that looks like a snapshot.
    if (this._created) await unlink(this.file.path).catch(() => undefined);
  }

  async close(): Promise<void> {
    await this.file.close();
  }
}

/** Opens the target, creating it (mode 0600 by default) when missing. */
async function openTarget(path: string, opts: RawTargetConfig): Promise<{ file: TargetFile; created: boolean }> {
  const base = { write: true, direct: opts.direct, mode: opts.mode, threads: STREAM_IO_THREADS };
  try {
    return { file: await TargetFile.open(path, { ...base, create: false }), created: false };
  } catch (err) {
    if (!(err instanceof SnapshotError) || err.code !== ErrorCode.ENOENT) throw err;
  }
  try {
    return { file: await TargetFile.open(path, { ...base, create: true, exclusive: true }), created: true };
  } catch (err) {
    // The file did not exist a moment ago; an open that failed after creating
    // it (say, O_DIRECT refused by the filesystem) must not leave it behind.
    await unlink(path).catch(() => undefined);
    throw err;
  }
}

async function refuseQcow2(file: TargetFile): Promise<void> {
  if (file.size < 4) return;
  const probe = file.allocBuffer(Math.max(file.alignment, 4096));
  await file.read(probe, 0);
  const magic = (((probe[0] as number) << 24) | ((probe[1] as number) << 16) | ((probe[2] as number) << 8) | (probe[3] as number)) >>> 0;
  if (magic === QCOW_MAGIC) {
    throw new SnapshotError(
      ErrorCode.NOT_RAW,
      `'${file.path}' is a qcow2 image; pass { snapshot } to save into it, or { format: 'raw' } to overwrite it`,
      { path: file.path },
    );
  }
}

export function rawSinkFactory(path: string, opts: RawTargetConfig): SinkFactory {
  return async () => {
    const { file, created } = await openTarget(path, opts);
    try {
      if (opts.offset % file.alignment !== 0) {
        throw new SnapshotError(ErrorCode.EINVAL, `offset ${opts.offset} is not a multiple of the alignment ${file.alignment}`, {
          path,
          offset: opts.offset,
        });
      }
      if (opts.format !== 'raw') await refuseQcow2(file);
      if (opts.preallocate === 'space' && opts.expectedSize !== undefined && opts.expectedSize > 0) {
        await reserveSpace(file, opts.offset, opts.expectedSize, { signal: opts.signal });
      }
      return new RawSink(file, opts.offset, created);
    } catch (err) {
      await file.close().catch(() => undefined);
      if (created) await unlink(path).catch(() => undefined);
      throw err;
    }
  };
}
