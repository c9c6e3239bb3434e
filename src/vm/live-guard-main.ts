/**
 * The guard process of a live savevm (live-guard.ts): run as
 * `node live-guard-main.js PLAN_JSON`, reads steps from stdin. Exits at
 * `done`; at end of input without it, undoes what the dead savevm left.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { openImage } from '../qcow2/image.js';
import { Monitor } from './monitor.js';
import { cancelMigration } from './migration.js';
import type { GuardPlan } from './live-guard.js';

/** How long to keep trying the QMP socket: QEMU serves the next client once the dead one's socket closes. */
const RECONNECT_TIMEOUT_MS = 30_000;

async function main(): Promise<void> {
  const plan = JSON.parse(process.argv[2] ?? '{}') as GuardPlan;
  const steps = new Set<string>();
  let input = '';
  process.stdin.setEncoding('utf8');
  process.stdout.write('ready\n');
  for await (const chunk of process.stdin) {
    input += chunk as string;
    for (const line of input.split('\n').slice(0, -1)) steps.add(line.trim());
    input = input.slice(input.lastIndexOf('\n') + 1);
    if (steps.has('done')) return;
  }
  if (steps.has('done')) return;
  await cleanUp(plan, steps);
}

async function cleanUp(plan: GuardPlan, steps: ReadonlySet<string>): Promise<void> {
  const monitor = await reconnect(plan.socketPath);
  try {
    const qmp = monitor.client;
    await cancelMigration(qmp);
    if (steps.has('stopped') && !steps.has('resumed')) {
      const { status } = await qmp.execute<{ status: string }>('query-status');
      if (status !== 'running') await qmp.execute('cont');
    }
    // Killed after the commit in the state image: the snapshot is whole, keep its disk halves.
    if (steps.has('taken') && !(await committed(plan))) {
      for (const device of plan.disks) await qmp.execute('blockdev-snapshot-delete-internal-sync', { device, name: plan.name }).catch(() => undefined);
    }
    if (plan.capabilityWasOff) {
      await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'background-snapshot', state: false }] }).catch(() => undefined);
    }
  } finally {
    monitor.close();
  }
}

async function reconnect(path: string): Promise<Monitor> {
  const deadline = Date.now() + RECONNECT_TIMEOUT_MS;
  for (;;) {
    try {
      return await Monitor.connect(path, 5_000);
    } catch (err) {
      if (Date.now() > deadline) throw err;
      await sleep(100);
    }
  }
}

async function committed(plan: GuardPlan): Promise<boolean> {
  try {
    const image = await openImage(plan.stateImage, { readOnly: true, forceShare: true });
    try {
      return image.snapshots().some((s) => s.name === plan.name && s.vmStateSize > 0);
    } finally {
      await image.close();
    }
  } catch {
    return false;
  }
}

main().then(
  () => process.exit(0),
  () => process.exit(1),
);
