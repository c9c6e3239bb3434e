/**
 * The one file every reading case reads: a qcow2 image whose internal
 * snapshot holds the page stream as its vmstate, saved once, untimed, by
 * createSnapshotStream with O_DIRECT (so none of it is in this machine's page
 * cache). The export cases (x, x0) read it through createVmStateReadStream;
 * the device-read cells (rd*, fio-r*) read its first bytes raw, which are the
 * same host clusters.
 *
 * One file for both, because the work disk is a virtual disk whose host keeps
 * a cache of its own: two files read at rates up to twice apart in the same
 * minute, depending on what the host still holds of each (docs/performance.md).
 * Read the same file in turn, the export and the device references see the
 * same host state. It lives in the runner's scratch directory, which the
 * runner deletes.
 */
import { mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createImage, createSnapshotStream } from '../../dist/index.js';
import { pumpPages } from './pump.js';

/** bench/run.js's TMP_DIR. */
const SCRATCH_DIR = join(dirname(dirname(fileURLToPath(import.meta.url))), '.tmp', String(process.pid));
export const READ_SOURCE_SNAPSHOT = 'bench-export';
/** 1 GiB disk: the vmstate area starts right after it, and its clusters fill the file from near its start. */
const DISK_BYTES = 1 << 30;

let made;

/** { image, bytes }: the image and its snapshot's vmstate size (the stream's bytes), written on first use. */
export function readSource(workload) {
  made ??= write(workload);
  return made;
}

/** The image's path; a device-read cell reads [0, pageCount x 4 KiB) of it, less than its size. */
export async function readSourcePath(workload) {
  return (await readSource(workload)).image;
}

async function write(workload) {
  mkdirSync(SCRATCH_DIR, { recursive: true });
  const image = join(SCRATCH_DIR, 'read-source.qcow2');
  await createImage(image, { size: DISK_BYTES, overwrite: true });
  const out = createSnapshotStream(image, { snapshot: READ_SOURCE_SNAPSHOT, direct: true });
  await pumpPages(out, workload);
  return { image, bytes: out.bytesWritten };
}
