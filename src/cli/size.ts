/**
 * The one size parser of the command line: `4096`, `512K`, `64M`, `1G`,
 * `1.5G`, `2TiB`. Suffixes are binary (K = 1024), like qemu-img's, because
 * every size here is a buffer, a disk or a memory image.
 */

const UNITS: Readonly<Record<string, number>> = {
  '': 1,
  K: 2 ** 10,
  M: 2 ** 20,
  G: 2 ** 30,
  T: 2 ** 40,
  P: 2 ** 50,
  E: 2 ** 60,
};

/** A number, an optional fraction, an optional unit letter, an optional `B`/`iB`. */
const SIZE_PATTERN = /^(\d+)(?:\.(\d+))?\s*([KMGTPE]?)(?:i?B)?$/i;

export class SizeError extends RangeError {
  constructor(text: string, reason: string) {
    super(`Expected a size like 4096, 512K, 64M or 1G, received '${text}' (${reason})`);
    this.name = 'SizeError';
  }
}

/** Bytes in `text`; throws SizeError for anything that is not a whole, safe, non-negative byte count. */
export function parseSize(text: string): number {
  const trimmed = text.trim();
  const match = SIZE_PATTERN.exec(trimmed);
  if (match === null) throw new SizeError(text, 'not a size');
  const [, whole = '', fraction = '', unitLetter = ''] = match;
  const unit = UNITS[unitLetter.toUpperCase()];
  if (unit === undefined) throw new SizeError(text, 'unknown unit');
  // Exact arithmetic in bigint: 1.5G must be 1610612736, not a rounded double.
  const scale = 10n ** BigInt(fraction.length);
  const numerator = (BigInt(whole) * scale + BigInt(fraction === '' ? '0' : fraction)) * BigInt(unit);
  if (numerator % scale !== 0n) throw new SizeError(text, 'not a whole number of bytes');
  const bytes = numerator / scale;
  if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) throw new SizeError(text, 'too large');
  return Number(bytes);
}

/** `1.5 GiB`, `512 KiB`, `42 B`: for messages and reports. */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let value = bytes;
  let i = 0;
  while (Math.abs(value) >= 1024 && i < units.length - 1) {
    value /= 1024;
    i++;
  }
  const digits = i === 0 || value >= 100 ? 0 : value >= 10 ? 1 : 2;
  return `${value.toFixed(digits)} ${units[i]}`;
}

/** `812.4 MiB/s` */
export function formatRate(bytesPerSecond: number): string {
  return `${formatBytes(Number.isFinite(bytesPerSecond) ? bytesPerSecond : 0)}/s`;
}
