//! The inference engine: one worker thread owns the model's forward passes and the resident
//! adapters, and runs every live request as a row of one continuous batch (ramole-paper.md
//! section 3). Requests join between decode steps and leave when they finish; each row has its
//! own adapters and gates ([`RowMix`]), sampling settings and KV cache; prompts are prefilled in
//! chunks beside decoding rows; a request can be cancelled at any step.
//!
//! Submissions go through a bounded channel: when it is full, [`Engine::try_submit`] answers
//! [`EngineError::Busy`] and [`Engine::submit`] waits. Adapters are loaded and compiled on a
//! second thread (`loader`), so a request waiting for its adapters never stalls the running
//! rows; loaded adapters stay resident in an LRU within a byte budget (`cache`); the batch
//! itself runs in `worker`. Callers (the CLI, the async server, the desktop shell) only send
//! jobs and receive events: no tensor work runs on their threads.

mod cache;
mod loader;
mod prefix;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::Serialize;

use crate::model::{GenerateParams, Generation, Model, ModelError, check_request};
use crate::mole::{CompiledMix, MoleError, Precision, Strategy};
use crate::router::{GateTrace, RouterLora, RouterMix};
use crate::vocab::Plan;
use loader::{Loaded, Loader};
use worker::Worker;

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("the engine is busy: its queue of {limit} waiting requests is full; retry later")]
    Busy { limit: usize },
    #[error("the engine has stopped")]
    Stopped,
    #[error("request: {0}")]
    Invalid(String),
    #[error("adapter {id}: {message}")]
    Adapter { id: String, message: String },
    #[error("{0}")]
    Model(String),
}

impl From<ModelError> for EngineError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Input(m) => EngineError::Invalid(m),
            other => EngineError::Model(other.to_string()),
        }
    }
}

impl From<MoleError> for EngineError {
    fn from(e: MoleError) -> Self {
        EngineError::Invalid(e.to_string())
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::from(e).into()
    }
}

/// Limits of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Rows decoded together.
    pub max_rows: usize,
    /// Tokens one step may feed (decode rows count 1 each; prompts fill the rest).
    pub step_tokens: usize,
    /// Prompt tokens one row feeds per step.
    pub prefill_chunk: usize,
    /// Requests that may wait beyond the running rows before submissions are refused.
    pub queue: usize,
    /// Bytes of adapter factors kept resident when no row uses them.
    pub adapter_budget: usize,
    /// How compiled mixtures hold their factors.
    pub precision: Precision,
    /// Force a batched-LoRA strategy (benchmarks, tests); `None` picks the cheaper per step.
    pub strategy: Option<Strategy>,
    /// Bytes of KV caches that finished requests leave for later requests with the same prefix
    /// and adapter configuration (`prefix`); 0 turns the prefix cache off.
    pub prefix_cache_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_rows: 8,
            step_tokens: 256,
            prefill_chunk: 128,
            queue: 64,
            adapter_budget: 1 << 30,
            precision: Precision::Int8,
            strategy: None,
            prefix_cache_bytes: 256 << 20,
        }
    }
}

/// An installed adapter a request applies.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterUse {
    /// Catalog id (or any stable name): the key of the resident cache.
    pub id: String,
    pub dir: PathBuf,
    pub gate: f32,
}

/// The adapters of a request and how they combine (DESIGN.md 3a).
#[derive(Debug, Clone, PartialEq)]
pub struct MixRequest {
    pub plan: Plan,
    pub adapters: Vec<AdapterUse>,
}

impl MixRequest {
    /// The base model alone.
    pub fn none() -> Self {
        Self {
            plan: Plan::None,
            adapters: Vec::new(),
        }
    }
}

/// One request: a templated prompt, its generation settings and its adapters.
#[derive(Debug, Clone)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    pub mix: MixRequest,
}

/// A request that ran to its end: the generation and, for `router` plans, the router's gates
/// per layer and token.
#[derive(Debug, Clone)]
pub struct Finished {
    pub generation: Generation,
    pub gates: Option<GateTrace>,
}

/// What a request hears, in order: `Started` once it has a row, `Text` pieces, then exactly one
/// of `Done` or `Failed`.
#[derive(Debug, Clone)]
pub enum JobEvent {
    Started,
    Text(String),
    Done(Finished),
    Failed(EngineError),
}

/// What a row applies besides the base model: a compiled mixture (`selection`, `mixture`,
/// `fusion`) or the experts a RouterLoRA gates per token (`router`).
#[derive(Clone)]
pub enum RowMix {
    Fixed(Arc<CompiledMix>),
    Routed(Arc<RouterMix>),
}

/// Receives a request's events on the engine's thread; it must not block. Returning `false`
/// says nobody listens any more, which cancels the request.
pub type Sink = Box<dyn FnMut(JobEvent) -> bool + Send>;

/// Cancels its request.
#[derive(Debug, Clone)]
pub struct JobHandle {
    id: u64,
    cancel: Arc<AtomicBool>,
}

impl JobHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The request stops before its next step and reports `Done` with
    /// [`FinishReason::Cancelled`].
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// Counters of the steps run so far.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineStats {
    pub steps: u64,
    /// Steps in which every row decoded one token (no prompt chunk).
    pub decode_steps: u64,
    pub decode_tokens: u64,
    /// Wall time of the decode steps.
    pub decode_s: f64,
    pub prefill_tokens: u64,
    pub most_rows: usize,
    pub gather_steps: u64,
    pub union_steps: u64,
    pub adapters_loaded: u64,
    pub adapters_evicted: u64,
    pub resident_adapter_bytes: usize,
    /// Requests that started from a cached prefix, and the prompt tokens it spared.
    pub prefix_hits: u64,
    pub prefix_tokens_reused: u64,
    /// Requests whose configuration is cached that found no prefix.
    pub prefix_misses: u64,
    pub prefix_cache_bytes: usize,
}

