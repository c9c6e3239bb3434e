/**
 * Which snapshot a reference means, exactly as QEMU 7.2 decides it. QEMU
 * has two rules, and each operation uses one of them (checked with qemu-img
 * 7.2 and HMP on images where one snapshot's name is another's id):
 *
 *   by name only: bdrv_snapshot_find() (block/snapshot.c). `qemu-img
 *     snapshot -d`, HMP `delvm` and `loadvm` (its vmstate and its check
 *     that the snapshot exists) use it: with snapshot id 1 named 'foo',
 *     `qemu-img snapshot -d 1` finds nothing.
 *   by id, then by name: find_snapshot_by_id_or_name()
 *     (block/qcow2-snapshot.c), behind qcow2_snapshot_goto(): `qemu-img
 *     snapshot -a 1` reverts to id 1.
 *
 * bdrv_snapshot_find compares the names as qcow2_snapshot_list() copies
 * them into QEMUSnapshotInfo: C strings cut at 255 bytes.
 * find_snapshot_by_id_or_name compares the whole C strings.
 */
import { ErrorCode, SnapshotError } from '../errors.js';
import type { SnapshotEntry } from './snapshot-table.js';

/** QEMUSnapshotInfo.name is char[256] (include/block/snapshot.h). */
const LISTED_NAME_BYTES = 255;

/** A stored id or name as C code sees it: up to the first NUL, cut to `max` bytes. */
function cString(bytes: Uint8Array, max = Infinity): Buffer {
  const nul = bytes.indexOf(0);
  const end = Math.min(nul < 0 ? bytes.length : nul, max);
  return Buffer.from(bytes.buffer, bytes.byteOffset, end);
}

function indexWhere(entries: readonly SnapshotEntry[], field: 'idBytes' | 'nameBytes', wanted: Buffer, max?: number): number {
  return entries.findIndex((e) => cString(e[field], max).equals(wanted));
}

/** bdrv_snapshot_find(): the first snapshot named `name` (delete, export). */
export function findByName(entries: readonly SnapshotEntry[], name: string): number {
  const wanted = Buffer.from(name, 'utf8');
  const index = indexWhere(entries, 'nameBytes', wanted, LISTED_NAME_BYTES);
  if (index >= 0) return index;
  const byId = entries[indexWhere(entries, 'idBytes', wanted)];
  const hint =
    byId === undefined
      ? ''
      : `; snapshot id ${byId.id} is named '${byId.name}' (this takes a name, as qemu-img snapshot -d, delvm and loadvm do)`;
  throw new SnapshotError(ErrorCode.SNAPSHOT_NOT_FOUND, `no snapshot named '${name}'${hint}`);
}

/** find_snapshot_by_id_or_name(): the first snapshot with id `ref`, else the first named `ref` (revert). */
export function findByIdThenName(entries: readonly SnapshotEntry[], ref: string): number {
  const wanted = Buffer.from(ref, 'utf8');
  const byId = indexWhere(entries, 'idBytes', wanted);
  if (byId >= 0) return byId;
  const byName = indexWhere(entries, 'nameBytes', wanted);
  if (byName >= 0) return byName;
  throw new SnapshotError(ErrorCode.SNAPSHOT_NOT_FOUND, `no snapshot with id or name '${ref}'`);
}

/** The snapshot with id `id` (ids are unique): addresses one entry exactly. */
export function findById(entries: readonly SnapshotEntry[], id: string): number {
  const index = indexWhere(entries, 'idBytes', Buffer.from(id, 'utf8'));
  if (index < 0) throw new SnapshotError(ErrorCode.SNAPSHOT_NOT_FOUND, `no snapshot with id '${id}'`);
  return index;
}
