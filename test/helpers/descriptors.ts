/** What this process has open, from /proc/self/fd. */
import { readdirSync, readlinkSync } from 'node:fs';

/** Descriptors of this process open on `path`. */
export function descriptorsOn(path: string): number {
  let n = 0;
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`) === path) n++;
    } catch {
      // closed meanwhile
    }
  }
  return n;
}
