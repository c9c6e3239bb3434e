/**
 * Loads the addon and describes its surface. The addon is deliberately dumb:
 * syscalls and threads only. Every policy decision lives in TypeScript.
 */
import { createRequire } from 'node:module';

export interface OpenFlags {
  write: boolean;
  create: boolean;
  exclusive: boolean;
  truncate: boolean;
  direct: boolean;
  mode: number;
}

export interface OpenFacts {
  fd: number;
  directInEffect: boolean;
  isBlockDevice: boolean;
  isRegular: boolean;
  size: number;
  dioReported: boolean;
  dioMemAlign: number;
  dioOffsetAlign: number;
  logicalBlockSize: number;
  blockSize: number;
  fsType: number;
}

export interface LockFacts {
  type: 0 | 1 | 2;
  pid: number;
}

export interface StatFacts {
  size: number;
  blocks: number;
  blockSize: number;
}

/** errno (0 = success), bytes transferred, failing syscall, per-op details. */
export type Completion<T = unknown> = (errno: number, bytes: number, syscall: string, details: T) => void;

export interface NativeFileHandle {
  open(path: string, flags: OpenFlags, cb: Completion<OpenFacts>): void;
  write(buffer: Uint8Array, position: number, cb: Completion): void;
  read(buffer: Uint8Array, position: number, cb: Completion): void;
  datasync(cb: Completion): void;
  truncate(length: number, cb: Completion): void;
  fallocate(mode: number, offset: number, length: number, cb: Completion): void;
  getlk(start: number, length: number, type: number, cb: Completion<LockFacts>): void;
  setlk(start: number, length: number, type: number, cb: Completion): void;
  fstat(cb: Completion<StatFacts>): void;
  close(cb: Completion): void;
  dispose(): void;
  pending(): number;
  /** At most `n` operations run at once (1..threads). */
  setConcurrency(n: number): void;
}

interface Addon {
  NativeFile: new (threads: number) => NativeFileHandle;
  alignmentSkip(buffer: ArrayBuffer, alignment: number): number;
}

// src/io and dist/io sit at the same depth, so one relative path serves both.
// SNAPSTREAM_ADDON_PATH points at another build (the sanitizer build of
// `npm run test:asan`) without touching the normal one.
const require = createRequire(import.meta.url);
export const addon: Addon = require(process.env.SNAPSTREAM_ADDON_PATH ?? '../../build/Release/snapstream.node') as Addon;
