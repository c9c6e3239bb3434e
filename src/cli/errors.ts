/**
 * How the command line reports failure: one line `snapstream: CODE: message`,
 * then a hint line where one helps, and an exit code.
 *
 *   0  success
 *   1  the operation failed (I/O, a locked image, a missing snapshot, ...)
 *   2  usage: unknown command or option, missing argument, bad size or value
 */
import { ErrorCode, isSnapshotError } from '../index.js';

export const ExitCode = { OK: 0, FAILURE: 1, USAGE: 2 } as const;
export type ExitCode = (typeof ExitCode)[keyof typeof ExitCode];

/** A mistake on the command line; exits 2. */
export class UsageError extends Error {
  constructor(
    message: string,
    readonly hint?: string,
  ) {
    super(message);
    this.name = 'UsageError';
  }
}

export interface Reported {
  lines: string[];
  exitCode: ExitCode;
}

/** What the failing command was working on, for hints that name it. */
export interface ErrorContext {
  image?: string;
}

/** API options that are positional arguments on the command line, not flags. */
const ARGUMENT_NAMES: Readonly<Record<string, string>> = { snapshot: 'NAME', size: 'SIZE' };

/**
 * Option names in API messages (`options.bufferSize`) as the user typed them
 * (`--buffer-size`, or the argument `NAME`), and API syntax (`{ format: 'raw' }`,
 * `format 'raw'`) in CLI words, so no message names something the CLI lacks.
 */
export function toCliWords(message: string): string {
  return message
    .replace(/options\.([a-zA-Z]+)/g, (_, name: string) => ARGUMENT_NAMES[name] ?? `--${name.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`)
    .replace(/save into it as a snapshot, or pass format 'raw' to overwrite it/, "'snapstream save IMAGE NAME' adds a snapshot to it; delete the file first to overwrite it")
    .replace(/\{ ?(\w+): ?'([^']*)' ?\}/g, "--$1 $2")
    .replace(/\{ ?(\w+) ?\}/g, '--$1');
}

/** The library's message names the holder where it can be found; the hint says what to do. */
function lockHint(message: string): string {
  if (message.includes('this process')) return 'close the other Image or stream of this image first';
  return "stop it first, or save a running VM's state to a raw volume with 'snapstream write'";
}

/** The library's TARGET_LOCKED message names the writer where /proc tells it. */
function targetLockHint(): string {
  return 'another writer has it open; wait for it to finish';
}

function hintFor(code: string, message: string, context: ErrorContext): string | undefined {
  const image = context.image ?? 'IMAGE';
  switch (code) {
    case ErrorCode.IMAGE_LOCKED:
      return lockHint(message);
    case ErrorCode.DIRECT_IO_UNSUPPORTED:
      return `this filesystem refuses O_DIRECT; try --direct=auto (uses the page cache there)`;
    case ErrorCode.SNAPSHOT_NOT_FOUND:
      return `see the snapshots with: snapstream list ${image}`;
    case ErrorCode.SNAPSHOT_EXISTS:
      return `choose another name, or remove the old one: snapstream delete ${image} NAME`;
    case ErrorCode.ENOSPC:
      return `the target is full; --expected-size SIZE --preallocate reserves the space before the first byte`;
    case ErrorCode.NOT_RAW:
      return `the target looks like a disk image; snapstream will not overwrite it as raw`;
    case ErrorCode.ABORTED:
      return 'what had begun is undone: no snapshot was added (the image and its file size are as before), and a file the command created is removed';
    case ErrorCode.SAME_FILE:
      return 'a stream cannot read its own output; copy the source elsewhere first';
    case ErrorCode.TARGET_LOCKED:
      return targetLockHint();
    case ErrorCode.SNAPSHOT_DISK_ONLY:
      return `a disk-only snapshot (qemu-img snapshot -c) has no vmstate; list them with: snapstream list ${image}`;
    case ErrorCode.QCOW2_CORRUPT:
      return `check the image with: qemu-img check ${image}`;
    default:
      return undefined;
  }
}

/** Turns anything thrown by a command into printed lines and an exit code. */
export function reportError(err: unknown, context: ErrorContext = {}): Reported {
  if (err instanceof UsageError) {
    const lines = [`snapstream: USAGE: ${err.message}`];
    if (err.hint !== undefined) lines.push(`hint: ${err.hint}`);
    return { lines, exitCode: ExitCode.USAGE };
  }
  // The API throws option mistakes synchronously as TypeError/RangeError naming the option.
  if (!isSnapshotError(err) && (err instanceof TypeError || err instanceof RangeError) && /options\.|Expected/.test(err.message)) {
    return { lines: [`snapstream: USAGE: ${toCliWords(err.message)}`], exitCode: ExitCode.USAGE };
  }
  const e = err as { code?: unknown; message?: unknown } | null;
  const code = typeof e?.code === 'string' ? e.code : ErrorCode.INTERNAL;
  const text = typeof e?.message === 'string' ? e.message.split('\n')[0]! : String(err);
  // Node's own errors already start with their code ("ENOENT: no such file ..."): say it once.
  const message = toCliWords(text.startsWith(`${code}: `) ? text.slice(code.length + 2) : text);
  const lines = [`snapstream: ${code}: ${message}`];
  const hint = hintFor(code, message, context);
  if (hint !== undefined) lines.push(`hint: ${hint}`);
  if (code === ErrorCode.INTERNAL && err instanceof Error && process.env.SNAPSTREAM_DEBUG) lines.push(String(err.stack));
  return { lines, exitCode: ExitCode.FAILURE };
}

/** EPIPE on stdout: the reader went away (`| head`). Not worth a message. */
export function isBrokenPipe(err: unknown): boolean {
  const e = err as { code?: unknown; cause?: { code?: unknown } } | null;
  return e?.code === ErrorCode.EPIPE || e?.cause?.code === ErrorCode.EPIPE;
}
