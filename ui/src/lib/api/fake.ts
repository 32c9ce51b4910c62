// An in-memory fake of the desktop shell: every command of the contract (index.ts), used by the
// tests and, in a plain browser (no window.__TAURI_INTERNALS__), by `npm run dev` / preview.
// Never used inside Tauri (see main.ts).
import type {
  Adapter,
  AdapterDetail,
  AdapterHit,
  ApiError,
  AppSettings,
  AppStatus,
  ChatEvent,
  ChatReply,
  ChatSession,
  ErrorCode,
  FinishReason,
  HubSearchRequest,
  InstallRequest,
  Plan,
  ProgressEvent,
  Provenance,
  PullRequest,
  ReplyGating,
  SendRequest,
  SetupRequest,
  TrainProgress,
  TrainRequest,
  Transcript,
  TranscriptMessage,
  AddLocalRequest,
  ServedAdapter,
  LayerGates,
} from './types';
import { DEFAULT_K, MAX_K } from './types';
import type { EventChannel } from './index';

export interface FakeOptions {
  /** Whether the base model and embedder are already set up. */
  ready?: boolean;
  /** Delay between streamed events / progress steps, in ms (0 in tests). */
  delayMs?: number;
  /** How long the engine stays "loading" after setup_models, in ms. */
  loadMs?: number;
  /**
   * Whether a trained router exists for the base: plan `router` works (else it is refused with
   * `invalid`) and `auto` picks it for retrieved adapters (DESIGN.md 3a). Default false.
   */
  router?: boolean;
}

export interface FakeBackend {
  invoke: (cmd: string, args?: Record<string, unknown>) => Promise<unknown>;
  channel: <T>(onEvent: (e: T) => void) => EventChannel<T>;
  /** Commands received, in order (for tests). */
  calls: { cmd: string; args: Record<string, unknown> | undefined }[];
  state: FakeState;
}

interface FakeState {
  status: AppStatus;
  settings: AppSettings;
  token: string | null;
  adapters: AdapterDetail[];
  hub: AdapterHit[];
  sessions: ChatSession[];
  messages: Map<number, TranscriptMessage[]>;
  nextSession: number;
  /** The next adapter's index key (never reused, as the shell's). */
  nextKey: number;
  nextMessage: number;
  cancelled: Set<string>;
  running: Set<string>;
  /** A trained router exists for the base (plan `router`). */
  router: boolean;
  /** The app_watch channels: each hears the status whenever the engine's state changes. */
  watchers: EventChannel<AppStatus>[];
}

const BASE = 'HuggingFaceTB/SmolLM2-135M-Instruct';

function err(code: ErrorCode, message: string): ApiError {
  return { code, message };
}

function now(): string {
  return new Date().toISOString();
}

function adapter(
  key: number,
  id: string,
  name: string,
  topic: string,
  extra: Partial<AdapterDetail> = {},
): AdapterDetail {
  return {
    key,
    id,
    name,
    source: { kind: 'hub', repo: `community/${id}`, revision: 'main', commit: '3f9a2c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a39' },
    base_model: BASE,
    architecture: 'llama',
    ranks: [8],
    alpha: 16,
    target_modules: ['q_proj', 'v_proj'],
    size_bytes: 3_700_000,
    license: 'apache-2.0',
    card_summary: `A LoRA for ${topic}.`,
    verdict: { compat: 'compatible', reason: 'same base model, llama shapes match', base: BASE },
    enabled: true,
    installed_at: '2025-01-10T10:00:00Z',
    samples: 3,
    sample_list: [
      { text: `Help me with ${topic}.`, origin: 'card' },
      { text: `A question about ${topic}`, origin: 'samples' },
      { text: `Explain ${topic} step by step`, origin: 'probe' },
    ],
    ...extra,
  };
}

