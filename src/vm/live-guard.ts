/**
 * A guard for a live savevm against snapstream's own death (kill -9, OOM):
 * a small detached process that holds the read end of a pipe from us. We
 * tell it each step (`stopped`, `taken`, `resumed`); `done` dismisses it.
 * When the pipe closes without `done`, we died in the middle: it connects to
 * the QMP socket (QEMU accepts it once our connection is gone), cancels the
 * migration, resumes a VM we left stopped, deletes the disk-only snapshots
 * QEMU took, and turns background-snapshot off (live-guard-main.ts).
 *
 * The entry point is the compiled dist/vm/live-guard-main.js; where it does
 * not exist (the library run from its TypeScript sources) there is no guard.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

export interface GuardPlan {
  socketPath: string;
  name: string;
  /** QEMU's names of the disks that get the disk-only snapshot. */
  disks: string[];
  /** The state image: a snapshot committed there keeps its disk halves. */
  stateImage: string;
  /** Whether background-snapshot was off before us. */
  capabilityWasOff: boolean;
}

export type GuardStep = 'stopped' | 'taken' | 'resumed';

/** Node starts in ~0.1 s; on a loaded host give it more, then go on without waiting. */
const GUARD_READY_TIMEOUT_MS = 5_000;

const MAIN = fileURLToPath(new URL('./live-guard-main.js', import.meta.url));

export class LiveGuard {
  private readonly _child: ChildProcess | undefined;

  private constructor(child: ChildProcess | undefined) {
    this._child = child;
  }

  /**
   * Starts the guard and waits until it is up (it says `ready`), so that its
   * start-up (tens of ms of CPU) does not fall into the VM's downtime.
   */
  static async start(plan: GuardPlan): Promise<LiveGuard> {
    if (!existsSync(MAIN)) return new LiveGuard(undefined);
    // Detached, in its own session: a kill of our process group leaves it alive to clean up.
    const child = spawn(process.execPath, [MAIN, JSON.stringify(plan)], { detached: true, stdio: ['pipe', 'pipe', 'ignore'] });
    child.on('error', () => undefined);
    child.stdin?.on('error', () => undefined);
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, GUARD_READY_TIMEOUT_MS);
      const done = (): void => {
        clearTimeout(timer);
        resolve();
      };
      child.stdout?.once('data', done);
      child.once('exit', done);
    });
    child.stdout?.destroy();
    child.unref();
    return new LiveGuard(child);
  }

  get active(): boolean {
    return this._child !== undefined;
  }

  step(step: GuardStep): void {
    this._child?.stdin?.write(`${step}\n`);
  }

  /** Dismisses the guard: the savevm finished or cleaned up after itself. */
  dismiss(): void {
    this._child?.stdin?.end('done\n');
  }
}
