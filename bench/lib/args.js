/** Command-line options of bench/run.js. */
import { parseArgs } from 'node:util';

export const USAGE = `usage: node bench/run.js [options]
  --quick            smoke run: 64 MiB fast / 32 MiB slow writers, 1 repetition, verify output
  --reps N           repetitions per writer, round-robin (default 5)
  --size MiB         page bytes per fast writer (default 1024)
  --slow-size MiB    page bytes per slow writer: (a), (b), (d) (default 256)
  --only a,f,g       run only these cases
  --verify           check every output file byte for byte against the stream
  --no-hot-path      skip the benny suite (bench/hot-path.js)
  --hot-path-only    run only the benny suite
  --no-vm            skip the savevm/loadvm cases (bench/vm.js: QEMU, 1 GiB guest; bench/live.js: live savevm, 1 and 4 GiB)
  --vm-only          run only the savevm/loadvm case
  --vm-reps N        repetitions of the savevm/loadvm case (default 3)
  --results DIR      where the samples and the chart go (default bench/results)`;

export function parseOptions(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean', default: false },
      reps: { type: 'string' },
      size: { type: 'string' },
      'slow-size': { type: 'string' },
      only: { type: 'string' },
      verify: { type: 'boolean', default: false },
      'no-hot-path': { type: 'boolean', default: false },
      'hot-path-only': { type: 'boolean', default: false },
      'no-vm': { type: 'boolean', default: false },
      'vm-only': { type: 'boolean', default: false },
      'vm-reps': { type: 'string' },
      results: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  const quick = values.quick;
  const int = (v, name, dflt) => {
    if (v === undefined) return dflt;
    const n = Number(v);
    if (!Number.isInteger(n) || n < 1) throw new RangeError(`Expected a positive integer for --${name}, received '${v}'`);
    return n;
  };
  return {
    help: values.help,
    quick,
    reps: int(values.reps, 'reps', quick ? 1 : 5),
    fastBytes: int(values.size, 'size', quick ? 64 : 1024) * 2 ** 20,
    slowBytes: int(values['slow-size'], 'slow-size', quick ? 32 : 256) * 2 ** 20,
    only: values.only?.split(',').map((s) => s.trim()).filter(Boolean),
    verify: values.verify || quick,
    hotPath: !values['no-hot-path'] && !values['vm-only'],
    throughput: !values['hot-path-only'] && !values['vm-only'],
    vm: !values['no-vm'] && !values['hot-path-only'] && !quick,
    vmReps: int(values['vm-reps'], 'vm-reps', 3),
    resultsDir: values.results,
  };
}
