//! The local OpenAI-compatible HTTP API: `POST /v1/chat/completions` (streamed as server-sent
//! events ending in `[DONE]`, or as one JSON answer) and `GET /v1/models`, over the engine and
//! the library. Every request is routed like a chat message (retrieval on the latest user
//! message, or adapters named in the `ramole` extension, or an adapter named as the `model`), and
//! the answer carries the provenance. Nothing is stored: the API is stateless like OpenAI's.
//!
//! The async side only parses, routes events and writes bytes: retrieval (embedding) runs on
//! tokio's blocking pool and generation on the engine's thread. Concurrent clients share the
//! engine's batches; a client that goes away cancels its row.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::catalog::Provenance;
use crate::chat::{self, ChatError, PlanChoice, Routing};
use crate::engine::{Engine, EngineError, Job, JobEvent};
use crate::library::{Library, LibraryError};
use crate::model::{ChatMessage, FinishReason, GenerateParams, Generation, Sampling};
use crate::mole::{Gating, Plan};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// Most messages in one request.
pub const MAX_MESSAGES: usize = 512;
/// Most stop strings (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// `max_tokens` when a request gives none.
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// An error answered to a client: status and OpenAI's error object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: Some(param),
            code: None,
        }
    }

    fn server(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param,
                         "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Busy { .. } => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                message: e.to_string(),
                param: None,
                code: Some("engine_busy"),
            },
            EngineError::Invalid(m) => Self::invalid("messages", m),
            other => Self::server(other.to_string()),
        }
    }
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        match e {
            ChatError::Invalid(m) => Self::invalid("messages", m),
            ChatError::Mole(m) => Self::invalid("ramole", m.to_string()),
            ChatError::Engine(e) => e.into(),
            ChatError::Library(LibraryError::Invalid(m)) => Self::invalid("ramole", m),
            ChatError::Library(LibraryError::Catalog(
                e @ crate::catalog::CatalogError::NoAdapter(_),
            )) => Self {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                message: e.to_string(),
                param: Some("ramole"),
                code: Some("adapter_not_found"),
            },
            ChatError::Model(crate::model::ModelError::Input(m)) => Self::invalid("messages", m),
            other => Self::server(other.to_string()),
        }
    }
}

/// How a request chooses its adapters.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteAsk {
    /// Retrieval on the latest user message.
    Retrieve {
        k: Option<usize>,
        plan: PlanChoice,
        gating: Option<Gating>,
        exclude: Vec<String>,
    },
    /// Adapters named by hand, `(id, gate)`.
    Given {
        adapters: Vec<(String, f32)>,
        plan: Option<Plan>,
    },
}

/// A chat completion request, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// The `model` asked for (echoed back).
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub stream: bool,
    pub include_usage: bool,
    pub params: GenerateParams,
    pub route: RouteAsk,
}

fn field<'a>(obj: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn number(v: &Value, param: &'static str, lo: f64, hi: f64) -> Result<f64, ApiError> {
    let x = v
        .as_f64()
        .ok_or_else(|| ApiError::invalid(param, format!("{param} must be a number, got {v}")))?;
    if !(lo..=hi).contains(&x) {
        return Err(ApiError::invalid(
            param,
            format!("{param} = {x} must be between {lo} and {hi}"),
        ));
    }
    Ok(x)
}

fn count(v: &Value, param: &'static str, lo: u64, hi: u64) -> Result<u64, ApiError> {
    let x = v.as_u64().ok_or_else(|| {
        ApiError::invalid(param, format!("{param} must be a whole number, got {v}"))
    })?;
    if !(lo..=hi).contains(&x) {
        return Err(ApiError::invalid(
            param,
            format!("{param} = {x} must be between {lo} and {hi}"),
        ));
    }
    Ok(x)
}

/// The text of a message's `content`: a string, or an array of `{"type": "text", "text": ..}`
/// parts.
fn content_text(v: &Value, i: usize) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => out.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            "messages",
                            format!(
                                "messages[{i}].content: only text parts are supported, got {}",
                                kind.unwrap_or("a part without a type")
                            ),
                        ));
                    }
                }
            }
            Ok(out)
        }
        other => Err(ApiError::invalid(
            "messages",
            format!(
                "messages[{i}].content must be a string or an array of text parts, got {other}"
            ),
        )),
    }
}

