/**
 * Lets the disk settle before a timed phase: `sync`, then a pause.
 *
 * After a 1 GiB file is deleted, a filesystem mounted with `discard` (as the
 * work disk here is) sends the device discards for its blocks after the next
 * journal commit, and those compete with the next writer; a file just
 * written through the page cache is written back meanwhile too. Measured
 * here, without settling, (f) against (g) swung between 0.55x and 1.0x
 * depending on which writer ran after a delete; with `sync` and a short
 * pause both measure within a few percent of each other. Every case of a
 * bench gets the same pause. BENCH_SETTLE_MS overrides the default.
 */
import { spawnSync } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';

export const SETTLE_MS = Number(process.env.BENCH_SETTLE_MS ?? 1000);
/** The VM benches' pause: their phases take seconds, and QEMU writes with cache=none. */
export const SETTLE_VM_MS = 500;

export async function settleDisk(ms = SETTLE_MS) {
  spawnSync('sync');
  await sleep(ms);
}
