/**
 * Loads the addon and describes its surface. The addon is deliberately dumb:
 * syscalls and threads only. Every policy decision lives in TypeScript.
 */
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

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
  /** A unix stream socket instead of a file; `timeoutMs` > 0 bounds each send/recv that makes no progress (EAGAIN). */
  connect(path: string, timeoutMs: number, cb: Completion<{ fd: number }>): void;
  /** A unix stream socket listening at `path` for one peer. */
  listen(path: string, cb: Completion<{ fd: number }>): void;
  /** The peer of a listening socket, which then replaces it; waits at most `waitMs` (0: until shutdown()). */
  accept(waitMs: number, timeoutMs: number, cb: Completion<{ fd: number }>): void;
  /** Writes all of `buffer` to the socket. */
  send(buffer: Uint8Array, cb: Completion): void;
  /** Reads until `buffer` is full or the peer closes; `bytes` says how many. */
  recv(buffer: Uint8Array, cb: Completion): void;
  /** Maps the whole pages of `buffer` writable (MADV_POPULATE_WRITE) on this object's thread; needs no descriptor. */
  prefault(buffer: Uint8Array, cb: Completion): void;
  /** shutdown(SHUT_RDWR) now, on this thread: a blocked send/recv returns. Returns the errno, 0 on success. */
  shutdown(): number;
}

export interface SlabStats {
  /** Slabs made by posix_memalign, handed out again from the free list, given back to the C library. */
  allocated: number;
  reused: number;
  released: number;
  /** Slabs (and bytes) handed out and not filed again yet: their ArrayBuffer alive, or an operation still using them. */
  live: number;
  liveBytes: number;
  /** Slabs (and bytes) on the free list. */
  free: number;
  freeBytes: number;
}

interface Addon {
  NativeFile: new (threads: number) => NativeFileHandle;
  alignmentSkip(buffer: ArrayBuffer, alignment: number): number;
  /** madvise(MADV_HUGEPAGE) over the whole huge pages in buffer[offset, +length); returns the bytes advised. */
  adviseHugePages(buffer: ArrayBuffer, offset: number, length: number, hugePageBytes: number): number;
  /**
   * An ArrayBuffer of exactly `length` bytes at a multiple of `alignment`, uninitialised, whose memory
   * goes back to a process-wide free list when V8 collects it (native/slabs.cc); `fresh` when it is new
   * memory rather than a slab from the free list. Throws an Error with code SLAB_REFUSED where external
   * buffers are refused (a V8 sandbox), SLAB_NO_MEMORY when the memory cannot be had.
   */
  allocSlab(length: number, alignment: number, hugePageBytes: number): { buffer: ArrayBuffer; fresh: boolean };
  /** Frees the free slabs idle at least `idleMs`; returns how many stay free. */
  trimSlabs(idleMs: number): number;
  /** Slab counters, for tests and diagnostics. */
  slabStats(): SlabStats;
  /** sysconf(_SC_PAGESIZE). */
  pageSize: number;
  /** The transparent huge page size, 0 when the kernel offers none to madvise. */
  hugePageSize: number;
}

// The package root is two levels above src/io and dist/io alike. node-gyp-build
// picks build/Release when there is one (a clone, or an install that compiled
// from source), else the prebuilt binary in prebuilds/<platform>-<arch>/ that
// matches this machine (see scripts/prebuild.sh).
// SNAPSTREAM_ADDON_PATH points at another build (the sanitizer build of
// `npm run test:asan`) without touching the normal one.
const require = createRequire(import.meta.url);
const packageRoot = fileURLToPath(new URL('../..', import.meta.url));

function loadAddon(): Addon {
  const explicit = process.env.SNAPSTREAM_ADDON_PATH;
  if (explicit) return require(explicit) as Addon;
  const load = require('node-gyp-build') as (dir: string) => unknown;
  try {
    return load(packageRoot) as Addon;
  } catch (cause) {
    const reason = String((cause as Error)?.message ?? cause).split('\n')[0];
    throw new Error(
      `snapstream: the native addon could not be loaded on ${process.platform}-${process.arch}: ${reason}. ` +
        'Where no prebuilt binary fits, installing compiles the addon, which needs a C++17 compiler, ' +
        'make and Python 3; with those in place (and its install script allowed), run `npm rebuild snapstream`.',
      { cause },
    );
  }
}

export const addon: Addon = loadAddon();
