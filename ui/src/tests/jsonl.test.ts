import { describe, it, expect } from 'vitest';
import { parseExamples } from '../lib/jsonl';

describe('JSONL examples', () => {
  it('parses valid lines and skips blank ones', () => {
    const r = parseExamples('{"input":"a","target":"b"}\n\n  {"input": "c", "target": "d", "extra": 1}\n');
    expect(r.errors).toEqual([]);
    expect(r.examples).toEqual([
      { input: 'a', target: 'b' },
      { input: 'c', target: 'd' },
    ]);
  });
  it('reports line-numbered errors', () => {
    const text = ['{"input":"a","target":"b"}', '{bad json', '[1,2]', '{"input":"x"}', '{"input":1,"target":"y"}', '{"input":" ","target":"y"}'].join('\n');
    const r = parseExamples(text);
    expect(r.examples).toHaveLength(1);
    expect(r.errors.map((e) => e.line)).toEqual([2, 3, 4, 5, 6]);
    expect(r.errors[0].message).toMatch(/not valid JSON/);
    expect(r.errors[1].message).toMatch(/JSON object/);
    expect(r.errors[2].message).toBe('missing field "target"');
    expect(r.errors[3].message).toMatch(/must be strings/);
    expect(r.errors[4].message).toMatch(/must not be empty/);
  });
  it('counts lines across CRLF', () => {
    const r = parseExamples('{"input":"a","target":"b"}\r\nnope');
    expect(r.errors).toEqual([{ line: 2, message: expect.stringMatching(/not valid JSON/) }]);
  });
});
