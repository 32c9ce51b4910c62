//! One chat message end to end (DESIGN.md 3): store the user message, embed it, retrieve
//! adapters, make the plan, generate the reply with it, store the reply with its provenance.
//! Multi-turn: retrieval runs on every turn on the latest user message; history that does not
//! fit the context is dropped oldest-first, keeping the system prompt.

use std::sync::Arc;

use serde::Serialize;

use crate::adapter::LoraAdapter;
use crate::catalog::{Provenance, ServedAdapter};
use crate::library::{Library, LibraryError};
use crate::model::{ChatMessage, FinishReason, GenerateParams, Model, ModelError, generate};
use crate::mole::{CompiledMix, Gating, MixDelta, MoleError, Plan};

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Library(#[from] LibraryError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Mole(#[from] MoleError),
    #[error("adapter {id}: {message}")]
    Adapter { id: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl From<crate::catalog::CatalogError> for ChatError {
    fn from(e: crate::catalog::CatalogError) -> Self {
        ChatError::Library(e.into())
    }
}

type Result<T, E = ChatError> = std::result::Result<T, E>;

/// Longest user message accepted, in characters.
pub const MAX_MESSAGE_CHARS: usize = 100_000;

/// `auto` or one of the plans (DESIGN.md 3a).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanChoice {
    /// `router` when a trained router exists (not yet), else `mixture`.
    Auto,
    Plan(Plan),
}

impl std::str::FromStr for PlanChoice {
    type Err = MoleError;
    fn from_str(s: &str) -> Result<Self, MoleError> {
        if s == "auto" {
            Ok(PlanChoice::Auto)
        } else {
            s.parse().map(PlanChoice::Plan).map_err(|_| {
                MoleError::Plan(format!(
                    "unknown plan {s:?} (auto, selection, mixture, fusion, none)"
                ))
            })
        }
    }
}

#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// Continue this session; `None` starts a new one.
    pub session: Option<i64>,
    pub text: String,
    /// Adapters to retrieve; `None` uses the settings.
    pub k: Option<usize>,
    pub plan: PlanChoice,
    /// `None` uses the settings.
    pub gating: Option<Gating>,
    /// Adapter ids never to retrieve for this message.
    pub exclude: Vec<String>,
    /// System prompt of a new session.
    pub system_prompt: Option<String>,
    pub params: GenerateParams,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatReply {
    pub session: i64,
    pub user_message: i64,
    pub message: i64,
    pub reply: String,
    pub finish_reason: FinishReason,
    pub provenance: Provenance,
    /// Messages dropped from the front of the history to fit the context.
    pub dropped_messages: usize,
}

/// Keeps the system prompt (if first) and the longest suffix of the rest whose prompt fits in
/// `budget` tokens; `count` gives a candidate's prompt length. Fails when even the last message
/// alone does not fit.
pub fn fit_history(
    messages: &[ChatMessage],
    budget: usize,
    count: &mut dyn FnMut(&[ChatMessage]) -> Result<usize, ModelError>,
) -> Result<(Vec<ChatMessage>, usize)> {
    let (system, rest) = match messages.first() {
        Some(m) if m.role == "system" => (Some(m.clone()), &messages[1..]),
        _ => (None, messages),
    };
    for start in 0..rest.len() {
        // A reply never opens the history: start at a user message.
        if rest[start].role != "user" && start + 1 < rest.len() {
            continue;
        }
        let mut candidate: Vec<ChatMessage> = system.iter().cloned().collect();
        candidate.extend_from_slice(&rest[start..]);
        let n = count(&candidate)?;
        if n <= budget {
            return Ok((candidate, start));
        }
        if start + 1 == rest.len() {
            return Err(ChatError::Invalid(format!(
                "the message needs {n} prompt tokens, more than the {budget} the context leaves (context length minus max_tokens)"
            )));
        }
    }
    Err(ChatError::Invalid("there is no message to answer".into()))
}

/// Answers `req` in its session with `model` (the library's active base), calling `on_text`
/// with each printable piece of the reply.
pub fn send(
    lib: &mut Library,
    model: &Model,
    req: &ChatRequest,
    on_text: &mut dyn FnMut(&str),
) -> Result<ChatReply> {
    let text = req.text.trim();
    if text.is_empty() {
        return Err(ChatError::Invalid("the message is empty".into()));
    }
    let chars = req.text.chars().count();
    if chars > MAX_MESSAGE_CHARS {
        return Err(ChatError::Invalid(format!(
            "the message has {chars} characters, the limit is {MAX_MESSAGE_CHARS}"
        )));
    }
    let settings = lib.settings().retrieval.clone();
    let k = req.k.unwrap_or(settings.k);
    if k == 0 || k > crate::config::MAX_K {
        return Err(ChatError::Invalid(format!(
            "k = {k} must be within 1..={}",
            crate::config::MAX_K
        )));
    }
    let gating = req.gating.unwrap_or(settings.gating);
    let plan = match req.plan {
        PlanChoice::Auto => Plan::Mixture,
        PlanChoice::Plan(p) => p,
    };
    let ctx = model.decoder.config().max_position_embeddings;
    if req.params.max_tokens == 0 || req.params.max_tokens >= ctx {
        return Err(ChatError::Invalid(format!(
            "max_tokens = {} must be within 1..{ctx} (the context length)",
            req.params.max_tokens
        )));
    }
    // Retrieval first: a bad exclusion or a broken index fails before anything is stored.
    let (k_used, retrieved) = match plan {
        Plan::None => (0, Vec::new()),
        Plan::Selection => (1, lib.retrieve(text, 1, &req.exclude, gating)?),
        Plan::Mixture | Plan::Fusion => (k, lib.retrieve(text, k, &req.exclude, gating)?),
    };
    let mut served: Vec<ServedAdapter> = retrieved
        .iter()
        .map(|r| ServedAdapter {
            id: r.id.clone(),
            name: r.name.clone(),
            score: Some(r.score),
            // Selection applies its one adapter at full strength (DESIGN.md 3a).
            gate: if plan == Plan::Selection { 1.0 } else { r.gate },
        })
        .collect();
    let ran_plan = if served.is_empty() { Plan::None } else { plan };
    let mut loaded = Vec::with_capacity(served.len());
    for s in &served {
        let dir = lib.adapter_dir(&s.id);
        let a = LoraAdapter::load(&dir, &model.decoder).map_err(|e| ChatError::Adapter {
            id: s.id.clone(),
            message: e.to_string(),
        })?;
        loaded.push((Arc::new(a), s.gate));
    }
    let delta = MixDelta {
        rows: vec![if loaded.is_empty() {
            None
        } else {
            Some(Arc::new(CompiledMix::new(ran_plan, &loaded)?))
        }],
    };

    let catalog = lib.catalog_mut();
    let session = match req.session {
        Some(id) => catalog.require_chat(id)?,
        None => {
            let title: String = text.chars().take(60).collect();
            catalog.create_chat(&title, req.system_prompt.as_deref())?
        }
    };
    let user_message = catalog.add_message(session.id, "user", &req.text)?;
    let mut history: Vec<ChatMessage> = Vec::new();
    if let Some(sys) = session.system_prompt.as_deref().filter(|s| !s.is_empty()) {
        history.push(ChatMessage::new("system", sys));
    }
    for m in catalog.messages(session.id)? {
        history.push(ChatMessage::new(m.role, m.content));
    }
    let budget = ctx - req.params.max_tokens;
    let (messages, dropped) = fit_history(&history, budget, &mut |msgs| {
        model.chat_prompt(msgs).map(|ids| ids.len())
    })?;
    let prompt = model.chat_prompt(&messages)?;
    let generation = generate(model, &prompt, &req.params, &delta, on_text)?;

    if ran_plan == Plan::None {
        served.clear();
    }
    let provenance = Provenance {
        plan: ran_plan.as_str().to_string(),
        k: k_used,
        query: text.to_string(),
        base_model: lib.settings().base_id.clone(),
        embedder: (plan != Plan::None).then(|| lib.embedder_id().to_string()),
        scoring: (plan != Plan::None).then(|| settings.scoring.as_str().to_string()),
        gating: (plan != Plan::None).then(|| match plan {
            Plan::Selection => "selection".to_string(),
            _ => gating.to_string(),
        }),
        adapters: served,
        generation: serde_json::json!({
            "max_tokens": req.params.max_tokens,
            "temperature": req.params.sampling.temperature,
            "top_p": req.params.sampling.top_p,
            "top_k": req.params.sampling.top_k,
            "seed": req.params.sampling.seed,
            "stop": req.params.stop,
            "prompt_tokens": generation.prompt_tokens,
            "generated_tokens": generation.generated_tokens,
            "finish_reason": generation.finish_reason,
            "dropped_messages": dropped,
        }),
        layer_gates: None,
    };
    let message = lib
        .catalog_mut()
        .add_reply(session.id, &generation.text, &provenance)?;
    Ok(ChatReply {
        session: session.id,
        user_message,
        message,
        reply: generation.text,
        finish_reason: generation.finish_reason,
        provenance,
        dropped_messages: dropped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(roles: &[(&str, usize)]) -> Vec<ChatMessage> {
        roles
            .iter()
            .map(|(r, n)| ChatMessage::new(*r, "x".repeat(*n)))
            .collect()
    }

    fn len(m: &[ChatMessage]) -> Result<usize, ModelError> {
        Ok(m.iter().map(|m| m.content.len() + 2).sum())
    }

    #[test]
    fn history_drops_oldest_first_and_keeps_the_system_prompt() {
        let h = msgs(&[
            ("system", 10),
            ("user", 30),
            ("assistant", 30),
            ("user", 5),
            ("assistant", 5),
            ("user", 5),
        ]);
        // Everything fits.
        let (kept, dropped) = fit_history(&h, 1000, &mut len).unwrap();
        assert_eq!((kept.len(), dropped), (6, 0));
        // The first exchange must go; the system prompt stays; it restarts at a user turn.
        let (kept, dropped) = fit_history(&h, 40, &mut len).unwrap();
        assert_eq!(dropped, 2);
        assert_eq!(kept[0].role, "system");
        assert_eq!(kept[1].role, "user");
        assert_eq!(kept.len(), 4);
        // Only the last message fits.
        let (kept, _) = fit_history(&h, 19, &mut len).unwrap();
        assert_eq!(kept.len(), 2);
        // Not even that: a clear error.
        let err = fit_history(&h, 10, &mut len).unwrap_err().to_string();
        assert!(
            err.contains("19 prompt tokens") && err.contains("10"),
            "{err}"
        );
    }
}
