/**
 * Shared set-up for the qcow2 suites: images made by qemu-img itself, in temp
 * dirs on the real disk, and small byte-level helpers for corrupting them.
 */
import { open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { qemuImg, qemuIo, requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';

/** Undefined when qemu-img and qemu-io are installed; a skip reason otherwise (throws on CI). */
export const qemuMissing = requireTool('qemu-img', 'qemu-io');

export interface ImageSpec {
  sizeBytes: number;
  clusterSize?: number;
  compat?: '0.10' | '1.1';
  refcountBits?: number;
  preallocation?: 'off' | 'metadata';
  lazyRefcounts?: boolean;
  compressionType?: 'zlib' | 'zstd';
}

export class Workdir {
  private _n = 0;
  private constructor(readonly dir: TmpDir) {}

  static async create(prefix: string): Promise<Workdir> {
    return new Workdir(await tmpDir(prefix));
  }

  path(name = 'img'): string {
    this._n++;
    return join(this.dir.path, `${name}-${this._n}.qcow2`);
  }

  /** `qemu-img create -f qcow2` with the given options. */
  async image(spec: ImageSpec, name?: string): Promise<string> {
    const path = this.path(name);
    const options: Record<string, string | number> = {
      cluster_size: spec.clusterSize ?? 65536,
      compat: spec.compat ?? '1.1',
    };
    if (spec.refcountBits !== undefined) options.refcount_bits = spec.refcountBits;
    if (spec.preallocation !== undefined) options.preallocation = spec.preallocation;
    if (spec.lazyRefcounts === true) options.lazy_refcounts = 'on';
    if (spec.compressionType !== undefined) options.compression_type = spec.compressionType;
    await qemuImg.create(path, spec.sizeBytes, options);
    return path;
  }

  cleanup(): Promise<void> {
    return this.dir.cleanup();
  }
}

/** Writes guest data with qemu-io, e.g. `write -P 0xab 0 1M`. */
export async function guestWrite(path: string, ...cmds: string[]): Promise<void> {
  await qemuIo(path, cmds);
}

export async function patchBytes(path: string, offset: number, bytes: Uint8Array): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    await fh.write(bytes, 0, bytes.length, offset);
  } finally {
    await fh.close();
  }
}

export function be32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value >>> 0);
  return b;
}

export function be64(value: bigint | number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(value));
  return b;
}

export async function readBytes(path: string, offset: number, length: number): Promise<Buffer> {
  const all = await readFile(path);
  return all.subarray(offset, offset + length);
}
