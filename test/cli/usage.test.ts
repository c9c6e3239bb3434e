/** Help, usage errors and exit codes, through the real bin. */
import { describe, expect, it } from 'vitest';
import { errLines, runBin } from './bin-harness.js';

const COMMANDS = ['save', 'list', 'export', 'delete', 'check', 'create', 'write', 'bench', 'demo'];

describe('snapstream usage', () => {
  it('prints help listing every command and the exit codes, exit 0', async () => {
    const r = await runBin(['--help']);
    expect(r.code).toBe(0);
    const text = r.stdout.toString();
    for (const c of COMMANDS) expect(text).toMatch(new RegExp(`^  ${c}\\b`, 'm'));
    expect(text).toContain('Exit codes: 0 ok, 1 failure, 2 usage error');
  });

  it.each(COMMANDS)('has --help for %s, exit 0', async (command) => {
    const r = await runBin([command, '--help']);
    expect(r.code).toBe(0);
    expect(r.stdout.toString()).toMatch(new RegExp(`^Usage: snapstream ${command}`, 'm'));
  });

  it('prints the version', async () => {
    const r = await runBin(['--version']);
    expect(r.code).toBe(0);
    expect(r.stdout.toString().trim()).toMatch(/^\d+\.\d+\.\d+/);
  });

  it('exits 2 with help on stderr when no command is given', async () => {
    const r = await runBin([]);
    expect(r.code).toBe(2);
    expect(r.stdout.length).toBe(0);
    expect(r.stderr).toContain('Usage: snapstream');
  });

  it('exits 2 on an unknown command, in the one-line error format', async () => {
    const r = await runBin(['frobnicate']);
    expect(r.code).toBe(2);
    expect(errLines(r)[0]).toBe("snapstream: USAGE: unknown command 'frobnicate'");
  });

  it('exits 2 on an unknown option', async () => {
    const r = await runBin(['write', 'x.raw', '--bogus']);
    expect(r.code).toBe(2);
    expect(errLines(r)[0]).toBe("snapstream: USAGE: unknown option '--bogus'");
  });

  it('exits 2 on a missing argument', async () => {
    const r = await runBin(['save', 'disk.qcow2']);
    expect(r.code).toBe(2);
    expect(errLines(r)[0]).toBe("snapstream: USAGE: missing required argument 'NAME'");
  });

  it('exits 2 on a bad size, naming it', async () => {
    const r = await runBin(['create', 'x.qcow2', '12X']);
    expect(r.code).toBe(2);
    expect(errLines(r)[0]).toMatch(/^snapstream: USAGE: .*'12X'.*Expected a size like 4096, 512K, 64M or 1G/);
  });

  it('exits 2 on a bad choice', async () => {
    const r = await runBin(['write', 'x.raw', '--direct=maybe']);
    expect(r.code).toBe(2);
    expect(errLines(r)[0]).toMatch(/^snapstream: USAGE: option '--direct <mode>' argument 'maybe' is invalid/);
  });

  it('exits 2 on an option value the API rejects, naming the flag', async () => {
    const r = await runBin(['write', '/nonexistent-dir/x.raw', '--buffer-size', '1000'], { input: '' });
    expect(r.code).toBe(2);
    expect(errLines(r)[0]).toBe(
      "snapstream: USAGE: option '--buffer-size <size>' argument '1000' is invalid. Expected a multiple of 4096 from 4K to 256M, received '1000'",
    );
  });

  it('bench passes its arguments on to bench/run.js and exits with its status', async () => {
    const r = await runBin(['bench', '--', '--help']);
    expect(r.code).toBe(0);
    expect(r.stdout.toString()).toMatch(/^usage: node bench\/run\.js/);
  });
});
