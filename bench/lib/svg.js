/**
 * A self-contained SVG bar chart of median MiB/s per writer, one dot per
 * repetition. No dependencies, no fonts beyond the generic families.
 */
const ROW = 30;
const LEFT = 330;
const RIGHT = 150;
const WIDTH = 1000;
const TOP = 58;

function esc(s) {
  return String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

function colorOf(id) {
  if (id.startsWith('g') || id.startsWith('rd') || id.startsWith('fio')) return '#6b7280';
  if (id.startsWith('f')) return '#2563eb';
  if (id === 'e') return '#60a5fa';
  return '#f59e0b';
}

export function renderSvg(run) {
  const results = run.results;
  // The write reference; readers are drawn against the same axis.
  const g = run.references?.write?.medianMiBps;
  const max = Math.max(...results.flatMap((r) => r.samples.map((s) => s.MiBps)));
  const plot = WIDTH - LEFT - RIGHT;
  const x = (v) => LEFT + (v / max) * plot;
  const height = TOP + results.length * ROW + 40;
  const out = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${WIDTH}" height="${height}" viewBox="0 0 ${WIDTH} ${height}" font-family="sans-serif" font-size="13">`);
  out.push(`<rect width="100%" height="100%" fill="#ffffff"/>`);
  out.push(`<text x="16" y="24" font-size="16" font-weight="bold">snapstream: QEMU-like page stream (8 B header + 4 KiB page), MiB/s, median of ${esc(run.config.reps)}</text>`);
  out.push(`<text x="16" y="44" fill="#555">${esc(run.date)}  node ${esc(run.env.node)}  ${esc(run.env.cpus)} CPUs  fast writers ${esc(run.config.fastSize)}, slow writers ${esc(run.config.slowSize)}${run.config.quick ? '  (--quick)' : ''}</text>`);
  // Grid.
  const step = niceStep(max / 5);
  for (let v = 0; v <= max; v += step) {
    out.push(`<line x1="${x(v).toFixed(1)}" y1="${TOP - 6}" x2="${x(v).toFixed(1)}" y2="${TOP + results.length * ROW}" stroke="#e5e7eb"/>`);
    out.push(`<text x="${x(v).toFixed(1)}" y="${TOP + results.length * ROW + 16}" text-anchor="middle" fill="#555">${v}</text>`);
  }
  if (g !== undefined) {
    out.push(`<line x1="${x(0.9 * g).toFixed(1)}" y1="${TOP - 6}" x2="${x(0.9 * g).toFixed(1)}" y2="${TOP + results.length * ROW}" stroke="#dc2626" stroke-dasharray="4 3"/>`);
    out.push(`<text x="${x(0.9 * g).toFixed(1)}" y="${TOP + results.length * ROW + 32}" text-anchor="middle" fill="#dc2626">0.9 x write ref</text>`);
  }
  results.forEach((r, i) => {
    const y = TOP + i * ROW;
    out.push(`<text x="${LEFT - 8}" y="${y + 18}" text-anchor="end">(${esc(r.id)}) ${esc(r.label)}</text>`);
    out.push(`<rect x="${LEFT}" y="${y + 5}" width="${(x(r.medianMiBps) - LEFT).toFixed(1)}" height="${ROW - 10}" fill="${colorOf(r.id)}"/>`);
    for (const s of r.samples) {
      out.push(`<circle cx="${x(s.MiBps).toFixed(1)}" cy="${y + ROW / 2}" r="2.5" fill="#111827" fill-opacity="0.6"/>`);
    }
    const rel = g !== undefined ? `  ${(r.medianMiBps / g).toFixed(2)}x write ref` : '';
    out.push(`<text x="${(x(r.medianMiBps) + 6).toFixed(1)}" y="${y + 18}">${r.medianMiBps.toFixed(0)}${esc(rel)}</text>`);
  });
  out.push('</svg>');
  return `${out.join('\n')}\n`;
}

function niceStep(raw) {
  const p = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 5, 10]) if (m * p >= raw) return m * p;
  return 10 * p;
}
