//! ramole-serve: the local OpenAI-compatible HTTP API. `POST /v1/chat/completions` (streamed as
//! server-sent events ending in `[DONE]`, or as one JSON answer) and `GET /v1/models`, over
//! ramole-core's engine and library. Every request is routed like a chat message (retrieval on
//! the latest user message, or adapters named in the `ramole` extension, or an adapter named as
//! the `model`) through the same `chat::prepare_turn` as the CLI's and the app's chat, and the
//! answer carries the provenance. Nothing is stored: the API is stateless like OpenAI's.
//!
//! `request` holds the typed OpenAI request and its checks, `handlers` the state and handlers,
//! `reply` the answer's objects, `sse` the streamed answer, `error` what a client sees when something is wrong. The async side
//! only parses, routes events and writes bytes: retrieval (embedding) runs on tokio's blocking
//! pool and generation on the engine's thread. Concurrent clients share the engine's batches; a
//! client that goes away cancels its row.

mod error;
mod handlers;
mod reply;
mod request;
mod sse;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

pub use error::ApiError;
pub use handlers::ServeState;
pub use request::{
    ChatCompletionRequest, CompletionRequest, DEFAULT_MAX_TOKENS, MAX_BODY_BYTES, MAX_MESSAGES,
    MAX_STOP, parse_request,
};

use handlers::{completions, models, not_found};

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
