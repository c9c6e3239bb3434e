/**
 * One file of the page stream's size on the work disk, written once with
 * O_DIRECT (so none of it is in the page cache) and read by every device-read
 * cell. It lives in the runner's scratch directory, which the runner deletes.
 */
import { mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { allocAligned } from '../../dist/io/alignment.js';
import { TargetFile } from '../../dist/io/target-file.js';

/** bench/run.js's TMP_DIR. */
const SCRATCH_DIR = join(dirname(dirname(fileURLToPath(import.meta.url))), '.tmp', String(process.pid));
const BLOCK_BYTES = 16 << 20;

const made = new Map();

/** The path of a file of at least the workload's page bytes (rounded up to 16 MiB). */
export function readSourcePath(workload) {
  const total = Math.ceil((workload.pageCount * 4096) / BLOCK_BYTES) * BLOCK_BYTES;
  let p = made.get(total);
  if (p === undefined) {
    p = write(join(SCRATCH_DIR, `read-source-${total}.bin`), total, workload.pool);
    made.set(total, p);
  }
  return p;
}

async function write(path, total, pool) {
  mkdirSync(SCRATCH_DIR, { recursive: true });
  const block = allocAligned(BLOCK_BYTES, 4096);
  block.set(pool.subarray(0, Math.min(BLOCK_BYTES, pool.length)));
  const f = await TargetFile.open(path, { write: true, create: true, truncate: true, direct: 'auto', threads: 1 });
  for (let pos = 0; pos < total; pos += BLOCK_BYTES) await f.write(block, pos);
  await f.datasync();
  await f.close();
  return path;
}
