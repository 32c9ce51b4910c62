import { describe, it, expect } from 'vitest';
import { renormalise, pinsToRequest } from '../lib/gates';

const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);

describe('gate renormalisation', () => {
  it('scales slider values to sum 1', () => {
    expect(renormalise([1, 1])).toEqual([0.5, 0.5]);
    const g = renormalise([0.6, 0.2]);
    expect(g[0]).toBeCloseTo(0.75);
    expect(g[1]).toBeCloseTo(0.25);
    expect(renormalise([1, 0])).toEqual([1, 0]);
  });
  it('falls back to equal shares when all are zero, and handles empty', () => {
    expect(renormalise([0, 0, 0])).toEqual([1 / 3, 1 / 3, 1 / 3]);
    expect(renormalise([])).toEqual([]);
  });
  it('clamps out-of-range values', () => {
    expect(renormalise([5, -1])).toEqual([1, 0]);
    expect(renormalise([NaN, 1])).toEqual([0, 1]);
  });
  it('shares what fixed gates leave among null gates', () => {
    const g = renormalise([0.5, null, null]);
    expect(g).toEqual([0.5, 0.25, 0.25]);
    expect(sum(renormalise([0.9, 0.9, null]))).toBeCloseTo(1);
  });
  it('builds the pinned request field', () => {
    const p = pinsToRequest([
      { id: 'a', name: 'A', value: 0.3 },
      { id: 'b', name: 'B', value: 0.1 },
    ]);
    expect(p.map((x) => x.id)).toEqual(['a', 'b']);
    expect(p[0].gate).toBeCloseTo(0.75);
    expect(sum(p.map((x) => x.gate as number))).toBeCloseTo(1);
  });
});
