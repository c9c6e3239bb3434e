/**
 * `snapstream list IMAGE [--json]`: the snapshot table, as `qemu-img snapshot
 * -l` shows it, or as JSON for scripts.
 */
import type { Command } from 'commander';
import { openImage, type SnapshotInfo } from '../api.js';
import type { CliContext } from '../context.js';
import { refuseNonImagePath } from '../image-path.js';
import { formatBytes } from '../size.js';
import { markLiveHalves, renderLiveTable } from './list-live.js';

/** The JSON shape of one snapshot; vmClockNs is a decimal string because it may exceed 2^53. */
export interface SnapshotJson {
  id: string;
  name: string;
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  date: string;
  vmClockNs: string;
  diskSize: number | null;
  icount: number | null;
}

function toSecNsec(date: unknown): { sec: number; nsec: number } {
  if (date instanceof Date) {
    const ms = date.getTime();
    return { sec: Math.floor(ms / 1000), nsec: (ms % 1000) * 1e6 };
  }
  if (typeof date === 'number') return { sec: Math.floor(date), nsec: Math.round((date % 1) * 1e9) };
  const d = date as { sec?: unknown; nsec?: unknown; dateSec?: unknown; dateNsec?: unknown } | null;
  return { sec: Number(d?.sec ?? d?.dateSec ?? 0), nsec: Number(d?.nsec ?? d?.dateNsec ?? 0) };
}

function optionalNumber(value: unknown): number | null {
  if (value === undefined || value === null) return null;
  const n = Number(value);
  // QEMU writes icount -1 ("not recorded") as all-ones.
  return n < 0 || n >= 2 ** 64 - 1 ? null : n;
}

export function snapshotJson(s: SnapshotInfo): SnapshotJson {
  const raw = s as SnapshotInfo & { dateSec?: number; dateNsec?: number };
  const { sec, nsec } = raw.dateSec !== undefined ? { sec: raw.dateSec, nsec: raw.dateNsec ?? 0 } : toSecNsec(s.date);
  return {
    id: String(s.id),
    name: s.name,
    vmStateSize: Number(s.vmStateSize),
    dateSec: sec,
    dateNsec: nsec,
    date: new Date(sec * 1000 + Math.floor(nsec / 1e6)).toISOString(),
    vmClockNs: String(s.vmClockNs),
    diskSize: optionalNumber(s.diskSize),
    icount: optionalNumber(s.icount),
  };
}

/** `00:00:01.250` from nanoseconds, like qemu-img's VM CLOCK column. */
function formatClock(ns: string): string {
  const total = BigInt(ns);
  const ms = Number((total / 1_000_000n) % 1000n);
  const s = Number(total / 1_000_000_000n);
  const pad = (n: number, w = 2) => String(n).padStart(w, '0');
  return `${pad(Math.floor(s / 3600))}:${pad(Math.floor(s / 60) % 60)}:${pad(s % 60)}.${pad(ms, 3)}`;
}

function formatDate(sec: number): string {
  return new Date(sec * 1000).toISOString().replace('T', ' ').slice(0, 19);
}

export function renderTable(rows: SnapshotJson[]): string {
  if (rows.length === 0) return 'no snapshots\n';
  const header = ['ID', 'TAG', 'VM SIZE', 'DATE (UTC)', 'VM CLOCK'];
  const body = rows.map((r) => [r.id, r.name, formatBytes(r.vmStateSize), formatDate(r.dateSec), formatClock(r.vmClockNs)]);
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((row) => row[i]!.length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => (i === 2 ? c.padStart(widths[i]!) : c.padEnd(widths[i]!))).join('  ').trimEnd();
  return `${[line(header), ...body.map(line)].join('\n')}\n`;
}

export function registerList(program: Command, ctx: CliContext): void {
  program
    .command('list')
    .description("list an image's internal snapshots")
    .argument('<IMAGE>', 'qcow2 image')
    .option('--json', 'print a JSON array (vmClockNs is a decimal string)')
    .option('-U, --force-share', "read without QEMU's image lock, like qemu-img -U (the image may change meanwhile)")
    .option('--state-image <FILE>', "a live savevm's state image: marks each disk-only snapshot as the half of a live snapshot (vmstate there) or not")
    .action(async (image: string, flags: { json?: boolean; forceShare?: boolean; stateImage?: string }) => {
      ctx.image = image;
      refuseNonImagePath(image);
      const img = await openImage(image, { readOnly: true, forceShare: flags.forceShare === true });
      let rows: SnapshotJson[];
      try {
        rows = img.snapshots().map(snapshotJson);
      } finally {
        await img.close();
      }
      if (flags.stateImage !== undefined) {
        const marked = await markLiveHalves(rows, flags.stateImage, flags.forceShare === true);
        process.stdout.write(flags.json === true ? `${JSON.stringify(marked, null, 2)}\n` : renderLiveTable(marked));
        return;
      }
      process.stdout.write(flags.json === true ? `${JSON.stringify(rows, null, 2)}\n` : renderTable(rows));
    });
}
