//! One chat message end to end (DESIGN.md 3): store the user message, embed it, retrieve
//! adapters, make the plan, generate the reply with it, store the reply with its provenance.
//! Multi-turn: retrieval runs on every turn on the latest user message; history that does not
//! fit the context is dropped oldest-first, keeping the system prompt.

use serde::Serialize;

use crate::catalog::{Provenance, ServedAdapter};
use crate::engine::{AdapterUse, Engine, EngineError, Job, JobEvent, MixRequest};
use crate::library::{Library, LibraryError};
use crate::model::{ChatMessage, FinishReason, GenerateParams, Generation, ModelError};
use crate::mole::{Gating, MoleError, Plan};

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Library(#[from] LibraryError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Mole(#[from] MoleError),
    #[error(transparent)]
    Engine(#[from] EngineError),
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

/// Which adapters serve a message and how: the plan that runs, with the adapters, their scores
/// and gates. Chat and the server both route through it, so their provenance agrees.
#[derive(Debug, Clone)]
pub struct Routing {
    /// The plan that runs (`auto` resolved; `none` when nothing was retrieved).
    pub plan: Plan,
    /// The plan asked for (resolved from `auto`), before falling back to `none`.
    pub asked: Plan,
    pub k: usize,
    pub gating: Gating,
    /// Adapters given by hand rather than retrieved.
    pub given: bool,
    pub served: Vec<ServedAdapter>,
}

/// Checks a message's text: not empty, within [`MAX_MESSAGE_CHARS`].
pub fn check_message(text: &str) -> Result<()> {
    if text.trim().is_empty() {
        return Err(ChatError::Invalid("the message is empty".into()));
    }
    let chars = text.chars().count();
    if chars > MAX_MESSAGE_CHARS {
        return Err(ChatError::Invalid(format!(
            "the message has {chars} characters, the limit is {MAX_MESSAGE_CHARS}"
        )));
    }
    Ok(())
}

impl Routing {
    /// Retrieves adapters for `text` (the latest user message) under `plan`: selection takes the
    /// top 1 at gate 1, mixture and fusion the top `k` with retrieval gates.
    pub fn retrieve(
        lib: &Library,
        text: &str,
        k: Option<usize>,
        plan: PlanChoice,
        gating: Option<Gating>,
        exclude: &[String],
    ) -> Result<Self> {
        let settings = &lib.settings().retrieval;
        let k = k.unwrap_or(settings.k);
        if k == 0 || k > crate::config::MAX_K {
            return Err(ChatError::Invalid(format!(
                "k = {k} must be within 1..={}",
                crate::config::MAX_K
            )));
        }
        let gating = gating.unwrap_or(settings.gating);
        let asked = match plan {
            PlanChoice::Auto => Plan::Mixture,
            PlanChoice::Plan(p) => p,
        };
        let text = text.trim();
        let (k_used, retrieved) = match asked {
            Plan::None => (0, Vec::new()),
            Plan::Selection => (1, lib.retrieve(text, 1, exclude, gating)?),
            Plan::Mixture | Plan::Fusion => (k, lib.retrieve(text, k, exclude, gating)?),
        };
        let served: Vec<ServedAdapter> = retrieved
            .iter()
            .map(|r| ServedAdapter {
                id: r.id.clone(),
                name: r.name.clone(),
                score: Some(r.score),
                // Selection applies its one adapter at full strength (DESIGN.md 3a).
                gate: if asked == Plan::Selection {
                    1.0
                } else {
                    r.gate
                },
            })
            .collect();
        Ok(Self {
            plan: if served.is_empty() { Plan::None } else { asked },
            asked,
            k: k_used,
            gating,
            given: false,
            served,
        })
    }

    /// Adapters named by hand (`(id, gate)`; gates are used as given): each must be installed,
    /// enabled and compatible with the active base. `plan` defaults to selection for one adapter
    /// and mixture for several.
    pub fn given(lib: &Library, adapters: &[(String, f32)], plan: Option<Plan>) -> Result<Self> {
        if adapters.is_empty() {
            return Err(ChatError::Invalid("no adapter was named".into()));
        }
        if adapters.len() > crate::config::MAX_K {
            return Err(ChatError::Invalid(format!(
                "{} adapters named; the limit is {}",
                adapters.len(),
                crate::config::MAX_K
            )));
        }
        let plan = plan.unwrap_or(if adapters.len() == 1 {
            Plan::Selection
        } else {
            Plan::Mixture
        });
        crate::mole::check_gates(&adapters.iter().map(|a| a.1).collect::<Vec<_>>())?;
        let mut served = Vec::with_capacity(adapters.len());
        for (i, (id, gate)) in adapters.iter().enumerate() {
            if adapters[..i].iter().any(|(other, _)| other == id) {
                return Err(ChatError::Invalid(format!("adapter {id} is named twice")));
            }
            let rec = lib.catalog().require_adapter(id)?;
            if !rec.enabled {
                return Err(ChatError::Invalid(format!("adapter {id} is disabled")));
            }
            if rec.verdict.compat == crate::catalog::Compat::Incompatible {
                return Err(ChatError::Invalid(format!(
                    "adapter {id} does not fit the active base: {}",
                    rec.verdict.reason
                )));
            }
            served.push(ServedAdapter {
                id: rec.id,
                name: rec.name,
                score: None,
                gate: *gate,
            });
        }
        Ok(Self {
            plan,
            asked: plan,
            k: served.len(),
            gating: Gating::Uniform,
            given: true,
            served,
        })
    }

    /// The engine's view: adapter folders and gates.
    pub fn mix(&self, lib: &Library) -> MixRequest {
        MixRequest {
            plan: self.plan,
            adapters: self
                .served
                .iter()
                .map(|s| AdapterUse {
                    id: s.id.clone(),
                    dir: lib.adapter_dir(&s.id),
                    gate: s.gate,
                })
                .collect(),
        }
    }

    /// What gets stored with the reply (and returned by the server); its `generation` record is
    /// filled in by [`generation_record`] once the reply is done.
    pub fn provenance(&self, lib: &Library, query: &str) -> Provenance {
        let retrieved = self.asked != Plan::None && !self.given;
        Provenance {
            plan: self.plan.as_str().to_string(),
            k: self.k,
            query: query.to_string(),
            base_model: lib.settings().base_id.clone(),
            embedder: retrieved.then(|| lib.embedder_id().to_string()),
            scoring: retrieved.then(|| lib.settings().retrieval.scoring.as_str().to_string()),
            gating: (self.asked != Plan::None).then(|| {
                if self.given {
                    "given".to_string()
                } else if self.asked == Plan::Selection {
                    "selection".to_string()
                } else {
                    self.gating.to_string()
                }
            }),
            adapters: if self.plan == Plan::None {
                Vec::new()
            } else {
                self.served.clone()
            },
            generation: serde_json::Value::Null,
            layer_gates: None,
        }
    }
}

/// Sampling settings, seed, token counts and finish reason of a reply: enough to replay it.
pub fn generation_record(
    params: &GenerateParams,
    generation: &Generation,
    dropped: usize,
) -> serde_json::Value {
    serde_json::json!({
        "max_tokens": params.max_tokens,
        "temperature": params.sampling.temperature,
        "top_p": params.sampling.top_p,
        "top_k": params.sampling.top_k,
        "seed": params.sampling.seed,
        "stop": params.stop,
        "prompt_tokens": generation.prompt_tokens,
        "generated_tokens": generation.generated_tokens,
        "finish_reason": generation.finish_reason,
        "dropped_messages": dropped,
    })
}

/// Checks `max_tokens` against the context length.
pub fn check_max_tokens(max_tokens: usize, ctx: usize) -> Result<()> {
    if max_tokens == 0 || max_tokens >= ctx {
        return Err(ChatError::Invalid(format!(
            "max_tokens = {max_tokens} must be within 1..{ctx} (the context length)"
        )));
    }
    Ok(())
}

/// Answers `req` in its session through `engine` (running the library's active base), calling
/// `on_text` with each printable piece of the reply.
pub fn send(
    lib: &mut Library,
    engine: &Engine,
    req: &ChatRequest,
    on_text: &mut dyn FnMut(&str),
) -> Result<ChatReply> {
    check_message(&req.text)?;
    let text = req.text.trim();
    let ctx = engine.model().decoder.config().max_position_embeddings;
    check_max_tokens(req.params.max_tokens, ctx)?;
    // Retrieval first: a bad exclusion or a broken index fails before anything is stored.
    let routing = Routing::retrieve(lib, text, req.k, req.plan, req.gating, &req.exclude)?;

    // The prompt is built in memory first: nothing is stored until the engine has the request
    // running (its adapters loaded), so a broken adapter or a full engine stores nothing.
    let model = engine.model();
    let session = match req.session {
        Some(id) => Some(lib.catalog_mut().require_chat(id)?),
        None => None,
    };
    let system_prompt = match &session {
        Some(s) => s.system_prompt.clone(),
        None => req.system_prompt.clone(),
    };
    let mut history: Vec<ChatMessage> = Vec::new();
    if let Some(sys) = system_prompt.as_deref().filter(|s| !s.is_empty()) {
        history.push(ChatMessage::new("system", sys));
    }
    if let Some(s) = &session {
        for m in lib.catalog_mut().messages(s.id)? {
            history.push(ChatMessage::new(m.role, m.content));
        }
    }
    history.push(ChatMessage::new("user", &req.text));
    let budget = ctx - req.params.max_tokens;
    let (messages, dropped) = fit_history(&history, budget, &mut |msgs| {
        model.chat_prompt(msgs).map(|ids| ids.len())
    })?;
    let prompt = model.chat_prompt(&messages)?;
    let (tx, rx) = std::sync::mpsc::channel();
    engine.submit(
        Job {
            prompt,
            params: req.params.clone(),
            mix: routing.mix(lib),
        },
        Box::new(move |e| tx.send(e).is_ok()),
    )?;
    let mut events = rx.into_iter();
    match events.next() {
        Some(JobEvent::Started) => {}
        Some(JobEvent::Failed(e)) => return Err(e.into()),
        _ => return Err(EngineError::Stopped.into()),
    }
    let catalog = lib.catalog_mut();
    let session = match session {
        Some(s) => s,
        None => {
            let title: String = text.chars().take(60).collect();
            catalog.create_chat(&title, req.system_prompt.as_deref())?
        }
    };
    let user_message = catalog.add_message(session.id, "user", &req.text)?;
    let generation = loop {
        match events.next() {
            Some(JobEvent::Text(t)) => on_text(&t),
            Some(JobEvent::Done(g)) => break g,
            Some(JobEvent::Failed(e)) => return Err(e.into()),
            Some(JobEvent::Started) => {}
            None => return Err(EngineError::Stopped.into()),
        }
    };
    let mut provenance = routing.provenance(lib, text);
    provenance.generation = generation_record(&req.params, &generation, dropped);
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
