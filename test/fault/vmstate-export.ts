/**
 * Reading back what a save wrote, shared by the crash, concurrency and limits
 * suites: a snapshot's vmstate read twice, once through the public read API
 * and once by the independent reader of test/helpers/qcow2-vmstate.ts (which
 * shares no code with src/), so a bug our writer and our reader agree on
 * cannot pass.
 */
import { createHash } from 'node:crypto';
import { openImage } from '../../src/index.js';
import { readSnapshotVmState } from '../helpers/qcow2-vmstate.js';

export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

/** The whole vmstate of snapshot `idOrName`, read through a read-only openImage(). */
async function exportOurs(path: string, idOrName: string): Promise<Buffer> {
  const img = await openImage(path, { readOnly: true });
  try {
    const parts: Buffer[] = [];
    for await (const chunk of img.createVmStateReadStream(idOrName)) parts.push(chunk as Buffer);
    return Buffer.concat(parts);
  } finally {
    await img.close();
  }
}

/**
 * The vmstate of snapshot `name` as the independent reader sees it. Throws
 * when our export reads anything else, so callers compare one buffer against
 * their expected bytes and both readers are checked.
 */
export async function exportVmState(path: string, name: string): Promise<Buffer> {
  const independent = await readSnapshotVmState(path, name);
  const ours = await exportOurs(path, name);
  if (!ours.equals(independent)) {
    throw new Error(
      `vmstate of '${name}' in ${path}: our export (${ours.length} B, sha256 ${sha256(ours)}) differs from ` +
        `the independent reader (${independent.length} B, sha256 ${sha256(independent)})`,
    );
  }
  return independent;
}
