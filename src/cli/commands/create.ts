/**
 * `snapstream create IMAGE SIZE`: a new qcow2 image, with qemu-img's
 * preallocation modes. With 'falloc' or 'full' the allocation can take a
 * while; progress then follows the space the file occupies on disk.
 */
import type { Command } from 'commander';
import { Option } from 'commander';
import { statSync } from 'node:fs';
import { createImage, type Preallocation } from '../api.js';
import type { CliContext } from '../context.js';
import { addQuietFlag, sizeArg } from '../options.js';
import { createProgress } from '../progress.js';
import { formatBytes } from '../size.js';

/** How often the allocated size is sampled while preallocating. */
const POLL_MS = 200;
/** QEMU's default cluster size (qcow2.txt: cluster_bits 16). */
const DEFAULT_CLUSTER_SIZE = 64 << 10;

interface CreateFlags {
  clusterSize: number;
  preallocation: Preallocation;
  compat: '0.10' | '1.1';
  quiet?: boolean;
}

function allocatedBytes(path: string): number {
  try {
    return statSync(path).blocks * 512;
  } catch {
    return 0;
  }
}

export function registerCreate(program: Command, ctx: CliContext): void {
  const cmd = program
    .command('create')
    .description('create a qcow2 image')
    .argument('<IMAGE>', 'path of the new image (must not exist)')
    .argument('<SIZE>', 'virtual disk size, e.g. 20G', sizeArg)
    .option('--cluster-size <size>', 'cluster size, a power of two from 512 to 2M', sizeArg, DEFAULT_CLUSTER_SIZE)
    .addOption(
      new Option('--preallocation <mode>', 'what to allocate up front, as in qemu-img')
        .choices(['off', 'metadata', 'falloc', 'full'])
        .default('off'),
    )
    .addOption(new Option('--compat <level>', 'qcow2 version: 1.1 (v3) or 0.10 (v2)').choices(['1.1', '0.10']).default('1.1'));
  addQuietFlag(cmd).addHelpText('after', '\nExample:\n  snapstream create disk.qcow2 20G --preallocation metadata');
  cmd.action(async (image: string, sizeBytes: number, flags: CreateFlags) => {
    ctx.image = image;
    const slow = flags.preallocation === 'falloc' || flags.preallocation === 'full';
    const progress = createProgress({ label: 'create', totalBytes: slow ? sizeBytes : undefined, quiet: flags.quiet || !slow });
    const timer = slow ? setInterval(() => progress.update(allocatedBytes(image)), POLL_MS) : undefined;
    // A signal aborts the creation; createImage then removes the file it made.
    const abort = ctx.interrupts.abortSignal();
    try {
      await createImage(image, {
        size: sizeBytes,
        clusterSize: flags.clusterSize,
        version: flags.compat === '0.10' ? 2 : 3,
        preallocation: flags.preallocation,
        signal: abort.signal,
      });
      progress.update(Math.min(sizeBytes, allocatedBytes(image)));
    } catch (err) {
      throw abort.signal.aborted ? (abort.signal.reason as Error) : err;
    } finally {
      abort.dispose();
      if (timer !== undefined) clearInterval(timer);
      progress.stop();
    }
    if (flags.quiet !== true) {
      process.stderr.write(
        `created ${image}: qcow2 v${flags.compat === '0.10' ? 2 : 3}, ${formatBytes(sizeBytes)}, cluster ${formatBytes(flags.clusterSize)}, preallocation ${flags.preallocation}\n`,
      );
    }
  });
}
