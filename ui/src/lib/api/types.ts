// The data the desktop shell (src-tauri) exchanges with the UI. Field names are snake_case,
// as in the CLI's JSON and the stored provenance (DESIGN.md 3a vocabulary: plans, gates).

/** Every failed command rejects with this (never a bare string). */
export interface ApiError {
  /** invalid | not_found | not_ready | busy | hub | offline | cancelled | model | io | internal */
  code: string;
  message: string;
}

export type Plan = 'selection' | 'mixture' | 'fusion' | 'router' | 'none';
export type PlanChoice = 'auto' | Plan;
export const PLAN_CHOICES: PlanChoice[] = ['auto', 'selection', 'mixture', 'fusion', 'router', 'none'];

/** One line per plan (DESIGN.md 3a), shown as the plan selects' tooltips. */
export const PLAN_HINTS: Record<PlanChoice, string> = {
  auto: 'router when a trained router exists for the active base, else mixture',
  selection: 'the top-1 retrieved adapter',
  mixture: 'k retrieved adapters, their outputs mixed with gates',
  fusion: 'k retrieved adapters, their weights averaged with gates (equal ranks only)',
  router: 'RouterLoRA: per-token, per-layer gates over k retrieved adapters; needs a trained router for the active base',
  none: 'the base model only',
};
/** Shown next to a plan select while `router` is chosen. */
export const ROUTER_HINT = 'needs a trained router for the active base';

export type EngineState = 'idle' | 'loading' | 'ready' | 'failed';

export interface BaseInfo {
  id: string;
  path: string;
  architecture: string;
  /** Context length in tokens. */
  context: number;
  /** Bytes of the weights as stored. */
  weight_bytes: number;
}

export interface AppStatus {
  /** A base model and an embedder are set up in the data folder. */
  ready: boolean;
  engine: EngineState;
  engine_error: string | null;
  /** The data folder in use ($RAMOLE_HOME). */
  home: string;
  base: BaseInfo | null;
  embedder: { id: string; path: string } | null;
  adapters: number;
  /** A trained router exists for the active base (plan `router` works; `auto` picks it). */
  router: boolean;
  /** Paths the run script prepared (PyPI SmolLM2 + MiniLM) for the first-run screen. */
  suggested: { base_path: string | null; embedder_path: string | null };
}

export interface SetupRequest {
  base_path: string;
  embedder_path: string;
  base_id: string | null;
}

export type Stage = 'download' | 'validate' | 'embed' | 'commit' | 'load';

/** Progress of a download / install / model load (Channel events). */
export interface ProgressEvent {
  stage: Stage;
  /** The file being downloaded, empty for other stages. */
  file: string;
  done: number;
  total: number;
}

export interface PullRequest {
  repo: string;
  revision: string | null;
  /** A GGUF file in the repository; null pulls a safetensors model / embedder. */
  file: string | null;
}

export interface Pulled {
  repo: string;
  commit: string;
  path: string;
  files: string[];
  bytes: number;
}

export type Compat = 'compatible' | 'warning' | 'incompatible';
export type HubSort = 'downloads' | 'likes' | 'updated' | 'trending';

export interface HubSearchRequest {
  query: string | null;
  sort: HubSort;
  limit: number;
}

export interface AdapterCost {
  params: number;
  memory_bytes: number;
  /** Extra decode time as a fraction of the base's (0.01 = 1%). */
  decode_slowdown: number;
}

export interface AdapterHit {
  repo: string;
  downloads: number;
  likes: number;
  license: string | null;
  last_modified: string | null;
  gated: string | null;
  size: number | null;
  declared_base: string | null;
  subfolder: string | null;
  verdict: Compat;
  compatible: boolean;
  reason: string;
  cost: AdapterCost | null;
  ranks: number[];
  target_modules: string[];
  /** The id under which it is installed, when it is. */
  installed_as: string | null;
}

export interface InstallRequest {
  repo: string;
  revision: string | null;
  subfolder: string | null;
}

export type AdapterSource =
  | { kind: 'hub'; repo: string; revision: string; commit: string | null; subfolder?: string }
  | { kind: 'local'; path: string };

export interface Verdict {
  compat: Compat;
  reason: string;
  base: string;
}

export interface Adapter {
  id: string;
  name: string;
  source: AdapterSource;
  base_model: string | null;
  architecture: string;
  ranks: number[];
  alpha: number;
  target_modules: string[];
  size_bytes: number;
  license: string | null;
  card_summary: string | null;
  verdict: Verdict;
  enabled: boolean;
  installed_at: string;
  samples: number;
}

export type SampleOrigin = 'samples' | 'card' | 'dataset' | 'probe' | 'user';

export interface Sample {
  text: string;
  origin: SampleOrigin;
}

export interface AdapterDetail extends Adapter {
  sample_list: Sample[];
}

export interface AddLocalRequest {
  path: string;
  name: string | null;
}

export interface TrainExample {
  input: string;
  target: string;
}

