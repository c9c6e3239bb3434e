// Run inside a fresh project that installed the packed tarball: the package as
// a CommonJS user requires it (require(esm), Node >= 20.19). The module
// required is the same instance the ESM import gets, so SnapshotError checks
// agree across the two.
const assert = require('node:assert/strict');
const { createHash, randomBytes } = require('node:crypto');
const { readFileSync } = require('node:fs');
const { join } = require('node:path');
const { Readable } = require('node:stream');
const { pipeline } = require('node:stream/promises');

const snapstream = require('snapstream');
for (const name of ['createSnapshotStream', 'openImage', 'createImage', 'SnapshotError']) {
  assert.equal(typeof snapstream[name], 'function', `require('snapstream').${name}`);
}
assert.equal(require('snapstream/package.json').name, 'snapstream');

async function main() {
  const esm = await import('snapstream');
  assert.equal(esm.SnapshotError, snapstream.SnapshotError, 'ESM and CJS see different module instances');
  const data = randomBytes(3 * 4096 + 7);
  const file = join(process.argv[2], 'cjs.raw');
  await pipeline(Readable.from([data]), snapstream.createSnapshotStream(file));
  const sha256 = (bytes) => createHash('sha256').update(bytes).digest('hex');
  assert.equal(sha256(readFileSync(file)), sha256(data));
  console.log('cjs: ok');
}
main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
