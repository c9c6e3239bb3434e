/**
 * The library's QMP client (src/vm/qmp.ts) against a real QEMU, and against
 * plain unix sockets for what QEMU never does on its own (silence, garbage).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { QmpClient, QmpError } from '../../src/vm/qmp.js';
import { requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';
import { startVm, type TestVm } from './harness.js';

const skip = requireTool('qemu-system-x86_64');

describe.skipIf(skip !== undefined)('QmpClient with a real QEMU', () => {
  let dir: TmpDir;
  let vm: TestVm;

  beforeAll(async () => {
    dir = await tmpDir('vm-qmp');
    vm = await startVm({ dir: dir.path, ramMiB: 32, disks: [] });
  });
  afterAll(async () => {
    await vm?.quit();
    await dir.cleanup();
  });

  it('negotiates capabilities, runs commands and reads QEMU\'s version from the greeting', async () => {
    const qmp = await QmpClient.connect(vm.snapSocket);
    try {
      expect(qmp.version[0]).toBeGreaterThanOrEqual(6);
      expect(await qmp.execute('query-status')).toMatchObject({ status: 'prelaunch', running: false });
    } finally {
      qmp.close();
    }
  });

  it('rejects a QEMU error reply with QMP_ERROR carrying its class and description', async () => {
    const qmp = await QmpClient.connect(vm.snapSocket);
    try {
      const unknown = await qmp.execute('no-such-command').catch((e: unknown) => e);
      expect(unknown).toBeInstanceOf(QmpError);
      expect(unknown).toMatchObject({ code: 'QMP_ERROR', command: 'no-such-command', errorClass: 'CommandNotFound', desc: "The command no-such-command has not been found" });
      const generic = await qmp.execute('human-monitor-command', {}).catch((e: unknown) => e);
      expect(generic).toMatchObject({ code: 'QMP_ERROR', errorClass: 'GenericError', desc: expect.stringContaining('command-line') });
      // The connection stays usable after an error reply.
      expect(await qmp.execute('query-status')).toMatchObject({ status: 'prelaunch' });
    } finally {
      qmp.close();
    }
  });

  it('delivers events, and times out a wait for one that does not come', async () => {
    const qmp = await QmpClient.connect(vm.snapSocket);
    try {
      const resumed = qmp.waitEvent('RESUME', 5_000);
      await qmp.execute('cont');
      expect((await resumed).event).toBe('RESUME');
      await qmp.execute('stop');
      expect((await qmp.waitEvent('STOP', 5_000)).event).toBe('STOP');
      await expect(qmp.waitEvent('SHUTDOWN', 50)).rejects.toMatchObject({ code: 'QMP_ERROR', message: expect.stringMatching(/SHUTDOWN.*50 ms/) });
    } finally {
      qmp.close();
    }
  });

  it('names the cause when another client holds the socket (QEMU serves one at a time)', async () => {
    const first = await QmpClient.connect(vm.snapSocket);
    try {
      await expect(QmpClient.connect(vm.snapSocket, { timeoutMs: 300 })).rejects.toMatchObject({
        code: 'QMP_CLOSED',
        message: expect.stringMatching(/no QMP greeting within 300 ms.*another client/),
      });
    } finally {
      first.close();
    }
    const again = await QmpClient.connect(vm.snapSocket);
    again.close();
  });

  it('rejects pending commands when closed, and every later one (QMP_CLOSED)', async () => {
    const qmp = await QmpClient.connect(vm.snapSocket);
    const pending = qmp.execute('query-status', undefined, { timeoutMs: 5_000 });
    qmp.close();
    await expect(pending).rejects.toMatchObject({ code: 'QMP_CLOSED' });
    await expect(qmp.execute('query-status')).rejects.toMatchObject({ code: 'QMP_CLOSED', message: expect.stringMatching(/closed/) });
    expect(qmp.closed).toBe(true);
  });
});

describe('QmpClient against servers that misbehave', () => {
  let dir: TmpDir;
  beforeAll(async () => {
    dir = await tmpDir('vm-qmp-fake');
  });
  afterAll(async () => dir.cleanup());

  async function serve(name: string, onConnection: (socket: Socket) => void): Promise<{ path: string; server: Server }> {
    const path = join(dir.path, name);
    const server = createServer(onConnection);
    await new Promise<void>((resolve) => server.listen(path, resolve));
    return { path, server };
  }

  it('times out a command that gets no reply, naming the command', async () => {
    const { path, server } = await serve('silent.sock', (socket) => {
      socket.write('{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}\n');
      socket.on('data', (d) => {
        if (d.toString().includes('qmp_capabilities')) socket.write('{"return": {}, "id": 1}\n');
      });
    });
    try {
      const qmp = await QmpClient.connect(path);
      await expect(qmp.execute('query-status', undefined, { timeoutMs: 100 })).rejects.toMatchObject({
        code: 'QMP_ERROR',
        message: expect.stringMatching(/query-status: no reply within 100 ms/),
      });
      qmp.close();
    } finally {
      server.close();
    }
  });

  it('refuses a server that is not QMP, and one that closes the connection', async () => {
    const garbage = await serve('garbage.sock', (socket) => socket.end('SSH-2.0-OpenSSH\n'));
    const closing = await serve('closing.sock', (socket) => socket.destroy());
    try {
      await expect(QmpClient.connect(garbage.path)).rejects.toMatchObject({ code: 'QMP_CLOSED', message: expect.stringMatching(/not a QMP greeting/) });
      await expect(QmpClient.connect(closing.path)).rejects.toMatchObject({ code: 'QMP_CLOSED', message: expect.stringMatching(/closed before the greeting/) });
    } finally {
      garbage.server.close();
      closing.server.close();
    }
  });
});
