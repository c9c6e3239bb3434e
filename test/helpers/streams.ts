/**
 * Stream sources shared by the stream tests: deterministic content, and the
 * QEMU-like pattern of an 8-byte page header followed by a 4 KiB page.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { Readable } from 'node:stream';

/** xorshift32: fast, deterministic bytes for any seed. */
export function pseudoRandom(bytes: number, seed: number): Buffer {
  const out = Buffer.allocUnsafe(bytes);
  let x = seed >>> 0 || 0x9e3779b9;
  let i = 0;
  for (; i + 4 <= bytes; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out.writeUInt32LE(x >>> 0, i);
  }
  for (; i < bytes; i++) out[i] = (x >>> ((i & 3) * 8)) & 0xff;
  return out;
}

export function sha256(data: Uint8Array | Uint8Array[]): string {
  const h = createHash('sha256');
  for (const d of Array.isArray(data) ? data : [data]) h.update(d);
  return h.digest('hex');
}

export async function sha256OfFile(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of createReadStream(path)) h.update(c as Buffer);
  return h.digest('hex');
}

/** Splits `data` into chunks whose sizes come from `sizes` (cycled). */
export function chunked(data: Buffer, sizes: (i: number) => number): Buffer[] {
  const out: Buffer[] = [];
  let pos = 0;
  for (let i = 0; pos < data.length; i++) {
    const n = Math.min(Math.max(1, sizes(i)), data.length - pos);
    out.push(data.subarray(pos, pos + n));
    pos += n;
  }
  return out;
}

/** A Readable of the given chunks, one chunk per read. */
export function fromChunks(chunks: Uint8Array[]): Readable {
  return Readable.from(chunks, { objectMode: true });
}

/** QEMU-like RAM stream: for each page an 8-byte header, then the 4 KiB page. */
export function* qemuLikePages(pages: number, pool: Buffer): Generator<Buffer> {
  const poolPages = Math.floor(pool.length / 4096);
  for (let i = 0; i < pages; i++) {
    const header = Buffer.alloc(8);
    header.writeBigUInt64BE((BigInt(i) << 12n) | 0x28n);
    yield header;
    const p = (i * 7919) % poolPages;
    yield pool.subarray(p * 4096, (p + 1) * 4096);
  }
}
