export function median(values) {
  const s = [...values].sort((x, y) => x - y);
  const n = s.length;
  if (n === 0) return NaN;
  return n % 2 === 1 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

export const MiB = 1 << 20;
export const GiB = 1 << 30;

export function formatBytes(n) {
  if (n >= GiB && n % GiB === 0) return `${n / GiB} GiB`;
  if (n >= GiB) return `${(n / GiB).toFixed(2)} GiB`;
  return `${Math.round(n / MiB)} MiB`;
}
