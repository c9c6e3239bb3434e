/**
 * Format-blind mutators, AFL's "havoc" set: bit flips, interesting values,
 * random bytes, byte runs, splices from another corpus entry, truncation and
 * extension. They work on a Canvas so that the qcow2 fuzzer can record them
 * as patches over a seed image instead of copying 2 MiB per input.
 */
import type { Rng } from './engine.js';

export interface Canvas {
  /** The input's current length in bytes; may be set anywhere up to `capacity`. */
  length: number;
  readonly capacity: number;
  byteAt(at: number): number;
  write(at: number, bytes: Uint8Array): void;
}

/** Another corpus entry, for splices. */
export interface SpliceSource {
  length: number;
  read(from: number, count: number): Uint8Array;
}

/** AFL's interesting 8/16/32-bit values (afl-fuzz config.h), written big- or little-endian. */
const INTERESTING: readonly number[] = [
  0, 1, 16, 32, 64, 100, 127, 128, 255, 256, 512, 1000, 1024, 4096, 32767, 32768, 65535, 65536,
  0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff,
];
const RUN_BYTES: readonly number[] = [0x00, 0xff, 0x7f, 0x80];
/** Splices and runs stay below a 4 KiB page: long enough for a table entry run, short enough to keep patches small. */
const MAX_RUN_BYTES = 4096;

/** One generic mutation of `canvas`; `hot` bytes from the start get half the point mutations. */
export function havoc(rng: Rng, canvas: Canvas, hot: number, other: () => SpliceSource): void {
  const len = canvas.length;
  const at = (width: number): number => {
    const span = rng.int(2) === 0 ? Math.min(hot, len) : len;
    return Math.max(0, rng.int(Math.max(1, span - width + 1)));
  };
  switch (rng.int(8)) {
    case 0: {
      if (len === 0) return;
      const i = at(1);
      canvas.write(i, Uint8Array.of(canvas.byteAt(i) ^ (1 << rng.int(8))));
      return;
    }
    case 1: {
      const width = rng.pick([1, 2, 4]);
      if (len < width) return;
      const b = Buffer.alloc(4);
      b.writeUInt32BE(rng.pick(INTERESTING) >>> 0);
      const bytes = b.subarray(4 - width);
      canvas.write(at(width), rng.int(2) === 0 ? bytes : Uint8Array.from(bytes).reverse());
      return;
    }
    case 2:
      if (len > 0) canvas.write(at(1), Uint8Array.of(rng.int(256)));
      return;
    case 3: {
      if (len === 0) return;
      const i = at(1);
      canvas.write(i, new Uint8Array(Math.min(len - i, 1 + rng.int(64))).fill(rng.pick(RUN_BYTES)));
      return;
    }
    case 4: {
      const src = other();
      if (src.length === 0 || len === 0) return;
      const from = rng.int(src.length);
      const count = Math.min(1 + rng.int(MAX_RUN_BYTES), src.length - from, len);
      canvas.write(rng.int(len - count + 1), src.read(from, count));
      return;
    }
    case 5:
      canvas.length = rng.int(len + 1);
      return;
    case 6:
      canvas.length = Math.min(canvas.capacity, len + 1 + rng.int(Math.max(1, hot)));
      return;
    default: {
      // A small add/subtract on a byte, as AFL's arith stage.
      if (len === 0) return;
      const i = at(1);
      canvas.write(i, Uint8Array.of((canvas.byteAt(i) + rng.int(71) - 35) & 0xff));
    }
  }
}

/** A Canvas over a plain buffer of fixed capacity, for small inputs. */
export class BufferCanvas implements Canvas {
  constructor(
    readonly bytes: Buffer,
    public length: number,
  ) {}
  get capacity(): number {
    return this.bytes.length;
  }
  byteAt(at: number): number {
    return this.bytes[at] as number;
  }
  write(at: number, bytes: Uint8Array): void {
    this.bytes.set(bytes.subarray(0, Math.max(0, this.bytes.length - at)), at);
  }
}
