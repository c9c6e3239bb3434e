/**
 * fio cells of the device reference grid (bench/cases/g-device.js): the same
 * sequential O_DIRECT writes and reads through libaio, 1, 2 and 4 in flight
 * at 4 and 16 MiB, when fio is installed. The rate is fio's own (bw_bytes,
 * end_fsync included for writes), so process start-up is not counted.
 */
import { spawn, spawnSync } from 'node:child_process';
import { BLOCK_MIB, IN_FLIGHT } from './g-device.js';
import { readSourcePath } from '../lib/read-source.js';

let fioVersion;
function available() {
  fioVersion ??= spawnSync('fio', ['--version'], { encoding: 'utf8' });
  return fioVersion.status === 0 ? undefined : 'fio is not installed';
}

function runFio(args) {
  return new Promise((resolve, reject) => {
    const child = spawn('fio', [...args, '--output-format=json'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    child.on('error', reject);
    child.on('close', (code) => {
      if (code !== 0) return reject(new Error(`fio exited with ${code}: ${err.trim()}`));
      try {
        resolve(JSON.parse(out.slice(out.indexOf('{'))).jobs[0]);
      } catch (e) {
        reject(e);
      }
    });
  });
}

function fioCell(mode, inFlight, blockMiB) {
  const write = mode === 'write';
  return {
    id: `fio-${write ? 'w' : 'r'}${blockMiB}x${inFlight}`,
    label: `device ${mode}: fio libaio, ${blockMiB} MiB O_DIRECT, ${inFlight} in flight`,
    kind: write ? 'device-write' : 'device-read',
    sizeClass: 'fast',
    verifiable: false,
    container: !write,
    available,
    prepare: write ? undefined : async (ctx) => ({ source: await readSourcePath(ctx.workload) }),
    async run(ctx, state) {
      const block = blockMiB << 20;
      const total = Math.floor((ctx.workload.pageCount * 4096) / block) * block;
      const job = await runFio([
        `--name=${mode}`,
        `--filename=${write ? ctx.path : state.source}`,
        `--rw=${mode}`,
        `--bs=${block}`,
        `--size=${total}`,
        '--direct=1',
        '--ioengine=libaio',
        `--iodepth=${inFlight}`,
        ...(write ? ['--end_fsync=1', '--buffer_compress_percentage=0', '--refill_buffers=0'] : []),
      ]);
      const side = job[mode];
      if (side.io_bytes !== total) throw new Error(`fio moved ${side.io_bytes} bytes, expected ${total}`);
      return { bytes: total, seconds: total / side.bw_bytes };
    },
  };
}

export const fioCases = ['write', 'read'].flatMap((mode) => BLOCK_MIB.flatMap((m) => IN_FLIGHT.map((n) => fioCell(mode, n, m))));
