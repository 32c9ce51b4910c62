// The router's per-layer, per-token gates (Provenance.layer_gates, plan `router`): shape checks
// and the small pure helpers the heatmap (GateHeatmap.svelte) is drawn from.
import type { LayerGates } from './api/types';

/** The contract's cap on token columns (the prompt column included). */
export const MAX_TOKEN_COLUMNS = 32;
/** The label of the first column: the mean over all prompt tokens. */
export const PROMPT_TOKEN = '<prompt>';
/** Gates are rounded to 3 decimals: allow that much outside 0..1. */
const SLACK = 1e-3;

export type LayerGatesCheck = { ok: true; value: LayerGates } | { ok: false; reason: string };

const isStringArray = (v: unknown): v is string[] => Array.isArray(v) && v.every((x) => typeof x === 'string');

/**
 * Checks that `v` has the LayerGates shape: unique adapter ids, 1..32 token labels,
 * `layers` = gates.length >= 1, gates[layer][token][adapter] not ragged, every gate a finite
 * number in 0..1. With `adapterIds` (the reply's Provenance.adapters ids), the gate columns must
 * be the same adapters. Never throws.
 */
export function checkLayerGates(v: unknown, adapterIds?: readonly string[]): LayerGatesCheck {
  const bad = (reason: string): LayerGatesCheck => ({ ok: false, reason });
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return bad('not an object');
  const o = v as Record<string, unknown>;
  const { adapters, layers, tokens, gates } = o;
  if (!isStringArray(adapters) || adapters.length === 0) return bad('adapters is not a non-empty list of ids');
  if (new Set(adapters).size !== adapters.length) return bad('adapters has duplicate ids');
  if (adapterIds) {
    const known = new Set(adapterIds);
    if (adapters.length !== known.size || !adapters.every((id) => known.has(id))) {
      return bad(`adapters [${adapters.join(', ')}] are not the reply's adapters [${adapterIds.join(', ')}]`);
    }
  }
  if (!isStringArray(tokens) || tokens.length === 0) return bad('tokens is not a non-empty list of labels');
  if (tokens.length > MAX_TOKEN_COLUMNS) return bad(`${tokens.length} token columns (at most ${MAX_TOKEN_COLUMNS})`);
  if (!Array.isArray(gates) || gates.length === 0) return bad('gates is not a non-empty list of layers');
  if (typeof layers !== 'number' || !Number.isInteger(layers) || layers !== gates.length) {
    return bad(`layers (${String(layers)}) is not the number of gate rows (${gates.length})`);
  }
  for (let l = 0; l < gates.length; l++) {
    const row: unknown = gates[l];
    if (!Array.isArray(row) || row.length !== tokens.length) return bad(`layer ${l}: not ${tokens.length} token columns`);
    for (let t = 0; t < row.length; t++) {
      const cell: unknown = row[t];
      if (!Array.isArray(cell) || cell.length !== adapters.length) return bad(`layer ${l}, token ${t}: not ${adapters.length} gates`);
      for (const g of cell) {
        if (typeof g !== 'number' || !Number.isFinite(g) || g < -SLACK || g > 1 + SLACK) {
          return bad(`layer ${l}, token ${t}: gate ${String(g)} is not a number in 0..1`);
        }
      }
    }
  }
  return { ok: true, value: { adapters, layers, tokens, gates: gates as number[][][] } };
}

/** Index of the largest gate (the first on ties; -1 for an empty list). */
export function argmax(xs: readonly number[]): number {
  let best = -1;
  for (let i = 0; i < xs.length; i++) if (best < 0 || xs[i] > xs[best]) best = i;
  return best;
}

/** Each adapter's mean gate over all layers and token columns. */
export function meanGates(lg: LayerGates): number[] {
  const sums = lg.adapters.map(() => 0);
  let n = 0;
  for (const row of lg.gates) {
    for (const cell of row) {
      cell.forEach((g, j) => (sums[j] += g));
      n += 1;
    }
  }
  return sums.map((s) => (n ? s / n : 0));
}

/**
 * The adapter shown first: the one with the highest mean gate. `means` are the reply's mean
 * gates by id (Provenance.adapters[].gate); missing ones are computed from the grid.
 */
export function defaultAdapter(lg: LayerGates, means: ReadonlyMap<string, number> = new Map()): string {
  const grid = meanGates(lg);
  const m = lg.adapters.map((id, j) => means.get(id) ?? grid[j]);
  return lg.adapters[Math.max(0, argmax(m))];
}

/** A token column's label as shown: whitespace made visible, the prompt column named. */
export function tokenLabel(token: string, column: number): string {
  if (column === 0 && token === PROMPT_TOKEN) return 'prompt';
  const shown = token.replace(/\r?\n/g, '↵').replace(/\t/g, '⇥').replace(/ /g, '·');
  return shown || '∅';
}

/** A token column described in a tooltip. */
export function tokenTitle(token: string, column: number): string {
  if (column === 0 && token === PROMPT_TOKEN) return 'prompt (mean over all prompt tokens)';
  return `token column ${column}: “${token.replace(/\r?\n/g, '\\n')}”`;
}
