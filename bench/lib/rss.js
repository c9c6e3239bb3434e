/**
 * Peak RSS growth over a region. The JS thread is busy copying while a stream
 * runs, so a timer alone would miss samples; writers also call sample() at
 * natural yield points (drain, progress).
 */
const INTERVAL_MS = 5;

export function startRssSampler() {
  const baseline = process.memoryUsage.rss();
  let peak = baseline;
  const sample = () => {
    const rss = process.memoryUsage.rss();
    if (rss > peak) peak = rss;
  };
  const timer = setInterval(sample, INTERVAL_MS);
  return {
    sample,
    stop() {
      clearInterval(timer);
      sample();
      return { baselineBytes: baseline, peakBytes: peak, growthBytes: peak - baseline };
    },
  };
}
