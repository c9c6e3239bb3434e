/**
 * The slice of TargetFile (src/io/target-file.ts) that the qcow2 layer uses
 * for metadata. Keeping it an interface lets the format code be exercised on
 * any descriptor and documents exactly which syscalls the layer needs.
 */
import { corrupt } from './fail.js';

export interface MetaFile {
  readonly path: string;
  /** The image is a block device: no truncation, st_blocks means nothing. */
  readonly isBlockDevice?: boolean;
  read(buffer: Uint8Array, position: number): Promise<number>;
  write(buffer: Uint8Array, position: number): Promise<void>;
  datasync(): Promise<void>;
  truncate(length: number): Promise<void>;
  /** fallocate(2); `mode` is a mask of FALLOC_FL_* (discard.ts punches freed clusters with it). */
  allocate(position: number, length: number, mode: number): Promise<void>;
  stat(): Promise<{ size: number; blocks?: number }>;
  getLock(start: number, length: number, kind: 'read' | 'write'): Promise<{ type: 'read' | 'write'; pid: number } | null>;
  setLock(start: number, length: number, kind: 'read' | 'write' | 'unlock'): Promise<void>;
  close(): Promise<void>;
}

/**
 * Reads exactly `length` bytes. Callers have bounded `length` by a validated
 * header field, so this never allocates from untrusted input. A short read
 * means the metadata runs past the end of the file.
 */
export async function readExact(file: MetaFile, position: number, length: number, what: string): Promise<Buffer> {
  const buffer = Buffer.alloc(length);
  if (length === 0) return buffer;
  const got = await file.read(buffer, position);
  if (got !== length) {
    throw corrupt(`${what} (${length} bytes at offset ${position}) runs past the end of the file`, {
      path: file.path,
      offset: position,
    });
  }
  return buffer;
}
