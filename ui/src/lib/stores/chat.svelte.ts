// Chat state: sessions, the open conversation, streaming replies (routing -> started -> text* ->
// done), Stop, and the request building for send / regenerate / edit / compare.
import {
  api,
  newTaskId,
  toApiError,
  type ApiError,
  type ChatAction,
  type ChatEvent,
  type ChatSession,
  type ExportFormat,
  type FinishReason,
  type GenerationParams,
  type PlanChoice,
  type Provenance,
  type Role,
  type SendRequest,
  type TranscriptMessage,
  MAX_K,
} from '../api';
import { pinsToRequest, renormalise, clamp01, type PinSlider } from '../gates';
import { errors } from './errors.svelte';

export interface UiMessage {
  /** Stable local key (ids arrive only once the shell stored the message). */
  key: string;
  id: number | null;
  role: Role;
  content: string;
  provenance: Provenance | null;
  streaming: boolean;
  finish_reason: FinishReason | null;
  error: string | null;
}

export interface CompareView {
  /** The user message answered again. */
  messageId: number;
  plan: PlanChoice;
  reply: UiMessage;
}

interface Controls {
  pins: PinSlider[];
  exclude: string[];
}

let nextKey = 0;
const key = (p: string) => `${p}${++nextKey}`;

export const DEFAULT_PARAMS: GenerationParams = { max_tokens: 256, temperature: 0.7, top_p: 0.9, seed: null };

function fromMessage(m: TranscriptMessage): UiMessage {
  return {
    key: key('m'),
    id: m.id,
    role: m.role,
    content: m.content,
    provenance: m.provenance,
    streaming: false,
    finish_reason: m.provenance?.generation?.finish_reason ?? null,
    error: null,
  };
}

function placeholder(): UiMessage {
  return { key: key('r'), id: null, role: 'assistant', content: '', provenance: null, streaming: true, finish_reason: null, error: null };
}

/** k from the number input: integer 1..MAX_K (the core's limit), or null (empty = the settings' k). */
export function parseK(v: unknown): number | null {
  if (v === null || v === undefined || v === '') return null;
  const n = typeof v === 'number' ? v : Number(v);
  if (!Number.isFinite(n)) return null;
  return Math.max(1, Math.min(MAX_K, Math.round(n)));
}

export class ChatStore {
  sessions = $state<ChatSession[]>([]);
  /** The open session; null = a new chat not sent yet. */
  session = $state<ChatSession | null>(null);
  messages = $state<UiMessage[]>([]);
  systemPrompt = $state('');
  plan = $state<PlanChoice>('auto');
  k = $state<number | null>(null);
  pins = $state<PinSlider[]>([]);
  exclude = $state<string[]>([]);
  /** The stream running now (Stop cancels it). */
  streamId = $state<string | null>(null);
  compare = $state<CompareView | null>(null);
  /** A session-list call is running. */
  busy = $state(false);
  lastError = $state<ApiError | null>(null);

  #controls = new Map<string, Controls>();
  #defaults: () => GenerationParams;

  constructor(defaults: () => GenerationParams = () => DEFAULT_PARAMS) {
    this.#defaults = defaults;
  }

  get streaming(): boolean {
    return this.streamId !== null;
  }

  /** Pinned gates as shown: renormalised to sum 1. */
  get pinGates(): number[] {
    return renormalise(this.pins.map((p) => p.value));
  }

  // ---- sessions ----

  async loadSessions(): Promise<void> {
    try {
      this.sessions = await api.chatsList();
    } catch (e) {
      this.#fail('List chats', e);
    }
  }

