/**
 * Reading back what a save wrote, shared by the crash, concurrency and limits
 * suites: a snapshot's vmstate through the public read API, and its digest.
 */
import { createHash } from 'node:crypto';
import { openImage } from '../../src/index.js';

export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

/** The whole vmstate of snapshot `idOrName`, read through a read-only openImage(). */
export async function exportVmState(path: string, idOrName: string): Promise<Buffer> {
  const img = await openImage(path, { readOnly: true });
  try {
    const parts: Buffer[] = [];
    for await (const chunk of img.createVmStateReadStream(idOrName)) parts.push(chunk as Buffer);
    return Buffer.concat(parts);
  } finally {
    await img.close();
  }
}