enum Command {
    Submit(Box<Pending>),
    /// Adapters finished loading; the results wait in `Shared::loaded`.
    Wake,
    Shutdown,
}

struct Pending {
    id: u64,
    job: Job,
    sink: Sink,
    cancel: Arc<AtomicBool>,
}

/// State the handle, the worker and the loader share.
struct Shared {
    stats: Mutex<EngineStats>,
    loaded: Mutex<Vec<Loaded>>,
    /// The RouterLoRA `router` plans use (requests submitted later see a change).
    router: Mutex<Option<Arc<RouterLora>>>,
}

pub struct Engine {
    tx: SyncSender<Command>,
    worker: Option<JoinHandle<()>>,
    model: Arc<Model>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    queue: usize,
}

impl Engine {
    /// Starts the worker and loader threads over `model`.
    pub fn start(model: Arc<Model>, cfg: EngineConfig) -> Self {
        let cfg = EngineConfig {
            max_rows: cfg.max_rows.max(1),
            step_tokens: cfg.step_tokens.max(1),
            prefill_chunk: cfg.prefill_chunk.max(1),
            queue: cfg.queue.max(1),
            ..cfg
        };
        let cfg_queue = cfg.queue;
        let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue);
        let (load_tx, load_rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            stats: Mutex::new(EngineStats::default()),
            loaded: Mutex::new(Vec::new()),
            router: Mutex::new(None),
        });
        let loader = Loader::new(model.clone(), cfg.precision, shared.clone(), tx.clone());
        std::thread::Builder::new()
            .name("ramole-loader".into())
            .spawn(move || loader.run(load_rx))
            .expect("spawning the adapter loader thread");
        let worker = Worker::new(model.clone(), cfg, shared.clone(), load_tx);
        let handle = std::thread::Builder::new()
            .name("ramole-engine".into())
            .spawn(move || worker.run(rx))
            .expect("spawning the engine thread");
        Self {
            tx,
            worker: Some(handle),
            queue: cfg_queue,
            model,
            shared,
            next_id: AtomicU64::new(1),
        }
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().expect("stats lock").clone()
    }

    pub fn reset_stats(&self) {
        let mut s = self.shared.stats.lock().expect("stats lock");
        let resident = s.resident_adapter_bytes;
        *s = EngineStats {
            resident_adapter_bytes: resident,
            ..EngineStats::default()
        };
    }

    /// Sets the RouterLoRA of `router` plans (checked against the model when it was loaded);
    /// running requests keep the one they started with.
    pub fn set_router(&self, router: Option<Arc<RouterLora>>) {
        *self.shared.router.lock().expect("router") = router;
    }

    pub fn router(&self) -> Option<Arc<RouterLora>> {
        self.shared.router.lock().expect("router").clone()
    }

    fn prepare(&self, job: Job, sink: Sink) -> Result<(Box<Pending>, JobHandle), EngineError> {
        check_request(&self.model, &job.prompt, &job.params)?;
        crate::mole::check_gates(&job.mix.adapters.iter().map(|a| a.gate).collect::<Vec<_>>())?;
        if job.mix.plan != Plan::None && job.mix.adapters.is_empty() {
            return Err(EngineError::Invalid(format!(
                "plan {} needs at least one adapter",
                job.mix.plan
            )));
        }
        if job.mix.plan == Plan::Router && self.router().is_none() {
            return Err(EngineError::Invalid(
                "plan router needs a RouterLoRA for this base; none is loaded".into(),
            ));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = Arc::new(AtomicBool::new(false));
        let handle = JobHandle {
            id,
            cancel: cancel.clone(),
        };
        Ok((
            Box::new(Pending {
                id,
                job,
                sink,
                cancel,
            }),
            handle,
        ))
    }

    /// Queues `job`, waiting while the queue is full.
    pub fn submit(&self, job: Job, sink: Sink) -> Result<JobHandle, EngineError> {
        let (pending, handle) = self.prepare(job, sink)?;
        self.tx
            .send(Command::Submit(pending))
            .map_err(|_| EngineError::Stopped)?;
        Ok(handle)
    }

    /// Queues `job`, or answers [`EngineError::Busy`] at once when the queue is full.
    pub fn try_submit(&self, job: Job, sink: Sink) -> Result<JobHandle, EngineError> {
        let (pending, handle) = self.prepare(job, sink)?;
        match self.tx.try_send(Command::Submit(pending)) {
            Ok(()) => Ok(handle),
            Err(TrySendError::Full(_)) => Err(EngineError::Busy { limit: self.queue }),
            Err(TrySendError::Disconnected(_)) => Err(EngineError::Stopped),
        }
    }

    /// Runs `job` to the end on the calling thread's behalf, calling `on_text` with each piece.
    pub fn run(&self, job: Job, on_text: &mut dyn FnMut(&str)) -> Result<Finished, EngineError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.submit(job, Box::new(move |e| tx.send(e).is_ok()))?;
        for event in rx {
            match event {
                JobEvent::Started => {}
                JobEvent::Text(t) => on_text(&t),
                JobEvent::Done(g) => return Ok(g),
                JobEvent::Failed(e) => return Err(e),
            }
        }
        Err(EngineError::Stopped)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
    }
}
