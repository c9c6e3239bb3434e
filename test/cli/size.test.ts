import { describe, expect, it } from 'vitest';
import { formatBytes, parseSize, SizeError } from '../../src/cli/size.js';

describe('parseSize', () => {
  it('reads plain byte counts', () => {
    expect(parseSize('0')).toBe(0);
    expect(parseSize('4096')).toBe(4096);
  });

  it('reads binary suffixes, upper or lower case, with optional B or iB', () => {
    expect(parseSize('512K')).toBe(512 * 1024);
    expect(parseSize('64M')).toBe(64 * 2 ** 20);
    expect(parseSize('1G')).toBe(2 ** 30);
    expect(parseSize('2t')).toBe(2 * 2 ** 40);
    expect(parseSize('64MiB')).toBe(64 * 2 ** 20);
    expect(parseSize('8KB')).toBe(8192);
    expect(parseSize('100B')).toBe(100);
  });

  it('reads fractions exactly when they make whole bytes', () => {
    expect(parseSize('1.5G')).toBe(1610612736);
    expect(parseSize('0.5K')).toBe(512);
    expect(() => parseSize('1.1')).toThrow(SizeError);
    expect(() => parseSize('0.3K')).toThrow(/whole number of bytes/);
  });

  it('rejects anything that is not a size', () => {
    for (const bad of ['', 'abc', '-1', '12X', '1e6', '0x1000', '1 G B', 'K', '1.', '.5M']) {
      expect(() => parseSize(bad), bad).toThrow(SizeError);
    }
  });

  it('names the input and the accepted forms in its message', () => {
    expect(() => parseSize('12X')).toThrow("Expected a size like 4096, 512K, 64M or 1G, received '12X'");
  });

  it('rejects sizes beyond exact integer range', () => {
    expect(parseSize('8191T')).toBe(8191 * 2 ** 40);
    expect(() => parseSize('16E')).toThrow(/too large/);
  });
});

describe('formatBytes', () => {
  it('uses binary units with a few significant digits', () => {
    expect(formatBytes(42)).toBe('42 B');
    expect(formatBytes(1536)).toBe('1.50 KiB');
    expect(formatBytes(512 * 2 ** 20)).toBe('512 MiB');
    expect(formatBytes(1.25 * 2 ** 30)).toBe('1.25 GiB');
  });
});
