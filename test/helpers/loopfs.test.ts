import { existsSync } from 'node:fs';
import { open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { fillFs, freeBytes, loopFsSkipReason, probeODirect, ramfsSkipReason, Skipped, skipUnlessRan, withLoopFs, withRamfs } from './loopfs.js';
import { run } from './tools.js';

const skipExt4 = loopFsSkipReason('ext4');

async function isMounted(dir: string): Promise<boolean> {
  return (await readFile('/proc/self/mounts', 'utf8')).split('\n').some((line) => line.split(' ')[1] === dir);
}

async function loopDevicesFor(backing: string): Promise<string> {
  return (await run('losetup', ['-j', backing])).stdout.trim();
}

describe.skipIf(skipExt4 !== undefined)('withLoopFs', { timeout: 60_000 }, () => {
  it('mounts a fresh ext4 of the requested size and removes every trace afterwards', async () => {
    let seen = '';
    const result = await withLoopFs({ sizeBytes: 32 << 20, fsType: 'ext4' }, async (dir) => {
      seen = dir;
      expect(await isMounted(dir)).toBe(true);
      expect(await freeBytes(dir)).toBeGreaterThan(24 << 20);
      expect(await probeODirect(dir)).toBe('ok');
      return 'value';
    });
    expect(result).toBe('value');
    expect(await isMounted(seen)).toBe(false);
    expect(await loopDevicesFor(join(seen, '..', 'backing.img'))).toBe('');
    expect(existsSync(seen)).toBe(false);
  });

  it('tears down even when the body throws with a file still open', async () => {
    let seen = '';
    const body = withLoopFs({ sizeBytes: 16 << 20, fsType: 'ext4' }, async (dir) => {
      seen = dir;
      const file = await open(join(dir, 'held'), 'w');
      setTimeout(() => void file.close(), 150); // busy for a moment: umount must retry
      throw new Error('boom');
    });
    await expect(body).rejects.toThrow('boom');
    expect(await isMounted(seen)).toBe(false);
    expect(existsSync(seen)).toBe(false);
  });

  it('fillFs leaves about the requested free space, and the next big write hits ENOSPC', async () => {
    await withLoopFs({ sizeBytes: 64 << 20, fsType: 'ext4' }, async (dir) => {
      const { freeBytes: left } = await fillFs(dir, 1 << 20);
      expect(left).toBeGreaterThanOrEqual(1 << 20);
      expect(left).toBeLessThan((1 << 20) + (64 << 10));
      const error = await writeFile(join(dir, 'big'), Buffer.alloc(4 << 20, 1)).catch((e: unknown) => e);
      expect(error).toMatchObject({ code: 'ENOSPC' });
    });
  });

  it('rejects sizes mkfs would refuse', async () => {
    await expect(withLoopFs({ sizeBytes: 1 << 20, fsType: 'ext4' }, async () => 0)).rejects.toThrow(RangeError);
    await expect(withLoopFs({ sizeBytes: 64 << 20, fsType: 'xfs' }, async () => 0)).rejects.toThrow(/sizeBytes/);
  });
});

describe.skipIf(loopFsSkipReason('xfs') !== undefined)('withLoopFs xfs', { timeout: 60_000 }, () => {
  it('mounts xfs', async () => {
    const type = await withLoopFs({ sizeBytes: 300 << 20, fsType: 'xfs' }, async (dir) => {
      const line = (await readFile('/proc/self/mounts', 'utf8')).split('\n').find((l) => l.split(' ')[1] === dir);
      return line?.split(' ')[2];
    });
    expect(type).toBe('xfs');
  });
});

describe.skipIf(ramfsSkipReason() !== undefined)('withRamfs', { timeout: 30_000 }, () => {
  it('gives a filesystem that refuses O_DIRECT with EINVAL', async () => {
    let seen = '';
    const code = await withRamfs(async (dir) => {
      seen = dir;
      await writeFile(join(dir, 'buffered'), 'fine'); // buffered I/O works
      return probeODirect(dir);
    });
    expect(code).toBe('EINVAL');
    expect(await isMounted(seen)).toBe(false);
  });
});

describe('without root', () => {
  it('returns Skipped with a printed reason and never runs the body', async () => {
    vi.stubEnv('CI', '');
    vi.spyOn(process, 'getuid').mockReturnValue(1000);
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => undefined);
    try {
      let ran = false;
      const mark = async (): Promise<void> => {
        ran = true;
      };
      const loop = await withLoopFs({ sizeBytes: 16 << 20, fsType: 'ext4' }, mark);
      const ramfs = await withRamfs(mark);
      expect(ran).toBe(false);
      expect(loop).toBeInstanceOf(Skipped);
      expect((loop as Skipped).reason).toMatch(/root|missing tool/);
      expect(ramfs).toBeInstanceOf(Skipped);
      expect(warn).toHaveBeenCalled();
    } finally {
      vi.restoreAllMocks();
      vi.unstubAllEnvs();
    }
  });

  it('throws on CI instead, where root is part of the set-up and nothing may be skipped', async () => {
    vi.stubEnv('CI', 'true');
    vi.spyOn(process, 'getuid').mockReturnValue(1000);
    try {
      let ran = false;
      const mark = async (): Promise<void> => {
        ran = true;
      };
      await expect(withLoopFs({ sizeBytes: 16 << 20, fsType: 'ext4' }, mark)).rejects.toThrow(/need\(s\) root.*CI is set/);
      await expect(withRamfs(mark)).rejects.toThrow(/CI is set/);
      expect(ran).toBe(false);
    } finally {
      vi.restoreAllMocks();
      vi.unstubAllEnvs();
    }
  });

  it('hands Skipped to vitest as a skip, and passes a result through', () => {
    const skip = vi.fn((note?: string): never => {
      throw new Error(`skipped: ${note}`);
    });
    expect(skipUnlessRan({ skip }, 42)).toBe(42);
    expect(skip).not.toHaveBeenCalled();
    expect(() => skipUnlessRan({ skip }, new Skipped('no root'))).toThrow('skipped: no root');
  });
});
