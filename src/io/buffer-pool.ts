/**
 * Large I/O buffers kept for the next operation of the same process.
 *
 * Why: a page of fresh memory is expensive to touch the first time, and on a
 * virtual machine far more than zeroing it costs. On the machine of
 * docs/performance.md (sixth round) the first fill of a fresh 16 MiB ring
 * buffer took 60-100 ms, against 9 ms for a buffer filled before, huge pages
 * or not; and the disk waits for the first buffer. Every stream allocated its
 * ring afresh, so every stream paid that. A process that saves again (a
 * checkpoint loop, a backup of several VMs, the bench) now reuses the ring of
 * the stream before.
 *
 * The rules:
 * - Only buffers this module handed out come back; anything else is ignored.
 * - A buffer comes back all zero and with no I/O using it: the caller wipes
 *   it and waits for its writes first (Ring.release). It is handed out again
 *   as zeroed memory.
 * - The pool holds at most POOL_MAX_BYTES, and lets everything go after
 *   POOL_IDLE_MS without a take or a return. Its timer is unref'd: it never
 *   keeps a process alive.
 * - Buffers lent to user code (pumpTo's slots) never come here: a sink that
 *   kept a chunk past its lend would otherwise see another stream's data.
 */
import { assert } from '../assert.js';
import { allocAligned } from './alignment.js';

/** Bytes the pool may hold: two rings of the default geometry (4 x 8 MiB). */
export const POOL_MAX_BYTES = 64 * 1024 * 1024;
/** Idle time after which the pool lets its buffers go, by default. */
export const POOL_IDLE_MS = 10_000;
/** The longest idle time setTimeout takes (2^31 - 1 ms, about 24.8 days). */
const MAX_IDLE_MS = 2 ** 31 - 1;

/** The address alignment each buffer handed out here was asked for (it may have more). */
const alignmentOf = new WeakMap<Uint8Array, number>();
const pooled: Uint8Array[] = [];
let pooledBytes = 0;
let idleTimer: NodeJS.Timeout | undefined;
/** Off in measurements of fresh memory (setBufferPoolEnabled). */
let enabled = true;
let idleMs = POOL_IDLE_MS;

/** A zeroed buffer of `length` bytes aligned to `alignment`: a pooled one when one fits, else a fresh one. */
export function takeZeroedBuffer(length: number, alignment: number): Uint8Array {
  for (let i = enabled ? pooled.length - 1 : -1; i >= 0; i--) {
    const buffer = pooled[i] as Uint8Array;
    if (buffer.length === length && (alignmentOf.get(buffer) as number) % alignment === 0) {
      pooled.splice(i, 1);
      pooledBytes -= length;
      touch();
      return buffer;
    }
  }
  const buffer = allocAligned(length, alignment);
  alignmentOf.set(buffer, alignment);
  return buffer;
}

/**
 * Gives back a buffer from takeZeroedBuffer. The caller guarantees that every
 * byte is zero and that no I/O uses it any more; it must not touch it after.
 */
export function returnZeroedBuffer(buffer: Uint8Array): void {
  if (!alignmentOf.has(buffer)) return;
  assert(!pooled.includes(buffer), 'a buffer returned to the pool twice');
  if (!enabled || pooledBytes + buffer.length > POOL_MAX_BYTES) return;
  pooled.push(buffer);
  pooledBytes += buffer.length;
  touch();
}

/** Bytes held now (diagnostics and tests). */
export function bufferPoolBytes(): number {
  return pooledBytes;
}

/** Lets every pooled buffer go. */
export function drainBufferPool(): void {
  pooled.length = 0;
  pooledBytes = 0;
  if (idleTimer !== undefined) clearTimeout(idleTimer);
  idleTimer = undefined;
}

/**
 * Turns reuse on or off, for measurements that compare fresh memory with
 * reused: while off, buffers are allocated afresh and dropped when returned,
 * and what the pool holds stays there.
 */
export function setBufferPoolEnabled(on: boolean): void {
  enabled = on;
}

/**
 * How long the pool keeps buffers nobody takes. For a process that streams
 * at intervals longer than the default (the bench keeps its rings for the
 * whole run, as its device cells keep their buffers).
 */
export function setBufferPoolIdleMs(ms: number): void {
  if (!Number.isInteger(ms) || ms < 1 || ms > MAX_IDLE_MS) throw new RangeError(`Expected an integer from 1 to ${MAX_IDLE_MS} for the idle time, received ${ms}`);
  idleMs = ms;
  touch();
}

function touch(): void {
  if (idleTimer !== undefined) clearTimeout(idleTimer);
  idleTimer = pooled.length === 0 ? undefined : setTimeout(drainBufferPool, idleMs).unref();
}
