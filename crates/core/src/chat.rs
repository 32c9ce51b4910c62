//! One chat message end to end (DESIGN.md 3): store the user message, embed it, retrieve
//! adapters, make the plan, generate the reply with it, store the reply with its provenance.
//! Multi-turn: retrieval runs on every turn on the latest user message; history that does not
//! fit the context is dropped oldest-first, keeping the system prompt.

use serde::Serialize;
use ts_rs::TS;

use crate::catalog::{ChatSession, TurnChat};
use crate::engine::{
    AdapterUse, Engine, EngineError, Finished, Job, JobEvent, JobHandle, MixRequest,
};
use crate::library::{Library, LibraryError};
use crate::model::{ChatMessage, GenerateParams, Model, ModelError};
use crate::mole::MoleError;
use crate::router::GateTrace;
use crate::vocab::{
    FinishReason, Gating, GenerationRecord, Plan, PlanChoice, Provenance, ReplyGating, Role,
    ServedAdapter, TopK, VocabError,
};

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
    #[error(transparent)]
    Vocab(#[from] VocabError),
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

#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// Continue this session; `None` starts a new one.
    pub session: Option<i64>,
    pub text: String,
    /// Adapters to retrieve; `None` uses the settings.
    pub k: Option<TopK>,
    pub plan: PlanChoice,
    /// `None` uses the settings.
    pub gating: Option<Gating>,
    /// Adapter ids never to retrieve for this message.
    pub exclude: Vec<String>,
    /// System prompt of a new session.
    pub system_prompt: Option<String>,
    pub params: GenerateParams,
    /// Non-empty: these adapters serve the message instead of retrieval.
    pub pinned: Vec<Pin>,
    pub action: ChatAction,
}

/// What a message does to its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, Serialize, TS)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChatAction {
    /// A new user message, answered.
    #[default]
    Send,
    /// Answers the session's last user message again, replacing the reply that followed it.
    Regenerate,
    /// Replaces user message `message_id` with the request's text, dropping everything after
    /// it, and answers.
    Edit { message_id: i64 },
    /// Answers the history up to user message `message_id` again (another plan, say) without
    /// storing anything.
    Compare { message_id: i64 },
}

/// An adapter pinned by hand for a message, with its gate (`None`: an equal share of what the
/// given gates leave).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, Serialize, TS)]
pub struct Pin {
    pub id: String,
    pub gate: Option<f32>,
}

/// Gates of pinned adapters: given gates kept, the others share what is left of 1 equally, then
/// all are scaled to sum to 1 (sliders need not add up).
pub fn pinned_gates(pins: &[Pin]) -> Result<Vec<(String, f32)>> {
    let given: Vec<f32> = pins.iter().filter_map(|p| p.gate).collect();
    crate::mole::check_gates(&given)?;
    let open = pins.len() - given.len();
    let share = if open == 0 {
        0.0
    } else {
        (1.0 - given.iter().sum::<f32>()).max(0.0) / open as f32
    };
    let raw: Vec<f32> = pins.iter().map(|p| p.gate.unwrap_or(share)).collect();
    let total: f32 = raw.iter().sum();
    if total <= 0.0 {
        return Err(ChatError::Invalid(
            "the pinned adapters' gates are all 0: give at least one a weight".into(),
        ));
    }
    Ok(pins
        .iter()
        .zip(raw)
        .map(|(p, g)| (p.id.clone(), g / total))
        .collect())
}

