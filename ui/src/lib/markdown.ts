// Markdown replies -> sanitised HTML (marked + DOMPurify). Links open outside the app.
import { marked } from 'marked';
import DOMPurify from 'dompurify';

let hooked = false;

export function renderMarkdown(text: string): string {
  if (!hooked) {
    DOMPurify.addHook('afterSanitizeAttributes', (node) => {
      if (node.tagName === 'A') {
        node.setAttribute('target', '_blank');
        node.setAttribute('rel', 'noopener noreferrer');
      }
    });
    hooked = true;
  }
  const html = marked.parse(text, { async: false, gfm: true, breaks: true }) as string;
  return DOMPurify.sanitize(html, { ADD_ATTR: ['target'] });
}
