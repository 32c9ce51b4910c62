// Small pure formatting helpers (tested in format.test.ts).
import type { AdapterSource } from './api/types';

/** 1536 -> "1.5 KB" (binary multiples, shown with the usual short units). */
export function humanBytes(n: number | null | undefined): string {
  if (n === null || n === undefined || !Number.isFinite(n)) return '—';
  if (n < 0) return '—';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  if (i === 0) return `${Math.round(v)} B`;
  return `${v >= 100 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
}

/** 12345 -> "12.3k", 2500000 -> "2.5M". */
export function humanCount(n: number | null | undefined): string {
  if (n === null || n === undefined || !Number.isFinite(n)) return '—';
  const a = Math.abs(n);
  if (a >= 1e9) return `${trim(n / 1e9)}B`;
  if (a >= 1e6) return `${trim(n / 1e6)}M`;
  if (a >= 1e3) return `${trim(n / 1e3)}k`;
  return String(Math.round(n));
}

function trim(v: number): string {
  return v >= 100 ? v.toFixed(0) : v.toFixed(1).replace(/\.0$/, '');
}

/** 0.4567 -> "45.7%". */
export function percent(fraction: number, digits = 1): string {
  if (!Number.isFinite(fraction)) return '—';
  return `${(fraction * 100).toFixed(digits)}%`;
}

/** decode_slowdown 0.012 -> "+1.2% decode time". */
export function slowdown(fraction: number): string {
  return `+${(fraction * 100).toFixed(1)}% decode time`;
}

/** Seconds -> "1h 02m", "3m 05s", "42s". */
export function duration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '—';
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const r = s % 60;
  if (h > 0) return `${h}h ${String(m).padStart(2, '0')}m`;
  if (m > 0) return `${m}m ${String(r).padStart(2, '0')}s`;
  return `${r}s`;
}

/** Hub: "owner/name@abc1234" (commit short, else revision); local: the path. */
export function sourceLabel(src: AdapterSource): string {
  if (src.kind === 'local') return src.path;
  const rev = src.commit ? src.commit.slice(0, 7) : src.revision;
  const sub = src.subfolder ? `/${src.subfolder}` : '';
  return `${src.repo}${sub}@${rev}`;
}

/** Ranks as "8" or "8, 16". */
export function ranksLabel(ranks: number[]): string {
  if (!ranks.length) return '—';
  return Array.from(new Set(ranks)).join(', ');
}

/** Progress fraction in 0..1 (0 when total is unknown). */
export function fraction(done: number, total: number): number {
  if (!total || total <= 0) return 0;
  return Math.max(0, Math.min(1, done / total));
}

/** ISO date -> short local date-time. */
export function shortDate(iso: string | null | undefined): string {
  if (!iso) return '';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return d.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' });
}