/// Parses and checks a request body. `ctx` is the model's context length.
pub fn parse_request(body: &[u8], ctx: usize) -> Result<CompletionRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("the body is not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::invalid("body", "the body must be a JSON object"))?;
    let model = match field(obj, "model") {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(ApiError::invalid(
                "model",
                format!("model must be a string, got {other}"),
            ));
        }
    };
    let list = field(obj, "messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::invalid("messages", "messages must be a non-empty array"))?;
    if list.is_empty() || list.len() > MAX_MESSAGES {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "messages has {} entries; it needs 1 to {MAX_MESSAGES}",
                list.len()
            ),
        ));
    }
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::invalid(
                    "messages",
                    format!("messages[{i}].role {other:?} must be system, user or assistant"),
                ));
            }
        };
        let text = content_text(m.get("content").unwrap_or(&Value::Null), i)?;
        chat::check_message(&text).or_else(|e| match e {
            // An empty assistant turn is harmless history; an empty user turn is not.
            ChatError::Invalid(_) if role != "user" && text.trim().is_empty() => Ok(()),
            ChatError::Invalid(m) => {
                Err(ApiError::invalid("messages", format!("messages[{i}]: {m}")))
            }
            other => Err(other.into()),
        })?;
        messages.push(ChatMessage::new(role, text));
    }
    if messages.last().map(|m| m.role.as_str()) != Some("user") {
        return Err(ApiError::invalid(
            "messages",
            "the last message must be the user's: it is what gets answered (and what retrieval reads)",
        ));
    }
    if let Some(n) = field(obj, "n")
        && n.as_u64() != Some(1)
    {
        return Err(ApiError::invalid(
            "n",
            format!("n = {n}: only 1 choice is supported"),
        ));
    }
    let stream = match field(obj, "stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(ApiError::invalid(
                "stream",
                format!("stream must be true or false, got {other}"),
            ));
        }
    };
    let include_usage = field(obj, "stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let max_tokens = match field(obj, "max_completion_tokens").or(field(obj, "max_tokens")) {
        None => DEFAULT_MAX_TOKENS.min(ctx - 1),
        Some(v) => count(v, "max_tokens", 1, ctx as u64 - 1)? as usize,
    };
    let mut sampling = Sampling::default();
    if let Some(t) = field(obj, "temperature") {
        sampling.temperature = number(t, "temperature", 0.0, 2.0)? as f32;
    }
    if let Some(p) = field(obj, "top_p") {
        sampling.top_p = number(p, "top_p", 0.0, 1.0)? as f32;
        if sampling.top_p == 0.0 {
            return Err(ApiError::invalid("top_p", "top_p must be above 0"));
        }
    }
    if let Some(k) = field(obj, "top_k") {
        sampling.top_k = count(k, "top_k", 0, 1 << 20)? as usize;
    }
    if let Some(s) = field(obj, "seed") {
        sampling.seed = s
            .as_u64()
            .or_else(|| s.as_i64().map(|x| x as u64))
            .ok_or_else(|| {
                ApiError::invalid("seed", format!("seed must be an integer, got {s}"))
            })?;
    }
    let stop: Vec<String> = match field(obj, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::invalid("stop", format!("stop entries must be strings, got {s}"))
                })
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::invalid(
                "stop",
                format!("stop must be a string or an array of strings, got {other}"),
            ));
        }
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid(
            "stop",
            format!("{} stop strings; the limit is {MAX_STOP}", stop.len()),
        ));
    }
    let route = parse_route(field(obj, "ramole"))?;
    Ok(CompletionRequest {
        model,
        messages,
        stream,
        include_usage,
        params: GenerateParams {
            max_tokens,
            sampling,
            stop,
            ignore_eos: false,
        },
        route,
    })
}

