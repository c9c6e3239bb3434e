/**
 * (s), (sf), (sn), (sj): where savevm's bytes come from. QEMU sends the
 * migration stream over a unix socket; snapstream reads it and saves it into
 * the image.
 *
 * - (s)  1 GiB from a unix socket into the qcow2 saver, as savevm receives
 *        it: MigrationListener + receiveMigration, recv on the socket's
 *        native thread straight into the stream's ring;
 * - (sf) the same bytes from a file (fs.createReadStream, page cache warm
 *        after the first round) into the qcow2 saver;
 * - (sn) the native socket read alone, into one reused 16 MiB buffer: the
 *        ceiling (s) could reach;
 * - (sj) the socket through node:net piped into the saver: the way savevm
 *        read it before, for comparison.
 * A child process plays QEMU: it sends the page stream (8 B header + 4 KiB
 * page per page, in 4 MiB sends from prepared buffers, natively) as fast as
 * the socket takes it, on the same two CPUs. Each case times itself from the
 * moment the bytes can flow (the connection, or the read stream's creation),
 * image creation excluded.
 */
import { fork } from 'node:child_process';
import { closeSync, createReadStream, openSync, writeSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import { createImage, createSnapshotStream } from '../../dist/index.js';
import { allocAligned } from '../../dist/io/alignment.js';
import { MigrationListener, receiveMigration } from '../../dist/vm/migration.js';
import { PAIR_BYTES } from '../lib/workload.js';

const FEEDER = fileURLToPath(new URL('../lib/socket-feeder.js', import.meta.url));
/** A disk of 1 GiB: the vmstate area starts right after it. */
const DISK_BYTES = 1 << 30;

/** Accepts one connection on a fresh unix socket and starts the feeder on it. */
async function socketSource(ctx) {
  const sockPath = join(ctx.tmpDir, `feed-${process.pid}-${ctx.rep}.sock`);
  const server = createServer();
  await new Promise((resolve) => server.listen(sockPath, resolve));
  const accepted = new Promise((resolve) => server.once('connection', resolve));
  const child = fork(FEEDER, [sockPath, String(ctx.workload.pageCount)], { stdio: 'inherit' });
  const exited = new Promise((resolve, reject) => {
    child.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`feeder exited with ${code}`))));
  });
  const socket = await accepted;
  server.close();
  return { socket, exited, t0: performance.now() };
}

/**
 * The feeder connects to savevm's own listener once its buffers are built.
 * `started()` is when the connection was accepted: the clock starts there, as
 * sj's does, and not at the fork, so the feeder's own start-up (a Node process
 * building 16 MiB of pages, about half a second) is not counted as ours.
 */
async function nativeSource(ctx) {
  const listener = await MigrationListener.listen();
  let acceptedAt;
  const accept = listener.accept.bind(listener);
  listener.accept = async (...args) => {
    const socket = await accept(...args);
    acceptedAt = performance.now();
    return socket;
  };
  const child = fork(FEEDER, [listener.socketPath, String(ctx.workload.pageCount)], { stdio: 'inherit' });
  const exited = new Promise((resolve, reject) => {
    child.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`feeder exited with ${code}`))));
  });
  const started = () => {
    if (acceptedAt === undefined) throw new Error('the feeder never connected');
    return acceptedAt;
  };
  return { listener, exited, started };
}

const QCOW2_TARGET = { snapshot: 'bench', direct: true };

async function qcow2Target(ctx) {
  await createImage(ctx.path, { size: DISK_BYTES, overwrite: true });
  return createSnapshotStream(ctx.path, QCOW2_TARGET);
}

export const socketToQcow2 = {
  id: 's',
  label: 'qcow2 save fed from a unix socket (native receive, as savevm)',
  sizeClass: 'fast',
  verifiable: false,
  container: true,
  async run(ctx) {
    await createImage(ctx.path, { size: DISK_BYTES, overwrite: true });
    const { listener, exited, started } = await nativeSource(ctx);
    let bytes;
    try {
      // As savevm: the stream is made once QEMU (here the feeder) has connected.
      [bytes] = await Promise.all([receiveMigration(listener, () => createSnapshotStream(ctx.path, QCOW2_TARGET)), exited]);
    } finally {
      await listener.close();
    }
    return { bytes, seconds: (performance.now() - started()) / 1000 };
  },
};

export const socketNetToQcow2 = {
  id: 'sj',
  label: 'qcow2 save fed from a unix socket through node:net (pipeline)',
  sizeClass: 'fast',
  verifiable: false,
  container: true,
  async run(ctx) {
    const out = await qcow2Target(ctx);
    const { socket, exited, t0 } = await socketSource(ctx);
    await Promise.all([pipeline(socket, out), exited]);
    return { bytes: out.bytesWritten, seconds: (performance.now() - t0) / 1000 };
  },
};

export const fileToQcow2 = {
  id: 'sf',
  label: 'qcow2 save fed from a file (fs.createReadStream)',
  sizeClass: 'fast',
  verifiable: false,
  container: true,
  prepare(ctx) {
    const source = join(ctx.tmpDir, 'sf-source.bin');
    const { workload } = ctx;
    const fd = openSync(source, 'w', 0o600);
    const chunk = Buffer.allocUnsafe(256 * PAIR_BYTES);
    for (let page = 0; page < workload.pageCount; ) {
      let at = 0;
      for (let i = 0; i < 256 && page < workload.pageCount; i++, page++) {
        const k = workload.poolIndex(page);
        at += workload.headers[k].copy(chunk, at);
        at += workload.pages[k].copy(chunk, at);
      }
      writeSync(fd, chunk, 0, at);
    }
    closeSync(fd);
    return { source };
  },
  async run(ctx, { source }) {
    const out = await qcow2Target(ctx);
    const t0 = performance.now();
    await pipeline(createReadStream(source, { highWaterMark: 1 << 20 }), out);
    return { bytes: out.bytesWritten, seconds: (performance.now() - t0) / 1000 };
  },
};

export const socketAlone = {
  id: 'sn',
  label: 'unix socket read alone (native recv into one 16 MiB buffer)',
  kind: 'read',
  sizeClass: 'fast',
  verifiable: false,
  container: true,
  async run(ctx) {
    const { listener, exited, started } = await nativeSource(ctx);
    const buffer = allocAligned(16 << 20, 4096);
    let bytes = 0;
    try {
      const socket = await listener.accept();
      for (let got = await socket.recv(buffer); got > 0; got = await socket.recv(buffer)) bytes += got;
      await exited;
    } finally {
      await listener.close();
    }
    return { bytes, seconds: (performance.now() - started()) / 1000 };
  },
};