function initialState(ready: boolean): FakeState {
  const adapters = [
    adapter(1, 'sql-lora', 'SQL writer', 'SQL queries'),
    adapter(2, 'poetry-lora', 'Poetry', 'poems and rhymes', {
      ranks: [16],
      alpha: 32,
      target_modules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'],
      size_bytes: 14_800_000,
      source: { kind: 'local', path: '/home/me/adapters/poetry-lora' },
    }),
    adapter(3, 'math-lora', 'Math tutor', 'arithmetic and algebra', {
      verdict: { compat: 'warning', reason: 'declared base differs (SmolLM2-135M); shapes match', base: BASE },
      license: null,
    }),
  ];
  return {
    status: {
      ready,
      engine: ready ? 'ready' : 'idle',
      engine_error: null,
      home: '/home/me/.local/share/ramole',
      base: ready
        ? {
            id: BASE,
            path: '/home/me/.cache/ramole/models/SmolLM2-135M-Instruct',
            architecture: 'llama',
            context: 8192,
            weight_bytes: 269_060_552,
          }
        : null,
      embedder: ready ? { id: 'sentence-transformers/all-MiniLM-L6-v2', path: '/home/me/.cache/ramole/models/all-MiniLM-L6-v2' } : null,
      adapters: adapters.length,
      router: false,
      suggested: {
        base_path: '/opt/ramole/models/SmolLM2-135M-Instruct',
        embedder_path: '/opt/ramole/models/all-MiniLM-L6-v2',
      },
    },
    settings: {
      data_dir: '/home/me/.local/share/ramole',
      data_dir_next: null,
      hub_endpoint: null,
      hub_offline: false,
      threads: 0,
      k: DEFAULT_K,
      scoring: 'cosine',
      gating: 'softmax:0.1',
      plan: 'auto',
      max_tokens: 256,
      temperature: 0.7,
      top_p: 0.9,
      token_set: false,
      token_store: 'Secret Service',
    },
    token: null,
    adapters,
    hub: [
      hit('community/sql-lora', 48_210, 311, { installed_as: 'sql-lora' }),
      hit('alice/smollm2-legal-lora', 12_004, 88, { ranks: [16], license: 'mit' }),
      hit('bob/cooking-lora', 5_120, 40, {
        verdict: 'warning',
        reason: 'no declared base model; shapes match SmolLM2-135M',
        declared_base: null,
      }),
      hit('carol/llama3-8b-medical', 90_551, 1_204, {
        verdict: 'incompatible',
        compatible: false,
        reason: 'declared base meta-llama/Meta-Llama-3-8B (hidden 4096 ≠ 576)',
        declared_base: 'meta-llama/Meta-Llama-3-8B',
        cost: null,
        size: 167_832_240,
        ranks: [64],
        target_modules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
      }),
      hit('dave/smollm2-french-lora', 2_230, 12, { gated: 'auto', license: 'cc-by-4.0' }),
    ],
    sessions: [],
    messages: new Map(),
    nextSession: 1,
    nextMessage: 1,
    nextKey: adapters.length + 1,
    cancelled: new Set(),
    running: new Set(),
    router: false,
    watchers: [],
  };
}

function hit(repo: string, downloads: number, likes: number, extra: Partial<AdapterHit> = {}): AdapterHit {
  return {
    repo,
    downloads,
    likes,
    license: 'apache-2.0',
    last_modified: '2025-02-01T12:00:00Z',
    gated: null,
    size: 3_700_000,
    declared_base: BASE,
    subfolder: null,
    verdict: 'compatible',
    compatible: true,
    reason: 'same base model',
    cost: { params: 921_600, memory_bytes: 3_686_400, decode_slowdown: 0.012 },
    ranks: [8],
    target_modules: ['q_proj', 'v_proj'],
    installed_as: null,
    ...extra,
  };
}

function plain(a: AdapterDetail): Adapter {
  const { sample_list: _drop, ...rest } = a;
  void _drop;
  return { ...rest };
}

const words = (s: string) => s.toLowerCase().match(/[a-z]+/g) ?? [];

/** A deterministic pseudo-similarity between a query and an adapter's samples. */
function score(query: string, a: AdapterDetail): number {
  const q = new Set(words(query));
  const vocab = new Set([...words(a.name), ...a.sample_list.flatMap((s) => words(s.text)), ...words(a.card_summary ?? '')]);
  let shared = 0;
  for (const w of q) if (vocab.has(w) && w.length > 3) shared += 1;
  let h = 0;
  for (const ch of a.id + query) h = (h * 31 + ch.charCodeAt(0)) % 997;
  return Math.min(0.95, 0.18 + 0.22 * shared + (h / 997) * 0.12);
}

