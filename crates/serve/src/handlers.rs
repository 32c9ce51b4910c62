//! The handlers of the API and the state they share: routing a request like a chat message
//! (`chat::prepare_turn`), submitting it to the engine, and answering as one JSON object or as
//! server-sent events.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ramole_core::catalog::Compat;
use ramole_core::chat::{self, PreparedTurn, RouteAsk};
use ramole_core::engine::{Engine, EngineError, JobEvent};
use ramole_core::library::Library;
use serde_json::json;
use tokio::sync::mpsc::unbounded_channel;

use crate::error::ApiError;
use crate::reply::Reply;
use crate::request::{CompletionRequest, parse_request};
use crate::sse::SseEvents;

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

    /// Routes a request and templates its prompt as chat does (blocking: retrieval embeds the
    /// message).
    fn prepare(&self, req: &CompletionRequest) -> Result<PreparedTurn, ApiError> {
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
        let route = if by_model {
            match lib.catalog().adapter(&req.model) {
                Ok(Some(_)) => RouteAsk::Given {
                    adapters: vec![(req.model.clone(), 1.0)],
                    plan: None,
                },
                _ => {
                    return Err(ApiError::not_found(
                        Some("model"),
                        "model_not_found",
                        format!(
                            "model {:?} is neither the served base ({}) nor an installed adapter; GET /v1/models lists them",
                            req.model, self.model_id
                        ),
                    ));
                }
            }
        } else {
            req.route.clone()
        };
        Ok(chat::prepare_turn(
            &lib,
            self.engine.model(),
            &req.messages,
            &query,
            &route,
            &req.params,
        )?)
    }
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found(
        None,
        "unknown_url",
        "no such endpoint: the API has POST /v1/chat/completions and GET /v1/models".into(),
    )
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) async fn models(State(st): State<Arc<ServeState>>) -> Result<Response, ApiError> {
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
        .filter(|a| a.enabled && a.verdict.compat != Compat::Incompatible)
    {
        data.push(
            json!({"id": a.id, "object": "model", "created": 0, "owned_by": "ramole",
                         "parent": st.model_id,
                         "ramole": {"name": a.name, "ranks": a.ranks, "kind": "lora"}}),
        );
    }
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

pub(crate) async fn completions(
    State(st): State<Arc<ServeState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let ctx = st.engine.model().decoder.config().max_position_embeddings;
    let req = parse_request(&body, ctx)?;
    let st2 = st.clone();
    let req2 = req.clone();
    let turn = tokio::task::spawn_blocking(move || st2.prepare(&req2))
        .await
        .map_err(|e| ApiError::server(e.to_string()))??;
    let (tx, rx) = unbounded_channel();
    let handle = st
        .engine
        .try_submit(turn.job, Box::new(move |e| tx.send(e).is_ok()))?;
    let reply = Reply {
        id: format!("chatcmpl-{}-{}", now_secs(), handle.id()),
        created: now_secs(),
        model: if req.model.is_empty() {
            st.model_id.clone()
        } else {
            req.model.clone()
        },
        provenance: turn.provenance,
        params: req.params.clone(),
        dropped: turn.dropped,
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
                Some(JobEvent::Done(f)) => {
                    return Ok(axum::Json(reply.complete(&f)).into_response());
                }
                Some(JobEvent::Failed(e)) => return Err(e.into()),
                Some(JobEvent::Started | JobEvent::Text(_)) => {}
                None => return Err(EngineError::Stopped.into()),
            }
        }
    }
}
