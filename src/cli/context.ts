/**
 * What a command hands back to the dispatcher besides throwing: its exit
 * code, and what it was working on (for hints such as `snapstream list IMAGE`).
 */
import type { Command } from 'commander';
import type { ErrorContext } from './errors.js';
import type { Interrupts } from './interrupt.js';

export interface CliContext extends ErrorContext {
  exitCode: number;
  /** SIGINT/SIGTERM/SIGHUP: commands that can undo their work subscribe here. */
  interrupts: Interrupts;
}

export type Register = (program: Command, ctx: CliContext) => void;
