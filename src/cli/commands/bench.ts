/**
 * `snapstream bench [ARGS...]`: runs the benchmark suite (bench/run.js) with
 * the given arguments and exits with its status.
 */
import type { Command } from 'commander';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { constants } from 'node:os';
import { fileURLToPath } from 'node:url';
import type { CliContext } from '../context.js';
import { UsageError } from '../errors.js';

/** dist/cli/commands/bench.js -> the package root's bench/run.js */
const RUN_JS = fileURLToPath(new URL('../../../bench/run.js', import.meta.url));

export function registerBench(program: Command, ctx: CliContext): void {
  program
    .command('bench')
    .description('run the throughput benchmark (bench/run.js); arguments are passed on')
    .argument('[ARGS...]', "bench/run.js options, e.g. --quick; 'snapstream bench -- --help' lists them")
    .allowUnknownOption()
    .helpOption('-h, --help', 'show this help')
    .addHelpText('after', '\nExamples:\n  snapstream bench --quick\n  snapstream bench --only a,f --reps 3')
    .action(async (args: string[]) => {
      if (!existsSync(RUN_JS)) throw new UsageError('bench/run.js is not part of this installation', 'run it from a source checkout');
      ctx.exitCode = await new Promise<number>((resolve, reject) => {
        const child = spawn(process.execPath, [RUN_JS, ...args], { stdio: 'inherit' });
        child.once('error', reject);
        child.once('exit', (code, signal) => resolve(code ?? 128 + (signal === null ? 0 : constants.signals[signal])));
      });
    });
}
