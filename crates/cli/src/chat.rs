//! `ramole chat` (one turn of a stored session, retrieval on the message) and `ramole serve` (the
//! OpenAI-compatible API of ramole-serve), both over the library's base in an engine.

use std::io::Write;

use anyhow::{Context, Result, bail};
use clap::Args;
use ramole_core::chat::{self, ChatRequest};
use ramole_core::engine::{Engine, EngineConfig};
use ramole_core::model::{LoadOptions, Model};
use ramole_core::vocab::{PlanChoice, TopK};
use ramole_serve::ServeState;
use serde_json::json;

use crate::common::{ReplyOut, SamplingArgs, open, parse_gating};

#[derive(Args)]
pub(crate) struct ChatArgs {
    /// The user message.
    #[arg(long)]
    text: String,
    #[arg(short, long)]
    k: Option<TopK>,
    /// auto | selection | mixture | fusion | router | none (auto: router when the base has one, else mixture).
    #[arg(long, default_value = "auto")]
    plan: String,
    /// uniform | softmax | softmax:<temperature> (default: settings).
    #[arg(long)]
    gating: Option<String>,
    /// Continue this session (default: start a new one).
    #[arg(long)]
    session: Option<i64>,
    /// System prompt of a new session.
    #[arg(long, conflicts_with = "session")]
    system: Option<String>,
    /// Adapter ids never to retrieve (repeatable).
    #[arg(long)]
    exclude: Vec<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on; anything but loopback exposes the API to the network.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// 0 picks a free port (printed on start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests decoded together in one batch.
    #[arg(long, default_value_t = 8)]
    max_rows: usize,
    /// Requests that may wait beyond the running ones before the server answers 503.
    #[arg(long, default_value_t = 64)]
    queue: usize,
}

pub(crate) fn run_chat(a: ChatArgs) -> Result<()> {
    let mut lib = open()?;
    let plan: PlanChoice = a.plan.parse()?;
    let base = lib.settings().base_path.clone();
    let model = Model::load(&base, &LoadOptions::default())
        .with_context(|| format!("loading {}", base.display()))?;
    let engine = Engine::start(std::sync::Arc::new(model), EngineConfig::default());
    engine.set_router(lib.load_router()?);
    let req = ChatRequest {
        session: a.session,
        text: a.text.clone(),
        k: a.k,
        plan,
        gating: parse_gating(&a.gating)?,
        exclude: a.exclude.clone(),
        system_prompt: a.system.clone(),
        params: a.sampling.params(Vec::new()),
        pinned: Vec::new(),
        action: chat::ChatAction::Send,
    };
    let mut out = ReplyOut::new(a.json);
    let reply = chat::send(&mut lib, &engine, &req, &mut |piece: &str| out.text(piece))?;
    if a.json {
        writeln!(
            out,
            "{}",
            json!({"reply": reply.reply, "session": reply.session, "message": reply.message,
                   "finish_reason": reply.finish_reason, "provenance": reply.provenance,
                   "dropped_messages": reply.dropped_messages})
        )?;
    } else {
        writeln!(out)?;
        let p = &reply.provenance;
        let served: Vec<String> = p
            .adapters
            .iter()
            .map(|s| {
                format!(
                    "{} (gate {:.3}, score {:.3})",
                    s.id,
                    s.gate,
                    s.score.unwrap_or(f32::NAN)
                )
            })
            .collect();
        eprintln!(
            "[session {} · plan {} · {}]",
            reply.session,
            p.plan,
            if served.is_empty() {
                "no adapters".to_string()
            } else {
                served.join(", ")
            }
        );
    }
    Ok(())
}

pub(crate) fn run_serve(a: ServeArgs) -> Result<()> {
    if a.max_rows == 0 || a.max_rows > 64 {
        bail!("--max-rows {} must be between 1 and 64", a.max_rows);
    }
    let lib = open()?;
    let base = lib.settings().base_path.clone();
    let model = Model::load(&base, &LoadOptions::default())
        .with_context(|| format!("loading {}", base.display()))?;
    let engine = Engine::start(
        std::sync::Arc::new(model),
        EngineConfig {
            max_rows: a.max_rows,
            queue: a.queue.max(1),
            ..EngineConfig::default()
        },
    );
    engine.set_router(lib.load_router()?);
    let state = std::sync::Arc::new(ServeState::new(std::sync::Arc::new(engine), lib));
    let addr = std::net::SocketAddr::new(a.host, a.port);
    if !ramole_serve::is_loopback(&addr) {
        eprintln!(
            "ramole: warning: listening on {addr} exposes the API (no authentication) to the network"
        );
    }
    let model_id = state.model_id().to_string();
    ramole_serve::serve_blocking(addr, state, |bound| {
        // The first line of stdout: scripts and tests read the bound port from it.
        println!("listening on http://{bound}");
        eprintln!("ramole: serving {model_id} at http://{bound}/v1 (Ctrl-C stops)");
        let _ = std::io::stdout().flush();
    })
    .with_context(|| format!("serving on {addr}"))
}
