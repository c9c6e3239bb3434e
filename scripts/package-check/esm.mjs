// Run inside a fresh project that installed the packed tarball: the package as
// an ESM user imports it. Writes a raw state file and a qcow2 internal snapshot
// from a QEMU-like stream, checked against a sha256 of the input and against
// qemu-img.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createImage, createSnapshotStream, openImage, SnapshotError } from 'snapstream';

const dir = process.argv[2];
const sha256 = (bytes) => createHash('sha256').update(bytes).digest('hex');
// 5 MiB + an odd tail, so the last buffer is partial and the raw file is truncated.
const data = randomBytes(5 * 1024 * 1024 + 12345);

/** The stream as QEMU writes it: an 8-byte header, then a 4 KiB page, again and again. */
function* qemuLikeChunks(bytes) {
  for (let at = 0; at < bytes.length; ) {
    const size = (at / 8) % 2 === 0 ? 8 : 4096;
    yield bytes.subarray(at, at + size);
    at += size;
  }
}

const raw = join(dir, 'state.raw');
const out = createSnapshotStream(raw, { bufferSize: 1 << 20, buffers: 2 });
await pipeline(Readable.from(qemuLikeChunks(data)), out);
assert.equal(out.bytesWritten, data.length);
assert.equal(sha256(readFileSync(raw)), sha256(data), 'raw file differs from the input');

const image = join(dir, 'disk.qcow2');
await createImage(image, { size: 64 << 20 });
await pipeline(Readable.from(qemuLikeChunks(data)), createSnapshotStream(image, { snapshot: 'package-check' }));
const listed = execFileSync('qemu-img', ['snapshot', '-l', image], { encoding: 'utf8' });
assert.match(listed, /\bpackage-check\b/, `qemu-img snapshot -l does not list the snapshot:\n${listed}`);
const checked = execFileSync('qemu-img', ['check', '--output=json', image], { encoding: 'utf8' });
const report = JSON.parse(checked);
assert.equal(report['check-errors'], 0, checked);
assert.ok(!report.corruptions && !report.leaks, checked);

const img = await openImage(image, { readOnly: true });
try {
  const [info] = img.snapshots();
  assert.equal(info?.name, 'package-check');
  assert.equal(info?.vmStateSize, data.length);
  const chunks = [];
  for await (const chunk of img.createVmStateReadStream('package-check')) chunks.push(chunk);
  assert.equal(sha256(Buffer.concat(chunks)), sha256(data), 'vmstate read back differs from the input');
} finally {
  await img.close();
}

await assert.rejects(openImage(join(dir, 'missing.qcow2')), (err) => err instanceof SnapshotError && err.code === 'ENOENT');
console.log(`esm: ok (raw ${data.length} bytes, direct=${out.direct}, alignment=${out.alignment}; qcow2 snapshot accepted by qemu-img)`);
