/**
 * An IMAGE argument must be something a qcow2 image can live in: a regular
 * file or a block device. A FIFO would block the open until a writer came
 * (the command would hang), and a character device or socket has no header
 * to read, so they are refused before anything is opened.
 */
import { statSync } from 'node:fs';
import { ErrorCode, SnapshotError } from './api.js';

export function refuseNonImagePath(path: string): void {
  let kind: string | undefined;
  try {
    const st = statSync(path);
    kind = st.isFIFO() ? 'a FIFO' : st.isCharacterDevice() ? 'a character device' : st.isSocket() ? 'a socket' : undefined;
  } catch {
    return; // a missing path: the open reports ENOENT with the path
  }
  if (kind !== undefined) {
    throw new SnapshotError(ErrorCode.EINVAL, `'${path}' is ${kind}; a qcow2 image is a regular file or a block device`, {
      path,
      syscall: 'open',
    });
  }
}
