/**
 * What the tail of a migration stream records that a snapshot needs: the
 * run state (QEMU migration/global_state.c) and the guest clock.
 *
 * QEMU's savevm stores the run state *before* it stops the VM ("running"),
 * and a QEMU that loads the stream with `-incoming` starts the guest when it
 * says so. snapstream stops the VM itself before it migrates, so QEMU
 * records "paused"; the hand-off rewrites that one field to what savevm
 * would have written. The section, as vmstate_globalstate puts it on the
 * wire (QEMU_VM_SECTION_FULL):
 *
 *   u8 0x04, be32 section_id, u8 len=11, "globalstate", be32 instance_id,
 *   be32 version_id=1, be32 size (strlen + 1), u8 runstate[100] (NUL padded)
 *
 * It is a device section, written after RAM, near the end of the stream
 * (98,784 bytes from the end for a pc-i440fx-7.2 guest here).
 */

/** How far from the end of the vmstate the globalstate section is looked for. */
export const GLOBAL_STATE_SEARCH_BYTES = 4 << 20;

const SECTION_FULL = 0x04;
const IDSTR = Buffer.from('\x0bglobalstate', 'latin1');
/** Bytes from the idstr's length byte to the runstate field: idstr (12), instance_id (4), version_id (4), size (4). */
const RUNSTATE_FIELD = IDSTR.length + 12;
const RUNSTATE_BYTES = 100;

export interface GlobalStateField {
  /** Offset of the be32 size field within the searched buffer. */
  sizeOffset: number;
  runState: string;
}

/** The last globalstate section in `tail`, or undefined when the stream has none (older machine types may omit it). */
export function findGlobalState(tail: Buffer): GlobalStateField | undefined {
  for (let at = tail.lastIndexOf(IDSTR); at > 0; at = tail.lastIndexOf(IDSTR, at - 1)) {
    if (tail[at - 5] !== SECTION_FULL || at + RUNSTATE_FIELD + RUNSTATE_BYTES > tail.length) continue;
    if (tail.readUInt32BE(at + IDSTR.length + 4) !== 1) continue; // version_id
    const sizeOffset = at + RUNSTATE_FIELD - 4;
    const size = tail.readUInt32BE(sizeOffset);
    if (size < 1 || size > RUNSTATE_BYTES) continue;
    const field = tail.subarray(sizeOffset + 4, sizeOffset + 4 + RUNSTATE_BYTES);
    const text = field.subarray(0, size - 1).toString('latin1');
    if (!/^[a-z-]+$/.test(text) || field[size - 1] !== 0) continue;
    return { sizeOffset, runState: text };
  }
  return undefined;
}

const TIMER_IDSTR = Buffer.from('\x05timer', 'latin1');

/**
 * The guest clock at the save, from the "timer" section (QEMU
 * softmmu/cpu-timers.c vmstate_timers, version 2: be64 cpu_ticks_offset,
 * 8 unused bytes, be64 cpu_clock_offset). While the VM is stopped,
 * cpu_clock_offset holds QEMU_CLOCK_VIRTUAL, which is what savevm records
 * as vm_clock_nsec.
 */
export function findVmClockNs(tail: Buffer): bigint | undefined {
  for (let at = tail.lastIndexOf(TIMER_IDSTR); at > 0; at = tail.lastIndexOf(TIMER_IDSTR, at - 1)) {
    const fields = at + TIMER_IDSTR.length + 8;
    if (tail[at - 5] !== SECTION_FULL || fields + 24 > tail.length) continue;
    if (tail.readUInt32BE(at + TIMER_IDSTR.length + 4) !== 2) continue; // version_id
    const clock = tail.readBigInt64BE(fields + 16);
    return clock >= 0n ? clock : undefined;
  }
  return undefined;
}

/** Rewrites the run state in place (size field and NUL-padded name). */
export function setGlobalState(tail: Buffer, field: GlobalStateField, runState: string): void {
  const name = Buffer.from(runState, 'latin1');
  tail.writeUInt32BE(name.length + 1, field.sizeOffset);
  const value = tail.subarray(field.sizeOffset + 4, field.sizeOffset + 4 + RUNSTATE_BYTES);
  value.fill(0);
  name.copy(value);
}