/// The `ramole` extension: `{"k", "plan", "gating", "exclude"}` for retrieval, or
/// `{"adapters": [{"id", "gate"}], "plan"}` to name adapters.
fn parse_route(ext: Option<&Value>) -> Result<RouteAsk, ApiError> {
    let default = RouteAsk::Retrieve {
        k: None,
        plan: PlanChoice::Auto,
        gating: None,
        exclude: Vec::new(),
    };
    let Some(ext) = ext else {
        return Ok(default);
    };
    let obj = ext.as_object().ok_or_else(|| {
        ApiError::invalid("ramole", format!("ramole must be an object, got {ext}"))
    })?;
    for key in obj.keys() {
        if !["k", "plan", "gating", "exclude", "adapters"].contains(&key.as_str()) {
            return Err(ApiError::invalid(
                "ramole",
                format!("ramole.{key} is not an option (k, plan, gating, exclude, adapters)"),
            ));
        }
    }
    let plan = match field(obj, "plan") {
        None => None,
        Some(Value::String(s)) => Some(
            s.parse::<PlanChoice>()
                .map_err(|e| ApiError::invalid("ramole", format!("ramole.plan: {e}")))?,
        ),
        Some(other) => {
            return Err(ApiError::invalid(
                "ramole",
                format!("ramole.plan must be a string, got {other}"),
            ));
        }
    };
    if let Some(list) = field(obj, "adapters") {
        let list = list
            .as_array()
            .ok_or_else(|| ApiError::invalid("ramole", "ramole.adapters must be an array"))?;
        let mut adapters = Vec::with_capacity(list.len());
        for (i, a) in list.iter().enumerate() {
            let (id, gate) = match a {
                Value::String(id) => (id.clone(), 1.0),
                Value::Object(o) => {
                    let id = o.get("id").and_then(Value::as_str).ok_or_else(|| {
                        ApiError::invalid("ramole", format!("ramole.adapters[{i}] needs an id"))
                    })?;
                    let gate = match o.get("gate") {
                        None | Some(Value::Null) => 1.0,
                        Some(g) => number(g, "ramole", 0.0, 100.0)? as f32,
                    };
                    (id.to_string(), gate)
                }
                other => {
                    return Err(ApiError::invalid(
                        "ramole",
                        format!(
                            "ramole.adapters[{i}] must be an id or {{\"id\", \"gate\"}}, got {other}"
                        ),
                    ));
                }
            };
            adapters.push((id, gate));
        }
        let plan = match plan {
            None => None,
            Some(PlanChoice::Plan(p)) => Some(p),
            Some(PlanChoice::Auto) => None,
        };
        return Ok(RouteAsk::Given { adapters, plan });
    }
    let k = field(obj, "k")
        .map(|k| count(k, "ramole", 1, crate::config::MAX_K as u64).map(|k| k as usize))
        .transpose()?;
    let gating = match field(obj, "gating") {
        None => None,
        Some(Value::String(s)) => Some(
            s.parse::<Gating>()
                .map_err(|e| ApiError::invalid("ramole", format!("ramole.gating: {e}")))?,
        ),
        Some(other) => {
            return Err(ApiError::invalid(
                "ramole",
                format!("ramole.gating must be a string, got {other}"),
            ));
        }
    };
    let exclude = match field(obj, "exclude") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::invalid("ramole", "ramole.exclude must list adapter ids")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "ramole",
                "ramole.exclude must list adapter ids",
            ));
        }
    };
    Ok(RouteAsk::Retrieve {
        k,
        plan: plan.unwrap_or(PlanChoice::Auto),
        gating,
        exclude,
    })
}

/// What the server shares between requests.
pub struct ServeState {
    engine: Arc<Engine>,
    library: Mutex<Library>,
    model_id: String,
}