  #saveControls(): void {
    this.#controls.set(String(this.session?.id ?? 'new'), { pins: $state.snapshot(this.pins), exclude: [...this.exclude] });
  }

  #loadControls(id: number | null): void {
    const c = this.#controls.get(String(id ?? 'new'));
    this.pins = c ? c.pins.map((p) => ({ ...p })) : [];
    this.exclude = c ? [...c.exclude] : [];
  }

  newChat(): void {
    if (this.streaming) return;
    this.#saveControls();
    this.session = null;
    this.messages = [];
    this.systemPrompt = '';
    this.compare = null;
    this.#loadControls(null);
  }

  async open(id: number): Promise<void> {
    if (this.streaming) return;
    this.busy = true;
    try {
      const d = await api.chatGet(id);
      this.#saveControls();
      this.session = d.session;
      this.messages = d.messages.filter((m) => m.role !== 'system').map(fromMessage);
      this.systemPrompt = d.session.system_prompt ?? '';
      this.compare = null;
      this.#loadControls(d.session.id);
    } catch (e) {
      this.#fail('Open chat', e);
    } finally {
      this.busy = false;
    }
  }

  async rename(id: number, title: string): Promise<boolean> {
    const t = title.trim();
    if (!t) return false;
    this.busy = true;
    try {
      const s = await api.chatRename(id, t);
      this.sessions = this.sessions.map((x) => (x.id === id ? s : x));
      if (this.session?.id === id) this.session = s;
      return true;
    } catch (e) {
      this.#fail('Rename chat', e);
      return false;
    } finally {
      this.busy = false;
    }
  }

  async remove(id: number): Promise<void> {
    this.busy = true;
    try {
      await api.chatDelete(id);
      this.sessions = this.sessions.filter((x) => x.id !== id);
      this.#controls.delete(String(id));
      if (this.session?.id === id) {
        this.session = null;
        this.messages = [];
        this.systemPrompt = '';
        this.compare = null;
        this.#loadControls(null);
      }
    } catch (e) {
      this.#fail('Delete chat', e);
    } finally {
      this.busy = false;
    }
  }

  async exportChat(id: number, format: ExportFormat): Promise<string | null> {
    this.busy = true;
    try {
      return (await api.chatExport(id, format)).path;
    } catch (e) {
      this.#fail('Export chat', e);
      return null;
    } finally {
      this.busy = false;
    }
  }

  /** Existing session: chat_set_system_prompt; a new chat sends it with the first message. */
  async saveSystemPrompt(): Promise<boolean> {
    if (!this.session) return true;
    const id = this.session.id;
    this.busy = true;
    try {
      const s = await api.chatSetSystemPrompt(id, this.systemPrompt.trim() ? this.systemPrompt : null);
      this.session = s;
      this.sessions = this.sessions.map((x) => (x.id === id ? s : x));
      return true;
    } catch (e) {
      this.#fail('Save system prompt', e);
      return false;
    } finally {
      this.busy = false;
    }
  }

  // ---- adapter controls (per session) ----

  addPin(id: string, name: string): void {
    if (this.pins.some((p) => p.id === id)) return;
    this.pins = [...this.pins, { id, name, value: 1 }];
    this.exclude = this.exclude.filter((x) => x !== id);
  }

  removePin(id: string): void {
    this.pins = this.pins.filter((p) => p.id !== id);
  }

  setPinValue(id: string, value: number): void {
    this.pins = this.pins.map((p) => (p.id === id ? { ...p, value: clamp01(value) } : p));
  }

  toggleExclude(id: string): void {
    if (this.exclude.includes(id)) {
      this.exclude = this.exclude.filter((x) => x !== id);
    } else {
      this.exclude = [...this.exclude, id];
      this.pins = this.pins.filter((p) => p.id !== id);
    }
  }

  // ---- requests ----

  buildRequest(action: ChatAction, text: string, plan: PlanChoice = this.plan): SendRequest {
    return {
      session: this.session?.id ?? null,
      stream_id: newTaskId('chat'),
      action,
      text: action.kind === 'send' || action.kind === 'edit' ? text : '',
      plan,
      k: parseK(this.k),
      exclude: [...this.exclude],
      pinned: pinsToRequest(this.pins),
      system_prompt: this.session ? null : this.systemPrompt.trim() ? this.systemPrompt : null,
      params: { ...this.#defaults() },
    };
  }

  /** The last reply, the only one that can be regenerated. */
  canRegenerate(m: UiMessage): boolean {
    const last = this.messages[this.messages.length - 1];
    return !this.streaming && !!last && last.key === m.key && m.role === 'assistant' && m.id !== null;
  }

  async send(text: string): Promise<boolean> {
    if (this.streaming || !text.trim()) return false;
    const user: UiMessage = { ...placeholder(), key: key('u'), role: 'user', content: text, streaming: false };
    const reply = placeholder();
    this.compare = null;
    this.messages = [...this.messages, user, reply];
    return this.#run(this.buildRequest({ kind: 'send' }, text), reply.key, user.key);
  }

  async regenerate(): Promise<boolean> {
    const last = this.messages[this.messages.length - 1];
    if (!last || !this.canRegenerate(last)) return false;
    const reply = placeholder();
    this.compare = null;
    this.messages = [...this.messages.slice(0, -1), reply];
    return this.#run(this.buildRequest({ kind: 'regenerate' }, ''), reply.key, null);
  }

  async edit(messageId: number, text: string): Promise<boolean> {
    if (this.streaming || !text.trim()) return false;
    const idx = this.messages.findIndex((m) => m.id === messageId && m.role === 'user');
    if (idx < 0) return false;
    const user: UiMessage = { ...$state.snapshot(this.messages[idx]), content: text, key: key('u') };
    const reply = placeholder();
    this.compare = null;
    this.messages = [...this.messages.slice(0, idx), user, reply];
    return this.#run(this.buildRequest({ kind: 'edit', message_id: messageId }, text), reply.key, user.key);
  }

  /** Answers user message `messageId` again with `plan`, shown beside the stored reply. */
  async compareWith(messageId: number, plan: PlanChoice): Promise<boolean> {
    if (this.streaming) return false;
    const reply = placeholder();
    this.compare = { messageId, plan, reply };
    return this.#run(this.buildRequest({ kind: 'compare', message_id: messageId }, '', plan), reply.key, null);
  }

  closeCompare(): void {
    if (this.compare?.reply.streaming) return;
    this.compare = null;
  }

  async stop(): Promise<void> {
    const id = this.streamId;
    if (!id) return;
    try {
      await api.taskCancel(id);
    } catch (e) {
      this.#fail('Stop', e);
    }
  }

  /** The message a stream writes to (the compare reply or one in the list). */
  #target(k: string): UiMessage | undefined {
    if (this.compare && this.compare.reply.key === k) return this.compare.reply;
    return this.messages.find((m) => m.key === k);
  }

  /** Applies one ChatEvent to the reply `replyKey` (and its user message). */
  applyEvent(ev: ChatEvent, replyKey: string, userKey: string | null): void {
    const msg = this.#target(replyKey);
    switch (ev.event) {
      case 'routing':
        if (msg) msg.provenance = ev.provenance;
        break;
      case 'started': {
        // session is null while a new chat is not stored yet; its id then arrives with done.
        if (ev.session !== null && (!this.session || this.session.id !== ev.session)) this.#adoptSession(ev.session, userKey);
        if (userKey && ev.user_message !== null) {
          const u = this.messages.find((m) => m.key === userKey);
          if (u) u.id = ev.user_message;
        }
        break;
      }
      case 'text':
        if (msg) msg.content += ev.delta;
        break;
      case 'done':
        if (msg) {
          msg.content = ev.reply.reply;
          msg.id = ev.reply.message;
          msg.provenance = ev.reply.provenance;
          msg.finish_reason = ev.reply.finish_reason;
          msg.streaming = false;
        }
        // A new chat learns its session id here (started carried session: null).
        if (!this.session && ev.reply.session !== null) this.#adoptSession(ev.reply.session, userKey);
        if (userKey && ev.reply.user_message !== null) {
          const u = this.messages.find((m) => m.key === userKey);
          if (u) u.id = ev.reply.user_message;
        }
        break;
    }
  }

  /** A placeholder for session `id` until the session list is reloaded. */
  #adoptSession(id: number, userKey: string | null): void {
    const now = new Date().toISOString();
    const draft = this.messages.find((m) => m.key === userKey)?.content ?? 'New chat';
    this.session = {
      id,
      title: draft.slice(0, 40) || 'New chat',
      system_prompt: this.systemPrompt.trim() ? this.systemPrompt : null,
      created_at: now,
      updated_at: now,
    };
  }

  async #run(req: SendRequest, replyKey: string, userKey: string | null): Promise<boolean> {
    this.streamId = req.stream_id;
    this.lastError = null;
    const isNew = req.session === null;
    try {
      const reply = await api.chatSend(req, (ev) => this.applyEvent(ev, replyKey, userKey));
      // The resolved reply is authoritative even if a "done" event was missed.
      this.applyEvent({ event: 'done', reply }, replyKey, userKey);
      if (isNew || req.action.kind !== 'compare') await this.loadSessions();
      if (isNew) this.session = this.sessions.find((s) => s.id === reply.session) ?? this.session;
      return true;
    } catch (e) {
      const err = toApiError(e);
      const msg = this.#target(replyKey);
      if (msg) {
        msg.streaming = false;
        if (err.code === 'cancelled') msg.finish_reason = 'cancelled';
        else msg.error = err.message;
      }
      if (err.code !== 'cancelled') this.#fail('Send', err);
      return false;
    } finally {
      if (this.streamId === req.stream_id) this.streamId = null;
    }
  }

  #fail(context: string, e: unknown): void {
    this.lastError = errors.push(context, e);
  }
}