function softmax(xs: number[], tau: number): number[] {
  const m = Math.max(...xs);
  const e = xs.map((x) => Math.exp((x - m) / tau));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

/** Layers of the fake base (SmolLM2-135M has 30). */
const ROUTER_LAYERS = 30;

/** The reply as token-like pieces: words with their leading space, long words cut in 4s. */
function tokenPieces(text: string): string[] {
  const spans = text.match(/\s*\S+|\s+/g) ?? [];
  return spans.flatMap((w) => {
    const lead = w.match(/^\s*/)![0];
    const body = w.slice(lead.length);
    if (body.length <= 5) return [w];
    const parts = body.match(/.{1,4}/gs) ?? [];
    return [lead + parts[0], ...parts.slice(1)];
  });
}

/** Deterministic 0..1 noise. */
function noise(...keys: (string | number)[]): number {
  let h = 2166136261;
  for (const ch of keys.join('|')) h = Math.imul(h ^ ch.charCodeAt(0), 16777619);
  return ((h >>> 0) % 10007) / 10007;
}

/**
 * Plausible RouterLoRA gates for a reply: per layer and token column (the prompt, then the reply's
 * tokens bucketed to at most 31 columns), a softmax around the retrieval prior that drifts
 * smoothly with depth and jitters per token, rounded to 3 decimals.
 */
function routerGates(query: string, reply: string, served: ServedAdapter[]): LayerGates {
  const pieces = tokenPieces(reply);
  const per = Math.max(1, Math.ceil(pieces.length / 31));
  const tokens = ['<prompt>'];
  for (let i = 0; i < pieces.length; i += per) tokens.push(pieces.slice(i, i + per).join(''));
  const prior = served.map((a) => Math.log(Math.max(1e-3, a.gate)));
  const gates = Array.from({ length: ROUTER_LAYERS }, (_, l) =>
    tokens.map((tok, t) => {
      const logits = served.map((a, j) => {
        const depth = Math.sin((l / ROUTER_LAYERS) * Math.PI * (1 + j * 0.7) + noise(a.id) * 6.28);
        const jitter = t === 0 ? 0 : (noise(query, tok, t, a.id) - 0.5) * 2.2;
        return prior[j] * 0.6 + depth * 1.1 + jitter * (0.3 + l / ROUTER_LAYERS);
      });
      const g = softmax(logits, 1).map((x) => Math.round(x * 1000) / 1000);
      // Rounded gates still sum to 1: the largest takes the rounding error.
      const top = g.indexOf(Math.max(...g));
      g[top] = Math.round((g[top] + 1 - g.reduce((x, y) => x + y, 0)) * 1000) / 1000;
      return g;
    }),
  );
  return { adapters: served.map((a) => a.id), layers: ROUTER_LAYERS, tokens, gates };
}

/** Provenance.adapters of a router reply: gate = the mean over layers and reply token columns. */
function replyMeans(lg: LayerGates, served: ServedAdapter[]): ServedAdapter[] {
  const cols = lg.tokens.length > 1 ? lg.tokens.map((_, t) => t).slice(1) : [0];
  const sums = served.map(() => 0);
  for (const row of lg.gates) for (const t of cols) row[t].forEach((g, j) => (sums[j] += g));
  const total = sums.reduce((a, b) => a + b, 0) || 1;
  return served.map((a, j) => ({ ...a, gate: sums[j] / total }));
}

export function createFakeBackend(opts: FakeOptions = {}): FakeBackend {
  const delayMs = opts.delayMs ?? 0;
  const loadMs = opts.loadMs ?? 0;
  const st = initialState(opts.ready ?? true);
  st.router = opts.router ?? false;
  st.status.router = st.router;
  const calls: FakeBackend['calls'] = [];

  const sleep = (ms = delayMs) => (ms > 0 ? new Promise<void>((r) => setTimeout(r, ms)) : Promise.resolve());
  const checkCancel = (task: string) => {
    if (st.cancelled.has(task)) {
      st.cancelled.delete(task);
      st.running.delete(task);
      throw err('cancelled', 'cancelled by the user');
    }
  };
  const needReady = () => {
    if (!st.status.ready || st.status.engine !== 'ready') throw err('not_ready', 'the model is not loaded yet');
  };
  const findAdapter = (id: unknown) => {
    const a = st.adapters.find((x) => x.id === id);
    if (!a) throw err('not_found', `no adapter "${String(id)}"`);
    return a;
  };
  const findSession = (id: unknown) => {
    const s = st.sessions.find((x) => x.id === id);
    if (!s) throw err('not_found', `no chat ${String(id)}`);
    return s;
  };
  const emit = <T>(ch: unknown, ev: T) => {
    (ch as EventChannel<T>).onmessage(ev);
  };
  const syncCount = () => {
    st.status.adapters = st.adapters.length;
  };
  /** As the shell's set_engine: every watcher hears the new status. */
  const setEngine = (engine: AppStatus['engine']) => {
    st.status.engine = engine;
    for (const w of st.watchers) w.onmessage(structuredClone(st.status));
  };

  async function progress(task: string, ch: unknown, file: string, total: number, stages: ProgressEvent['stage'][]) {
    st.running.add(task);
    const steps = 8;
    for (let i = 1; i <= steps; i++) {
      checkCancel(task);
      emit<ProgressEvent>(ch, { stage: 'download', file, done: Math.round((total * i) / steps), total });
      await sleep();
    }
    for (const stage of stages) {
      checkCancel(task);
      emit<ProgressEvent>(ch, { stage, file: '', done: 0, total: 0 });
      await sleep();
    }
    checkCancel(task);
    st.running.delete(task);
  }

  function route(req: SendRequest, query: string): Provenance {
    const k = req.k ?? st.settings.k;
    const tau = Number(st.settings.gating.split(':')[1] ?? '0.1') || 0.1;
    // `auto` is stored as what it resolved to.
    let plan: Plan = req.plan === 'auto' ? 'none' : req.plan;
    let served: ServedAdapter[] = [];
    let gating: ReplyGating | null = st.settings.gating;
    if (req.pinned.length) {
      const pins = req.pinned.map((p) => ({ a: findAdapter(p.id), gate: p.gate }));
      const given = pins.map((p) => p.gate ?? 1 / pins.length);
      const s = given.reduce((a, b) => a + b, 0) || 1;
      served = pins.map((p, i) => ({ id: p.a.id, name: p.a.name, score: null, gate: given[i] / s }));
      gating = plan === 'router' ? null : 'given';
      if (req.plan === 'auto') plan = served.length > 1 ? 'mixture' : 'selection';
    } else if (req.plan !== 'none') {
      const cands = st.adapters
        .filter((a) => a.enabled && a.verdict.compat !== 'incompatible' && !req.exclude.includes(a.id))
        .map((a) => ({ a, s: score(query, a) }))
        .sort((x, y) => y.s - x.s)
        .slice(0, k);
      if (req.plan === 'auto') {
        const [a, b] = cands;
        plan = !a ? 'none' : st.router ? 'router' : a.s >= 0.6 && (!b || a.s - b.s >= 0.25) ? 'selection' : 'mixture';
      }
      // The router's gates come at the end of the reply (routerGates); these are the prior.
      if (plan === 'router') gating = null;
      if (plan === 'selection') {
        served = cands.slice(0, 1).map((c) => ({ id: c.a.id, name: c.a.name, score: c.s, gate: 1 }));
      } else if (plan !== 'none') {
        const g = st.settings.gating.startsWith('softmax') ? softmax(cands.map((c) => c.s), tau) : cands.map(() => 1 / cands.length);
        served = cands.map((c, i) => ({ id: c.a.id, name: c.a.name, score: c.s, gate: g[i] }));
      }
    }
    if (plan === 'none') {
      served = [];
      gating = null;
    }
    return {
      plan,
      k,
      query,
      base_model: st.status.base?.id ?? BASE,
      embedder: st.status.embedder?.id ?? null,
      scoring: st.settings.scoring,
      gating,
      adapters: served,
      // As the shell: the record comes with the finished reply, not with the routing event.
      generation: null,
      layer_gates: null,
    };
  }

  function replyText(query: string, prov: Provenance): string {
    const who = prov.adapters.length ? prov.adapters.map((a) => a.name).join(' + ') : 'the base model';
    if (/sql|query|table|code/i.test(query)) {
      return `Here is a query (served by **${who}**):\n\n\`\`\`sql\nSELECT name, COUNT(*) AS orders\nFROM customers c JOIN orders o ON o.customer_id = c.id\nGROUP BY name\nORDER BY orders DESC\nLIMIT 10;\n\`\`\`\n\nIt lists the ten customers with the most orders.`;
    }
    return `You asked: *${query.slice(0, 80)}*.\n\nThis reply was written by **${who}** with the \`${prov.plan}\` plan. Some points:\n\n1. Retrieval picked ${prov.adapters.length} adapter(s).\n2. Gates always sum to 1.\n3. Everything runs locally.`;
  }

  async function chatSend(req: SendRequest, ch: unknown): Promise<ChatReply> {
    needReady();
    if (req.k !== null && !(Number.isInteger(req.k) && req.k >= 1 && req.k <= MAX_K)) {
      throw err('invalid', `k = ${req.k} must be within 1..=${MAX_K}`);
    }
    if (req.plan === 'router' && !st.router) {
      throw err('invalid', `plan router needs a trained router for ${st.status.base?.id ?? BASE}; train one or choose another plan`);
    }
    const action = req.action;
    let session: ChatSession;
    if (req.session === null) {
      if (action.kind !== 'send') throw err('invalid', `${action.kind} needs an existing chat`);
      session = {
        id: st.nextSession++,
        title: req.text.slice(0, 40) || 'New chat',
        system_prompt: req.system_prompt,
        created_at: now(),
        updated_at: now(),
      };
      st.sessions.unshift(session);
      st.messages.set(session.id, []);
    } else {
      session = findSession(req.session);
    }
    const msgs = st.messages.get(session.id)!;
    let history: TranscriptMessage[];
    let query: string;
    let userId: number | null = null;
    if (action.kind === 'send') {
      if (!req.text.trim()) throw err('invalid', 'empty message');
      query = req.text;
      history = msgs;
    } else if (action.kind === 'regenerate') {
      const last = msgs[msgs.length - 1];
      if (!last || last.role !== 'assistant') throw err('invalid', 'no reply to regenerate');
      history = msgs.slice(0, -1);
      const u = history[history.length - 1];
      query = u?.content ?? '';
      userId = u?.id ?? null;
    } else {
      const idx = msgs.findIndex((m) => m.id === action.message_id && m.role === 'user');
      if (idx < 0) throw err('not_found', `no user message ${action.message_id}`);
      if (action.kind === 'edit') {
        if (!req.text.trim()) throw err('invalid', 'empty message');
        history = msgs.slice(0, idx);
        query = req.text;
      } else {
        history = msgs.slice(0, idx + 1);
        query = msgs[idx].content;
        userId = null;
      }
    }
    const prov = route(req, query);
    st.running.add(req.stream_id);
    emit<ChatEvent>(ch, { event: 'routing', provenance: prov });
    await sleep();
    // Store the user message now (send / edit), as the shell does.
    if (action.kind === 'send' || action.kind === 'edit') {
      const u: TranscriptMessage = { id: st.nextMessage++, role: 'user', content: query, created_at: now(), provenance: null };
      history = [...history, u];
      userId = u.id;
      st.messages.set(session.id, history);
    } else if (action.kind === 'regenerate') {
      st.messages.set(session.id, history);
    }
    // As the shell: a new session's id and the stored user message's id arrive only with `done`.
    emit<ChatEvent>(ch, { event: 'started', session: req.session === null ? null : session.id, user_message: null });
    const full = replyText(query, prov);
    const chunks = full.match(/[\s\S]{1,6}/g) ?? [];
    let text = '';
    let finish: FinishReason = 'eos';
    for (const c of chunks) {
      if (st.cancelled.has(req.stream_id)) {
        st.cancelled.delete(req.stream_id);
        finish = 'cancelled';
        break;
      }
      text += c;
      emit<ChatEvent>(ch, { event: 'text', delta: c });
      await sleep();
    }
    st.running.delete(req.stream_id);
    const generated = Math.max(1, Math.round(text.length / 4));
    const provenance: Provenance = {
      ...prov,
      generation: {
        max_tokens: req.params.max_tokens,
        temperature: req.params.temperature,
        top_p: req.params.top_p,
        top_k: 0,
        // The shell draws a seed when none is given and records it; here one from the query.
        seed: req.params.seed ?? Math.floor(noise('seed', query) * 2 ** 31),
        stop: [],
        prompt_tokens: 24 + history.length * 12,
        generated_tokens: generated,
        finish_reason: finish,
        dropped_messages: 0,
      },
    };
    if (prov.plan === 'router' && prov.adapters.length) {
      const lg = routerGates(query, text, prov.adapters);
      provenance.layer_gates = lg;
      provenance.adapters = replyMeans(lg, prov.adapters);
    }
    let replyId: number | null = null;
    if (action.kind !== 'compare') {
      const m: TranscriptMessage = { id: st.nextMessage++, role: 'assistant', content: text, created_at: now(), provenance };
      st.messages.get(session.id)!.push(m);
      replyId = m.id;
      session.updated_at = now();
    }
    const reply: ChatReply = {
      session: session.id,
      user_message: action.kind === 'compare' ? null : userId,
      message: replyId,
      reply: text,
      finish_reason: finish,
      provenance,
      dropped_messages: 0,
    };
    emit<ChatEvent>(ch, { event: 'done', reply });
    return reply;
  }

  async function handle(cmd: string, a: Record<string, unknown>): Promise<unknown> {
    switch (cmd) {
      case 'app_status':
        return structuredClone(st.status);
      case 'app_watch':
        st.watchers.push(a.on_status as EventChannel<AppStatus>);
        return structuredClone(st.status);
      case 'setup_models': {
        const r = a.request as SetupRequest;
        if (!r?.base_path?.trim()) throw err('invalid', 'choose a base model');
        if (!r.embedder_path?.trim()) throw err('invalid', 'choose an embedder');
        if (r.base_path.includes('missing')) throw err('not_found', `no model at ${r.base_path}`);
        const name = r.base_path.split('/').filter(Boolean).pop() ?? 'base';
        st.status.ready = true;
        st.status.base = { id: r.base_id ?? name, path: r.base_path, architecture: 'llama', context: 8192, weight_bytes: 269_060_552 };
        st.status.embedder = { id: r.embedder_path.split('/').filter(Boolean).pop() ?? 'embedder', path: r.embedder_path };
        if (loadMs > 0) {
          setEngine('loading');
          setTimeout(() => setEngine('ready'), loadMs);
        } else {
          setEngine('ready');
        }
        return structuredClone(st.status);
      }
      case 'model_pull': {
        const r = a.request as PullRequest;
        const task = a.task_id as string;
        if (!r?.repo?.includes('/')) throw err('invalid', 'a repository looks like owner/name');
        if (st.settings.hub_offline) throw err('offline', 'offline mode is on');
        await progress(task, a.on_progress, r.file ?? 'model.safetensors', 269_060_552, ['validate']);
        const name = r.repo.split('/')[1];
        return {
          repo: r.repo,
          commit: 'c0ffee1234567890c0ffee1234567890c0ffee12',
          path: `/home/me/.cache/huggingface/${name}${r.file ? `/${r.file}` : ''}`,
          files: [r.file ?? 'model.safetensors'],
          bytes: 269_060_552,
        };
      }
      case 'hub_search': {
        const r = a.request as HubSearchRequest;
        if (st.settings.hub_offline) throw err('offline', 'offline mode is on: the Hub is not reachable');
        const q = (r.query ?? '').toLowerCase().trim();
        if (q === 'error') throw err('hub', 'the Hub answered 503 Service Unavailable');
        await sleep();
        let res = st.hub.filter((h) => !q || h.repo.toLowerCase().includes(q));
        if (r.sort === 'recent') {
          res = [...res].sort((x, y) => (y.last_modified ?? '').localeCompare(x.last_modified ?? ''));
        } else if (r.sort === 'likes' || r.sort === 'downloads') {
          const key = r.sort;
          res = [...res].sort((x, y) => y[key] - x[key]);
        } else {
          throw err('invalid', `unknown sort ${String(r.sort)}`);
        }
        res = res.slice(0, r.limit);
        return structuredClone(res);
      }
      case 'adapter_install': {
        const r = a.request as InstallRequest;
        const task = a.task_id as string;
        const h = st.hub.find((x) => x.repo === r.repo);
        if (!h) throw err('not_found', `no repository ${r.repo}`);
        if (!h.compatible) throw err('invalid', `incompatible: ${h.reason}`);
        if (h.installed_as) throw err('invalid', `already installed as ${h.installed_as}`);
        if (h.gated) throw err('hub', 'this repository is gated: accept its terms on the Hub and set a token');
        await progress(task, a.on_progress, 'adapter_model.safetensors', h.size ?? 1_000_000, ['validate', 'embed', 'commit']);
        const id = r.repo.split('/')[1];
        const d = adapter(st.nextKey++, id, id.replace(/-lora$/, '').replace(/[-_]/g, ' '), id.replace(/-/g, ' '), {
          source: { kind: 'hub', repo: r.repo, revision: r.revision ?? 'main', commit: '9b1e0c7d2a4f6e8d0c2b4a6f8e0d2c4b6a8f0e2d' },
          verdict: { compat: h.verdict, reason: h.reason, base: BASE },
          installed_at: now(),
        });
        st.adapters.push(d);
        h.installed_as = id;
        syncCount();
        return plain(d);
      }
      case 'task_cancel': {
        const t = a.task_id as string;
        if (!st.running.has(t)) return false;
        st.cancelled.add(t);
        return true;
      }
      case 'adapters_list':
        return st.adapters.map((x) => plain(structuredClone(x)));
      case 'adapter_get':
        return structuredClone(findAdapter(a.id));
      case 'adapter_set_enabled': {
        const d = findAdapter(a.id);
        d.enabled = Boolean(a.enabled);
        return plain(structuredClone(d));
      }
      case 'adapter_remove': {
        const d = findAdapter(a.id);
        st.adapters = st.adapters.filter((x) => x.id !== d.id);
        for (const h of st.hub) if (h.installed_as === d.id) h.installed_as = null;
        syncCount();
        return plain(structuredClone(d));
      }
      case 'adapter_add_local': {
        const r = a.request as AddLocalRequest;
        if (!r?.path?.trim()) throw err('invalid', 'give the folder of the adapter');
        if (!r.path.startsWith('/')) throw err('not_found', `no adapter_config.json in ${r.path}`);
        const folder = r.path.split('/').filter(Boolean).pop() ?? 'adapter';
        const id = folder.toLowerCase().replace(/[^a-z0-9-]+/g, '-');
        if (st.adapters.some((x) => x.id === id)) throw err('invalid', `an adapter "${id}" is already installed`);
        const d = adapter(st.nextKey++, id, r.name?.trim() || folder, folder, { source: { kind: 'local', path: r.path }, installed_at: now() });
        st.adapters.push(d);
        syncCount();
        return plain(d);
      }
      case 'adapter_set_samples': {
        const d = findAdapter(a.id);
        const samples = a.samples as string[];
        if (!Array.isArray(samples)) throw err('invalid', 'samples must be a list');
        const clean = samples.map((s) => s.trim()).filter(Boolean);
        if (!clean.length) throw err('invalid', 'give at least one sample prompt');
        await sleep();
        d.sample_list = clean.map((text) => ({ text, origin: 'user' }));
        d.samples = clean.length;
        return structuredClone(d);
      }
      case 'adapter_train': {
        needReady();
        const r = a.request as TrainRequest;
        const task = a.task_id as string;
        if (!r.name?.trim()) throw err('invalid', 'give the adapter a name');
        if (!r.examples_path && !r.examples?.length) throw err('invalid', 'give examples (a JSONL path or inline)');
        if (r.examples_path && !r.examples_path.endsWith('.jsonl')) throw err('not_found', `no file ${r.examples_path}`);
        st.running.add(task);
        for (let step = 1; step <= r.steps; step++) {
          checkCancel(task);
          emit<TrainProgress>(a.on_progress, {
            step,
            steps: r.steps,
            loss: 2.6 * Math.exp(-step / (r.steps / 3)) + 0.35 + 0.08 * Math.sin(step),
            tokens_per_s: 410 + (step % 7) * 3,
            eta_s: ((r.steps - step) * Math.max(delayMs, 1)) / 1000,
          });
          await sleep(delayMs * 2);
        }
        checkCancel(task);
        st.running.delete(task);
        const id = r.name.toLowerCase().replace(/[^a-z0-9-]+/g, '-');
        const d = adapter(st.nextKey++, id, r.name, r.name, {
          source: { kind: 'local', path: `${st.settings.data_dir}/adapters/${id}` },
          ranks: [r.rank],
          alpha: r.alpha,
          installed_at: now(),
        });
        st.adapters.push(d);
        syncCount();
        return plain(d);
      }
      case 'chats_list':
        return structuredClone([...st.sessions].sort((x, y) => y.updated_at.localeCompare(x.updated_at)));
      case 'chat_get': {
        const s = findSession(a.id);
        return structuredClone({ session: s, messages: st.messages.get(s.id) ?? [] } satisfies Transcript);
      }
      case 'chat_rename': {
        const s = findSession(a.id);
        const t = String(a.title ?? '').trim();
        if (!t) throw err('invalid', 'a title cannot be empty');
        s.title = t;
        return structuredClone(s);
      }
      case 'chat_set_system_prompt': {
        const s = findSession(a.id);
        const p = a.system_prompt as string | null;
        s.system_prompt = p && p.trim() ? p : null;
        return structuredClone(s);
      }
      case 'chat_delete': {
        const s = findSession(a.id);
        st.sessions = st.sessions.filter((x) => x.id !== s.id);
        st.messages.delete(s.id);
        return null;
      }
      case 'chat_export': {
        const s = findSession(a.id);
        const msgs = st.messages.get(s.id) ?? [];
        const fmt = a.format;
        if (fmt !== 'json' && fmt !== 'markdown') throw err('invalid', `unknown format ${String(fmt)}`);
        const content =
          fmt === 'json'
            ? JSON.stringify({ session: s, messages: msgs }, null, 2)
            : `# ${s.title}\n\n` + msgs.map((m) => `**${m.role}**: ${m.content}`).join('\n\n');
        return { path: `/home/me/Downloads/chat-${s.id}.${fmt === 'json' ? 'json' : 'md'}`, content };
      }
      case 'chat_send':
        return chatSend(a.request as SendRequest, a.on_event);
      case 'settings_get':
        return structuredClone(st.settings);
      case 'settings_set': {
        const s = a.settings as AppSettings;
        if (!s) throw err('invalid', 'no settings');
        if (!(Number.isInteger(s.k) && s.k >= 1 && s.k <= MAX_K)) throw err('invalid', `k = ${s.k} must be within 1..=${MAX_K}`);
        if (!(s.temperature >= 0 && s.temperature <= 2)) throw err('invalid', 'temperature must be in 0..2');
        if (!(s.top_p > 0 && s.top_p <= 1)) throw err('invalid', 'top_p must be in (0, 1]');
        if (!/^(uniform|softmax:\d+(\.\d+)?)$/.test(s.gating)) throw err('invalid', 'gating is "uniform" or "softmax:<tau>"');
        st.settings = { ...s, data_dir: st.settings.data_dir, token_set: st.settings.token_set, token_store: st.settings.token_store };
        return structuredClone(st.settings);
      }
      case 'hub_token_set': {
        const t = a.token as string | null;
        st.token = t && t.trim() ? t.trim() : null;
        st.settings.token_set = st.token !== null;
        return structuredClone(st.settings);
      }
      default:
        throw err('internal', `unknown command ${cmd}`);
    }
  }

  return {
    calls,
    state: st,
    channel: <T>(onEvent: (e: T) => void): EventChannel<T> => ({ onmessage: onEvent }),
    invoke: async (cmd, args) => {
      calls.push({ cmd, args });
      return handle(cmd, args ?? {});
    },
  };
}
