/**
 * Reading the run state and guest clock from a real QEMU migration stream,
 * and rewriting the run state in a form QEMU accepts (checked by the
 * savevm tests, where QEMU's -incoming starts the guest after our loadvm).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { findGlobalState, findVmClockNs, setGlobalState } from '../../src/vm/runstate.js';
import { withPausedVm } from '../helpers/qemu.js';
import { requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';

const skip = requireTool('qemu-system-x86_64');

describe.skipIf(skip !== undefined)('the run state and guest clock in a migration stream', () => {
  let dir: TmpDir;
  let stream: Buffer;

  beforeAll(async () => {
    dir = await tmpDir('vm-runstate');
    const file = join(dir.path, 'stream.bin');
    await withPausedVm({ ramMiB: 32 }, async (vm) => {
      await vm.qmp.execute('cont');
      await vm.qmp.execute('stop');
      await vm.migrateToFile(file);
    });
    stream = await readFile(file);
  });
  afterAll(async () => dir.cleanup());

  it("finds 'paused' in the stream of a VM stopped before the migration, and a guest clock that advanced", () => {
    const field = findGlobalState(stream);
    expect(field?.runState).toBe('paused');
    expect(stream.readUInt32BE(field!.sizeOffset)).toBe('paused'.length + 1);
    const clock = findVmClockNs(stream);
    expect(clock).toBeGreaterThan(0n);
  });

  it("rewrites it to 'running' in place: same length, NUL padded, found again", () => {
    const copy = Buffer.from(stream);
    const field = findGlobalState(copy)!;
    setGlobalState(copy, field, 'running');
    expect(copy.length).toBe(stream.length);
    expect(findGlobalState(copy)).toEqual({ sizeOffset: field.sizeOffset, runState: 'running' });
    expect(copy.subarray(field.sizeOffset + 4 + 8, field.sizeOffset + 4 + 100).every((b) => b === 0)).toBe(true);
    // Only the size and the name changed.
    let differing = 0;
    for (let i = 0; i < copy.length; i++) if (copy[i] !== stream[i]) differing++;
    expect(differing).toBeGreaterThan(0);
    expect(differing).toBeLessThanOrEqual(4 + 8);
  });

  it('finds nothing in bytes that only look alike (guest RAM holding the name)', () => {
    const fake = Buffer.concat([Buffer.from('\x0bglobalstate', 'latin1'), Buffer.alloc(200, 0x41)]);
    expect(findGlobalState(Buffer.concat([Buffer.alloc(16), fake]))).toBeUndefined();
    expect(findVmClockNs(Buffer.from('\x05timerxxxxxxxx', 'latin1'))).toBeUndefined();
  });
});
