/**
 * What a command hands back to the dispatcher besides throwing: its exit
 * code, and what it was working on (for hints such as `snapstream list IMAGE`).
 */
import type { Command } from 'commander';
import type { ErrorContext } from './errors.js';

export interface CliContext extends ErrorContext {
  exitCode: number;
}

export type Register = (program: Command, ctx: CliContext) => void;
