import { describe, it, expect } from 'vitest';
import { renderMarkdown } from '../lib/markdown';

describe('markdown rendering', () => {
  it('renders code blocks and emphasis', () => {
    const html = renderMarkdown('Hi **there**\n\n```sql\nSELECT 1;\n```');
    expect(html).toContain('<strong>there</strong>');
    expect(html).toMatch(/<pre><code class="language-sql">SELECT 1;\n<\/code><\/pre>/);
  });
  it('sanitises scripts and handlers', () => {
    const html = renderMarkdown('<script>alert(1)</script><img src="x" onerror="alert(2)">\n\nA [link](javascript:alert(3)) here');
    expect(html).not.toContain('<script');
    expect(html).not.toContain('onerror');
    expect(html).toContain('<a');
    expect(html).not.toMatch(/href="javascript:/);
  });
  it('opens links outside the app', () => {
    const html = renderMarkdown('[docs](https://example.org)');
    expect(html).toContain('target="_blank"');
    expect(html).toContain('rel="noopener noreferrer"');
  });
});
