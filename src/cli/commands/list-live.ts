/**
 * `snapstream list IMAGE --state-image FILE`: which disk-only snapshots of a
 * disk are halves of a live snapshot (docs/live-checkpoint.md). A disk-only
 * entry whose name the state image holds with a vmstate is `live`; one the
 * state image lacks is `disk-only`: a half left by a live savevm that could
 * not clean up, or a plain disk-only snapshot.
 */
import { openImage } from '../api.js';
import { renderTable, type SnapshotJson } from './list.js';

export type LiveMark = 'live' | 'disk-only' | null;

export async function markLiveHalves(rows: SnapshotJson[], stateImage: string, forceShare: boolean): Promise<Array<SnapshotJson & { live: LiveMark }>> {
  const state = await openImage(stateImage, { readOnly: true, forceShare });
  let withVmState: Set<string>;
  try {
    withVmState = new Set(state.snapshots().filter((s) => s.vmStateSize > 0).map((s) => s.name));
  } finally {
    await state.close();
  }
  return rows.map((row) => ({ ...row, live: row.vmStateSize > 0 ? null : withVmState.has(row.name) ? 'live' : 'disk-only' }));
}

export function renderLiveTable(rows: Array<SnapshotJson & { live: LiveMark }>): string {
  const lines = renderTable(rows).split('\n');
  if (rows.length === 0) return lines.join('\n');
  const width = Math.max(...lines.slice(0, rows.length + 1).map((l) => l.length));
  const marks = ['LIVE', ...rows.map((r) => (r.live === 'live' ? 'live (vmstate in the state image)' : r.live === 'disk-only' ? 'disk-only (no vmstate anywhere)' : '-'))];
  return `${lines
    .slice(0, rows.length + 1)
    .map((l, i) => `${l.padEnd(width)}  ${marks[i]}`)
    .join('\n')}\n`;
}
