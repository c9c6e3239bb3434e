/**
 * The performance targets of DESIGN.md ("Performance targets"), checked on one
 * run against the device references of that run (bench/run.js references():
 * writeRef, the best device-write cell; readRef, the best device-read cell).
 * A miss is printed, never fatal: this is a benchmark. The hot-path target
 * (within 1.2x a bare Writable) is checked by bench/hot-path.js.
 */
const MiB = 1 << 20;
const slowest = (r) => Math.min(...r.samples.map((s) => s.MiBps));
const times = (v) => `${v.toFixed(2)}x`;

export const TARGETS = [
  {
    name: '(f) median >= 0.9 x device write reference',
    needs: ['f', 'writeRef'],
    measure: (m) => ({ value: m.f.medianMiBps / m.writeRef.medianMiBps, detail: `ref (${m.writeRef.id})` }),
    threshold: 0.9,
    format: times,
  },
  {
    name: '(f) slowest >= 0.75 x device write reference',
    needs: ['f', 'writeRef'],
    measure: (m) => slowest(m.f) / m.writeRef.medianMiBps,
    threshold: 0.75,
    format: times,
  },
  {
    name: '(q) median >= 0.85 x device write reference (qcow2 save, commit included)',
    needs: ['q', 'writeRef'],
    measure: (m) => m.q.medianMiBps / m.writeRef.medianMiBps,
    threshold: 0.85,
    format: times,
  },
  {
    name: '(x) median >= 0.9 x device read reference (export)',
    needs: ['x', 'readRef'],
    measure: (m) => ({ value: m.x.medianMiBps / m.readRef.medianMiBps, detail: `ref (${m.readRef.id})` }),
    threshold: 0.9,
    format: times,
  },
  {
    name: '(f) >= 4 x (a)     stream vs writeSync',
    needs: ['f', 'a'],
    measure: (m) => m.f.medianMiBps / m.a.medianMiBps,
    threshold: 4,
    format: times,
  },
  {
    name: '(f) RSS growth <= buffers x bufferSize + 32 MiB',
    // Measured in a fresh process over a 4 GiB stream (bench/rss-probe.js).
    needs: ['rssProbe'],
    // Expressed as headroom under the bound, so that "value >= threshold" passes.
    measure: (m) => {
      const p = m.rssProbe;
      const bound = p.ringBytes + 32 * MiB;
      return {
        value: bound - p.growthBytes,
        detail: `peak growth ${(p.growthBytes / MiB).toFixed(1)} MiB, bound ${(bound / MiB).toFixed(0)} MiB, ${(p.streamBytes / 2 ** 30).toFixed(2)} GiB stream`,
      };
    },
    threshold: 0,
    format: (v) => `${(v / MiB).toFixed(1)} MiB headroom`,
  },
];
