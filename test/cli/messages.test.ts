/**
 * What a user meets (issue 13 items 7, 10, 11): a source that is the target,
 * a disk-only snapshot, and messages in the CLI's own words — no API option
 * syntax, no option the CLI lacks, flags checked before anything is opened.
 */
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createProgress } from '../../src/cli/progress.js';
import { readSnapshotVmState } from '../helpers/qcow2-vmstate.js';
import { pseudoRandom } from '../helpers/streams.js';
import { qemuImg, requireTool, runOk, tmpDir, type TmpDir } from '../helpers/tools.js';
import { errLines, runBin } from './bin-harness.js';

const MiB = 1 << 20;
const sha256 = (data: Uint8Array): string => createHash('sha256').update(data).digest('hex');
const skip = requireTool('qemu-img', 'qemu-io');

describe.skipIf(skip !== undefined)('the CLI refuses what cannot work, in its own words', () => {
  let dir: TmpDir;
  let n = 0;
  const data = pseudoRandom(MiB + 17, 5);
  let dataPath: string;
  const fresh = (name: string) => join(dir.path, `${name}-${++n}`);

  beforeAll(async () => {
    dir = await tmpDir('cli-messages');
    dataPath = join(dir.path, 'data.bin');
    writeFileSync(dataPath, data);
  });
  afterAll(async () => dir?.cleanup());

  async function image(): Promise<string> {
    const path = fresh('img.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', path, '16M']);
    return path;
  }

  describe('a source that is the target itself (st_dev, st_ino), as cat refuses it', () => {
    it('write FILE FILE: SAME_FILE, exit 1, the file untouched', async () => {
      const path = fresh('self.raw');
      writeFileSync(path, data);
      const r = await runBin(['write', path, path]);
      expect(r.code).toBe(1);
      expect(errLines(r)[0]).toMatch(/^snapstream: SAME_FILE: the source '.*' is the target '.*' itself$/);
      expect(sha256(readFileSync(path))).toBe(sha256(data));
    });

    it('save IMAGE NAME IMAGE, and save IMAGE NAME - < IMAGE: SAME_FILE, the image as it was', async () => {
      const path = await image();
      const size = statSync(path).size;
      for (const [args, stdinFile] of [
        [['save', path, 'self', path], undefined],
        [['save', path, 'self', '-'], path],
      ] as const) {
        const r = await runBin(args, stdinFile === undefined ? {} : { stdinFile });
        expect(r.code, r.stderr).toBe(1);
        expect(errLines(r)[0]).toMatch(/^snapstream: SAME_FILE: /);
      }
      expect(statSync(path).size).toBe(size);
      expect(await qemuImg.snapshotList(path)).toEqual([]);
    });

    it('a hard link to the target is the same file', async () => {
      const path = fresh('linked.raw');
      writeFileSync(path, data);
      const link = `${path}.link`;
      await runOk('ln', [path, link]);
      const r = await runBin(['write', path, link]);
      expect(errLines(r)[0]).toMatch(/^snapstream: SAME_FILE: /);
    });

    it('/dev/null in and out is fine (a character device has no bytes to lose)', async () => {
      const r = await runBin(['write', '/dev/null', '-'], { stdinFile: '/dev/null' });
      expect(r.code, r.stderr).toBe(0);
    });
  });

  describe('a disk-only snapshot', () => {
    it('export: SNAPSHOT_DISK_ONLY, exit 1, and no output file is created', async () => {
      const path = await image();
      await qemuImg.snapshot(path, 'create', 'disk');
      const out = fresh('never.bin');
      const r = await runBin(['export', path, 'disk', out]);
      expect(r.code).toBe(1);
      expect(errLines(r)[0]).toMatch(/^snapstream: SNAPSHOT_DISK_ONLY: snapshot .*'disk'.* is disk-only/);
      expect(existsSync(out)).toBe(false);
      const toStdout = await runBin(['export', path, 'disk', '-']);
      expect(toStdout.code).toBe(1);
      expect(toStdout.stdout.length).toBe(0);
    });
  });

  describe('messages', () => {
    it('a bad snapshot name names the NAME argument, not an option the CLI lacks', async () => {
      const path = await image();
      for (const name of ['', 'x'.repeat(300)]) {
        const r = await runBin(['save', path, name, dataPath]);
        expect(r.code).toBe(2);
        expect(r.stderr).not.toContain('--snapshot');
        expect(r.stderr).not.toContain('options.');
        expect(errLines(r)[0]).toMatch(/for NAME, received/);
      }
    });

    it('a qcow2 image as a raw target: NOT_RAW in CLI words, no API syntax', async () => {
      const path = await image();
      const r = await runBin(['write', path, dataPath]);
      expect(r.code).toBe(1);
      expect(errLines(r)[0]).toMatch(/^snapstream: NOT_RAW: /);
      expect(r.stderr).not.toMatch(/\{|format 'raw'|options\./);
    });

    it('--buffer-size says everything a valid value is, for 0 and for a non-multiple', async () => {
      for (const value of ['0', '5000', '512M']) {
        const r = await runBin(['write', fresh('b.raw'), dataPath, '--buffer-size', value]);
        expect(r.code, value).toBe(2);
        expect(errLines(r)[0], value).toMatch(/Expected a multiple of 4096 from 4K to 256M, received '/);
      }
    });

    it('--preallocate without any size is a usage error for save and write, not silently ignored', async () => {
      const path = await image();
      for (const args of [['save', path, 'p', '-', '--preallocate'], ['write', fresh('p.raw'), '-', '--preallocate']]) {
        const r = await runBin(args, { input: data });
        expect(r.code, args.join(' ')).toBe(2);
        expect(errLines(r)[0]).toBe('snapstream: USAGE: --preallocate needs --expected-size when the source has no known size');
      }
      expect(await qemuImg.snapshotList(path)).toEqual([]);
    });

    it('save --preallocate --expected-size, which the ENOSPC hint recommends, saves', async () => {
      const path = await image();
      const r = await runBin(['save', '-q', path, 'pre', '-', '--expected-size', '2M', '--preallocate'], { input: data });
      expect(r.code, r.stderr).toBe(0);
      expect(sha256(await readSnapshotVmState(path, 'pre'))).toBe(sha256(data));
      expect((await qemuImg.check(path)).exitCode).toBe(0);
      const help = await runBin(['save', '--help']);
      expect(help.stdout.toString()).toContain('--preallocate');
    });

    it('--offset, --preallocate and --direct=true on stdout or a FIFO: a usage error naming them', async () => {
      const r = await runBin(['write', '-', dataPath, '--offset', '4K', '--direct', 'true']);
      expect(r.code).toBe(2);
      expect(errLines(r)[0]).toMatch(/^snapstream: USAGE: --offset, --direct=true need\(s\) a file or block device/);
    });

    it('demo --help prints each default once; demo --size 1000 is refused, not rounded to 4 KiB', async () => {
      const help = (await runBin(['demo', '--help'])).stdout.toString().replace(/\s+/g, ' ');
      const sizeHelp = help.slice(help.indexOf('--size'), help.indexOf('--dir'));
      expect(sizeHelp.match(/default/g)).toHaveLength(1);
      expect(sizeHelp).toContain('(default: 512M)');
      const r = await runBin(['demo', '--size', '1000']);
      expect(r.code).toBe(2);
      expect(errLines(r)[0]).toMatch(/Expected a whole number of 4 KiB pages/);
    });
  });
});

describe('the progress bar', () => {
  it('grows its total when the size hint was too small, instead of showing 200 MiB / 1.00 MiB', () => {
    let text = '';
    const tty = Object.assign(
      new Writable({
        write(chunk, _encoding, callback) {
          text += String(chunk);
          callback();
        },
      }),
      { isTTY: true, columns: 200, rows: 50, cursorTo: () => true, clearLine: () => true, moveCursor: () => true },
    ) as unknown as NodeJS.WriteStream;
    const progress = createProgress({ label: 'save', totalBytes: MiB, stream: tty });
    progress.update(200 * MiB);
    progress.stop();
    expect(text).toContain('200 MiB / 200 MiB');
    expect(text).not.toContain('200 MiB / 1.00 MiB');
  });
});
