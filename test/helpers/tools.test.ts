import { open, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { findTool, isCi, qemuImg, qemuIo, requireTool, run, RunError, tmpDir, type TmpDir } from './tools.js';

describe('requireTool', () => {
  afterEach(() => {
    vi.unstubAllEnvs();
    vi.restoreAllMocks();
  });

  it('returns undefined when every tool is on PATH', () => {
    expect(requireTool('sh')).toBeUndefined();
  });

  it('returns a skip reason naming the missing tool outside CI', () => {
    vi.stubEnv('CI', '');
    vi.spyOn(console, 'warn').mockImplementation(() => undefined);
    expect(requireTool('sh', 'no-such-tool-xyz')).toMatch(/no-such-tool-xyz/);
  });

  it('throws on CI, so a missing tool fails the suite instead of skipping it', () => {
    vi.stubEnv('CI', 'true');
    expect(isCi()).toBe(true);
    expect(() => requireTool('no-such-tool-xyz')).toThrow(/CI/);
  });
});

describe('run', () => {
  it('resolves with output and a non-zero exit code without rejecting', async () => {
    const result = await run('sh', ['-c', 'echo out; echo err >&2; exit 3']);
    expect(result).toEqual({ stdout: 'out\n', stderr: 'err\n', code: 3, signal: null });
  });

  it('feeds input to stdin', async () => {
    expect((await run('cat', [], { input: 'hello' })).stdout).toBe('hello');
  });

  it('kills the whole process group and rejects when the time bound passes', async () => {
    const started = Date.now();
    const error = await run('sh', ['-c', 'sleep 30 & sleep 30'], { timeoutMs: 200 }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(RunError);
    expect((error as RunError).message).toMatch(/timed out after 200 ms/);
    expect(Date.now() - started).toBeLessThan(5_000);
  });

  it('rejects when the command does not exist', async () => {
    await expect(run('no-such-tool-xyz', [])).rejects.toBeInstanceOf(RunError);
  });
});

describe('tmpDir', () => {
  it('creates a directory under os.tmpdir() and removes it on cleanup', async () => {
    const dir = await tmpDir('selftest');
    await writeFile(join(dir.path, 'f'), 'x');
    await dir.cleanup();
    await expect(stat(dir.path)).rejects.toMatchObject({ code: 'ENOENT' });
    await dir.cleanup(); // idempotent
  });
});

const skipQemu = requireTool('qemu-img', 'qemu-io');

describe.skipIf(skipQemu !== undefined)('qemu-img and qemu-io wrappers', () => {
  let dir: TmpDir;
  let image: string;

  beforeAll(async () => {
    dir = await tmpDir('qemu-img');
    image = join(dir.path, 'a.qcow2');
    await qemuImg.create(image, 16 << 20, { cluster_size: 65536 });
  });
  afterAll(() => dir?.cleanup());

  it('info parses the JSON', async () => {
    expect(findTool('qemu-img')).toBeDefined();
    const info = await qemuImg.info(image);
    expect(info).toMatchObject({ format: 'qcow2', 'virtual-size': 16 << 20, 'cluster-size': 65536 });
  });

  it('qemuIo writes a pattern that qemu-img map then reports as data', async () => {
    await qemuIo(image, ['write -P 0xab 0 64k']);
    expect(await qemuIo(image, ['read -P 0xab 0 64k'])).toMatch(/read 65536\/65536/);
    await expect(qemuIo(image, ['read -P 0xcd 0 64k'])).rejects.toThrow(/Pattern verification failed/);
    const map = await qemuImg.map(image);
    expect(map[0]).toMatchObject({ start: 0, length: 65536, data: true });
  });

  it('snapshotList reports snapshots made by qemu-img snapshot -c', async () => {
    expect(await qemuImg.snapshotList(image)).toEqual([]);
    await qemuImg.snapshot(image, 'create', 'one');
    const [snapshot] = await qemuImg.snapshotList(image);
    expect(snapshot).toMatchObject({ id: '1', name: 'one', vmStateSize: 0, vmClockNs: 0n });
  });

  it('check parses a clean image (exit 0) and a leaking one (exit 3)', async () => {
    expect(await qemuImg.check(image)).toMatchObject({ 'check-errors': 0, exitCode: 0 });
    // Bump the refcount of cluster 0 (the header) from 1 to 2: a leak, not a corruption.
    const leaky = join(dir.path, 'leaky.qcow2');
    await qemuImg.create(leaky, 16 << 20);
    const file = await open(leaky, 'r+');
    try {
      const header = Buffer.alloc(56);
      await file.read(header, 0, 56, 0);
      const refcountTable = Buffer.alloc(8);
      await file.read(refcountTable, 0, 8, Number(header.readBigUInt64BE(48)));
      const refcountBlockOffset = Number(refcountTable.readBigUInt64BE(0));
      await file.write(Buffer.from([0, 2]), 0, 2, refcountBlockOffset); // 16-bit refcount of cluster 0
    } finally {
      await file.close();
    }
    const check = await qemuImg.check(leaky);
    expect(check).toMatchObject({ leaks: 1, exitCode: 3 });
  });
});