impl ServeState {
    pub fn new(engine: Arc<Engine>, library: Library) -> Self {
        let model_id = library.settings().base_id.clone();
        Self {
            engine,
            library: Mutex::new(library),
            model_id,
        }
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Routes a request and templates its prompt (blocking: retrieval embeds the message).
    fn prepare(&self, req: &CompletionRequest) -> Result<(Job, Provenance, usize), ApiError> {
        let lib = self
            .library
            .lock()
            .map_err(|_| ApiError::server("the library lock is poisoned"))?;
        let query = req
            .messages
            .last()
            .map(|m| m.content.trim().to_string())
            .unwrap_or_default();
        // The `model` may name an installed adapter (as LoRAX and vLLM serve adapters).
        let by_model = !req.model.is_empty()
            && req.model != self.model_id
            && req.model != "ramole"
            && !matches!(req.route, RouteAsk::Given { .. });
        let routing = if by_model {
            match lib.catalog().adapter(&req.model) {
                Ok(Some(_)) => Routing::given(&lib, &[(req.model.clone(), 1.0)], None)?,
                _ => {
                    return Err(ApiError {
                        status: StatusCode::NOT_FOUND,
                        kind: "invalid_request_error",
                        message: format!(
                            "model {:?} is neither the served base ({}) nor an installed adapter; GET /v1/models lists them",
                            req.model, self.model_id
                        ),
                        param: Some("model"),
                        code: Some("model_not_found"),
                    });
                }
            }
        } else {
            match &req.route {
                RouteAsk::Retrieve {
                    k,
                    plan,
                    gating,
                    exclude,
                } => Routing::retrieve(&lib, &query, *k, *plan, *gating, exclude)?,
                RouteAsk::Given { adapters, plan } => Routing::given(&lib, adapters, *plan)?,
            }
        };
        let model = self.engine.model();
        let ctx = model.decoder.config().max_position_embeddings;
        let budget = ctx - req.params.max_tokens;
        let (messages, dropped) = chat::fit_history(&req.messages, budget, &mut |m| {
            model.chat_prompt(m).map(|ids| ids.len())
        })?;
        let prompt = model.chat_prompt(&messages).map_err(ChatError::from)?;
        let job = Job {
            prompt,
            params: req.params.clone(),
            mix: routing.mix(&lib),
        };
        Ok((job, routing.provenance(&lib, &query), dropped))
    }
}

/// The API's routes over `state`.
pub fn router(state: Arc<ServeState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/models", get(models))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: Arc<ServeState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds `addr`, calls `on_ready` with the bound address (port 0 picks a free one) and serves
/// until Ctrl-C, on a small runtime of its own (the tensor work runs on the engine's thread).
pub fn serve_blocking(
    addr: SocketAddr,
    state: Arc<ServeState>,
    on_ready: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ramole-serve")
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        on_ready(listener.local_addr()?);
        run(listener, state, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    })
}

/// Whether `addr` only accepts connections from this machine.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        message: "no such endpoint: the API has POST /v1/chat/completions and GET /v1/models"
            .into(),
        param: None,
        code: Some("unknown_url"),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(st): State<Arc<ServeState>>) -> Result<Response, ApiError> {
    let st2 = st.clone();
    let adapters = tokio::task::spawn_blocking(move || {
        let lib = st2
            .library
            .lock()
            .map_err(|_| ApiError::server("the library lock is poisoned"))?;
        lib.catalog()
            .adapters()
            .map_err(|e| ApiError::server(e.to_string()))
    })
    .await
    .map_err(|e| ApiError::server(e.to_string()))??;
    let mut data = vec![json!({"id": st.model_id, "object": "model", "created": 0,
                               "owned_by": "ramole"})];
    for a in adapters
        .iter()
        .filter(|a| a.enabled && a.verdict.compat != crate::catalog::Compat::Incompatible)
    {
        data.push(
            json!({"id": a.id, "object": "model", "created": 0, "owned_by": "ramole",
                         "parent": st.model_id,
                         "ramole": {"name": a.name, "ranks": a.ranks, "kind": "lora"}}),
        );
    }
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

async fn completions(State(st): State<Arc<ServeState>>, body: Bytes) -> Result<Response, ApiError> {
    let ctx = st.engine.model().decoder.config().max_position_embeddings;
    let req = parse_request(&body, ctx)?;
    let st2 = st.clone();
    let req2 = req.clone();
    let (job, provenance, dropped) = tokio::task::spawn_blocking(move || st2.prepare(&req2))
        .await
        .map_err(|e| ApiError::server(e.to_string()))??;
    let (tx, rx) = unbounded_channel();
    let handle = st
        .engine
        .try_submit(job, Box::new(move |e| tx.send(e).is_ok()))?;
    let reply = Reply {
        id: format!("chatcmpl-{}-{}", now_secs(), handle.id()),
        created: now_secs(),
        model: if req.model.is_empty() {
            st.model_id.clone()
        } else {
            req.model.clone()
        },
        provenance,
        params: req.params.clone(),
        dropped,
    };
    if req.stream {
        let events = SseEvents {
            rx,
            queue: VecDeque::new(),
            reply,
            include_usage: req.include_usage,
            ended: false,
        };
        Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response())
    } else {
        let mut rx = rx;
        loop {
            match rx.recv().await {
                Some(JobEvent::Done(g)) => {
                    return Ok(axum::Json(reply.complete(&g)).into_response());
                }
                Some(JobEvent::Failed(e)) => return Err(e.into()),
                Some(JobEvent::Started | JobEvent::Text(_)) => {}
                None => return Err(EngineError::Stopped.into()),
            }
        }
    }
}

/// What every answer to one request repeats.
struct Reply {
    id: String,
    created: u64,
    model: String,
    provenance: Provenance,
    params: GenerateParams,
    dropped: usize,
}

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Eos | FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

impl Reply {
    fn provenance(&self, g: &Generation) -> Provenance {
        let mut p = self.provenance.clone();
        p.generation = chat::generation_record(&self.params, g, self.dropped);
        chat::record_router_gates(&mut p, g);
        p
    }

    fn usage(g: &Generation) -> Value {
        json!({"prompt_tokens": g.prompt_tokens, "completion_tokens": g.generated_tokens,
               "total_tokens": g.prompt_tokens + g.generated_tokens})
    }

    fn complete(&self, g: &Generation) -> Value {
        json!({
            "id": self.id, "object": "chat.completion", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                         "finish_reason": finish_reason(g.finish_reason)}],
            "usage": Self::usage(g),
            "ramole": {"provenance": self.provenance(g)},
        })
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    }
}

