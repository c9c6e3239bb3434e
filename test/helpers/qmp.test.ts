/**
 * The QMP client (the library's, through the test helper) against a scripted
 * fake server (no QEMU needed): the protocol edges that real QEMU rarely
 * shows on demand.
 */
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { QmpClient, QmpError } from './qmp.js';
import { tmpDir, type TmpDir } from './tools.js';

type Handler = (message: { execute: string; arguments?: Record<string, unknown>; id?: number }, socket: Socket) => void;

let dir: TmpDir;
let server: Server;
let socketPath: string;
const sockets = new Set<Socket>();

function send(socket: Socket, message: unknown): void {
  socket.write(`${JSON.stringify(message)}\n`);
}

function event(name: string, data: Record<string, unknown> = {}): unknown {
  return { event: name, data, timestamp: { seconds: 1, microseconds: 2 } };
}

async function serve(handler: Handler): Promise<void> {
  server = createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    send(socket, { QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 } }, capabilities: [] } });
    let buffer = '';
    socket.on('data', (chunk) => {
      buffer += chunk.toString();
      let newline: number;
      while ((newline = buffer.indexOf('\n')) >= 0) {
        const message = JSON.parse(buffer.slice(0, newline)) as Parameters<Handler>[0];
        buffer = buffer.slice(newline + 1);
        if (message.execute === 'qmp_capabilities') send(socket, { return: {}, id: message.id });
        else handler(message, socket);
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
}

beforeEach(async () => {
  dir = await tmpDir('qmp-fake');
  socketPath = join(dir.path, 'qmp.sock');
});

afterEach(async () => {
  for (const socket of sockets) socket.destroy();
  await new Promise<void>((resolve) => (server?.listening ? server.close(() => resolve()) : resolve()));
  await dir.cleanup();
});

describe('QmpClient', () => {
  it('negotiates capabilities and resolves execute with the return value', async () => {
    await serve((m, s) => send(s, { return: { echoed: m.arguments }, id: m.id }));
    const qmp = await QmpClient.connect(socketPath);
    expect(qmp.greeting).toHaveProperty('QMP');
    expect(await qmp.execute('echo', { a: 1 })).toEqual({ echoed: { a: 1 } });
    qmp.close();
  });

  it('rejects with QmpError carrying class and description on an error reply', async () => {
    await serve((m, s) => send(s, { error: { class: 'GenericError', desc: 'no such thing' }, id: m.id }));
    const qmp = await QmpClient.connect(socketPath);
    const error = await qmp.execute('bad').catch((e: unknown) => e);
    expect(error).toBeInstanceOf(QmpError);
    expect(error).toMatchObject({ command: 'bad', errorClass: 'GenericError', desc: 'no such thing' });
    qmp.close();
  });

  it('matches out-of-order replies by id and keeps events interleaved with them', async () => {
    const held: Array<Parameters<Handler>[0]> = [];
    await serve((m, s) => {
      held.push(m);
      if (held.length < 2) return;
      send(s, event('STOP'));
      for (const h of held.reverse()) send(s, { return: h.execute, id: h.id });
    });
    const qmp = await QmpClient.connect(socketPath);
    const [first, second] = await Promise.all([qmp.execute('first'), qmp.execute('second')]);
    expect([first, second]).toEqual(['first', 'second']);
    expect((await qmp.waitEvent('STOP', 100)).event).toBe('STOP'); // queued before the wait started
    qmp.close();
  });

  it('waitEvent resolves on a later matching event and honours the filter', async () => {
    await serve((m, s) => {
      send(s, { return: {}, id: m.id });
      setTimeout(() => {
        send(s, event('JOB_STATUS_CHANGE', { id: 'j', status: 'running' }));
        send(s, event('JOB_STATUS_CHANGE', { id: 'j', status: 'concluded' }));
      }, 20);
    });
    const qmp = await QmpClient.connect(socketPath);
    const concluded = qmp.waitEvent('JOB_STATUS_CHANGE', 2_000, (e) => e.data?.status === 'concluded');
    await qmp.execute('start-job');
    expect((await concluded).data).toEqual({ id: 'j', status: 'concluded' });
    expect(qmp.events.map((e) => e.data?.status)).toEqual(['running']);
    qmp.close();
  });

  it('times out commands and event waits', async () => {
    await serve(() => undefined); // never answers
    const qmp = await QmpClient.connect(socketPath);
    await expect(qmp.execute('hang', undefined, { timeoutMs: 50 })).rejects.toThrow(/no reply within 50 ms/);
    await expect(qmp.waitEvent('NEVER', 50)).rejects.toThrow(/not received within 50 ms/);
    qmp.close();
  });

  it('rejects pending work when the server goes away, and after close', async () => {
    await serve((_m, s) => s.destroy());
    const qmp = await QmpClient.connect(socketPath);
    const waiting = qmp.waitEvent('SHUTDOWN', 5_000);
    await expect(qmp.execute('quit')).rejects.toThrow(/closed/);
    await expect(waiting).rejects.toThrow(/closed/);
    qmp.close();
    await expect(qmp.execute('again')).rejects.toThrow(/closed/);
  });

  it('gives up connecting to a socket that never appears within the bound', async () => {
    const started = Date.now();
    await expect(QmpClient.connect(join(dir.path, 'absent.sock'), { timeoutMs: 200 })).rejects.toThrow(/QMP connect/);
    expect(Date.now() - started).toBeLessThan(2_000);
  });
});
