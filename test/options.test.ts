import { describe, expect, it } from 'vitest';
import { createSnapshotStream } from '../src/index.js';

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
});
