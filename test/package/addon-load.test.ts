/**
 * How src/io/native.ts finds the addon in an installed package (issue 14):
 * build/Release when there is one, else the prebuilt binary under the name
 * scripts/prebuild.sh gives it (prebuilds/<platform>-<arch>/snapstream.napi.glibc.node),
 * else a clear error naming the platform and what to do, with no crash.
 * Each case is a package root laid out in a temp folder around the built
 * dist/io/native.js, imported by a separate node process.
 */
import { copyFile, mkdir, symlink, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run, tmpDir, type TmpDir } from '../helpers/tools.js';

const repo = resolve(import.meta.dirname, '../..');
const builtLoader = join(repo, 'dist/io/native.js');
const builtAddon = join(repo, 'build/Release/snapstream.node');
const tuple = `${process.platform}-${process.arch}`;

let dir: TmpDir;
beforeAll(async () => {
  // `npm test` builds dist/ first; `npm ci` builds both.
  for (const needed of [builtLoader, builtAddon]) {
    if (!existsSync(needed)) throw new Error(`${needed} is missing: run npm run build and node-gyp rebuild first`);
  }
  dir = await tmpDir('addon-load');
});
afterAll(async () => {
  await dir?.cleanup();
});

type Layout = { build?: 'addon'; prebuild?: 'addon' | 'garbage' };

/** A package root with dist/io/native.js and the given addon files. */
async function packageRoot(name: string, layout: Layout): Promise<string> {
  const root = join(dir.path, name);
  await mkdir(join(root, 'dist/io'), { recursive: true });
  await writeFile(join(root, 'package.json'), JSON.stringify({ name: 'snapstream', type: 'module' }));
  await symlink(join(repo, 'node_modules'), join(root, 'node_modules'));
  await copyFile(builtLoader, join(root, 'dist/io/native.js'));
  if (layout.build) {
    await mkdir(join(root, 'build/Release'), { recursive: true });
    await copyFile(builtAddon, join(root, 'build/Release/snapstream.node'));
  }
  if (layout.prebuild) {
    const target = join(root, 'prebuilds', tuple, 'snapstream.napi.glibc.node');
    await mkdir(join(target, '..'), { recursive: true });
    if (layout.prebuild === 'addon') await copyFile(builtAddon, target);
    else await writeFile(target, 'not an ELF file\n');
  }
  return root;
}

/** Imports the loader in a fresh node; prints which file the addon came from. */
async function load(root: string, env: Record<string, string> = {}) {
  const script = `
    const { addon } = await import(process.argv[1]);
    const { createRequire } = await import('node:module');
    const loaded = Object.keys(createRequire(import.meta.url).cache).filter((f) => f.endsWith('.node'));
    console.log(JSON.stringify({ nativeFile: typeof addon.NativeFile, loaded }));`;
  const { SNAPSTREAM_ADDON_PATH: _ignored, ...base } = process.env;
  return run(process.execPath, ['--input-type=module', '-e', script, pathToFileURL(join(root, 'dist/io/native.js')).href], {
    env: { ...base, ...env },
    timeoutMs: 30_000,
  });
}

describe('loading the native addon from an installed package', () => {
  it('uses the prebuilt binary when nothing was compiled', async () => {
    const root = await packageRoot('prebuild-only', { prebuild: 'addon' });
    const out = await load(root);
    expect(out.code, out.stderr).toBe(0);
    const facts = JSON.parse(out.stdout) as { nativeFile: string; loaded: string[] };
    expect(facts.nativeFile).toBe('function');
    expect(facts.loaded).toEqual([join(root, 'prebuilds', tuple, 'snapstream.napi.glibc.node')]);
  });

  it('prefers build/Release (compiled at install or in a clone) over a prebuild', async () => {
    const root = await packageRoot('build-and-broken-prebuild', { build: 'addon', prebuild: 'garbage' });
    const out = await load(root);
    expect(out.code, out.stderr).toBe(0);
    expect((JSON.parse(out.stdout) as { loaded: string[] }).loaded).toEqual([join(root, 'build/Release/snapstream.node')]);
  });

  it('fails with a clear error, not a crash, when no addon is there', async () => {
    const root = await packageRoot('nothing', {});
    const out = await load(root);
    expect(out.signal).toBeNull();
    expect(out.code).toBe(1);
    expect(out.stderr).toContain(`snapstream: the native addon could not be loaded on ${tuple}: No native build was found`);
    expect(out.stderr).toContain('C++17 compiler, make and Python 3');
    expect(out.stderr).toContain('npm rebuild snapstream');
  });

  it('names the loader error when the prebuild that matches does not load', async () => {
    const root = await packageRoot('broken-prebuild', { prebuild: 'garbage' });
    const out = await load(root);
    expect(out.signal).toBeNull();
    expect(out.code).toBe(1);
    // The reason is the dynamic loader's, naming the file it refused.
    const prebuild = join(root, 'prebuilds', tuple, 'snapstream.napi.glibc.node');
    expect(out.stderr).toContain(`snapstream: the native addon could not be loaded on ${tuple}: ${prebuild}: `);
  });

  it('SNAPSTREAM_ADDON_PATH loads exactly that file', async () => {
    const root = await packageRoot('explicit', { prebuild: 'garbage' });
    const out = await load(root, { SNAPSTREAM_ADDON_PATH: builtAddon });
    expect(out.code, out.stderr).toBe(0);
    expect((JSON.parse(out.stdout) as { loaded: string[] }).loaded).toEqual([builtAddon]);
  });
});