#[derive(Debug, Clone, Serialize, TS)]
pub struct ChatReply {
    pub session: i64,
    /// The stored user message (`None` for regenerate and compare).
    pub user_message: Option<i64>,
    /// The stored reply (`None` for compare).
    pub message: Option<i64>,
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
        Some(m) if m.role == Role::System => (Some(m.clone()), &messages[1..]),
        _ => (None, messages),
    };
    for start in 0..rest.len() {
        // A reply never opens the history: start at a user message.
        if rest[start].role != Role::User && start + 1 < rest.len() {
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
        k: Option<TopK>,
        plan: PlanChoice,
        gating: Option<Gating>,
        exclude: &[String],
    ) -> Result<Self> {
        let settings = &lib.settings().retrieval;
        let k = k.unwrap_or(settings.k);
        let gating = gating.unwrap_or(settings.gating);
        let asked = match plan {
            PlanChoice::Auto if lib.has_router() => Plan::Router,
            PlanChoice::Auto => Plan::Mixture,
            PlanChoice::Plan(p) => p,
        };
        if asked == Plan::Router && !lib.has_router() {
            return Err(no_router(lib));
        }
        let text = text.trim();
        let (k_used, retrieved) = match asked {
            Plan::None => (0, Vec::new()),
            Plan::Selection => (1, lib.retrieve(text, TopK::ONE, exclude, gating)?),
            Plan::Mixture | Plan::Fusion | Plan::Router => {
                (k.get(), lib.retrieve(text, k, exclude, gating)?)
            }
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
        if adapters.len() > TopK::MAX.get() {
            return Err(ChatError::Invalid(format!(
                "{} adapters named; the limit is {}",
                adapters.len(),
                TopK::MAX
            )));
        }
        let plan = plan.unwrap_or(if adapters.len() == 1 {
            Plan::Selection
        } else {
            Plan::Mixture
        });
        if plan == Plan::Router && !lib.has_router() {
            return Err(no_router(lib));
        }
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
    /// filled in by [`finished_provenance`] once the reply is done.
    pub fn provenance(&self, lib: &Library, query: &str) -> Provenance {
        let retrieved = self.asked != Plan::None && !self.given;
        Provenance {
            plan: self.plan,
            k: self.k,
            query: query.to_string(),
            base_model: lib.settings().base_id.clone(),
            embedder: retrieved.then(|| lib.embedder_id().to_string()),
            scoring: retrieved.then_some(lib.settings().retrieval.scoring),
            gating: (self.asked != Plan::None).then_some(if self.asked == Plan::Router {
                ReplyGating::Router
            } else if self.given {
                ReplyGating::Given
            } else if self.asked == Plan::Selection {
                ReplyGating::Selection
            } else {
                ReplyGating::Retrieved(self.gating)
            }),
            adapters: if self.plan == Plan::None {
                Vec::new()
            } else {
                self.served.clone()
            },
            generation: None,
            layer_gates: None,
        }
    }
}

/// The error of a `router` plan without a router for the active base.
fn no_router(lib: &Library) -> ChatError {
    ChatError::Invalid(format!(
        "plan router needs a trained router for the active base {:?}: train one with `ramole router train` and install it with `ramole router add`",
        lib.settings().base_id
    ))
}

/// Puts a router reply's gates into its provenance: each adapter's mean gate (the bars) and
/// the per-layer, per-token summary (the heatmap).
pub fn record_router_gates(provenance: &mut Provenance, gates: Option<&GateTrace>) {
    let Some(trace) = gates else {
        return;
    };
    let mean = trace.mean();
    for (a, g) in provenance.adapters.iter_mut().zip(&mean) {
        a.gate = *g;
    }
    let ids: Vec<String> = provenance.adapters.iter().map(|a| a.id.clone()).collect();
    provenance.layer_gates = Some(trace.summary(&ids));
}

/// Sampling settings, seed, token counts and finish reason of a reply: enough to replay it.
pub fn generation_record(
    params: &GenerateParams,
    finished: &Finished,
    dropped: usize,
) -> GenerationRecord {
    let g = &finished.generation;
    GenerationRecord {
        max_tokens: params.max_tokens,
        temperature: params.sampling.temperature,
        top_p: params.sampling.top_p,
        top_k: params.sampling.top_k,
        seed: params.sampling.seed,
        stop: params.stop.clone(),
        prompt_tokens: g.prompt_tokens,
        generated_tokens: g.generated_tokens,
        finish_reason: g.finish_reason,
        dropped_messages: dropped,
    }
}

/// The provenance of a finished reply: the routing's, with the generation record and (router
/// plans) the gates the router chose.
pub fn finished_provenance(
    routed: &Provenance,
    params: &GenerateParams,
    finished: &Finished,
    dropped: usize,
) -> Provenance {
    let mut p = routed.clone();
    p.generation = Some(generation_record(params, finished, dropped));
    record_router_gates(&mut p, finished.gates.as_ref());
    p
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

/// A reply under way: routed, its job running in the engine, nothing stored yet. The library
/// is not needed while it generates, so a caller holding the library in a lock can release it.
pub struct Turn {
    provenance: Provenance,
    handle: JobHandle,
    events: std::sync::mpsc::Receiver<JobEvent>,
    params: GenerateParams,
    dropped: usize,
    session: Option<ChatSession>,
    /// Title and system prompt of a session created when the turn is stored.
    new_session: (String, Option<String>),
    truncate_from: Option<i64>,
    user_text: Option<String>,
    store: bool,
}

impl Turn {
    /// The adapters, scores and gates serving this reply (its `generation` record is filled in
    /// when the turn is finished).
    pub fn provenance(&self) -> &Provenance {
        &self.provenance
    }

    /// The session it continues (`None`: a new one is created when it is stored).
    pub fn session(&self) -> Option<i64> {
        self.session.as_ref().map(|s| s.id)
    }

    /// Cancels the reply: generation stops and the text so far is stored as a cancelled reply.
    pub fn handle(&self) -> &JobHandle {
        &self.handle
    }

    /// Runs the reply to its end, calling `on_text` with each printable piece.
    pub fn generate(&mut self, on_text: &mut dyn FnMut(&str)) -> Result<Finished> {
        loop {
            match self.events.recv() {
                Ok(JobEvent::Text(t)) => on_text(&t),
                Ok(JobEvent::Done(g)) => return Ok(g),
                Ok(JobEvent::Failed(e)) => return Err(e.into()),
                Ok(JobEvent::Started) => {}
                Err(_) => return Err(EngineError::Stopped.into()),
            }
        }
    }
}

/// The history a turn answers and what it changes in the session.
struct Script {
    history: Vec<ChatMessage>,
    query: String,
    truncate_from: Option<i64>,
    user_text: Option<String>,
    store: bool,
}

fn script(lib: &Library, req: &ChatRequest, session: Option<&ChatSession>) -> Result<Script> {
    let stored = match session {
        Some(s) => lib.catalog().messages(s.id)?,
        None => Vec::new(),
    };
    let system_prompt = match session {
        Some(s) => s.system_prompt.clone(),
        None => req.system_prompt.clone(),
    };
    let mut history: Vec<ChatMessage> = Vec::new();
    if let Some(sys) = system_prompt.as_deref().filter(|s| !s.trim().is_empty()) {
        history.push(ChatMessage::new(Role::System, sys));
    }
    let user_at = |id: i64| -> Result<usize> {
        let what = match session {
            Some(s) => format!("session {}", s.id),
            None => "a new session".into(),
        };
        match stored.iter().position(|m| m.id == id) {
            Some(i) if stored[i].role == Role::User => Ok(i),
            Some(_) => Err(ChatError::Invalid(format!(
                "message {id} is a reply, not a user message"
            ))),
            None => Err(ChatError::Invalid(format!("{what} has no message {id}"))),
        }
    };
    let push = |history: &mut Vec<ChatMessage>, upto: usize| {
        for m in &stored[..upto] {
            history.push(ChatMessage::new(m.role, m.content.clone()));
        }
    };
    Ok(match req.action {
        ChatAction::Send => {
            check_message(&req.text)?;
            push(&mut history, stored.len());
            history.push(ChatMessage::new(Role::User, &req.text));
            Script {
                history,
                query: req.text.trim().to_string(),
                truncate_from: None,
                user_text: Some(req.text.clone()),
                store: true,
            }
        }
        ChatAction::Edit { message_id } => {
            check_message(&req.text)?;
            let at = user_at(message_id)?;
            push(&mut history, at);
            history.push(ChatMessage::new(Role::User, &req.text));
            Script {
                history,
                query: req.text.trim().to_string(),
                truncate_from: Some(message_id),
                user_text: Some(req.text.clone()),
                store: true,
            }
        }
        ChatAction::Regenerate | ChatAction::Compare { .. } => {
            let at = match req.action {
                ChatAction::Compare { message_id } => user_at(message_id)?,
                _ => stored
                    .iter()
                    .rposition(|m| m.role == Role::User)
                    .ok_or_else(|| {
                        ChatError::Invalid("there is no user message to answer again".into())
                    })?,
            };
            push(&mut history, at + 1);
            let store = matches!(req.action, ChatAction::Regenerate);
            Script {
                history,
                query: stored[at].content.trim().to_string(),
                // Regenerate replaces what followed the user message.
                truncate_from: stored.get(at + 1).map(|m| m.id).filter(|_| store),
                user_text: None,
                store,
            }
        }
    })
}

/// How a turn chooses its adapters: retrieval on the latest user message, or adapters named
/// by hand (`(id, gate)`, gates used as given).
#[derive(Debug, Clone, PartialEq)]
pub enum RouteAsk {
    Retrieve {
        k: Option<TopK>,
        plan: PlanChoice,
        gating: Option<Gating>,
        exclude: Vec<String>,
    },
    Given {
        adapters: Vec<(String, f32)>,
        plan: Option<Plan>,
    },
}

/// A turn ready for the engine: its job, the provenance of its routing, and how many messages
/// were dropped from the front of the history to fit the context.
#[derive(Debug, Clone)]
pub struct PreparedTurn {
    pub job: Job,
    pub provenance: Provenance,
    pub dropped: usize,
}

/// Builds a turn the way chat and the server both do: routes `query` (the latest user message)
/// as `route` asks, fits `history` (ending with that message) into the context left by
/// `params.max_tokens`, templates the prompt for `model` and makes the engine job.
pub fn prepare_turn(
    lib: &Library,
    model: &Model,
    history: &[ChatMessage],
    query: &str,
    route: &RouteAsk,
    params: &GenerateParams,
) -> Result<PreparedTurn> {
    let ctx = model.decoder.config().max_position_embeddings;
    check_max_tokens(params.max_tokens, ctx)?;
    // Routing before anything runs: a bad exclusion, pin or a broken index fails here.
    let routing = match route {
        RouteAsk::Retrieve {
            k,
            plan,
            gating,
            exclude,
        } => Routing::retrieve(lib, query, *k, *plan, *gating, exclude)?,
        RouteAsk::Given { adapters, plan } => Routing::given(lib, adapters, *plan)?,
    };
    let budget = ctx - params.max_tokens;
    let (messages, dropped) = fit_history(history, budget, &mut |msgs| {
        model.chat_prompt(msgs).map(|ids| ids.len())
    })?;
    let prompt = model.chat_prompt(&messages)?;
    Ok(PreparedTurn {
        job: Job {
            prompt,
            params: params.clone(),
            mix: routing.mix(lib),
        },
        provenance: routing.provenance(lib, query),
        dropped,
    })
}

impl ChatRequest {
    /// How this request routes: its pins when it has any, else retrieval.
    pub fn route(&self) -> Result<RouteAsk> {
        if self.pinned.is_empty() {
            return Ok(RouteAsk::Retrieve {
                k: self.k,
                plan: self.plan,
                gating: self.gating,
                exclude: self.exclude.clone(),
            });
        }
        if self.plan == PlanChoice::Plan(Plan::None) {
            return Err(ChatError::Invalid(
                "plan none uses no adapter, but adapters are pinned".into(),
            ));
        }
        Ok(RouteAsk::Given {
            adapters: pinned_gates(&self.pinned)?,
            plan: self.plan.plan(),
        })
    }
}

/// Routes `req`, builds its prompt and starts it in `engine` (running the library's active
/// base); returns once the engine has the request running (its adapters loaded), so a broken
/// adapter or a full engine fails here. Nothing is stored until [`finish`].
pub fn begin(lib: &Library, engine: &Engine, req: &ChatRequest) -> Result<Turn> {
    if req.session.is_none() && !matches!(req.action, ChatAction::Send) {
        return Err(ChatError::Invalid(
            "regenerate, edit and compare need a session".into(),
        ));
    }
    let session = match req.session {
        Some(id) => Some(lib.catalog().require_chat(id)?),
        None => None,
    };
    let script = script(lib, req, session.as_ref())?;
    let turn = prepare_turn(
        lib,
        engine.model(),
        &script.history,
        &script.query,
        &req.route()?,
        &req.params,
    )?;
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = engine.submit(turn.job, Box::new(move |e| tx.send(e).is_ok()))?;
    match rx.recv() {
        Ok(JobEvent::Started) => {}
        Ok(JobEvent::Failed(e)) => return Err(e.into()),
        _ => return Err(EngineError::Stopped.into()),
    }
    let title: String = script.query.chars().take(60).collect();
    Ok(Turn {
        provenance: turn.provenance,
        handle,
        events: rx,
        params: req.params.clone(),
        dropped: turn.dropped,
        session,
        new_session: (title, req.system_prompt.clone()),
        truncate_from: script.truncate_from,
        user_text: script.user_text,
        store: script.store,
    })
}

/// Stores a finished turn (one transaction) and returns the reply with its provenance.
pub fn finish(lib: &mut Library, turn: Turn, finished: Finished) -> Result<ChatReply> {
    let provenance = finished_provenance(&turn.provenance, &turn.params, &finished, turn.dropped);
    let text = finished.generation.text;
    let (session, user_message, message) = if turn.store {
        let chat = match &turn.session {
            Some(s) => TurnChat::Existing(s.id),
            None => TurnChat::New {
                title: &turn.new_session.0,
                system_prompt: turn
                    .new_session
                    .1
                    .as_deref()
                    .filter(|s| !s.trim().is_empty()),
            },
        };
        let (session, user, reply) = lib.catalog_mut().commit_turn(
            chat,
            turn.truncate_from,
            turn.user_text.as_deref(),
            &text,
            &provenance,
        )?;
        (session, user, Some(reply))
    } else {
        (turn.session.as_ref().map_or(0, |s| s.id), None, None)
    };
    Ok(ChatReply {
        session,
        user_message,
        message,
        reply: text,
        finish_reason: finished.generation.finish_reason,
        provenance,
        dropped_messages: turn.dropped,
    })
}

/// Answers `req` in its session through `engine`, calling `on_text` with each printable piece
/// of the reply: [`begin`], [`Turn::generate`], [`finish`].
pub fn send(
    lib: &mut Library,
    engine: &Engine,
    req: &ChatRequest,
    on_text: &mut dyn FnMut(&str),
) -> Result<ChatReply> {
    let mut turn = begin(lib, engine, req)?;
    let finished = turn.generate(on_text)?;
    finish(lib, turn, finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(roles: &[(&str, usize)]) -> Vec<ChatMessage> {
        roles
            .iter()
            .map(|(r, n)| ChatMessage::new(r.parse().unwrap(), "x".repeat(*n)))
            .collect()
    }

    fn len(m: &[ChatMessage]) -> Result<usize, ModelError> {
        Ok(m.iter().map(|m| m.content.len() + 2).sum())
    }

    #[test]
    fn pinned_gates_share_the_rest_and_sum_to_one() {
        let pin = |id: &str, gate| Pin {
            id: id.into(),
            gate,
        };
        let g = pinned_gates(&[pin("a", Some(0.5)), pin("b", None), pin("c", None)]).unwrap();
        assert_eq!(
            g,
            [("a".into(), 0.5), ("b".into(), 0.25), ("c".into(), 0.25)]
        );
        // Given gates over 1 leave nothing for the open ones, then are scaled to sum 1.
        let g = pinned_gates(&[pin("a", Some(0.8)), pin("b", Some(0.8)), pin("c", None)]).unwrap();
        assert_eq!(g.iter().map(|x| x.1).collect::<Vec<_>>(), [0.5, 0.5, 0.0]);
        assert!(pinned_gates(&[pin("a", Some(-1.0))]).is_err());
        assert!(pinned_gates(&[pin("a", Some(0.0))]).is_err());
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
        assert_eq!(kept[0].role, Role::System);
        assert_eq!(kept[1].role, Role::User);
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
