import { describe, it, expect, beforeEach } from 'vitest';
import { PLAN_CHOICES, PLAN_HINTS, setTransport, type ChatEvent } from '../lib/api';
import { createFakeBackend } from '../lib/api/fake';
import { ChatStore } from '../lib/stores/chat.svelte';
import { errors } from '../lib/stores/errors.svelte';
import { checkLayerGates, PROMPT_TOKEN } from '../lib/layerGates';

const params = () => ({ max_tokens: 64, temperature: 0.2, top_p: 0.8, seed: null });

beforeEach(() => errors.clear());

describe('plan router', () => {
  it('is one of the plan choices (DESIGN.md 3a names), with a hint', () => {
    expect(PLAN_CHOICES).toEqual(['auto', 'selection', 'mixture', 'fusion', 'router', 'none']);
    expect(PLAN_HINTS.router).toMatch(/trained router/);
  });

  it('without a trained router the send is refused with code invalid, shown like other errors', async () => {
    const fake = createFakeBackend({ ready: true });
    setTransport(fake.invoke, fake.channel);
    const chat = new ChatStore(params);
    chat.plan = 'router';
    expect(await chat.send('Bonjour, write a poem')).toBe(false);
    expect(errors.list.at(-1)).toMatchObject({ code: 'invalid', context: 'Send' });
    expect(chat.messages[1].error).toMatch(/trained router/);
    expect(fake.state.sessions).toEqual([]);
  });

  it('the fake answers plan router with layer gates of the contract shape', async () => {
    const fake = createFakeBackend({ ready: true, router: true });
    const seen: ChatEvent[] = [];
    setTransport(fake.invoke, <T>(onEvent: (e: T) => void) =>
      fake.channel<T>((e) => {
        seen.push(e as ChatEvent);
        onEvent(e);
      }),
    );
    const chat = new ChatStore(params);
    chat.plan = 'router';
    expect(await chat.send('Write a poem with rhymes about the sea, then explain every line of it in detail')).toBe(true);
    const routing = seen.find((e) => e.event === 'routing') as Extract<ChatEvent, { event: 'routing' }>;
    expect(routing.provenance.plan).toBe('router');
    expect(routing.provenance.layer_gates).toBeNull();

    const prov = chat.messages[1].provenance!;
    expect(prov.plan).toBe('router');
    const ids = prov.adapters.map((a) => a.id);
    expect(ids.length).toBeGreaterThan(1);
    const check = checkLayerGates(prov.layer_gates, ids);
    expect(check.ok).toBe(true);
    const lg = prov.layer_gates!;
    expect(lg.adapters).toEqual(ids);
    expect(lg.layers).toBe(30);
    expect(lg.gates).toHaveLength(30);
    expect(lg.tokens[0]).toBe(PROMPT_TOKEN);
    expect(lg.tokens.length).toBeGreaterThan(8);
    expect(lg.tokens.length).toBeLessThanOrEqual(32);
    // A long reply is bucketed: the reply columns together are the reply's text.
    expect(lg.tokens.slice(1).join('')).toBe(chat.messages[1].content);
    for (const row of lg.gates) {
      for (const cell of row) {
        expect(cell.reduce((a, b) => a + b, 0)).toBeCloseTo(1, 2);
        for (const g of cell) expect(Math.round(g * 1000) / 1000).toBe(g);
      }
    }
    // Provenance gates are the router's means, summing to 1.
    expect(prov.adapters.reduce((a, b) => a + b.gate, 0)).toBeCloseTo(1);
    // The stored reply carries the same layer gates.
    expect(fake.state.messages.get(1)![1].provenance!.layer_gates).toEqual(lg);
  });

  it('auto picks router when a trained router exists; other plans carry no layer gates', async () => {
    const fake = createFakeBackend({ ready: true, router: true });
    setTransport(fake.invoke, fake.channel);
    const chat = new ChatStore(params);
    chat.plan = 'auto';
    await chat.send('tell me a poem');
    expect(chat.messages[1].provenance).toMatchObject({ plan: 'router' });
    expect(chat.messages[1].provenance!.layer_gates).not.toBeNull();
    chat.plan = 'mixture';
    await chat.send('and an SQL query');
    expect(chat.messages[3].provenance).toMatchObject({ plan: 'mixture', layer_gates: null });

    const noRouter = createFakeBackend({ ready: true });
    setTransport(noRouter.invoke, noRouter.channel);
    const other = new ChatStore(params);
    await other.send('tell me a poem');
    expect(other.messages[1].provenance!.plan).not.toBe('router');
    expect(other.messages[1].provenance!.layer_gates).toBeNull();
  });
});
