/**
 * Plays QEMU for bench/cases/s-socket-source.js: connects to the unix socket
 * in argv[2] and sends `pageCount` pages of the bench page stream (8 B header
 * + 4 KiB page each), then closes. QEMU writes from its own buffers in C; so
 * does this feeder, through the addon's native send (StreamSocket), from four
 * 4 MiB buffers of stream pages built before it connects: the feeder's own
 * CPU stays out of the way of the reader being measured.
 */
import { StreamSocket } from '../../dist/io/stream-socket.js';
import { createWorkload, PAIR_BYTES } from './workload.js';

const [sockPath, pageCountArg] = process.argv.slice(2);
const pageCount = Number(pageCountArg);
const workload = createWorkload({ totalBytes: pageCount * 4096 });
const PAIRS_PER_SEND = 1022; // 1022 x 4104 B: just under 4 MiB per send
const BUFFERS = 4;

// Stream pages 0 .. BUFFERS x PAIRS_PER_SEND, sent round-robin: the bytes are
// page stream, though not the exact pages a longer stream would carry.
const buffers = [];
for (let b = 0, page = 0; b < BUFFERS; b++) {
  const chunk = Buffer.allocUnsafe(PAIRS_PER_SEND * PAIR_BYTES);
  for (let i = 0; i < PAIRS_PER_SEND; i++, page++) {
    const k = workload.poolIndex(page);
    workload.headers[k].copy(chunk, i * PAIR_BYTES);
    workload.pages[k].copy(chunk, i * PAIR_BYTES + 8);
  }
  buffers.push(chunk);
}

const socket = await StreamSocket.connect(sockPath, { timeoutMs: 60_000 });
const inFlight = [];
for (let page = 0, n = 0; page < pageCount; n++) {
  const pairs = Math.min(PAIRS_PER_SEND, pageCount - page);
  const slot = n % BUFFERS;
  // The socket's thread sends in order; a buffer is reused once its send is done.
  if (inFlight[slot] !== undefined) await inFlight[slot];
  inFlight[slot] = socket.send(buffers[slot].subarray(0, pairs * PAIR_BYTES));
  page += pairs;
}
await Promise.all(inFlight);
socket.shutdown();
await socket.close();
