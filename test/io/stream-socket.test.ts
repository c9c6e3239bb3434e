/**
 * StreamSocket against real unix sockets served by node:net: the bytes that
 * arrive are the bytes sent (SHA-256 on both sides), recv reads until full or
 * the peer's end, connect failures carry their errno code, a peer that stops
 * reading fails a send after the timeout (EAGAIN), and shutdown() frees a send
 * blocked on such a peer at once.
 */
import { createHash } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { allocAligned } from '../../src/io/alignment.js';
import { StreamSocket } from '../../src/io/stream-socket.js';
import { pseudoRandom } from '../helpers/streams.js';
import { tmpDir, type TmpDir } from '../helpers/tools.js';

let dir: TmpDir;
let count = 0;
beforeAll(async () => {
  dir = await tmpDir('stream-socket');
});
afterAll(async () => dir.cleanup());

/** A server on a fresh socket path; resolves with the path and the first connection. */
async function serve(): Promise<{ path: string; server: Server; connection: Promise<Socket> }> {
  const path = join(dir.path, `s${++count}.sock`);
  const server = createServer();
  const connection = new Promise<Socket>((resolve) => server.once('connection', resolve));
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return { path, server, connection };
}

function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

describe('StreamSocket', () => {
  it('sends every byte in order: the peer receives what was sent (SHA-256), across several queued sends', async () => {
    const { path, server, connection } = await serve();
    const socket = await StreamSocket.connect(path, { timeoutMs: 10_000 });
    const peer = await connection;
    const received: Buffer[] = [];
    peer.on('data', (chunk: Buffer) => received.push(chunk));
    const ended = new Promise((resolve) => peer.once('end', resolve));
    const parts = [pseudoRandom(3 << 20, 1), pseudoRandom(1, 2), pseudoRandom(5 << 20, 3)];
    // Queued without waiting: the socket's thread sends them in submission order.
    await Promise.all(parts.map((p) => socket.send(p)));
    socket.shutdown();
    await ended;
    await socket.close();
    server.close();
    expect(sha256(Buffer.concat(received))).toBe(sha256(Buffer.concat(parts)));
  });

  it('recv fills the buffer, and returns short only at the end of the stream', async () => {
    const { path, server, connection } = await serve();
    const socket = await StreamSocket.connect(path, { timeoutMs: 10_000 });
    const peer = await connection;
    const data = pseudoRandom(6 << 20, 4);
    peer.end(data);
    const first = allocAligned(4 << 20, 4096);
    const second = allocAligned(4 << 20, 4096);
    expect(await socket.recv(first)).toBe(4 << 20);
    expect(await socket.recv(second)).toBe(2 << 20);
    expect(await socket.recv(allocAligned(4096, 4096))).toBe(0);
    await socket.close();
    server.close();
    expect(sha256(Buffer.concat([first, second.subarray(0, 2 << 20)]))).toBe(sha256(data));
  });

  it('connect failures are coded: ENOENT for no socket, ECONNREFUSED for a path nobody listens on', async () => {
    await expect(StreamSocket.connect(join(dir.path, 'missing.sock'), { timeoutMs: 0 })).rejects.toMatchObject({ code: 'ENOENT', syscall: 'connect' });
    const { path, server } = await serve();
    server.close();
    await new Promise((resolve) => server.once('close', resolve));
    // A regular file where a socket should be: not a listening socket.
    await writeFile(path, 'x');
    await expect(StreamSocket.connect(path, { timeoutMs: 0 })).rejects.toMatchObject({ code: 'ECONNREFUSED' });
    await expect(StreamSocket.connect(`${dir.path}/${'x'.repeat(120)}`, { timeoutMs: 0 })).rejects.toMatchObject({ code: 'ENAMETOOLONG' });
  });

  it('a peer that stops reading fails the send with EAGAIN after the timeout, not forever', async () => {
    const { path, server, connection } = await serve();
    const socket = await StreamSocket.connect(path, { timeoutMs: 300 });
    const peer = await connection;
    peer.pause(); // reads nothing: the socket buffers fill up
    const t0 = performance.now();
    await expect(socket.send(pseudoRandom(32 << 20, 5))).rejects.toMatchObject({ code: 'EAGAIN', syscall: 'send' });
    // SO_SNDTIMEO counts from the last progress: at least the timeout, far less than forever.
    expect(performance.now() - t0).toBeGreaterThanOrEqual(250);
    expect(performance.now() - t0).toBeLessThan(10_000);
    await socket.close();
    peer.destroy();
    server.close();
  });

  it('shutdown() frees a send blocked on a peer that reads nothing, at once (no timeout set)', async () => {
    const { path, server, connection } = await serve();
    const socket = await StreamSocket.connect(path, { timeoutMs: 0 });
    const peer = await connection;
    peer.pause();
    const sending = socket.send(pseudoRandom(32 << 20, 6));
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect(socket.pending).toBe(1);
    const t0 = performance.now();
    socket.shutdown();
    await expect(sending).rejects.toMatchObject({ code: 'EPIPE' });
    expect(performance.now() - t0).toBeLessThan(2000);
    await socket.close();
    peer.destroy();
    server.close();
  });

  it('a peer that closes: the next send fails with a coded error (EPIPE or ECONNRESET), the process lives on', async () => {
    const { path, server, connection } = await serve();
    const socket = await StreamSocket.connect(path, { timeoutMs: 5000 });
    const peer = await connection;
    peer.destroy();
    await new Promise((resolve) => setTimeout(resolve, 50));
    const err = await socket.send(pseudoRandom(8 << 20, 7)).catch((e: unknown) => e);
    expect(['EPIPE', 'ECONNRESET']).toContain((err as { code?: string }).code);
    await socket.close();
    server.close();
  });

  it('a recv cut short by our own shutdown() is ECANCELED, never a clean end of the stream', async () => {
    const { path, server, connection } = await serve();
    const socket = await StreamSocket.connect(path, { timeoutMs: 0 });
    const peer = await connection;
    peer.write(pseudoRandom(1 << 20, 8)); // less than the buffer: the recv waits for more
    const receiving = socket.recv(allocAligned(4 << 20, 4096));
    await new Promise((resolve) => setTimeout(resolve, 200));
    socket.shutdown();
    await expect(receiving).rejects.toMatchObject({ code: 'ECANCELED', syscall: 'recv' });
    await socket.close();
    peer.destroy();
    server.close();
  });

  it('after a failed send, the sends queued behind it fail at once instead of waiting out their own timeouts', async () => {
    const { path, server, connection } = await serve();
    const socket = await StreamSocket.connect(path, { timeoutMs: 300 });
    const peer = await connection;
    peer.pause();
    const t0 = performance.now();
    const sends = [0, 1, 2, 3].map((i) => socket.send(pseudoRandom(16 << 20, 20 + i)).catch((e: unknown) => e));
    const errors = (await Promise.all(sends)) as Array<{ code?: string }>;
    expect(errors[0]!.code).toBe('EAGAIN');
    for (const e of errors.slice(1)) expect(e.code).toBe('EPIPE');
    // One stall timeout (a partial send may wait it twice), not one per queued send.
    expect(performance.now() - t0).toBeLessThan(2000);
    await socket.close();
    peer.destroy();
    server.close();
  });
});
