/**
 * Plays QEMU for bench/cases/s-socket-source.js: connects to the unix socket
 * in argv[2] and writes `pageCount` pages of the bench page stream, gathered
 * into 1 MiB writes (QEMU's QEMUFile buffers its writes too), respecting
 * backpressure, then closes.
 */
import { connect } from 'node:net';
import { createWorkload, PAIR_BYTES } from './workload.js';

const [sockPath, pageCountArg] = process.argv.slice(2);
const pageCount = Number(pageCountArg);
const workload = createWorkload({ totalBytes: pageCount * 4096 });
const PAIRS_PER_WRITE = 255; // 255 x 4104 B: just under 1 MiB per write

const socket = connect(sockPath);
socket.on('error', (err) => {
  console.error(err);
  process.exit(1);
});
socket.once('connect', () => {
  let page = 0;
  const feed = () => {
    while (page < pageCount) {
      const n = Math.min(PAIRS_PER_WRITE, pageCount - page);
      const chunk = Buffer.allocUnsafe(n * PAIR_BYTES);
      for (let i = 0; i < n; i++, page++) {
        const k = workload.poolIndex(page);
        workload.headers[k].copy(chunk, i * PAIR_BYTES);
        workload.pages[k].copy(chunk, i * PAIR_BYTES + 8);
      }
      if (!socket.write(chunk)) {
        socket.once('drain', feed);
        return;
      }
    }
    socket.end();
  };
  feed();
});