/// The server-sent events of one streamed answer: a role chunk, content chunks, a final chunk
/// with the finish reason and the provenance (and usage when asked), then `[DONE]`. Dropping it
/// (the client went away) drops the receiver, which cancels the request's row.
struct SseEvents {
    rx: UnboundedReceiver<JobEvent>,
    queue: VecDeque<Event>,
    reply: Reply,
    include_usage: bool,
    ended: bool,
}

impl SseEvents {
    fn data(v: &Value) -> Event {
        Event::default().data(v.to_string())
    }

    fn push(&mut self, e: JobEvent) {
        match e {
            JobEvent::Started => {
                let c = self
                    .reply
                    .chunk(json!({"role": "assistant", "content": ""}), None);
                self.queue.push_back(Self::data(&c));
            }
            JobEvent::Text(t) => {
                let c = self.reply.chunk(json!({"content": t}), None);
                self.queue.push_back(Self::data(&c));
            }
            JobEvent::Done(g) => {
                let mut c = self
                    .reply
                    .chunk(json!({}), Some(finish_reason(g.finish_reason)));
                c["ramole"] = json!({"provenance": self.reply.provenance(&g)});
                if self.include_usage {
                    c["usage"] = Reply::usage(&g);
                }
                self.queue.push_back(Self::data(&c));
                self.queue.push_back(Event::default().data("[DONE]"));
                self.ended = true;
            }
            JobEvent::Failed(e) => {
                // Headers are gone already: the error travels as an event, then the stream ends.
                let err: ApiError = e.into();
                self.queue.push_back(Self::data(&err.body()));
                self.queue.push_back(Event::default().data("[DONE]"));
                self.ended = true;
            }
        }
    }
}

impl tokio_stream::Stream for SseEvents {
    type Item = Result<Event, std::convert::Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(e) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(e)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(e)) => this.push(e),
                Poll::Ready(None) => {
                    this.push(JobEvent::Failed(EngineError::Stopped));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<CompletionRequest, ApiError> {
        parse_request(body.as_bytes(), 2048)
    }

    #[test]
    fn a_full_request_parses() {
        let r = parse(
            r#"{"model": "m", "stream": true, "max_tokens": 20, "temperature": 0.5, "top_p": 0.9,
                "seed": 7, "stop": ["\n\n"], "stream_options": {"include_usage": true},
                "messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                "ramole": {"k": 2, "plan": "fusion", "gating": "softmax:0.2", "exclude": ["x"]}}"#,
        )
        .unwrap();
        assert!(r.stream && r.include_usage);
        assert_eq!(r.params.max_tokens, 20);
        assert_eq!(r.params.sampling.seed, 7);
        assert_eq!(r.messages[1].content, "Hi");
        assert_eq!(
            r.route,
            RouteAsk::Retrieve {
                k: Some(2),
                plan: PlanChoice::Plan(Plan::Fusion),
                gating: Some(Gating::Softmax { temperature: 0.2 }),
                exclude: vec!["x".into()],
            }
        );
        let r = parse(
            r#"{"messages": [{"role": "user", "content": "Hi"}],
                "ramole": {"adapters": [{"id": "a", "gate": 0.3}, "b"], "plan": "mixture"}}"#,
        )
        .unwrap();
        assert_eq!(
            r.route,
            RouteAsk::Given {
                adapters: vec![("a".into(), 0.3), ("b".into(), 1.0)],
                plan: Some(Plan::Mixture),
            }
        );
        assert_eq!(r.params.max_tokens, DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn bad_requests_name_the_field_and_the_limit() {
        let cases = [
            ("{", "body", "not valid JSON"),
            ("[]", "body", "JSON object"),
            (r#"{"messages": []}"#, "messages", "1 to 512"),
            (
                r#"{"messages": [{"role": "robot", "content": "x"}]}"#,
                "messages",
                "robot",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}"#,
                "messages",
                "last message",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "  "}]}"#,
                "messages",
                "empty",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}"#,
                "max_tokens",
                "between 1 and 2047",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "temperature": 3}"#,
                "temperature",
                "between 0 and 2",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "n": 2}"#,
                "n",
                "only 1",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}"#,
                "stop",
                "limit is 4",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "ramole": {"plan": "magic"}}"#,
                "ramole",
                "magic",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "ramole": {"k": 0}}"#,
                "ramole",
                "between 1",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "ramole": {"topk": 3}}"#,
                "ramole",
                "ramole.topk",
            ),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
                "messages",
                "only text parts",
            ),
        ];
        for (body, param, needle) in cases {
            let e = parse(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param, Some(param), "{body}: {e:?}");
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
    }
}
