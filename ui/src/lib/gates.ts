// Gate sliders: raw slider values in 0..1, shown and sent renormalised to sum 1.
import type { Pin } from './api/types';

/** Clamp to 0..1 (NaN -> 0). */
export function clamp01(v: number): number {
  if (!Number.isFinite(v)) return 0;
  return Math.max(0, Math.min(1, v));
}

/**
 * Renormalises slider values so they sum to 1. A null value means "share what the others
 * leave equally" (the contract's Pin.gate null); all-zero values fall back to equal shares.
 */
export function renormalise(values: (number | null)[]): number[] {
  const n = values.length;
  if (n === 0) return [];
  const fixed = values.map((v) => (v === null ? null : clamp01(v)));
  const nulls = fixed.filter((v) => v === null).length;
  const fixedSum = fixed.reduce<number>((a, v) => a + (v ?? 0), 0);
  let filled: number[];
  if (nulls > 0) {
    const rest = Math.max(0, 1 - fixedSum) / nulls;
    filled = fixed.map((v) => (v === null ? rest : v));
  } else {
    filled = fixed as number[];
  }
  const sum = filled.reduce((a, v) => a + v, 0);
  if (sum <= 0) return filled.map(() => 1 / n);
  return filled.map((v) => v / sum);
}

export interface PinSlider {
  id: string;
  name: string;
  /** Raw slider value 0..1. */
  value: number;
}

/** The `pinned` field of a SendRequest: explicit gates summing to 1. */
export function pinsToRequest(pins: PinSlider[]): Pin[] {
  const gates = renormalise(pins.map((p) => p.value));
  return pins.map((p, i) => ({ id: p.id, gate: gates[i] }));
}
