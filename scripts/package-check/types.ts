// Type-checked (not run) under strict inside a fresh project that installed the
// packed tarball: the .d.ts files resolve and describe the public API.
import { pipeline } from 'node:stream/promises';
import { Readable } from 'node:stream';
import { createImage, createSnapshotStream, openImage, SnapshotError } from 'snapstream';

export async function save(source: Readable, image: string): Promise<number> {
  await createImage(image, { size: 1 << 30, clusterSize: 65536, version: 3, preallocation: 'off' });
  const out = createSnapshotStream(image, { snapshot: 'nightly', bufferSize: 4 << 20, buffers: 2, direct: 'auto' });
  out.on('progress', ({ bytesWritten, bytesQueued }) => console.log(bytesWritten + bytesQueued));
  await pipeline(source, out);
  const direct: boolean | undefined = out.direct;
  const alignment: number | undefined = out.alignment;
  console.log(direct, alignment);
  return out.bytesWritten;
}

export async function names(image: string): Promise<string[]> {
  const img = await openImage(image, { readOnly: true });
  try {
    const check = await img.check();
    console.log(check.corruptions, check.leaks);
    return img.snapshots().map((s) => `${s.id} ${s.name} ${s.vmStateSize}`);
  } catch (err) {
    if (err instanceof SnapshotError) console.error(err.code, err.syscall, err.path);
    throw err;
  } finally {
    await img.close();
  }
}

// The declarations are real types, not `any`: each misuse below must be an error.
// @ts-expect-error buffers is a number
createSnapshotStream('x.raw', { buffers: 'two' });
// @ts-expect-error direct is true, false or 'auto'
createSnapshotStream('x.raw', { direct: 'sometimes' });
// @ts-expect-error openImage takes a path
void openImage(42);
