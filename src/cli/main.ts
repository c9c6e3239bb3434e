/**
 * The `snapstream` command: parsing and dispatch. Each command lives in
 * src/cli/commands/; this file only wires them up and turns outcomes into
 * exit codes (0 ok, 1 failure, 2 usage; see errors.ts).
 */
import { Command, CommanderError } from 'commander';
import { readFileSync } from 'node:fs';
import { registerBench } from './commands/bench.js';
import { registerCheck } from './commands/check.js';
import { registerCreate } from './commands/create.js';
import { registerDelete } from './commands/delete.js';
import { registerDemo } from './commands/demo.js';
import { registerExport } from './commands/export.js';
import { registerList } from './commands/list.js';
import { registerLoadVm } from './commands/loadvm.js';
import { registerRevert } from './commands/revert.js';
import { registerSave } from './commands/save.js';
import { registerSaveVm } from './commands/savevm.js';
import { registerWrite } from './commands/write.js';
import type { CliContext, Register } from './context.js';
import { ExitCode, isBrokenPipe, reportError } from './errors.js';
import { Interrupts } from './interrupt.js';

const COMMANDS: readonly Register[] = [
  registerSave,
  registerList,
  registerExport,
  registerRevert,
  registerDelete,
  registerCheck,
  registerCreate,
  registerWrite,
  registerSaveVm,
  registerLoadVm,
  registerBench,
  registerDemo,
];

/** How long the process may linger after an interrupted command before it exits regardless. */
const LINGER_AFTER_SIGNAL_MS = 1000;

const EPILOG = `
Sizes: 4096, 512K, 64M, 1G (binary units). FILE '-' is stdin or stdout.
Exit codes: 0 ok, 1 failure, 2 usage error; 130/143/129 stopped by SIGINT/SIGTERM/SIGHUP.
Run 'snapstream COMMAND --help' for a command's options.`;

function packageVersion(): string {
  try {
    const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version?: string };
    return pkg.version ?? '0.0.0';
  } catch {
    return '0.0.0';
  }
}

function buildProgram(ctx: CliContext): Command {
  const program = new Command('snapstream')
    .description('Write VM snapshots at disk speed: raw state files and crash-safe qcow2 internal snapshots.')
    .version(packageVersion(), '-V, --version')
    .addHelpText('after', EPILOG)
    .showSuggestionAfterError(true)
    .exitOverride()
    .configureOutput({
      // commander's "error: unknown option '--x'" becomes our one-line format.
      outputError: (text, write) => write(`snapstream: USAGE: ${text.replace(/^error: /, '').trimEnd()}\n`),
    });
  for (const register of COMMANDS) register(program, ctx);
  return program;
}

function commanderExit(err: CommanderError): number {
  // --help and --version exit through here with code 0.
  if (err.exitCode === 0) return ExitCode.OK;
  return ExitCode.USAGE;
}

/** Runs the command line `argv` (without node and script) and resolves with the exit code. */
export async function main(argv: readonly string[]): Promise<number> {
  const interrupts = new Interrupts();
  const uninstall = interrupts.install();
  try {
    const code = await run(argv, { exitCode: ExitCode.OK, interrupts });
    if (interrupts.exitCode === undefined) return code;
    // The work ended, done or undone, after a signal: the shell's code for that signal.
    if (code === ExitCode.OK) process.stderr.write(`snapstream: ${interrupts.received} received after the operation had completed\n`);
    // An open that blocks in the kernel (a FIFO with no reader) would keep the
    // process alive after the abort; this timer fires only in that case.
    const exitCode = interrupts.exitCode;
    setTimeout(() => process.exit(exitCode), LINGER_AFTER_SIGNAL_MS).unref();
    return exitCode;
  } finally {
    uninstall();
  }
}

async function run(argv: readonly string[], ctx: CliContext): Promise<number> {
  // A reader that goes away (`| head`) ends the job quietly, whatever was writing.
  process.stdout.on('error', (err) => {
    if (isBrokenPipe(err)) process.exit(ctx.exitCode);
  });
  const program = buildProgram(ctx);
  if (argv.length === 0) {
    program.outputHelp({ error: true });
    return ExitCode.USAGE;
  }
  try {
    await program.parseAsync(argv, { from: 'user' });
    return ctx.exitCode;
  } catch (err) {
    if (err instanceof CommanderError) return commanderExit(err);
    if (isBrokenPipe(err)) return ctx.exitCode;
    const { lines, exitCode } = reportError(err, ctx);
    process.stderr.write(`${lines.join('\n')}\n`);
    return exitCode;
  }
}
