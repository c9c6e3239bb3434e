/**
 * Reproduces the configuration before issue 12 for before/after rows in one
 * run: every TargetFile opened while `fn` runs gets `threads` native threads
 * (the library opens its targets with 2 since then, and lets the DepthTuner
 * choose; before, it used 1). Bench-only: it patches the static
 * TargetFile.open of the dist build, which the library itself uses.
 */
import { TargetFile } from '../../dist/io/target-file.js';

export async function withThreads(threads, fn) {
  const open = TargetFile.open;
  TargetFile.open = (path, options) => open.call(TargetFile, path, { ...options, threads });
  try {
    return await fn();
  } finally {
    TargetFile.open = open;
  }
}
