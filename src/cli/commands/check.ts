/**
 * `snapstream check IMAGE [--json]`: consistency of a qcow2 image's metadata,
 * counted the way `qemu-img check` counts. Exit 1 when there are corruptions;
 * leaked clusters (harmless, only wasted space) are reported and exit 0.
 */
import type { Command } from 'commander';
import { type CheckResult, openImage } from '../api.js';
import type { CliContext } from '../context.js';
import { refuseNonImagePath } from '../image-path.js';
import { ExitCode } from '../errors.js';

/** JSON-safe copy: bigints become numbers when exact, decimal strings otherwise. */
export function jsonSafe(value: unknown): unknown {
  if (typeof value === 'bigint') return value <= BigInt(Number.MAX_SAFE_INTEGER) && value >= -BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : String(value);
  if (Array.isArray(value)) return value.map(jsonSafe);
  if (value !== null && typeof value === 'object' && !(value instanceof Date)) {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, jsonSafe(v)]));
  }
  return value;
}

/** The space lines: what the file holds against what the image uses. */
function spaceLines(result: CheckResult): string {
  const s = result.space;
  if (s === undefined) return '';
  const pastEnd = s.pastEndBytes > 0 ? `; ${s.pastEndBytes} bytes past the image end, unreferenced${s.pastEndDataBytes === undefined ? '' : ` (${s.pastEndDataBytes} holding data)`}` : '';
  return (
    `Space: file length ${s.fileLengthBytes} bytes, ${s.allocatedBytes} allocated on disk, image end ${result.imageEndOffset}.\n` +
    `Free clusters: ${s.freeBytes} bytes (${s.freeDataBytes} still holding data, not discarded)${pastEnd}.\n`
  );
}

function summary(image: string, result: CheckResult): string {
  return verdict(image, result) + spaceLines(result);
}

function verdict(image: string, result: CheckResult): string {
  const corruptions = Number(result.corruptions);
  const leaks = Number(result.leaks);
  const checkErrors = Number(result.checkErrors ?? 0);
  if (checkErrors > 0) return `${checkErrors} internal errors occurred during the check of ${image}.\n`;
  if (corruptions === 0 && leaks === 0) return `No errors were found on the image ${image}.\n`;
  const lines: string[] = [];
  if (corruptions > 0) lines.push(`${corruptions} errors were found on the image ${image}; data may be corrupted.`);
  if (leaks > 0) lines.push(`${leaks} leaked clusters were found on the image ${image}; this means waste of disk space, but no harm to data.`);
  return `${lines.join('\n')}\n`;
}

export function registerCheck(program: Command, ctx: CliContext): void {
  program
    .command('check')
    .description('check the metadata of a qcow2 image (like qemu-img check)')
    .argument('<IMAGE>', 'qcow2 image')
    .option('--json', 'print the result as JSON')
    .option('-U, --force-share', "read without QEMU's image lock, like qemu-img -U (the image may change meanwhile)")
    .addHelpText('after', '\nExit status: 0 clean or leaks only, 1 corruptions found or the check failed.')
    .action(async (image: string, flags: { json?: boolean; forceShare?: boolean }) => {
      ctx.image = image;
      refuseNonImagePath(image);
      const img = await openImage(image, { readOnly: true, forceShare: flags.forceShare === true });
      let result: CheckResult;
      try {
        result = await img.check();
      } finally {
        await img.close();
      }
      process.stdout.write(flags.json === true ? `${JSON.stringify(jsonSafe(result), null, 2)}\n` : summary(image, result));
      if (Number(result.corruptions) > 0 || Number(result.checkErrors ?? 0) > 0) ctx.exitCode = ExitCode.FAILURE;
    });
}
