/**
 * The performance targets of DESIGN.md ("Performance targets"), checked on the
 * medians of one run. A miss is printed, never fatal: this is a benchmark.
 * Add a target here when a case for it exists.
 */
const MiB = 1 << 20;

export const TARGETS = [
  {
    name: '(f) >= 0.9 x (g)   stream vs device',
    needs: ['f', 'g'],
    measure: (m) => m.f.medianMiBps / m.g.medianMiBps,
    threshold: 0.9,
    format: (v) => `${v.toFixed(2)}x`,
  },
  {
    name: '(q) >= 0.85 x (g)  qcow2 save vs device',
    needs: ['q', 'g'],
    measure: (m) => m.q.medianMiBps / m.g.medianMiBps,
    threshold: 0.85,
    format: (v) => `${v.toFixed(2)}x`,
  },
  {
    name: '(f) >= 4 x (a)     stream vs writeSync',
    needs: ['f', 'a'],
    measure: (m) => m.f.medianMiBps / m.a.medianMiBps,
    threshold: 4,
    format: (v) => `${v.toFixed(2)}x`,
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
