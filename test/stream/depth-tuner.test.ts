/**
 * The depth tuner measures the stream's own writes at depth 1 and at full
 * depth and keeps the faster (src/stream/depth-tuner.ts). Which depth wins
 * depends on the disk; what must hold everywhere: it probes after the
 * warm-up, chooses by its rule (full depth only when >= 5% faster), and the
 * bytes on disk are the bytes written.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { Readable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSnapshotStream } from '../../src/index.js';
import type { DepthTuner } from '../../src/stream/depth-tuner.js';
import { STREAM_IO_THREADS } from '../../src/stream/sink.js';
import { pseudoRandom } from '../helpers/streams.js';
import { tmpDir, type TmpDir } from '../helpers/tools.js';

let dir: TmpDir;
beforeAll(async () => {
  dir = await tmpDir('tuner');
});
afterAll(async () => {
  await dir.cleanup();
});

const MiB = 1 << 20;

describe('DepthTuner', () => {
  it('probes depth 1 and full depth on the stream\'s own writes and keeps the faster, bytes intact', async () => {
    const path = join(dir.path, 'tuned.bin');
    const chunk = pseudoRandom(MiB, 42);
    const total = 96; // MiB: warm-up 8 + two 32 MiB probes, then steady
    const hash = createHash('sha256');
    for (let i = 0; i < total; i++) hash.update(chunk);
    const out = createSnapshotStream(path, { bufferSize: 4 * MiB, buffers: 4, direct: 'auto' });
    let tuner: DepthTuner | undefined;
    out.once('progress', () => {
      tuner = (out as unknown as { _ring: { tuner: DepthTuner } })._ring.tuner;
    });
    await pipeline(Readable.from((function* () { for (let i = 0; i < total; i++) yield chunk; })()), out);
    expect(tuner).toBeDefined();
    const decisions = (tuner as DepthTuner).decisions;
    expect(STREAM_IO_THREADS).toBeGreaterThan(1);
    expect(decisions).toHaveLength(1);
    const [d] = decisions as [DepthTuner['decisions'][number]];
    expect(d.shallowMiBps).toBeGreaterThan(0);
    expect(d.deepMiBps).toBeGreaterThan(0);
    expect(d.depth).toBe(d.deepMiBps > d.shallowMiBps * 1.05 ? STREAM_IO_THREADS : 1);
    expect((tuner as DepthTuner).depth).toBe(d.depth);
    expect(createHash('sha256').update(await readFile(path)).digest('hex')).toBe(hash.digest('hex'));
  });

  it('makes no decision before the warm-up and both probes are done', async () => {
    const path = join(dir.path, 'short.bin');
    const out = createSnapshotStream(path, { bufferSize: 4 * MiB, buffers: 4, direct: 'auto' });
    let tuner: DepthTuner | undefined;
    out.once('progress', () => {
      tuner = (out as unknown as { _ring: { tuner: DepthTuner } })._ring.tuner;
    });
    const chunk = pseudoRandom(MiB, 7);
    await pipeline(Readable.from((function* () { for (let i = 0; i < 40; i++) yield chunk; })()), out);
    expect(tuner?.decisions).toEqual([]); // 40 MiB < 8 + 32 + 32
  });
});
