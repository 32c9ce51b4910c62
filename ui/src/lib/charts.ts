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

/** The theme's chart colours: series (accent), grid lines and tick labels. */
export function chartPalette(): { accent: string; grid: string; text: string } {
  return {
    accent: cssVar('--accent', '#3b5bdb'),
    grid: cssVar('--border', '#ddd'),
    text: cssVar('--muted', '#666'),
  };
}
