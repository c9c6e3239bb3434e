/** `snapstream demo` runs in CI: shrunk with --size, and it leaves nothing behind. */
import { readdirSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { tmpDir, type TmpDir } from '../helpers/tools.js';
import { runBin } from './bin-harness.js';

describe('snapstream demo', () => {
  let dir: TmpDir;
  beforeAll(async () => {
    dir = await tmpDir('cli-demo');
  });
  afterAll(() => dir.cleanup());

  it('saves, verifies and compares a small stream, then removes its files', async () => {
    const r = await runBin(['demo', '--size', '16M', '--dir', dir.path]);
    expect(r.code, r.stderr).toBe(0);
    const text = r.stdout.toString();
    expect(text).toMatch(/2\. stream +4096 pages, each an 8-byte header \+ 4 KiB/);
    expect(text).toMatch(/sha256 [0-9a-f]{16}… matches/);
    expect(text).toMatch(/speed-up \d+\.\dx/);
    expect(text).toContain('saved as a qcow2 internal snapshot');
    expect(text).toMatch(/check +no corruptions, no leaks/);
    expect(readdirSync(dir.path)).toEqual([]);
  });

  it('refuses a bad --size with exit 2', async () => {
    const r = await runBin(['demo', '--size', 'lots']);
    expect(r.code).toBe(2);
  });
});
