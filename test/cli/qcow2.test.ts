/**
 * The qcow2 commands through the real bin, checked against qemu-img and an
 * independent qcow2 reader (test/helpers/qcow2-vmstate.ts), not against
 * snapstream's own reader alone.
 */
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readSnapshotVmState } from '../helpers/qcow2-vmstate.js';
import { killAllVms, withPausedVm } from '../helpers/qemu.js';
import { pseudoRandom } from '../helpers/streams.js';
import { qemuImg, requireTool, tmpDir, type TmpDir } from '../helpers/tools.js';
import { errLines, runBin, runShell } from './bin-harness.js';

const sha256 = (data: Uint8Array) => createHash('sha256').update(data).digest('hex');
const skip = requireTool('qemu-img', 'qemu-io', 'qemu-system-x86_64');

/** Odd on purpose: the last vmstate cluster is partial. */
const VMSTATE_BYTES = 3 * 2 ** 20 + 777;

describe.skipIf(skip !== undefined)('snapstream qcow2 commands', () => {
  let dir: TmpDir;
  let image: string;
  let state: Buffer;
  let statePath: string;
  const piped = pseudoRandom(2 * 2 ** 20 + 5, 99);

  beforeAll(async () => {
    dir = await tmpDir('cli-qcow2');
    image = join(dir.path, 'disk.qcow2');
    state = pseudoRandom(VMSTATE_BYTES, 42);
    statePath = join(dir.path, 'state.bin');
    writeFileSync(statePath, state);
  });
  afterAll(async () => {
    await killAllVms();
    await dir.cleanup();
  });

  it('create makes an image qemu-img reads as asked', async () => {
    const r = await runBin(['create', image, '64M', '--cluster-size', '64K']);
    expect(r.code, r.stderr).toBe(0);
    const info = await qemuImg.info(image);
    expect(info.format).toBe('qcow2');
    expect(info['virtual-size']).toBe(64 * 2 ** 20);
    expect(info['cluster-size']).toBe(65536);
    expect(info['format-specific']?.data.compat).toBe('1.1');
  });

  it('create honours --compat 0.10, --preallocation and --cluster-size', async () => {
    const v2 = join(dir.path, 'v2.qcow2');
    const r = await runBin(['create', v2, '32M', '--compat', '0.10', '--preallocation', 'metadata', '--cluster-size', '128K', '-q']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe('');
    const info = await qemuImg.info(v2);
    expect(info['format-specific']?.data.compat).toBe('0.10');
    expect(info['cluster-size']).toBe(131072);
    expect((await qemuImg.check(v2)).exitCode).toBe(0);
  });

  it('save stores a vmstate file as a snapshot that qemu-img lists and the bytes match', async () => {
    const r = await runBin(['save', image, 'snap1', statePath]);
    expect(r.code, r.stderr).toBe(0);
    const list = await qemuImg.snapshotList(image);
    expect(list.map((s) => [s.name, s.vmStateSize])).toEqual([['snap1', VMSTATE_BYTES]]);
    expect(sha256(await readSnapshotVmState(image, 'snap1'))).toBe(sha256(state));
  });

  it('save reads stdin at the end of a pipe', async () => {
    const r = await runBin(['save', image, 'snap2', '-'], { input: piped });
    expect(r.code, r.stderr).toBe(0);
    expect(sha256(await readSnapshotVmState(image, 'snap2'))).toBe(sha256(piped));
  });

  it('list --json agrees with qemu-img info --output=json', async () => {
    const r = await runBin(['list', image, '--json']);
    expect(r.code, r.stderr).toBe(0);
    const ours = JSON.parse(r.stdout.toString()) as Array<Record<string, unknown>>;
    const info = await qemuImg.info(image);
    const theirs = info.snapshots ?? [];
    expect(ours).toHaveLength(theirs.length);
    ours.forEach((s, i) => {
      const q = theirs[i]!;
      expect(s.id).toBe(q.id);
      expect(s.name).toBe(q.name);
      expect(s.vmStateSize).toBe(q['vm-state-size']);
      expect(s.dateSec).toBe(q['date-sec']);
      expect(s.dateNsec).toBe(q['date-nsec']);
      expect(s.vmClockNs).toBe(String(BigInt(q['vm-clock-sec']) * 1_000_000_000n + BigInt(q['vm-clock-nsec'])));
      expect(s.diskSize).toBe(info['virtual-size']);
    });
  });

  it('list prints a table with every snapshot', async () => {
    const r = await runBin(['list', image]);
    expect(r.code).toBe(0);
    const lines = r.stdout.toString().trim().split('\n');
    expect(lines[0]).toMatch(/^ID\s+TAG\s+VM SIZE\s+DATE \(UTC\)\s+VM CLOCK$/);
    expect(lines.slice(1).map((l) => l.split(/\s+/)[1])).toEqual(['snap1', 'snap2']);
  });

  it('check --json agrees with qemu-img check --output=json', async () => {
    const r = await runBin(['check', image, '--json']);
    expect(r.code, r.stderr).toBe(0);
    const ours = JSON.parse(r.stdout.toString()) as Record<string, number>;
    const theirs = await qemuImg.check(image);
    expect(theirs.exitCode).toBe(0);
    expect(ours.corruptions).toBe(theirs.corruptions ?? 0);
    expect(ours.leaks).toBe(theirs.leaks ?? 0);
    expect(ours.checkErrors).toBe(theirs['check-errors']);
    expect(ours.imageEndOffset).toBe(theirs['image-end-offset']);
    expect(ours.totalClusters).toBe(theirs['total-clusters']);
    const plain = await runBin(['check', image]);
    const [verdict, ...space] = plain.stdout.toString().split('\n');
    expect(verdict).toBe(`No errors were found on the image ${image}.`);
    // Then the space report (docs/space.md), its image end as qemu-img's.
    expect(space[0]).toMatch(new RegExp(`^Space: file length \\d+ bytes, \\d+ allocated on disk, image end ${theirs['image-end-offset']}\\.$`));
    expect(space[1]).toMatch(/^Free clusters: \d+ bytes \(0 still holding data, not discarded\)/);
  });

  it('export to stdout carries only the vmstate: piped into a hash, it matches', async () => {
    const r = await runShell(`$SNAPSTREAM export '${image}' snap1 - | sha256sum`);
    expect(r.code, r.stderr).toBe(0);
    // The summary goes to stderr; stdout is the data alone.
    expect(errLines(r)).toHaveLength(1);
    expect(errLines(r)[0]).toMatch(/^exported snapshot 'snap1' \(id 1\) of .*: [\d.]+ [KM]iB to stdout \(/);
    expect(r.stdout.toString().split(' ')[0]).toBe(sha256(state));
  });

  it('export to a file writes the exact vmstate', async () => {
    const out = join(dir.path, 'exported.bin');
    const r = await runBin(['export', image, 'snap2', out]);
    expect(r.code, r.stderr).toBe(0);
    expect(sha256(readFileSync(out))).toBe(sha256(piped));
  });

  it('export into a reader that stops early (| head) exits quietly', async () => {
    const r = await runShell(`$SNAPSTREAM export '${image}' snap1 - | head -c 100 > /dev/null; echo "status=\${PIPESTATUS[0]}" >&2`);
    expect(r.stderr.trim()).toBe('status=0');
  });

  it('an unknown snapshot is SNAPSHOT_NOT_FOUND with a hint to list, exit 1', async () => {
    const r = await runBin(['export', image, 'nope', '-'], {});
    expect(r.code).toBe(1);
    expect(r.stdout.length).toBe(0);
    const lines = errLines(r);
    expect(lines[0]).toMatch(/^snapstream: SNAPSHOT_NOT_FOUND: .*nope/);
    expect(lines[1]).toBe(`hint: see the snapshots with: snapstream list ${image}`);
  });

  it('saving an existing name is SNAPSHOT_EXISTS, exit 1, and the image stays clean', async () => {
    const r = await runBin(['save', image, 'snap1', statePath]);
    expect(r.code).toBe(1);
    expect(errLines(r)[0]).toMatch(/^snapstream: SNAPSHOT_EXISTS: /);
    expect((await qemuImg.check(image)).exitCode).toBe(0);
  });

  it('delete removes a snapshot and names its id and name; deleting it again fails with exit 1', async () => {
    const byId = await runBin(['delete', image, '2']);
    expect(byId.code).toBe(1);
    expect(errLines(byId)[0]).toMatch(/^snapstream: SNAPSHOT_NOT_FOUND: no snapshot named '2'; snapshot id 2 is named 'snap2'/);
    const r = await runBin(['delete', image, 'snap2']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe(`deleted snapshot 2 'snap2' from ${image}\n`);
    expect((await qemuImg.snapshotList(image)).map((s) => s.name)).toEqual(['snap1']);
    expect((await qemuImg.check(image)).exitCode).toBe(0);
    const again = await runBin(['delete', image, 'snap2']);
    expect(again.code).toBe(1);
    expect(errLines(again)[0]).toMatch(/^snapstream: SNAPSHOT_NOT_FOUND: /);
  });

  it('a missing image is one ENOENT line, exit 1', async () => {
    const missing = join(dir.path, 'missing.qcow2');
    const r = await runBin(['list', missing]);
    expect(r.code).toBe(1);
    expect(errLines(r)).toHaveLength(1);
    expect(errLines(r)[0]).toMatch(/^snapstream: ENOENT: .*missing\.qcow2/);
  });

  it('an image held by a running QEMU is IMAGE_LOCKED, naming QEMU; -U still lists and exports it', async () => {
    await withPausedVm({ ramMiB: 16, image }, async () => {
      const r = await runBin(['save', image, 'while-running', statePath]);
      expect(r.code).toBe(1);
      const lines = errLines(r);
      expect(lines[0]).toMatch(/^snapstream: IMAGE_LOCKED: image '.+' is locked: process \d+ \(qemu-system-x86, a running QEMU\)/);
      expect(lines[1]).toMatch(/^hint: stop it first/);
      const list = await runBin(['list', image, '-U', '--json']);
      expect(list.code, list.stderr).toBe(0);
      // export -U reads a snapshot of an image the running VM holds, as qemu-img -U reads it.
      expect((await runBin(['export', image, 'snap1', '-'])).code).toBe(1);
      const exported = await runBin(['export', '-U', image, 'snap1', '-']);
      expect(exported.code, exported.stderr).toBe(0);
      expect(sha256(exported.stdout)).toBe(sha256(state));
      expect((JSON.parse(list.stdout.toString()) as Array<{ name: string }>).map((s) => s.name)).toEqual(['snap1']);
    });
    expect((await qemuImg.snapshotList(image)).map((s) => s.name)).toEqual(['snap1']);
  });
});
