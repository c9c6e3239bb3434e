/**
 * The raw sink: a file or block device written from `offset` on.
 *
 * - One writer at a time: the target is locked (an OFD write lock on QEMU's
 *   "write not shared" byte, so a QEMU is refused too) before anything is
 *   written; a second stream gets TARGET_LOCKED instead of mixing bytes.
 * - Only what this stream created is ever removed: a failed or aborted
 *   stream unlinks a file it made itself, and nothing else.
 * - Bytes past the stream are kept: the tail block is read and rewritten
 *   around the stream's last bytes on a device or when the file goes on past
 *   the stream, and a file written at an offset is never cut below its size.
 *   From offset 0 a file is truncated to the stream's exact length.
 * - Only targets that take writes at offsets: a FIFO, a character device or a
 *   socket is refused before anything is read (pipe into them instead).
 */
import { fstat } from 'node:fs';
import { stat, unlink } from 'node:fs/promises';
import { promisify } from 'node:util';
import { ErrorCode, SnapshotError } from '../errors.js';
import { alignDown } from '../io/alignment.js';
import { reserveSpace } from '../io/preallocate.js';
import { TargetFile } from '../io/target-file.js';
import { describeHolder, findLockHolders } from '../io/lock-holder.js';
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

/**
 * QEMU's lock byte for "write not shared" (block/file-posix.c: 200 + BLK_PERM_WRITE).
 * Our exclusive lock on it makes QEMU's write-permission check fail, and any
 * QEMU user of the file (which holds a shared lock there) makes ours fail.
 */
const RAW_WRITE_LOCK_BYTE = 201;
/** Opens retried when the path was unlinked or replaced between our open and our lock. */
const OPEN_ATTEMPTS = 3;
const fstatAsync = promisify(fstat);

class RawSink implements StreamSink {
  readonly file: TargetFile;
  readonly baseOffset: number;
  readonly maxLength: number | undefined;
  private readonly _created: boolean;
  /** The file's size before this stream: bytes past the stream below it belong to someone. */
  private readonly _sizeBefore: number;

  constructor(file: TargetFile, baseOffset: number, created: boolean, sizeBefore: number) {
    this.file = file;
    this.baseOffset = baseOffset;
    this._created = created;
    this._sizeBefore = sizeBefore;
    this.maxLength = file.isBlockDevice ? Math.max(0, file.size - baseOffset) : undefined;
  }

  /**
   * Read-modify-write of the tail block: buffer[from, to) is padding that
   * will land at file offset position + from; fill it with the bytes there
   * now wherever they are someone's (a device, or a file going on past the
   * stream), so the padding does not overwrite them.
   */
  async fillTail(buffer: Uint8Array, from: number, to: number, position: number): Promise<void> {
    const file = this.file;
    const keeps = file.isBlockDevice || (this.baseOffset > 0 && this._sizeBefore > position + from);
    if (!keeps || to <= from) return;
    const blockStart = alignDown(position + from, file.alignment);
    const scratch = file.allocBuffer(position + to - blockStart);
    const got = await file.read(scratch, blockStart);
    const skip = position + from - blockStart;
    if (got > skip) buffer.set(scratch.subarray(skip, Math.min(got, scratch.length)), from);
  }

  async finalize(logicalLength: number): Promise<void> {
    if (!this.file.isBlockDevice) {
      const end = this.baseOffset + logicalLength;
      // From offset 0 the stream is the file; at an offset it is a part of one.
      await this.file.truncate(this.baseOffset > 0 ? Math.max(end, this._sizeBefore) : end);
    }
    // Data, and the length just set, become durable before 'finish' is emitted.
    await this.file.datasync();
  }

  async abort(): Promise<void> {
    // A file this stream created holds nothing but a partial stream: remove
    // it rather than leave something that looks like a snapshot. We hold its
    // lock, so no other stream is writing it.
    if (this._created) await unlink(this.file.path).catch(() => undefined);
  }

  async close(): Promise<void> {
    await this.file.close();
  }
}

interface Opened {
  file: TargetFile;
  created: boolean;
}

/** Refuses targets without offsets before opening (an open of a FIFO would wait for a reader). */
async function refuseSequential(path: string): Promise<void> {
  const st = await stat(path).catch(() => undefined);
  if (st === undefined || st.isFile() || st.isBlockDevice() || st.isDirectory()) return;
  const kind = st.isFIFO() ? 'a FIFO' : st.isCharacterDevice() ? 'a character device' : 'a socket';
  throw new SnapshotError(
    ErrorCode.EINVAL,
    `'${path}' is ${kind}: the snapshot stream writes at offsets into a file or block device; pipe the bytes into it instead`,
    { path, syscall: 'open' },
  );
}

