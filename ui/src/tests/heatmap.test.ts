import { describe, it, expect, afterEach, vi } from 'vitest';
import { flushSync, mount, unmount } from 'svelte';
import GateHeatmap from '../components/GateHeatmap.svelte';
import RoutingPanel from '../components/RoutingPanel.svelte';
import type { LayerGates, Provenance } from '../lib/api';
import { argmax } from '../lib/layerGates';
import { layerGatesFixture, routerProvenance, servedFixture } from './fixtures.layerGates';

let target: HTMLElement;
let app: ReturnType<typeof mount> | null = null;

function render(layerGates: unknown, adapters = servedFixture()): HTMLElement {
  target = document.createElement('div');
  document.body.appendChild(target);
  app = mount(GateHeatmap, { target, props: { layerGates: layerGates as LayerGates | null, adapters } });
  flushSync();
  return target;
}

function renderPanel(provenance: Provenance): HTMLElement {
  target = document.createElement('div');
  document.body.appendChild(target);
  app = mount(RoutingPanel, { target, props: { provenance } });
  flushSync();
  return target;
}

afterEach(() => {
  if (app) unmount(app);
  app = null;
  target?.remove();
});

const cells = (root: HTMLElement) => [...root.querySelectorAll<HTMLElement>('[data-testid="heatmap-cell"]')];
const cell = (root: HTMLElement, l: number, t: number) =>
  root.querySelector<HTMLElement>(`[data-testid="heatmap-cell"][data-layer="${l}"][data-token="${t}"]`)!;
const adapterButton = (root: HTMLElement, id: string) =>
  root.querySelector<HTMLButtonElement>(`[data-testid="heatmap-adapter"][data-adapter="${id}"]`)!;

/** Every cell's data-gate equals the fixture's gate of adapter column `j`. */
function expectGatesOf(root: HTMLElement, lg: LayerGates, j: number) {
  for (let l = 0; l < lg.layers; l++) {
    for (let t = 0; t < lg.tokens.length; t++) {
      const c = cell(root, l, t);
      expect(Number(c.dataset.gate), `layer ${l} token ${t}`).toBe(lg.gates[l][t][j]);
      expect(c.dataset.adapter).toBe(lg.adapters[j]);
    }
  }
}

describe('GateHeatmap', () => {
  it('renders one cell per layer and token column, with the test hooks', () => {
    const lg = layerGatesFixture();
    const root = render(lg);
    const hm = root.querySelector<HTMLElement>('[data-testid="gate-heatmap"]')!;
    expect(hm).not.toBeNull();
    expect(hm.dataset.layers).toBe('4');
    expect(hm.dataset.tokens).toBe('5');
    expect(cells(root)).toHaveLength(lg.layers * lg.tokens.length);
    expect(root.querySelector('[role="img"]')!.getAttribute('aria-label')).toMatch(/4 layers by 5 token columns/);
    const buttons = [...root.querySelectorAll<HTMLElement>('[data-testid="heatmap-adapter"]')];
    expect(buttons.map((b) => b.dataset.adapter)).toEqual(lg.adapters);
    // Token labels: the prompt column named, the full text in a tooltip.
    const labels = [...root.querySelectorAll<HTMLElement>('.tok')];
    expect(labels.map((e) => e.textContent)).toEqual(['prompt', 'Bon', 'jour', '·le', 'ing·the']);
    expect(labels[4].title).toBe('token column 4: “ing the”');
    // Cell tooltip: layer, token and all adapters' gates.
    expect(cell(root, 2, 1).title).toBe('layer 2 · token column 1: “Bon”\nSQL writer: 70.0%\nPoetry: 20.0%\nMath tutor: 10.0%');
  });

  it('shows the adapter with the highest mean gate first, and switching adapter changes the cells', () => {
    const lg = layerGatesFixture();
    const root = render(lg);
    // servedFixture: poetry-lora has the highest mean gate (0.45).
    expect(adapterButton(root, 'poetry-lora').getAttribute('aria-pressed')).toBe('true');
    expect(adapterButton(root, 'sql-lora').getAttribute('aria-pressed')).toBe('false');
    expectGatesOf(root, lg, 1);

    adapterButton(root, 'math-lora').click();
    flushSync();
    expect(adapterButton(root, 'math-lora').getAttribute('aria-pressed')).toBe('true');
    expect(adapterButton(root, 'poetry-lora').getAttribute('aria-pressed')).toBe('false');
    expect(root.querySelector<HTMLElement>('[data-testid="gate-heatmap"]')!.dataset.adapter).toBe('math-lora');
    expectGatesOf(root, lg, 2);
    expect(cell(root, 0, 3).dataset.gate).toBe('0.8');

    adapterButton(root, 'sql-lora').click();
    flushSync();
    expectGatesOf(root, lg, 0);
  });

  it('dominant mode takes each cell from its argmax adapter', () => {
    const lg = layerGatesFixture();
    const root = render(lg);
    const dom = root.querySelector<HTMLButtonElement>('[data-testid="heatmap-dominant"]')!;
    expect(dom.getAttribute('aria-pressed')).toBe('false');
    dom.click();
    flushSync();
    expect(dom.getAttribute('aria-pressed')).toBe('true');
    expect([...root.querySelectorAll('[data-testid="heatmap-adapter"]')].every((b) => b.getAttribute('aria-pressed') === 'false')).toBe(true);
    expect(root.querySelector<HTMLElement>('[data-testid="gate-heatmap"]')!.dataset.mode).toBe('dominant');
    const seen = new Set<string>();
    for (let l = 0; l < lg.layers; l++) {
      for (let t = 0; t < lg.tokens.length; t++) {
        const j = argmax(lg.gates[l][t]);
        const c = cell(root, l, t);
        expect(c.dataset.adapter).toBe(lg.adapters[j]);
        expect(Number(c.dataset.gate)).toBe(Math.max(...lg.gates[l][t]));
        seen.add(c.dataset.adapter!);
      }
    }
    expect(seen.size).toBe(3);
    // Picking an adapter leaves dominant mode.
    adapterButton(root, 'sql-lora').click();
    flushSync();
    expect(dom.getAttribute('aria-pressed')).toBe('false');
    expectGatesOf(root, lg, 0);
  });

  it('colours an adapter as its gate bar (series by the reply index) with the gate as opacity', () => {
    const root = render(layerGatesFixture());
    const c = cell(root, 0, 3);
    // poetry-lora is the reply's second adapter: the second series colour (app.css --series-2 fallback).
    expect(c.style.getPropertyValue('--c')).toBe('#e8590c');
    expect(c.style.getPropertyValue('--g')).toBe('0.1');
  });

  it('renders nothing for null layer_gates', () => {
    const root = render(null);
    expect(root.querySelector('[data-testid="gate-heatmap"]')).toBeNull();
    expect(root.querySelector('[data-testid="gate-heatmap-unavailable"]')).toBeNull();
    expect(root.textContent!.trim()).toBe('');
  });

  it('shows "gate data unavailable" instead of crashing on malformed data', () => {
    const ragged = layerGatesFixture();
    ragged.gates[1].pop();
    const wrongCount = layerGatesFixture();
    wrongCount.gates[2][2] = [0.5, 0.5];
    const nonFinite = layerGatesFixture();
    nonFinite.gates[0][1][0] = NaN;
    const otherAdapters = { ...layerGatesFixture(), adapters: ['x', 'y', 'z'] };
    for (const bad of [ragged, wrongCount, nonFinite, otherAdapters, { layers: [[0.5, 0.5]] }, 'nope', [], 42]) {
      const root = render(bad);
      expect(root.querySelector('[data-testid="gate-heatmap"]')).toBeNull();
      const note = root.querySelector<HTMLElement>('[data-testid="gate-heatmap-unavailable"]');
      expect(note?.textContent).toMatch(/gate data unavailable/);
      expect(note?.title.length).toBeGreaterThan(0);
      unmount(app!);
      app = null;
      target.remove();
    }
  });
});

