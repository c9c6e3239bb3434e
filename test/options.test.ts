import { describe, expect, it } from 'vitest';
import { createImage, createSnapshotStream, ErrorCode, openImage, SnapshotError } from '../src/index.js';
import { errnoError, toSnapshotError } from '../src/errors.js';

describe('createSnapshotStream options', () => {
  const target = '/nonexistent-dir/never-opened.bin';

  it('throws a RangeError naming bufferSize when it is not a multiple of the alignment', () => {
    expect(() => createSnapshotStream(target, { bufferSize: 1000 })).toThrow(RangeError);
    expect(() => createSnapshotStream(target, { bufferSize: 1000 })).toThrow(/options\.bufferSize/);
    expect(() => createSnapshotStream(target, { bufferSize: 0 })).toThrow(/options\.bufferSize/);
    expect(() => createSnapshotStream(target, { bufferSize: -4096 })).toThrow(/options\.bufferSize/);
  });

  it('throws a TypeError naming bufferSize when it is not an integer', () => {
    expect(() => createSnapshotStream(target, { bufferSize: 4096.5 })).toThrow(TypeError);
    expect(() => createSnapshotStream(target, { bufferSize: '4M' as unknown as number })).toThrow(/options\.bufferSize/);
  });

  it('throws naming buffers when fewer than two are asked for', () => {
    expect(() => createSnapshotStream(target, { buffers: 1 })).toThrow(RangeError);
    expect(() => createSnapshotStream(target, { buffers: 1 })).toThrow(/options\.buffers/);
    expect(() => createSnapshotStream(target, { buffers: 0 })).toThrow(/options\.buffers/);
  });

  it('throws naming offset when it is negative or unaligned', () => {
    expect(() => createSnapshotStream(target, { offset: -4096 })).toThrow(/options\.offset/);
    expect(() => createSnapshotStream(target, { offset: 100 })).toThrow(RangeError);
    expect(() => createSnapshotStream(target, { offset: 100 })).toThrow(/options\.offset/);
  });

  it('throws naming direct for an unknown value', () => {
    expect(() => createSnapshotStream(target, { direct: 'yes' as unknown as boolean })).toThrow(TypeError);
    expect(() => createSnapshotStream(target, { direct: 'yes' as unknown as boolean })).toThrow(/options\.direct/);
  });

  it('requires expectedSize with preallocate space', () => {
    expect(() => createSnapshotStream(target, { preallocate: 'space' })).toThrow(/options\.expectedSize/);
    expect(() => createSnapshotStream(target, { preallocate: 'all' as 'space' })).toThrow(/options\.preallocate/);
  });

  it('rejects a signal that is not an AbortSignal and a path that is not a string', () => {
    expect(() => createSnapshotStream(target, { signal: {} as AbortSignal })).toThrow(/options\.signal/);
    expect(() => createSnapshotStream(42 as unknown as string)).toThrow(/path/);
    expect(() => createSnapshotStream('')).toThrow(/path/);
  });

  it("applies QEMU's snapshot name rule (at most 255 UTF-8 bytes, no NUL) to options.snapshot", () => {
    const accepted = createSnapshotStream(target, { snapshot: 'x'.repeat(255) });
    accepted.on('error', () => undefined).destroy();
    expect(() => createSnapshotStream(target, { snapshot: 'x'.repeat(256) })).toThrow(RangeError);
    expect(() => createSnapshotStream(target, { snapshot: 'é'.repeat(128) })).toThrow(/at most 255 UTF-8 bytes for options\.snapshot, received 256 bytes/);
    expect(() => createSnapshotStream(target, { snapshot: 'a\0b' })).toThrow(/options\.snapshot/);
  });

  it('refuses an unknown option with a TypeError that names it, in every entry point', () => {
    const typo = { bufersize: 4096 } as unknown as Record<string, never>;
    expect(() => createSnapshotStream(target, typo)).toThrow(TypeError);
    expect(() => createSnapshotStream(target, typo)).toThrow(/'bufersize'/);
    expect(() => openImage(target, { readonly: true } as unknown as Record<string, never>)).toThrow(/'readonly'/);
    expect(() => createImage(target, { size: 1, clustersize: 4096 } as unknown as { size: number })).toThrow(/'clustersize'/);
  });

  it('words every option mistake as "Expected <what> for <option>, received <value>"', () => {
    const attempts: Array<() => unknown> = [
      () => createSnapshotStream(target, { bufferSize: 1000 }),
      () => createSnapshotStream(target, { buffers: 1 }),
      () => createSnapshotStream(target, { vmClockNs: -1 }),
      () => createSnapshotStream(target, { mode: 0o17777 }),
      () => openImage(target, { readOnly: 'yes' as unknown as boolean }),
      () => openImage(''),
      () => createImage(target, { size: 1, clusterSize: 3000 }),
      () => createImage(target, { size: 1, version: 4 as 3 }),
      () => createImage(target, { size: -1 }),
      () => createImage(target, { size: 1, onProgress: 5 as unknown as () => void }),
    ];
    for (const attempt of attempts) expect(attempt).toThrow(/^Expected .+ for (options\.\w+|path|the keys of options), received .+/);
  });
});

describe('error codes', () => {
  it('maps an errno outside the table to EIO and keeps its name and number', () => {
    const err = errnoError(71 /* EPROTO */, 'pwrite', { path: '/x', offset: 4096 });
    expect(err.code).toBe(ErrorCode.EIO);
    expect(err.errno).toBe(71);
    expect(err.message).toContain('EPROTO');
  });

  it('keeps a known errno code and refuses to invent one from a foreign error', () => {
    expect(errnoError(28, 'pwrite').code).toBe(ErrorCode.ENOSPC);
    const foreign = Object.assign(new Error('premature close'), { code: 'ERR_STREAM_PREMATURE_CLOSE' });
    const wrapped = toSnapshotError(foreign);
    expect(wrapped).toBeInstanceOf(SnapshotError);
    expect(wrapped.code).toBe(ErrorCode.INTERNAL);
    expect(wrapped.cause).toBe(foreign);
    expect(Object.values(ErrorCode)).toContain(wrapped.code);
  });
});
