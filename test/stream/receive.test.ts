/**
 * SnapshotStream.receiveFrom: a stream received from a real unix socket
 * (StreamSocket.listen/accept, recv on the socket's native thread straight
 * into the ring) and written with O_DIRECT. The file holds exactly the bytes
 * the peer sent (SHA-256 of the input), at lengths that are not a multiple of
 * a buffer; an abort, a stalled peer and a missing peer end it with coded
 * errors and nothing hangs.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream } from '../../src/index.js';
import { StreamSocket } from '../../src/io/stream-socket.js';
import { pseudoRandom } from '../helpers/streams.js';
import { tmpDir, type TmpDir } from '../helpers/tools.js';

let dir: TmpDir;
let count = 0;
beforeAll(async () => {
  dir = await tmpDir('receive');
});
afterAll(async () => dir.cleanup());

const sha256 = (data: Uint8Array): string => createHash('sha256').update(data).digest('hex');

/** A listening StreamSocket and a node:net peer that connects to it; `feed` runs once connected. */
async function peerFeeding(timeoutMs: number, feed: (peer: ReturnType<typeof connect>) => void): Promise<StreamSocket> {
  const path = join(dir.path, `r${++count}.sock`);
  const socket = await StreamSocket.listen(path);
  const peer = connect(path);
  peer.on('error', () => undefined); // the peer sees EPIPE once we shut down: expected here
  peer.once('connect', () => feed(peer));
  await socket.accept(10_000, { timeoutMs });
  return socket;
}

describe('SnapshotStream.receiveFrom', () => {
  // Past a buffer with a partial tail, exactly two buffers (the end falls on a buffer boundary), one page, one byte.
  for (const bytes of [(40 << 20) + 12_345, 8 << 20, 4096, 1]) {
    it(`writes exactly the ${bytes} bytes the peer sent (SHA-256), padded tail included`, async () => {
      const data = pseudoRandom(bytes, bytes);
      const socket = await peerFeeding(10_000, (peer) => peer.end(data));
      const target = join(dir.path, `out${count}.bin`);
      const stream = createSnapshotStream(target, { bufferSize: 4 << 20, buffers: 3 });
      await stream.receiveFrom(socket);
      await socket.close();
      expect(stream.bytesWritten).toBe(bytes);
      const written = await readFile(target);
      expect(written.length).toBe(bytes);
      expect(sha256(written)).toBe(sha256(data));
    });
  }

  it('an abort mid-stream: ABORTED, the socket shut down (the peer sees its end), nothing hangs', async () => {
    const controller = new AbortController();
    let peerClosed: Promise<void> | undefined;
    const socket = await peerFeeding(10_000, (peer) => {
      peerClosed = new Promise((resolve) => peer.once('close', () => resolve()));
      peer.write(pseudoRandom(6 << 20, 9)); // more than a buffer, then nothing: the receive waits
    });
    const stream = createSnapshotStream(join(dir.path, 'aborted.bin'), { bufferSize: 4 << 20, buffers: 3, signal: controller.signal });
    const receiving = stream.receiveFrom(socket);
    await new Promise((resolve) => setTimeout(resolve, 300));
    controller.abort();
    const t0 = performance.now();
    await expect(receiving).rejects.toMatchObject({ code: 'ABORTED' });
    expect(performance.now() - t0).toBeLessThan(5000);
    expect(socket.pending).toBe(0);
    await socket.close();
    await peerClosed;
  });

  it('a peer that stops sending: the receive fails with EAGAIN after the stall timeout', async () => {
    const socket = await peerFeeding(300, (peer) => peer.write(pseudoRandom(1 << 20, 10)));
    const stream = createSnapshotStream(join(dir.path, 'stalled.bin'), { bufferSize: 4 << 20, buffers: 3 });
    const t0 = performance.now();
    await expect(stream.receiveFrom(socket)).rejects.toMatchObject({ code: 'EAGAIN', syscall: 'recv' });
    expect(performance.now() - t0).toBeGreaterThanOrEqual(250);
    await socket.close();
  });

  it('accept: ETIMEDOUT when no peer comes, ECANCELED on shutdown(), EADDRINUSE for a path in use', async () => {
    const path = join(dir.path, 'lonely.sock');
    const lonely = await StreamSocket.listen(path);
    await expect(lonely.accept(200, { timeoutMs: 0 })).rejects.toMatchObject({ code: 'ETIMEDOUT', syscall: 'accept' });
    const waiting = lonely.accept(0, { timeoutMs: 0 });
    setTimeout(() => lonely.shutdown(), 100);
    await expect(waiting).rejects.toMatchObject({ code: 'ECANCELED' });
    await expect(StreamSocket.listen(path)).rejects.toMatchObject({ code: 'EADDRINUSE', syscall: 'bind' });
    await lonely.close();
  });
});
