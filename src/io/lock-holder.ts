/**
 * Who holds an image's QEMU lock bytes, so that IMAGE_LOCKED can name them:
 * this process (another Image or stream still open on the file), a QEMU,
 * another snapstream.
 *
 * OFD locks show pid -1 in /proc/locks, so the holder is found the other
 * way round: /proc/PID/fdinfo/FD lists the locks taken through that open
 * file ("lock: 1: OFDLCK ADVISORY READ -1 fe:00:2158493 100 101"), keyed by
 * the device and inode of the image. Runs only after a failure, never on the
 * data path; any unreadable /proc entry is skipped.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';

/** QEMU's lock bytes: 100+i held permissions, 200+i unshared ones (block/file-posix.c). */
const LOCK_BYTES_FIRST = 100;
const LOCK_BYTES_LAST = 299;

export interface LockHolder {
  pid: number;
  /** /proc/PID/comm: at most 15 characters, e.g. "qemu-system-x86". */
  comm: string;
}

/** The device as /proc prints it in lock lines: "fe:00". */
function deviceKey(dev: number): string {
  const d = BigInt(dev);
  const major = ((d >> 8n) & 0xfffn) | ((d >> 32n) & ~0xfffn);
  const minor = (d & 0xffn) | ((d >> 12n) & ~0xffn);
  return `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}`;
}

function holdsQemuLockBytes(fdinfo: string, fileKey: string): boolean {
  for (const line of fdinfo.split('\n')) {
    if (!line.startsWith('lock:') || !line.includes(` ${fileKey} `)) continue;
    const fields = line.trim().split(/\s+/);
    const start = Number(fields.at(-2));
    const end = fields.at(-1) === 'EOF' ? Number.MAX_SAFE_INTEGER : Number(fields.at(-1));
    if (start <= LOCK_BYTES_LAST && end >= LOCK_BYTES_FIRST) return true;
  }
  return false;
}

function readComm(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return '?';
  }
}

/** Processes holding QEMU lock bytes on `path` (this one included: its other open Images and streams). */
export function findLockHolders(path: string): LockHolder[] {
  let fileKey: string;
  try {
    const st = statSync(path);
    fileKey = `${deviceKey(st.dev)}:${st.ino}`;
  } catch {
    return [];
  }
  const holders: LockHolder[] = [];
  let pids: string[];
  try {
    pids = readdirSync('/proc').filter((name) => /^\d+$/.test(name));
  } catch {
    return [];
  }
  for (const name of pids) {
    const pid = Number(name);
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fdinfo`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      let info: string;
      try {
        info = readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8');
      } catch {
        continue;
      }
      if (holdsQemuLockBytes(info, fileKey)) {
        holders.push({ pid, comm: readComm(pid) });
        break;
      }
    }
  }
  return holders;
}

/** What kind of program a holder is, in words. */
export function describeHolder(holder: LockHolder): string {
  const { comm } = holder;
  if (holder.pid === process.pid) return 'this process: another Image or snapshot stream of it is still open';
  if (comm.startsWith('qemu-system')) return 'a running QEMU';
  if (comm.startsWith('qemu-img') || comm.startsWith('qemu-io') || comm.startsWith('qemu-nbd')) return `a ${comm} process`;
  if (comm === 'node' || comm.startsWith('snapstream')) return 'another snapstream (or Node.js program)';
  return 'another process';
}