export interface TrainRequest {
  /** Name of the new adapter (also its folder name). */
  name: string;
  /** A JSONL file of {"input", "target"} lines, or... */
  examples_path: string | null;
  /** ...examples given inline (one of the two). */
  examples: TrainExample[] | null;
  steps: number;
  rank: number;
  alpha: number;
  lr: number;
  batch: number;
  template: 'alpaca' | 'chat';
}

/** Training progress (Channel events). */
export interface TrainProgress {
  step: number;
  steps: number;
  loss: number;
  tokens_per_s: number;
  eta_s: number;
}

export interface ChatSession {
  id: number;
  title: string;
  system_prompt: string | null;
  created_at: string;
  updated_at: string;
}

export interface ServedAdapter {
  id: string;
  name: string;
  /** Retrieval score; null when the adapter was pinned by hand. */
  score: number | null;
  gate: number;
}

export interface Provenance {
  plan: string;
  k: number;
  query: string;
  base_model: string;
  embedder: string | null;
  scoring: string | null;
  /** uniform | softmax:<tau> | given */
  gating: string | null;
  adapters: ServedAdapter[];
  /** max_tokens, temperature, top_p, top_k, seed, prompt_tokens, generated_tokens, finish_reason, ... */
  generation: Record<string, unknown>;
  /** Plan `router` only (null otherwise): the router's gates per layer and token column. */
  layer_gates: LayerGates | null;
}

/**
 * The router's gates per layer and token column (Provenance.layer_gates of plan `router`).
 * Validate with checkLayerGates (lib/layerGates.ts) before use: it comes from stored JSON.
 */
export interface LayerGates {
  /** The gate columns' adapter ids, in order (the same ids as Provenance.adapters[].id). */
  adapters: string[];
  /** Number of layers (= gates.length). */
  layers: number;
  /**
   * Column labels (at most 32): the first is always the literal `<prompt>` (the mean over all
   * prompt tokens), then the reply's tokens as text; a label may cover several tokens.
   */
  tokens: string[];
  /** gates[layer][token column][adapter]: mean gate over the layer's LoRA sites; sums to ~1. */
  gates: number[][][];
}

export interface Message {
  id: number;
  role: 'user' | 'assistant' | 'system';
  content: string;
  created_at: string;
  /** On assistant messages: which adapters and gates served it. */
  provenance: Provenance | null;
}

export interface ChatDetail {
  session: ChatSession;
  messages: Message[];
}

export interface Pin {
  id: string;
  /** Gate override (slider); null = share the rest equally. Gates are renormalised to sum 1. */
  gate: number | null;
}

export interface GenerationParams {
  max_tokens: number;
  temperature: number;
  top_p: number;
  seed: number | null;
}

/**
 * send: a new user message. regenerate: replace the last reply of the session.
 * edit: replace user message `message_id` with `text`, dropping everything after it, and answer.
 * compare: answer the history up to user message `message_id` again with this request's plan
 *          (not stored in the session).
 */
export type ChatAction =
  | { kind: 'send' }
  | { kind: 'regenerate' }
  | { kind: 'edit'; message_id: number }
  | { kind: 'compare'; message_id: number };

export interface SendRequest {
  /** null starts a new session. */
  session: number | null;
  /** Used by task_cancel (the Stop button). */
  stream_id: string;
  action: ChatAction;
  /** The message (send / edit); ignored by regenerate / compare. */
  text: string;
  plan: PlanChoice;
  /** null = the settings' k. */
  k: number | null;
  /** Adapter ids never retrieved in this request. */
  exclude: string[];
  /** Non-empty: these adapters serve the reply instead of retrieval. */
  pinned: Pin[];
  /** System prompt of a new session. */
  system_prompt: string | null;
  params: GenerationParams;
}

export interface ChatReply {
  session: number;
  /** The stored user message (null for compare). */
  user_message: number | null;
  /** The stored reply (null for compare). */
  message: number | null;
  reply: string;
  finish_reason: 'eos' | 'stop' | 'length' | 'cancelled';
  provenance: Provenance;
  dropped_messages: number;
}

/** Events of one chat_send (Channel), in this order: routing, started, text*, done. */
export type ChatEvent =
  | { event: 'routing'; provenance: Provenance }
  /** session: null until a new session is stored (at done); user_message: null until done. */
  | { event: 'started'; session: number | null; user_message: number | null }
  | { event: 'text'; delta: string }
  | { event: 'done'; reply: ChatReply };

export interface AppSettings {
  /** The data folder in use; `data_dir_next` applies at the next start. */
  data_dir: string;
  data_dir_next: string | null;
  hub_endpoint: string | null;
  hub_offline: boolean;
  /** Compute threads; 0 = all cores (applies at the next start). */
  threads: number;
  k: number;
  scoring: 'cosine' | 'ip';
  /** uniform | softmax:<tau> */
  gating: string;
  plan: PlanChoice;
  max_tokens: number;
  temperature: number;
  top_p: number;
  /** Whether a Hub token is stored in the system keyring (the token itself never comes back). */
  token_set: boolean;
  /** Where tokens are kept, e.g. "Secret Service" or an explanation of why none is available. */
  token_store: string;
}

export interface ExportResult {
  path: string;
  content: string;
}
