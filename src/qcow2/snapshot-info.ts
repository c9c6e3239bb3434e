/**
 * The public view of a snapshot table entry, as `qemu-img snapshot -l`
 * shows it.
 */
import type { SnapshotEntry } from './snapshot-table.js';

export interface SnapshotInfo {
  id: string;
  name: string;
  /** Saved VM state in bytes; 0 for a disk-only snapshot. */
  vmStateSize: number;
  /** Wall-clock time of the snapshot (millisecond precision; see dateNsec). */
  date: Date;
  dateSec: number;
  dateNsec: number;
  /** Guest clock in nanoseconds. A bigint: a guest running 105 days passes 2^53 ns. */
  vmClockNs: bigint;
  /** Virtual disk size in bytes when the snapshot was taken. */
  diskSize: number;
  /** Record/replay instruction count; -1n when replay was off (what savevm records). */
  icount: bigint;
}

export function toSnapshotInfo(entry: SnapshotEntry): SnapshotInfo {
  return {
    id: entry.id,
    name: entry.name,
    vmStateSize: entry.vmStateSize,
    date: new Date(entry.dateSec * 1000 + Math.floor(entry.dateNsec / 1_000_000)),
    dateSec: entry.dateSec,
    dateNsec: entry.dateNsec,
    vmClockNs: entry.vmClockNs,
    diskSize: entry.diskSize,
    icount: entry.icount,
  };
}
