// Client-side parsing/validation of inline training examples (JSONL {"input","target"} lines).
import type { TrainExample } from './api/types';

export interface LineError {
  /** 1-based line number in the textarea. */
  line: number;
  message: string;
}

export interface ParsedExamples {
  examples: TrainExample[];
  errors: LineError[];
}

export function parseExamples(text: string): ParsedExamples {
  const examples: TrainExample[] = [];
  const errors: LineError[] = [];
  const lines = text.split(/\r?\n/);
  lines.forEach((raw, i) => {
    const line = i + 1;
    const s = raw.trim();
    if (!s) return;
    let v: unknown;
    try {
      v = JSON.parse(s);
    } catch (e) {
      errors.push({ line, message: `not valid JSON (${e instanceof Error ? e.message : String(e)})` });
      return;
    }
    if (!v || typeof v !== 'object' || Array.isArray(v)) {
      errors.push({ line, message: 'expected a JSON object {"input": …, "target": …}' });
      return;
    }
    const o = v as Record<string, unknown>;
    const missing = ['input', 'target'].filter((key) => !(key in o));
    if (missing.length) {
      errors.push({ line, message: `missing field${missing.length > 1 ? 's' : ''} ${missing.map((m) => `"${m}"`).join(', ')}` });
      return;
    }
    if (typeof o.input !== 'string' || typeof o.target !== 'string') {
      errors.push({ line, message: '"input" and "target" must be strings' });
      return;
    }
    if (!o.input.trim() || !o.target.trim()) {
      errors.push({ line, message: '"input" and "target" must not be empty' });
      return;
    }
    examples.push({ input: o.input, target: o.target });
  });
  return { examples, errors };
}
