/** Facts about files on disk, for cases that report layout (preallocation, fragmentation). */
import { execFileSync } from 'node:child_process';

/** Extent count from filefrag(8), or undefined when filefrag is missing or fails. */
export function extentCount(path) {
  try {
    const out = execFileSync('filefrag', [path], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    const m = /:\s+(\d+) extents? found/.exec(out);
    return m === null ? undefined : Number(m[1]);
  } catch {
    return undefined;
  }
}