/** Opens the target, creating it (mode 0600 by default) when missing; `created` only when this call made it. */
async function openOnce(path: string, opts: RawTargetConfig): Promise<Opened> {
  const base = { write: true, direct: opts.direct, mode: opts.mode, threads: STREAM_IO_THREADS };
  try {
    return { file: await TargetFile.open(path, { ...base, create: false }), created: false };
  } catch (err) {
    if (!(err instanceof SnapshotError) || err.code !== ErrorCode.ENOENT) throw err;
  }
  try {
    return { file: await TargetFile.open(path, { ...base, create: true, exclusive: true }), created: true };
  } catch (err) {
    // Another writer created it between our two opens: it is theirs, and the lock decides.
    if (err instanceof SnapshotError && err.code === ErrorCode.EEXIST) {
      return { file: await TargetFile.open(path, { ...base, create: false }), created: false };
    }
    // Our exclusive create made the file and a later step failed (O_DIRECT
    // refused): it holds nothing, and it is ours.
    await unlink(path).catch(() => undefined);
    throw err;
  }
}

/** Takes the target's write lock, or throws TARGET_LOCKED naming the holder. */
async function lockTarget(file: TargetFile): Promise<void> {
  try {
    await file.setLock(RAW_WRITE_LOCK_BYTE, 1, 'write');
  } catch (err) {
    if (!(err instanceof SnapshotError) || err.code !== ErrorCode.EAGAIN) throw err;
    // OFD locks report pid -1 to F_OFD_GETLK: /proc names the holder (lock-holder.ts).
    const holder = findLockHolders(file.path)[0];
    const who = holder === undefined ? 'another process (snapstream or QEMU)' : `process ${holder.pid} (${holder.comm}, ${describeHolder(holder)})`;
    throw new SnapshotError(ErrorCode.TARGET_LOCKED, `'${file.path}' is being written by ${who}`, {
      path: file.path,
      syscall: 'fcntl(F_OFD_SETLK)',
      offset: RAW_WRITE_LOCK_BYTE,
    });
  }
}

/** Whether `path` still names the inode we opened (a writer that lost may have unlinked what it created). */
async function stillAtPath(file: TargetFile): Promise<boolean> {
  const [atPath, ours] = await Promise.all([stat(file.path).catch(() => undefined), fstatAsync(file.fd).catch(() => undefined)]);
  return atPath !== undefined && ours !== undefined && atPath.dev === ours.dev && atPath.ino === ours.ino;
}

/** Opens and locks the target; a file we did not create is never unlinked on the way. */
async function openLocked(path: string, opts: RawTargetConfig): Promise<Opened> {
  await refuseSequential(path);
  for (let attempt = 1; ; attempt++) {
    const opened = await openOnce(path, opts);
    try {
      await lockTarget(opened.file);
      if (opened.file.isBlockDevice || (await stillAtPath(opened.file))) return opened;
    } catch (err) {
      await opened.file.close().catch(() => undefined);
      // Locked by another writer: a file we just created is theirs now too; leave it.
      throw err;
    }
    await opened.file.close();
    if (attempt === OPEN_ATTEMPTS) {
      throw new SnapshotError(ErrorCode.TARGET_LOCKED, `'${path}' keeps being replaced by another writer`, { path });
    }
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
      `'${file.path}' is a qcow2 image; save into it as a snapshot, or pass format 'raw' to overwrite it`,
      { path: file.path },
    );
  }
}

export function rawSinkFactory(path: string, opts: RawTargetConfig): SinkFactory {
  return async () => {
    const { file, created } = await openLocked(path, opts);
    try {
      if (opts.offset % file.alignment !== 0) {
        throw new SnapshotError(ErrorCode.EINVAL, `offset ${opts.offset} is not a multiple of the alignment ${file.alignment}`, {
          path,
          offset: opts.offset,
        });
      }
      if (opts.format !== 'raw') await refuseQcow2(file);
      const sizeBefore = file.size;
      if (opts.preallocate === 'space' && opts.expectedSize !== undefined && opts.expectedSize > 0) {
        await reserveSpace(file, opts.offset, opts.expectedSize, { signal: opts.signal });
      }
      return new RawSink(file, opts.offset, created, sizeBefore);
    } catch (err) {
      // Unlink while the lock is still held, so no other writer is using the file.
      if (created) await unlink(path).catch(() => undefined);
      await file.close().catch(() => undefined);
      throw err;
    }
  };
}
