import { describe, it, expect, beforeEach, afterEach } from 'vitest';
import { flushSync, mount, tick, unmount } from 'svelte';
import { ConfirmStore, askConfirm, confirmStore } from '../lib/stores/confirm.svelte';
import ConfirmDialog from '../components/ConfirmDialog.svelte';

/** Whether `p` has settled (true/false) yet, without waiting for it. */
async function peek(p: Promise<boolean>): Promise<boolean | 'pending'> {
  return Promise.race([p, new Promise<'pending'>((r) => setTimeout(() => r('pending'), 0))]);
}

describe('confirm store', () => {
  let s: ConfirmStore;
  beforeEach(() => {
    s = new ConfirmStore();
  });

  it('shows the question and resolves true on yes', async () => {
    const p = s.ask('Delete it?', 'Delete');
    expect(s.current).toMatchObject({ message: 'Delete it?', confirmLabel: 'Delete', cancelLabel: 'Cancel', danger: true });
    expect(await peek(p)).toBe('pending');
    s.answer(true);
    expect(await p).toBe(true);
    expect(s.current).toBeNull();
  });

  it('resolves false on no', async () => {
    const p = s.ask('Remove?');
    expect(s.current?.confirmLabel).toBe('Confirm');
    s.answer(false);
    expect(await p).toBe(false);
    expect(s.open).toBe(false);
  });

  it('a second ask cancels the first (false) and stays open itself', async () => {
    const first = s.ask('first?');
    const firstId = s.current!.id;
    const second = s.ask('second?', 'Go', { danger: false });
    expect(await peek(first)).toBe(false);
    expect(await peek(second)).toBe('pending');
    expect(s.current).toMatchObject({ message: 'second?', confirmLabel: 'Go', danger: false });
    // A stale answer meant for the first question does not answer the second.
    s.answer(true, firstId);
    expect(await peek(second)).toBe('pending');
    s.answer(true, s.current!.id);
    expect(await second).toBe(true);
    expect(s.current).toBeNull();
  });

  it('answering with nothing open is a no-op', () => {
    s.answer(true);
    expect(s.current).toBeNull();
  });

  it('askConfirm uses the shared store', async () => {
    const p = askConfirm('Shared?', 'Yes');
    expect(confirmStore.current?.message).toBe('Shared?');
    confirmStore.answer(true);
    expect(await p).toBe(true);
  });
});

describe('ConfirmDialog', () => {
  let s: ConfirmStore;
  let target: HTMLElement;
  let cmp: ReturnType<typeof mount>;

  const q = (id: string) => target.querySelector<HTMLElement>(`[data-testid="${id}"]`);
  const key = (k: string) => window.dispatchEvent(new KeyboardEvent('keydown', { key: k, bubbles: true, cancelable: true }));

  beforeEach(() => {
    s = new ConfirmStore();
    target = document.createElement('div');
    document.body.appendChild(target);
    cmp = mount(ConfirmDialog, { target, props: { store: s } });
  });
  afterEach(() => {
    unmount(cmp);
    target.remove();
  });

  it('renders nothing until asked, then a modal dialog with focus on the danger confirm button', async () => {
    expect(q('confirm-dialog')).toBeNull();
    const p = s.ask('Delete the chat "x"?', 'Delete');
    flushSync();
    await tick();
    const dlg = q('confirm-dialog')!;
    expect(dlg.getAttribute('role')).toBe('dialog');
    expect(dlg.getAttribute('aria-modal')).toBe('true');
    expect(q('confirm-message')!.textContent).toBe('Delete the chat "x"?');
    const yes = q('confirm-yes')!;
    expect(yes.textContent).toBe('Delete');
    expect(yes.classList.contains('danger-fill')).toBe(true);
    expect(document.activeElement).toBe(yes);
    q('confirm-no')!.click();
    expect(await p).toBe(false);
    flushSync();
    expect(q('confirm-dialog')).toBeNull();
  });

  it('yes button confirms', async () => {
    const p = s.ask('Sure?');
    flushSync();
    q('confirm-yes')!.click();
    expect(await p).toBe(true);
  });

  it('Escape cancels and Enter confirms', async () => {
    const p1 = s.ask('one?');
    flushSync();
    key('Escape');
    expect(await p1).toBe(false);
    const p2 = s.ask('two?');
    flushSync();
    await tick();
    key('Enter');
    expect(await p2).toBe(true);
    key('Enter'); // nothing open: ignored
    expect(s.current).toBeNull();
  });
});
