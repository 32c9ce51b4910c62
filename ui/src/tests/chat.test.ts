import { describe, it, expect, beforeEach } from 'vitest';
import { MAX_K, setTransport, type ChatEvent, type SendRequest, type Provenance } from '../lib/api';
import { createFakeBackend, type FakeBackend } from '../lib/api/fake';
import { ChatStore, parseK } from '../lib/stores/chat.svelte';
import { errors } from '../lib/stores/errors.svelte';

let fake: FakeBackend;
let chat: ChatStore;

function sends(): SendRequest[] {
  return fake.calls.filter((c) => c.cmd === 'chat_send').map((c) => c.args!.request as SendRequest);
}

beforeEach(() => {
  fake = createFakeBackend({ ready: true });
  setTransport(fake.invoke, fake.channel);
  errors.clear();
  chat = new ChatStore(() => ({ max_tokens: 64, temperature: 0.2, top_p: 0.8, seed: null }));
});

describe('chat store: requests', () => {
  it('builds a send request for a new chat with system prompt, k, pins and excludes', () => {
    chat.systemPrompt = 'Be brief.';
    chat.plan = 'mixture';
    chat.k = 4;
    chat.addPin('sql-lora', 'SQL writer');
    chat.addPin('poetry-lora', 'Poetry');
    chat.setPinValue('sql-lora', 0.6);
    chat.setPinValue('poetry-lora', 0.2);
    chat.toggleExclude('math-lora');
    const r = chat.buildRequest({ kind: 'send' }, 'hello');
    expect(r.session).toBeNull();
    expect(r.system_prompt).toBe('Be brief.');
    expect(r.plan).toBe('mixture');
    expect(r.k).toBe(4);
    expect(r.exclude).toEqual(['math-lora']);
    expect(r.pinned.map((p) => p.id)).toEqual(['sql-lora', 'poetry-lora']);
    expect(r.pinned[0].gate).toBeCloseTo(0.75);
    expect(r.pinned[1].gate).toBeCloseTo(0.25);
    expect(r.params).toEqual({ max_tokens: 64, temperature: 0.2, top_p: 0.8, seed: null });
    expect(r.stream_id).toMatch(/^chat-/);
  });

  it('pinning removes an exclusion and excluding removes a pin', () => {
    chat.toggleExclude('sql-lora');
    chat.addPin('sql-lora', 'SQL');
    expect(chat.exclude).toEqual([]);
    chat.toggleExclude('sql-lora');
    expect(chat.pins).toEqual([]);
    expect(chat.exclude).toEqual(['sql-lora']);
  });

  it('parses k: empty = settings default, clamps to 1..MAX_K (the core\'s limit)', () => {
    expect(parseK('')).toBeNull();
    expect(parseK(null)).toBeNull();
    expect(parseK('12')).toBe(12);
    expect(parseK(String(MAX_K + 4))).toBe(MAX_K);
    expect(parseK(0)).toBe(1);
    expect(parseK('3')).toBe(3);
    expect(parseK('abc')).toBeNull();
  });
});

