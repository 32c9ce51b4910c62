// chart.js with only the pieces used (gate bars, loss line), registered once.
import {
  Chart,
  BarController,
  BarElement,
  CategoryScale,
  LinearScale,
  LineController,
  LineElement,
  PointElement,
  Tooltip,
} from 'chart.js';

Chart.register(BarController, BarElement, CategoryScale, LinearScale, LineController, LineElement, PointElement, Tooltip);

export { Chart };

/** Reads a CSS variable of the page (charts follow the light/dark theme). */
export function cssVar(name: string, fallback: string): string {
  if (typeof window === 'undefined') return fallback;
  const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  return v || fallback;
}

/** Fallbacks of the series colours after the accent (app.css --series-2 .. --series-8). */
const SERIES_FALLBACK = ['#e8590c', '#0ca678', '#ae3ec9', '#f59f00', '#d6336c', '#1098ad', '#74b816'];

/**
 * The theme's chart colours: accent, grid lines, tick labels, and `series`: one colour per
 * adapter of a reply, by its index in Provenance.adapters (the first is the accent), so gate
 * bars and the layer heatmap colour an adapter alike.
 */
export function chartPalette(): { accent: string; grid: string; text: string; series: string[] } {
  const accent = cssVar('--accent', '#3b5bdb');
  return {
    accent,
    grid: cssVar('--border', '#ddd'),
    text: cssVar('--muted', '#666'),
    series: [accent, ...SERIES_FALLBACK.map((c, i) => cssVar(`--series-${i + 2}`, c))],
  };
}

/** The colour of series `i` (wraps around past the last). */
export function seriesColor(series: readonly string[], i: number): string {
  return series[((i % series.length) + series.length) % series.length];
}