describe('RoutingPanel with layer gates', () => {
  // The gate chart (chart.js) asks for a canvas context, which jsdom lacks: give none, quietly
  // (chart.js then logs that it cannot create the chart).
  const quiet = () => {
    const ctx = vi.spyOn(HTMLCanvasElement.prototype, 'getContext').mockReturnValue(null);
    const log = vi.spyOn(console, 'error').mockImplementation(() => {});
    return { mockRestore: () => (ctx.mockRestore(), log.mockRestore()) };
  };

  it('shows the heatmap below the gate bars for plan router, in the bars colours, and hides it on demand', () => {
    const spy = quiet();
    const root = renderPanel(routerProvenance());
    spy.mockRestore();
    expect(root.querySelector('[data-testid="routing-panel"]')!.getAttribute('data-plan')).toBe('router');
    expect(root.querySelectorAll('[data-testid="gate-row"]')).toHaveLength(3);
    expect(root.querySelector('[data-testid="gate-heatmap"]')).not.toBeNull();
    const fills = [...root.querySelectorAll<HTMLElement>('[data-testid="gate-row"] .fill')];
    const swatches = [...root.querySelectorAll<HTMLElement>('[data-testid="heatmap-adapter"] .swatch')];
    expect(fills.map((f) => f.style.backgroundColor)).toEqual(swatches.map((s) => s.style.backgroundColor));
    const toggle = root.querySelector<HTMLButtonElement>('[data-testid="heatmap-toggle"]')!;
    expect(toggle.getAttribute('aria-expanded')).toBe('true');
    toggle.click();
    flushSync();
    expect(root.querySelector('[data-testid="gate-heatmap"]')).toBeNull();
    expect(toggle.getAttribute('aria-expanded')).toBe('false');
  });

  it('shows nothing new for other plans (layer_gates null)', () => {
    const spy = quiet();
    const root = renderPanel({ ...routerProvenance(null), plan: 'mixture' });
    spy.mockRestore();
    expect(root.querySelectorAll('[data-testid="gate-row"]')).toHaveLength(3);
    expect(root.querySelector('[data-testid="gate-heatmap"]')).toBeNull();
    expect(root.querySelector('[data-testid="heatmap-toggle"]')).toBeNull();
    expect(root.querySelector('[data-testid="gate-heatmap-unavailable"]')).toBeNull();
  });

  it('keeps the panel and shows the note for malformed layer_gates', () => {
    const spy = quiet();
    const root = renderPanel(routerProvenance({ adapters: ['sql-lora'], layers: 1, tokens: ['<prompt>'], gates: [[[Infinity]]] }));
    spy.mockRestore();
    expect(root.querySelectorAll('[data-testid="gate-row"]')).toHaveLength(3);
    expect(root.querySelector('[data-testid="gate-heatmap-unavailable"]')).not.toBeNull();
  });
});
