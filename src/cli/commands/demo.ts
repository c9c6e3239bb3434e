/**
 * `snapstream demo`: the main job end to end on a generated, QEMU-like RAM
 * stream, in a temporary directory that is always removed.
 *
 *   1. create a qcow2 image
 *   2. generate the stream (8-byte page headers + 4 KiB pages, ~512 MiB)
 *   3. save it as an internal snapshot with createSnapshotStream(image, { snapshot })
 *   4. list it, export it and compare sha256, check the image
 *   5. write the same bytes unbuffered (writeSync per write, then fsync) and compare speeds
 */
import { type Command, InvalidArgumentError, Option } from 'commander';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { closeSync, fsyncSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable, Writable } from 'node:stream';
import { finished } from 'node:stream/promises';
import { createImage, createSnapshotStream, ErrorCode, openImage, type StreamOptions } from '../api.js';
import type { CliContext } from '../context.js';
import { type Interrupts, SIGNAL_EXIT_CODES } from '../interrupt.js';
import { sizeArg } from '../options.js';
import { createRamStream, PAGE_BYTES, type RamStream } from '../ram-stream.js';
import { formatBytes, formatRate } from '../size.js';

/** 512 MiB: big enough to show disk speed, small enough to finish in seconds here. */
const DEFAULT_DEMO_BYTES = 512 << 20;
const IMAGE_BYTES = 1 << 30;
const SNAPSHOT_NAME = 'demo';

interface DemoFlags {
  size: number;
  dir: string;
}

class DemoFailure extends Error {
  readonly code = ErrorCode.VERIFY_FAILED;
}

const say = (line: string) => process.stdout.write(`${line}\n`);
const seconds = (t0: bigint) => Number(process.hrtime.bigint() - t0) / 1e9;
const short = (hex: string) => `${hex.slice(0, 16)}…`;

function sha256Of(stream: RamStream): string {
  const hash = createHash('sha256');
  for (const chunk of stream.chunks()) hash.update(chunk);
  return hash.digest('hex');
}

/** Writes every chunk as its own write(), honouring backpressure, then waits for 'finish'. */
async function writeChunks(out: Writable, stream: RamStream): Promise<void> {
  const failed = once(out, 'error').then(([err]) => Promise.reject(err as Error));
  failed.catch(() => undefined);
  for (const chunk of stream.chunks()) {
    if (!out.write(chunk)) await Promise.race([once(out, 'drain'), failed]);
  }
  out.end();
  await finished(out);
}

async function sha256OfReadable(readable: Readable): Promise<{ hex: string; bytes: number }> {
  const hash = createHash('sha256');
  let bytes = 0;
  for await (const chunk of readable) {
    hash.update(chunk as Buffer);
    bytes += (chunk as Buffer).length;
  }
  return { hex: hash.digest('hex'), bytes };
}

