/** `snapstream write`: the raw writer at the end of a pipe, through the real bin. */
import { createHash } from 'node:crypto';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ramfsSkipReason, Skipped, withRamfs } from '../helpers/loopfs.js';
import { pseudoRandom } from '../helpers/streams.js';
import { requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';
import { errLines, runBin, runShell } from './bin-harness.js';

const sha256 = (data: Uint8Array) => createHash('sha256').update(data).digest('hex');
/** Not a multiple of 4096, so the tail padding and the final truncate are exercised. */
const INPUT_BYTES = 5 * 2 ** 20 + 1234;

let dir: TmpDir;
let input: Buffer;
let inputPath: string;

beforeAll(async () => {
  dir = await tmpDir('cli-write');
  input = pseudoRandom(INPUT_BYTES, 7);
  inputPath = join(dir.path, 'input.bin');
  writeFileSync(inputPath, input);
});
afterAll(() => dir.cleanup());

describe('snapstream write', () => {
  it('writes stdin from a pipe byte for byte, exit 0', async () => {
    const out = join(dir.path, 'pipe.raw');
    const r = await runBin(['write', out], { input });
    expect(r.code).toBe(0);
    expect(r.stdout.length).toBe(0);
    expect(sha256(readFileSync(out))).toBe(sha256(input));
  });

  it('writes stdin redirected from a file, and a named SOURCE', async () => {
    const a = join(dir.path, 'redirect.raw');
    const b = join(dir.path, 'named.raw');
    expect((await runBin(['write', a], { stdinFile: inputPath })).code).toBe(0);
    expect((await runBin(['write', b, inputPath, '--direct=false', '--buffer-size', '64K', '--buffers', '3'])).code).toBe(0);
    expect(sha256(readFileSync(a))).toBe(sha256(input));
    expect(sha256(readFileSync(b))).toBe(sha256(input));
  });

  it('takes --flush-interval (0 for only the final flush, or a size) and refuses a bad one with exit 2', async () => {
    for (const [name, value] of [
      ['flush0.raw', '0'],
      ['flush64k.raw', '64K'],
    ] as const) {
      const out = join(dir.path, name);
      expect((await runBin(['write', out, inputPath, '--buffer-size', '64K', '--flush-interval', value, '--quiet'])).code).toBe(0);
      expect(sha256(readFileSync(out))).toBe(sha256(input));
    }
    const bad = await runBin(['write', join(dir.path, 'flushbad.raw'), inputPath, '--flush-interval', 'often']);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/--flush-interval/);
  });

  it('works at the end of a shell pipeline, as QEMU exec: migration runs it', async () => {
    const out = join(dir.path, 'exec.raw');
    const r = await runShell(`cat '${inputPath}' | $SNAPSTREAM write '${out}' -`);
    expect(r.code).toBe(0);
    expect(sha256(readFileSync(out))).toBe(sha256(input));
  });

  it('starts at --offset and reserves space with --preallocate', async () => {
    const out = join(dir.path, 'offset.raw');
    const r = await runBin(['write', out, inputPath, '--offset', '8K', '--preallocate', '--quiet']);
    expect(r.code).toBe(0);
    expect(r.stderr).toBe('');
    const written = readFileSync(out);
    expect(written.length).toBe(8192 + INPUT_BYTES);
    expect(sha256(written.subarray(8192))).toBe(sha256(input));
  });

  it('refuses --preallocate on a pipe without --expected-size, exit 2', async () => {
    const r = await runBin(['write', join(dir.path, 'never.raw'), '--preallocate'], { input: 'x' });
    expect(r.code).toBe(2);
    expect(errLines(r)[0]).toBe('snapstream: USAGE: --preallocate needs --expected-size when the source has no known size');
  });

  it('reports a missing source file in one line, exit 1', async () => {
    const missing = join(dir.path, 'missing.bin');
    const r = await runBin(['write', join(dir.path, 'x.raw'), missing]);
    expect(r.code).toBe(1);
    expect(errLines(r)).toEqual([`snapstream: ENOENT: no such file or directory, stat '${missing}'`]);
  });

  it('reports a target in a missing directory with its code, exit 1', async () => {
    const r = await runBin(['write', join(dir.path, 'no', 'such', 'dir.raw')], { input: 'abc' });
    expect(r.code).toBe(1);
    expect(errLines(r)[0]).toMatch(/^snapstream: ENOENT: .*no[/]such[/]dir\.raw/);
  });

  it('prints a one-line summary on stderr and draws no progress when stderr is not a TTY', async () => {
    const r = await runBin(['write', join(dir.path, 'summary.raw'), inputPath]);
    expect(r.code).toBe(0);
    expect(errLines(r)).toHaveLength(1);
    expect(errLines(r)[0]).toMatch(/^wrote 5\.00 MiB to .*summary\.raw \((O_DIRECT|page cache \+ fdatasync), .*\/s\)$/);
  });
});

describe('snapstream write on a TTY', () => {
  const skip = requireTool('script');

  it.skipIf(skip !== undefined)('draws bytes, rate and ETA when the size is known', async () => {
    const out = join(dir.path, 'tty-known.raw');
    const r = await runShell(`script -qec "$SNAPSTREAM write '${out}' '${inputPath}'" /dev/null`);
    expect(r.code).toBe(0);
    const screen = r.stdout.toString();
    expect(screen).toMatch(/write \|.*\| 100%  5\.00 MiB \/ 5\.00 MiB  .*\/s  ETA \d\d:\d\d/);
    expect(statSync(out).size).toBe(INPUT_BYTES);
  });

  it.skipIf(skip !== undefined)('draws bytes and rate only for a pipe of unknown size', async () => {
    const out = join(dir.path, 'tty-unknown.raw');
    const r = await runShell(`script -qec "cat '${inputPath}' | $SNAPSTREAM write '${out}'" /dev/null`);
    expect(r.code).toBe(0);
    const screen = r.stdout.toString();
    expect(screen).toMatch(/write 5\.00 MiB  /);
    expect(screen).not.toMatch(/%|ETA/);
  });

  it.skipIf(skip !== undefined)('draws nothing with --quiet', async () => {
    const out = join(dir.path, 'tty-quiet.raw');
    const r = await runShell(`script -qec "$SNAPSTREAM write --quiet '${out}' '${inputPath}'" /dev/null`);
    expect(r.code).toBe(0);
    expect(r.stdout.toString().trim()).toBe('');
  });
});

describe('snapstream write where O_DIRECT is refused', () => {
  const skip = ramfsSkipReason();

  it.skipIf(skip !== undefined)('fails with DIRECT_IO_UNSUPPORTED and a hint under --direct=true; auto works', async () => {
    const result = await withRamfs(async (ramDir) => {
      const out = join(ramDir, 'state.raw');
      const strict = await runBin(['write', out, inputPath, '--direct=true']);
      expect(strict.code).toBe(1);
      expect(errLines(strict)[0]).toMatch(/^snapstream: DIRECT_IO_UNSUPPORTED: /);
      expect(errLines(strict)[1]).toBe('hint: this filesystem refuses O_DIRECT; try --direct=auto (uses the page cache there)');
      const auto = await runBin(['write', out, inputPath, '--direct=auto']);
      expect(auto.code).toBe(0);
      expect(sha256(readFileSync(out))).toBe(sha256(input));
    });
    expect(result).not.toBeInstanceOf(Skipped);
  });
});
