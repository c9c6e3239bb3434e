/**
 * The ring: N aligned buffers, each FREE -> FILLING -> IN_FLIGHT -> FREE.
 * Allocated once when the stream opens; the hot path only moves indices.
 */
import assert from 'node:assert/strict';
import type { TargetFile } from '../io/target-file.js';

export const FREE = 0;
export const FILLING = 1;
export const IN_FLIGHT = 2;

export class Ring {
  readonly buffers: Uint8Array[];
  readonly bufferSize: number;
  private readonly _state: Uint8Array;
  private _next = 0; // where the search for a FREE buffer starts, to keep file order simple

  constructor(file: TargetFile, count: number, bufferSize: number) {
    assert.ok(count >= 2 && bufferSize > 0 && bufferSize % file.alignment === 0, 'ring geometry');
    this.bufferSize = bufferSize;
    this.buffers = [];
    for (let i = 0; i < count; i++) this.buffers.push(file.allocBuffer(bufferSize));
    this._state = new Uint8Array(count);
  }

  /** Index of a FREE buffer, now FILLING, or -1 when all are busy. */
  acquire(): number {
    const n = this._state.length;
    for (let k = 0; k < n; k++) {
      const i = (this._next + k) % n;
      if (this._state[i] === FREE) {
        this._state[i] = FILLING;
        this._next = (i + 1) % n;
        return i;
      }
    }
    return -1;
  }

  markInFlight(index: number): void {
    assert.equal(this._state[index], FILLING);
    this._state[index] = IN_FLIGHT;
  }

  release(index: number): void {
    assert.equal(this._state[index], IN_FLIGHT);
    this._state[index] = FREE;
  }

  /** Overwrites every buffer, so VM memory does not linger after the stream. */
  wipe(): void {
    for (const b of this.buffers) b.fill(0);
  }
}
