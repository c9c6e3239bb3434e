import { defineConfig } from 'vitest/config';

/**
 * Test files whose assertions depend on timing: event-loop probe latency,
 * how fast a second saver is refused by a lock, how long a save into an
 * image with 1000 snapshots takes, how soon V8's background sweep frees dead
 * ArrayBuffers (the export's memory bound). Beside other test files on two cores
 * they measure the neighbours, not the code. They run in their own project,
 * one file at a time, after every other file has finished (groupOrder), and
 * each states its margin where it asserts.
 */
const SERIAL = [
  'test/reliability/concurrency.test.ts',
  'test/reliability/concurrent-savers.test.ts',
  'test/qcow2/save-many.test.ts',
  'test/qcow2/export-memory.test.ts',
  'test/vm/live-timing.test.ts',
];

export default defineConfig({
  test: {
    // Real disks, real QEMU: generous limits.
    testTimeout: 120_000,
    hookTimeout: 120_000,
    pool: 'forks',
    // The JSON report lets .ci/run print one plain 'N passed, N failed' line.
    reporters: ['default', ['json', { outputFile: 'test-results/vitest.json' }]],
    projects: [
      {
        extends: true,
        test: {
          name: 'parallel',
          include: ['test/**/*.test.ts'],
          exclude: SERIAL,
          // Two workers for two cores.
          maxWorkers: 2,
          sequence: { groupOrder: 0 },
        },
      },
      {
        extends: true,
        test: {
          name: 'serial',
          include: SERIAL,
          maxWorkers: 1,
          fileParallelism: false,
          sequence: { groupOrder: 1 },
        },
      },
    ],
  },
});