/** The baseline: what a naive writer does with the same write pattern. */
function writeUnbuffered(path: string, stream: RamStream): number {
  const t0 = process.hrtime.bigint();
  const fd = openSync(path, 'w', 0o600);
  try {
    for (const chunk of stream.chunks()) writeSync(fd, chunk);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  return seconds(t0);
}

interface Saved {
  seconds: number;
  bytes: number;
  direct: boolean | undefined;
}

/** Step 3: the stream as QEMU would write it, into `createSnapshotStream(target, options)`. */
async function save(target: string, options: StreamOptions, stream: RamStream, what: string): Promise<Saved> {
  const t0 = process.hrtime.bigint();
  const out = createSnapshotStream(target, { ...options, expectedSize: stream.streamBytes });
  await writeChunks(out, stream);
  const s = seconds(t0);
  const how = out.direct === true ? 'O_DIRECT' : 'page cache';
  say(`  3. save     ${what}: ${formatBytes(out.bytesWritten)} in ${s.toFixed(2)} s = ${formatRate(out.bytesWritten / s)} (${how}, durable)`);
  return { seconds: s, bytes: out.bytesWritten, direct: out.direct };
}

/** Step 4 for qcow2: the snapshot is listed, reads back byte-exact, and the image checks clean. */
async function verifySnapshot(image: string, stream: RamStream, expectedSha: string): Promise<void> {
  const img = await openImage(image, { readOnly: true });
  try {
    const entries = img.snapshots();
    const entry = entries.find((s) => s.name === SNAPSHOT_NAME);
    if (entry === undefined) throw new DemoFailure(`snapshot '${SNAPSHOT_NAME}' is missing from the list`);
    say(`  4. list     ${entries.length} snapshot: id ${String(entry.id)} '${entry.name}', vmstate ${formatBytes(Number(entry.vmStateSize))}`);
    const exported = await sha256OfReadable(img.createVmStateReadStream(SNAPSHOT_NAME));
    if (exported.hex !== expectedSha || exported.bytes !== stream.streamBytes) {
      throw new DemoFailure(
        `exported vmstate differs: ${exported.bytes} bytes, sha256 ${exported.hex}; expected ${stream.streamBytes} bytes, ${expectedSha}`,
      );
    }
    say(`     export   ${formatBytes(exported.bytes)} read back, sha256 ${short(exported.hex)} matches`);
    const check = await img.check();
    if (Number(check.corruptions) !== 0 || Number(check.leaks) !== 0 || Number(check.checkErrors ?? 0) !== 0) {
      throw new DemoFailure(`check found ${String(check.corruptions)} corruptions and ${String(check.leaks)} leaks`);
    }
    say(`     check    no corruptions, no leaks`);
  } finally {
    await img.close();
  }
}

async function demoSteps(dir: string, pageCount: number): Promise<void> {
  const image = join(dir, 'demo.qcow2');
  say(`snapstream demo: a ${formatBytes(pageCount * PAGE_BYTES)} QEMU-like RAM stream saved as a qcow2 internal snapshot`);
  say(`  (working in ${dir}; removed at the end)`);
  let t0 = process.hrtime.bigint();
  await createImage(image, { size: IMAGE_BYTES, clusterSize: 64 << 10, version: 3, preallocation: 'off' });
  say(`  1. create   demo.qcow2: qcow2 v3, ${formatBytes(IMAGE_BYTES)} virtual, 64 KiB clusters  (${seconds(t0).toFixed(2)} s)`);
  t0 = process.hrtime.bigint();
  const stream = createRamStream(pageCount);
  const sha = sha256Of(stream);
  say(`  2. stream   ${pageCount} pages, each an 8-byte header + 4 KiB: ${formatBytes(stream.streamBytes)}, sha256 ${short(sha)}  (${seconds(t0).toFixed(2)} s)`);
  const saved = await save(image, { snapshot: SNAPSHOT_NAME }, stream, `snapshot '${SNAPSHOT_NAME}'`);
  await verifySnapshot(image, stream, sha);
  const naiveSeconds = writeUnbuffered(join(dir, 'unbuffered.raw'), stream);
  const fast = saved.bytes / saved.seconds;
  const slow = stream.streamBytes / naiveSeconds;
  say(`  5. compare  the same ${2 * pageCount + 3} writes, one writeSync each, then fsync: ${naiveSeconds.toFixed(2)} s = ${formatRate(slow)}`);
  say('');
  say(`snapstream ${formatRate(fast)}   unbuffered writeSync ${formatRate(slow)}   speed-up ${(fast / slow).toFixed(1)}x`);
}

async function runDemo(flags: DemoFlags, interrupts: Interrupts): Promise<void> {
  const pageCount = flags.size / PAGE_BYTES;
  const dir = mkdtempSync(join(flags.dir, 'snapstream-demo-'));
  // Ctrl-C must not leave half a gigabyte behind.
  const unsubscribe = interrupts.onInterrupt((signal) => {
    rmSync(dir, { recursive: true, force: true });
    process.exit(SIGNAL_EXIT_CODES[signal]);
  });
  try {
    await demoSteps(dir, pageCount);
  } finally {
    unsubscribe();
    rmSync(dir, { recursive: true, force: true });
  }
}

/** --size: whole 4 KiB pages, at least one; anything else would be silently rounded. */
function demoSizeArg(value: string): number {
  const bytes = sizeArg(value);
  if (bytes < PAGE_BYTES || bytes % PAGE_BYTES !== 0) {
    throw new InvalidArgumentError(`Expected a whole number of 4 KiB pages (a multiple of 4096, at least 4K), received '${value}'`);
  }
  return bytes;
}

export function registerDemo(program: Command, ctx: CliContext): void {
  program
    .command('demo')
    .description('save a generated QEMU-like RAM stream as a qcow2 snapshot, verify it, and compare with unbuffered writes')
    .addOption(
      new Option('--size <size>', 'RAM bytes in the generated stream, whole 4 KiB pages').argParser(demoSizeArg).default(DEFAULT_DEMO_BYTES, '512M'),
    )
    .addOption(new Option('--dir <dir>', 'where the temporary files go').default(tmpdir(), 'the system temp directory'))
    .action(async (flags: DemoFlags) => {
      await runDemo(flags, ctx.interrupts);
    });
}
