import { describe, it, expect } from 'vitest';
import { humanBytes, humanCount, percent, slowdown, duration, sourceLabel, ranksLabel, fraction } from '../lib/format';

describe('format', () => {
  it('formats bytes', () => {
    expect(humanBytes(0)).toBe('0 B');
    expect(humanBytes(1023)).toBe('1023 B');
    expect(humanBytes(1536)).toBe('1.5 KB');
    expect(humanBytes(3_700_000)).toBe('3.5 MB');
    expect(humanBytes(269_060_552)).toBe('257 MB');
    expect(humanBytes(5 * 1024 ** 3)).toBe('5.0 GB');
    expect(humanBytes(null)).toBe('—');
  });
  it('formats counts, percents, slowdown, durations', () => {
    expect(humanCount(999)).toBe('999');
    expect(humanCount(48_210)).toBe('48.2k');
    expect(humanCount(2_000_000)).toBe('2M');
    expect(percent(0.4567)).toBe('45.7%');
    expect(percent(1)).toBe('100.0%');
    expect(slowdown(0.012)).toBe('+1.2% decode time');
    expect(duration(42)).toBe('42s');
    expect(duration(185)).toBe('3m 05s');
    expect(duration(3720)).toBe('1h 02m');
    expect(fraction(5, 10)).toBe(0.5);
    expect(fraction(5, 0)).toBe(0);
    expect(fraction(20, 10)).toBe(1);
  });
  it('labels sources and ranks', () => {
    expect(sourceLabel({ kind: 'hub', repo: 'a/b', revision: 'main', commit: '0123456789abcdef' })).toBe('a/b@0123456');
    expect(sourceLabel({ kind: 'hub', repo: 'a/b', revision: 'v2', commit: null, subfolder: 'sub' })).toBe('a/b/sub@v2');
    expect(sourceLabel({ kind: 'local', path: '/x/y' })).toBe('/x/y');
    expect(ranksLabel([8, 8, 16])).toBe('8, 16');
    expect(ranksLabel([])).toBe('—');
  });
});
