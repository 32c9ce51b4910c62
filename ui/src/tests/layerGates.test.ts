import { describe, it, expect } from 'vitest';
import { argmax, checkLayerGates, defaultAdapter, meanGates, tokenLabel, tokenTitle, MAX_TOKEN_COLUMNS } from '../lib/layerGates';
import { layerGatesFixture } from './fixtures.layerGates';

const IDS = ['sql-lora', 'poetry-lora', 'math-lora'];

/** The fixture with one change. */
function withFixture(change: (o: Record<string, unknown>) => void): unknown {
  const o = structuredClone(layerGatesFixture()) as unknown as Record<string, unknown>;
  change(o);
  return o;
}
const gatesOf = (o: Record<string, unknown>) => o.gates as unknown[][][];

describe('checkLayerGates', () => {
  it('accepts the contract shape, with and without the reply adapter ids', () => {
    const lg = layerGatesFixture();
    expect(checkLayerGates(lg)).toEqual({ ok: true, value: lg });
    expect(checkLayerGates(lg, IDS).ok).toBe(true);
    // The reply may list its adapters in another order than the gate columns.
    expect(checkLayerGates(lg, [...IDS].reverse()).ok).toBe(true);
  });

  it('refuses what is not an object', () => {
    for (const v of [null, undefined, 3, 'x', [], [[0.5, 0.5]]]) expect(checkLayerGates(v).ok).toBe(false);
    // The catalog test's old placeholder shape.
    expect(checkLayerGates({ layers: [[0.5, 0.5]] }).ok).toBe(false);
  });

  it('refuses ragged arrays', () => {
    const cases = [
      withFixture((o) => gatesOf(o)[2].pop()),
      withFixture((o) => gatesOf(o)[1][3].push(0.1)),
      withFixture((o) => (gatesOf(o)[0][0] = 0.5 as never)),
      withFixture((o) => (gatesOf(o)[3] = 'row' as never)),
      withFixture((o) => gatesOf(o).push(gatesOf(o)[0])),
    ];
    for (const c of cases) {
      const r = checkLayerGates(c);
      expect(r.ok).toBe(false);
    }
  });

  it('refuses a wrong adapter count or other adapters than the reply', () => {
    const fewer = withFixture((o) => (o.adapters as string[]).pop());
    expect(checkLayerGates(fewer)).toMatchObject({ ok: false, reason: expect.stringContaining('not 2 gates') });
    expect(checkLayerGates(layerGatesFixture(), ['sql-lora', 'poetry-lora'])).toMatchObject({ ok: false });
    expect(checkLayerGates(layerGatesFixture(), ['sql-lora', 'poetry-lora', 'other'])).toMatchObject({ ok: false });
    expect(checkLayerGates(withFixture((o) => (o.adapters = ['a', 'a', 'b'])))).toMatchObject({ ok: false, reason: expect.stringContaining('duplicate') });
    expect(checkLayerGates(withFixture((o) => (o.adapters = [])))).toMatchObject({ ok: false });
    expect(checkLayerGates(withFixture((o) => (o.adapters = ['a', 7, 'b'])))).toMatchObject({ ok: false });
  });

  it('refuses non-finite, non-numeric and out-of-range gates', () => {
    for (const bad of [NaN, Infinity, -Infinity, null, '0.5', -0.2, 1.5]) {
      const r = checkLayerGates(withFixture((o) => (gatesOf(o)[1][2][1] = bad as never)));
      expect(r.ok, String(bad)).toBe(false);
    }
    // Rounding to 3 decimals may step just outside 0..1.
    expect(checkLayerGates(withFixture((o) => (gatesOf(o)[1][2][1] = 1.0004 as never))).ok).toBe(true);
  });

  it('refuses a layer count that is not the rows, and too many or no token columns', () => {
    expect(checkLayerGates(withFixture((o) => (o.layers = 30))).ok).toBe(false);
    expect(checkLayerGates(withFixture((o) => (o.layers = '4'))).ok).toBe(false);
    expect(checkLayerGates(withFixture((o) => (o.layers = 4.5))).ok).toBe(false);
    expect(checkLayerGates({ adapters: ['a'], layers: 0, tokens: ['<prompt>'], gates: [] }).ok).toBe(false);
    expect(checkLayerGates({ adapters: ['a'], layers: 1, tokens: [], gates: [[]] }).ok).toBe(false);
    const n = MAX_TOKEN_COLUMNS + 1;
    const tooWide = { adapters: ['a'], layers: 1, tokens: Array(n).fill('x'), gates: [Array.from({ length: n }, () => [1])] };
    expect(checkLayerGates(tooWide)).toMatchObject({ ok: false, reason: expect.stringContaining('33 token columns') });
    tooWide.tokens.pop();
    tooWide.gates[0].pop();
    expect(checkLayerGates(tooWide).ok).toBe(true);
  });

  it('refuses labels that are not strings', () => {
    expect(checkLayerGates(withFixture((o) => ((o.tokens as unknown[])[2] = 3))).ok).toBe(false);
  });
});

describe('layer gate helpers', () => {
  it('argmax takes the first of equal maxima', () => {
    expect(argmax([0.2, 0.7, 0.1])).toBe(1);
    expect(argmax([0.4, 0.2, 0.4])).toBe(0);
    expect(argmax([])).toBe(-1);
  });

  it('means over all cells, and the default adapter is the highest mean gate', () => {
    const lg = layerGatesFixture();
    const m = meanGates(lg);
    expect(m.reduce((a, b) => a + b, 0)).toBeCloseTo(1, 2);
    expect(m[0]).toBeCloseTo(lg.gates.flat().reduce((a, c) => a + c[0], 0) / 20);
    expect(defaultAdapter(lg)).toBe(lg.adapters[argmax(m)]);
    // The reply's own means (Provenance.adapters[].gate) take precedence over the grid.
    expect(defaultAdapter(lg, new Map([['sql-lora', 0.1], ['poetry-lora', 0.2], ['math-lora', 0.7]]))).toBe('math-lora');
  });

  it('labels token columns with visible whitespace and names the prompt column', () => {
    expect(tokenLabel('<prompt>', 0)).toBe('prompt');
    expect(tokenLabel('<prompt>', 3)).toBe('<prompt>');
    expect(tokenLabel(' le', 2)).toBe('·le');
    expect(tokenLabel('a\nb', 1)).toBe('a↵b');
    expect(tokenLabel('', 1)).toBe('∅');
    expect(tokenTitle('<prompt>', 0)).toMatch(/prompt/);
    expect(tokenTitle('ing the', 4)).toBe('token column 4: “ing the”');
  });
});