describe('chat store: streaming', () => {
  it('applies routing before text, appends deltas, finishes on done', () => {
    chat.messages = [
      { key: 'u', id: null, role: 'user', content: 'q', provenance: null, streaming: false, finish_reason: null, error: null },
      { key: 'r', id: null, role: 'assistant', content: '', provenance: null, streaming: true, finish_reason: null, error: null },
    ];
    const prov: Provenance = {
      plan: 'mixture', k: 2, query: 'q', base_model: 'b', embedder: null, scoring: 'cosine', gating: 'softmax:0.1',
      adapters: [{ id: 'a', name: 'A', score: 0.5, gate: 0.7 }, { id: 'b', name: 'B', score: 0.4, gate: 0.3 }],
      generation: null, layer_gates: null,
    };
    const evs: ChatEvent[] = [
      { event: 'routing', provenance: prov },
      { event: 'started', session: 7, user_message: 11 },
      { event: 'text', delta: 'Hel' },
      { event: 'text', delta: 'lo' },
    ];
    for (const e of evs) chat.applyEvent(e, 'r', 'u');
    expect(chat.messages[1].provenance?.adapters.map((a) => a.gate)).toEqual([0.7, 0.3]);
    expect(chat.messages[1].content).toBe('Hello');
    expect(chat.messages[1].streaming).toBe(true);
    expect(chat.messages[0].id).toBe(11);
    expect(chat.session?.id).toBe(7);
    chat.applyEvent(
      { event: 'done', reply: { session: 7, user_message: 11, message: 12, reply: 'Hello!', finish_reason: 'eos', provenance: prov, dropped_messages: 0 } },
      'r',
      'u',
    );
    expect(chat.messages[1]).toMatchObject({ id: 12, content: 'Hello!', streaming: false, finish_reason: 'eos' });
  });

  it('a new chat takes its session id and user message id from done (started carries nulls)', () => {
    chat.messages = [
      { key: 'u', id: null, role: 'user', content: 'first words', provenance: null, streaming: false, finish_reason: null, error: null },
      { key: 'r', id: null, role: 'assistant', content: '', provenance: null, streaming: true, finish_reason: null, error: null },
    ];
    chat.applyEvent({ event: 'started', session: null, user_message: null }, 'r', 'u');
    expect(chat.session).toBeNull();
    expect(chat.messages[0].id).toBeNull();
    chat.applyEvent({ event: 'text', delta: 'Hi' }, 'r', 'u');
    const prov: Provenance = {
      plan: 'none', k: 0, query: 'first words', base_model: 'b', embedder: null, scoring: 'cosine', gating: 'softmax:0.1',
      adapters: [], generation: null, layer_gates: null,
    };
    chat.applyEvent(
      { event: 'done', reply: { session: 42, user_message: 100, message: 101, reply: 'Hi!', finish_reason: 'eos', provenance: prov, dropped_messages: 0 } },
      'r',
      'u',
    );
    expect(chat.session).toMatchObject({ id: 42, title: 'first words' });
    expect(chat.messages[0].id).toBe(100);
    expect(chat.messages[1]).toMatchObject({ id: 101, content: 'Hi!', streaming: false });
  });

  it('the fake mirrors the shell: started has session null for a new chat and never a user message id', async () => {
    const seen: ChatEvent[] = [];
    setTransport(fake.invoke, <T>(onEvent: (e: T) => void) =>
      fake.channel<T>((e) => {
        seen.push(e as ChatEvent);
        onEvent(e);
      }),
    );
    expect(await chat.send('hello there')).toBe(true);
    const started = seen.filter((e) => e.event === 'started');
    const done = seen.filter((e) => e.event === 'done');
    expect(started).toEqual([{ event: 'started', session: null, user_message: null }]);
    expect(done).toHaveLength(1);
    const reply = (done[0] as Extract<ChatEvent, { event: 'done' }>).reply;
    expect(reply.user_message).not.toBeNull();
    expect(chat.session?.id).toBe(reply.session);
    expect(chat.messages[0].id).toBe(reply.user_message);
    expect(chat.messages[1].id).toBe(reply.message);

    seen.length = 0;
    expect(await chat.send('and again')).toBe(true);
    expect(seen.find((e) => e.event === 'started')).toEqual({ event: 'started', session: reply.session, user_message: null });
    const reply2 = (seen.find((e) => e.event === 'done') as Extract<ChatEvent, { event: 'done' }>).reply;
    expect(chat.messages[2].id).toBe(reply2.user_message);
    expect(chat.messages[2].id).not.toBe(reply.user_message);
  });

  it('a new chat keeps the session id from done even when reloading the session list fails', async () => {
    setTransport((cmd, args) => (cmd === 'chats_list' ? Promise.reject({ code: 'io', message: 'disk on fire' }) : fake.invoke(cmd, args)), fake.channel);
    expect(await chat.send('hello')).toBe(true);
    expect(chat.session?.id).toBe(1);
    expect(chat.messages[0].id).toBe(fake.state.messages.get(1)![0].id);
    expect(chat.messages[1].id).toBe(fake.state.messages.get(1)![1].id);
    expect(errors.list.at(-1)).toMatchObject({ code: 'io', context: 'List chats' });
  });

  it('sends a first message end-to-end against the fake backend', async () => {
    const ok = await chat.send('write an SQL query for orders');
    expect(ok).toBe(true);
    expect(chat.streaming).toBe(false);
    expect(chat.session?.id).toBe(1);
    expect(chat.sessions.map((s) => s.id)).toEqual([1]);
    const [u, r] = chat.messages;
    expect(u.role).toBe('user');
    expect(u.id).not.toBeNull();
    expect(r.streaming).toBe(false);
    expect(r.id).not.toBeNull();
    expect(r.content).toContain('SELECT');
    const gates = r.provenance!.adapters.map((a) => a.gate);
    expect(gates.length).toBeGreaterThan(0);
    expect(gates.reduce((a, b) => a + b, 0)).toBeCloseTo(1);
    expect(r.content).toBe(fake.state.messages.get(1)![1].content);
  });

  it('regenerates only the last reply, sending action regenerate', async () => {
    await chat.send('hello');
    const first = chat.messages[1];
    expect(chat.canRegenerate(chat.messages[0])).toBe(false);
    expect(chat.canRegenerate(first)).toBe(true);
    await chat.regenerate();
    expect(sends().at(-1)!.action).toEqual({ kind: 'regenerate' });
    expect(sends().at(-1)!.session).toBe(1);
    expect(sends().at(-1)!.system_prompt).toBeNull();
    expect(chat.messages).toHaveLength(2);
    expect(chat.messages[1].id).not.toBe(first.id);
    expect(fake.state.messages.get(1)).toHaveLength(2);
  });

  it('edit replaces a user message and drops what followed', async () => {
    await chat.send('first question');
    await chat.send('second question');
    const firstUser = chat.messages[0].id!;
    await chat.edit(firstUser, 'first question, edited');
    expect(sends().at(-1)!.action).toEqual({ kind: 'edit', message_id: firstUser });
    expect(sends().at(-1)!.text).toBe('first question, edited');
    expect(chat.messages.map((m) => m.role)).toEqual(['user', 'assistant']);
    expect(chat.messages[0].content).toBe('first question, edited');
    expect(fake.state.messages.get(1)!.map((m) => m.content)[0]).toBe('first question, edited');
  });

  it('compare answers a user message with another plan, without storing it', async () => {
    chat.plan = 'auto';
    await chat.send('tell me a poem');
    const uid = chat.messages[0].id!;
    await chat.compareWith(uid, 'none');
    const req = sends().at(-1)!;
    expect(req.action).toEqual({ kind: 'compare', message_id: uid });
    expect(req.plan).toBe('none');
    expect(chat.compare?.reply.provenance?.plan).toBe('none');
    expect(chat.compare?.reply.provenance?.adapters).toEqual([]);
    expect(chat.compare?.reply.streaming).toBe(false);
    expect(chat.compare?.reply.content.length).toBeGreaterThan(0);
    expect(chat.messages).toHaveLength(2);
    expect(fake.state.messages.get(1)).toHaveLength(2);
    expect(chat.plan).toBe('auto');
  });

  it('stop cancels the running stream (finish_reason cancelled, no error banner)', async () => {
    const slow = createFakeBackend({ ready: true, delayMs: 5 });
    setTransport(slow.invoke, slow.channel);
    const p = chat.send('a long answer please');
    await new Promise((r) => setTimeout(r, 30));
    expect(chat.streaming).toBe(true);
    const streamId = chat.streamId!;
    await chat.stop();
    expect(slow.calls.find((c) => c.cmd === 'task_cancel')!.args).toEqual({ task_id: streamId });
    await p;
    expect(chat.streaming).toBe(false);
    expect(chat.messages[1].finish_reason).toBe('cancelled');
    expect(chat.messages[1].streaming).toBe(false);
    expect(errors.list).toEqual([]);
  });

  it('shows a rejected send in the error banner and on the reply', async () => {
    const nf = createFakeBackend({ ready: false });
    setTransport(nf.invoke, nf.channel);
    const ok = await chat.send('hi');
    expect(ok).toBe(false);
    expect(errors.list[0]).toMatchObject({ code: 'not_ready', context: 'Send' });
    expect(chat.messages[1].error).toMatch(/not loaded/);
    expect(chat.messages[1].streaming).toBe(false);
    expect(chat.streaming).toBe(false);
  });

  it('keeps pins and excludes per session', async () => {
    await chat.send('one');
    chat.addPin('sql-lora', 'SQL');
    chat.newChat();
    expect(chat.pins).toEqual([]);
    chat.toggleExclude('math-lora');
    await chat.open(1);
    expect(chat.pins.map((p) => p.id)).toEqual(['sql-lora']);
    expect(chat.exclude).toEqual([]);
    chat.newChat();
    expect(chat.exclude).toEqual(['math-lora']);
  });

  it('renames, sets the system prompt, exports and deletes sessions', async () => {
    await chat.send('hello');
    expect(await chat.rename(1, 'Renamed')).toBe(true);
    expect(chat.sessions[0].title).toBe('Renamed');
    chat.systemPrompt = 'Answer in French.';
    await chat.saveSystemPrompt();
    expect(fake.state.sessions[0].system_prompt).toBe('Answer in French.');
    const path = await chat.exportChat(1, 'markdown');
    expect(path).toMatch(/chat-1\.md$/);
    await chat.remove(1);
    expect(chat.sessions).toEqual([]);
    expect(chat.session).toBeNull();
    expect(chat.messages).toEqual([]);
    await chat.exportChat(99, 'json');
    expect(errors.list.at(-1)).toMatchObject({ code: 'not_found', context: 'Export chat' });
  });
});
