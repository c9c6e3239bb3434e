/**
 * A private JS build of this tree's src/ for child processes, so a child runs
 * exactly the code under test whatever state dist/ is in (others rebuild it
 * concurrently). build/ (the addon) and node_modules are shared read-only.
 */
import { symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runOk } from '../helpers/tools.js';

export const REPO = fileURLToPath(new URL('../..', import.meta.url));

/** Compiles src/ into `<into>/dist` and returns that directory. */
export async function privateBuild(into: string): Promise<string> {
  const dist = join(into, 'dist');
  await runOk('node', [join(REPO, 'node_modules/typescript/bin/tsc'), '-p', join(REPO, 'tsconfig.build.json'), '--outDir', dist], {
    timeoutMs: 120_000,
    okCodes: [0, 1, 2], // a type error elsewhere in src/ still emits JS
  });
  await symlink(join(REPO, 'build'), join(into, 'build'));
  await symlink(join(REPO, 'node_modules'), join(into, 'node_modules'));
  return dist;
}
