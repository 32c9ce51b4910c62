//! The inference engine: one worker thread owns the model's forward passes and the resident
//! adapters, and runs every live request as a row of one continuous batch (ramole-paper.md
//! section 3). Requests join between decode steps and leave when they finish; each row has its
//! own adapters and gates, sampling settings and KV cache; prompts are prefilled in chunks
//! beside decoding rows; a request can be cancelled at any step.
//!
//! Submissions go through a bounded channel: when it is full, [`Engine::try_submit`] answers
//! [`EngineError::Busy`] and [`Engine::submit`] waits. Adapters are loaded and compiled on a
//! second thread, so a request waiting for its adapters never stalls the running rows; loaded
//! adapters stay resident in an LRU within a byte budget. Callers (the CLI, the async server,
//! the desktop shell) only send jobs and receive events: no tensor work runs on their threads.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Serialize;

use crate::adapter::LoraAdapter;
use crate::batch;
use crate::model::{
    Decoding, FinishReason, GenerateParams, Generation, LogitsAt, Model, ModelError, Next,
    RowInput, SeqCache, Timings, check_request,
};
use crate::mole::{CompiledMix, MixDelta, MoleError, Plan, Precision, Strategy};
use crate::router::{GateTrace, RoutedRow, RouterDelta, RouterLora};

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
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_rows: 8,
            step_tokens: 256,
            prefill_chunk: 128,
            queue: 64,
            adapter_budget: 1 << 30,
            precision: Precision::F32,
            strategy: None,
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

/// What a request hears, in order: `Started` once it has a row, `Text` pieces, then exactly one
/// of `Done` or `Failed`.
#[derive(Debug, Clone)]
pub enum JobEvent {
    Started,
    Text(String),
    Done(Generation),
    Failed(EngineError),
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
        let (load_tx, load_rx) = std::sync::mpsc::channel::<LoadJob>();
        let shared = Arc::new(Shared {
            stats: Mutex::new(EngineStats::default()),
            loaded: Mutex::new(Vec::new()),
            router: Mutex::new(None),
        });
        let loader = Loader {
            model: model.clone(),
            precision: cfg.precision,
            shared: shared.clone(),
            wake: tx.clone(),
            recent: HashMap::new(),
        };
        std::thread::Builder::new()
            .name("ramole-loader".into())
            .spawn(move || loader.run(load_rx))
            .expect("spawning the adapter loader thread");
        let worker = Worker {
            model: model.clone(),
            cfg,
            shared: shared.clone(),
            load_tx,
            adapters: AdapterCache::default(),
            mixes: HashMap::new(),
            loading: HashMap::new(),
            ready: VecDeque::new(),
            rows: Vec::new(),
        };
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
    pub fn run(&self, job: Job, on_text: &mut dyn FnMut(&str)) -> Result<Generation, EngineError> {
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

/// A request's adapters to load and compile.
struct LoadJob {
    id: u64,
    mix: MixRequest,
    /// The router of a `router` plan.
    router: Option<Arc<RouterLora>>,
    /// Adapters already resident, by id.
    resident: Vec<(String, Arc<LoraAdapter>)>,
}

/// A request's compiled mixture and the adapters newly loaded for it, by id.
type Prepared = (Arc<CompiledMix>, Vec<(String, Arc<LoraAdapter>)>);

struct Loaded {
    id: u64,
    result: Result<Prepared, EngineError>,
}

/// Loads adapter files and compiles mixtures off the worker thread.
struct Loader {
    model: Arc<Model>,
    precision: Precision,
    shared: Arc<Shared>,
    wake: SyncSender<Command>,
    /// Adapters this thread loaded that may still be alive, so two requests that ask for the same
    /// new adapter before the worker records it share one copy.
    recent: HashMap<String, Weak<LoraAdapter>>,
}

impl Loader {
    fn run(mut self, rx: Receiver<LoadJob>) {
        for job in rx {
            let result = self.load(&job);
            self.shared
                .loaded
                .lock()
                .expect("loaded lock")
                .push(Loaded { id: job.id, result });
            // Blocked in `recv` the worker's channel is empty, so this cannot be refused then;
            // when it is full, the worker is busy and looks at the results on its next step.
            let _ = self.wake.try_send(Command::Wake);
        }
    }

    fn load(&mut self, job: &LoadJob) -> Result<Prepared, EngineError> {
        self.recent.retain(|_, w| w.strong_count() > 0);
        let mut parts = Vec::with_capacity(job.mix.adapters.len());
        let mut fresh = Vec::new();
        for u in &job.mix.adapters {
            let known = job
                .resident
                .iter()
                .find(|(id, _)| *id == u.id)
                .map(|(_, a)| a.clone())
                .or_else(|| self.recent.get(&u.id).and_then(Weak::upgrade));
            let adapter = match known {
                Some(a) => a,
                None => {
                    let a = LoraAdapter::load(&u.dir, &self.model.decoder).map_err(|e| {
                        EngineError::Adapter {
                            id: u.id.clone(),
                            message: e.to_string(),
                        }
                    })?;
                    let a = Arc::new(a);
                    self.recent.insert(u.id.clone(), Arc::downgrade(&a));
                    fresh.push((u.id.clone(), a.clone()));
                    a
                }
            };
            parts.push((adapter, u.gate));
        }
        let mix = match (&job.mix.plan, &job.router) {
            (Plan::Router, Some(router)) => {
                let adapters: Vec<Arc<LoraAdapter>> = parts.into_iter().map(|(a, _)| a).collect();
                CompiledMix::routed(&adapters, router)?
            }
            (Plan::Router, None) => {
                return Err(EngineError::Invalid(
                    "plan router needs a RouterLoRA for this base; none is loaded".into(),
                ));
            }
            _ => CompiledMix::with_precision(job.mix.plan, &parts, self.precision)?,
        };
        Ok((Arc::new(mix), fresh))
    }
}

/// Resident adapters, least recently used first out, within a byte budget; adapters a row still
/// uses are never dropped.
#[derive(Default)]
struct AdapterCache {
    entries: HashMap<String, (Arc<LoraAdapter>, u64)>,
    clock: u64,
}

impl AdapterCache {
    fn get(&mut self, id: &str) -> Option<Arc<LoraAdapter>> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(id).map(|(a, used)| {
            *used = clock;
            a.clone()
        })
    }

    fn insert(&mut self, id: String, a: Arc<LoraAdapter>) {
        self.clock += 1;
        self.entries.entry(id).or_insert((a, self.clock));
    }

    fn bytes(&self) -> usize {
        self.entries.values().map(|(a, _)| a.bytes()).sum()
    }

    /// Drops unused adapters, oldest first, until the cache fits `budget`. Returns how many went.
    fn evict(&mut self, budget: usize) -> u64 {
        let mut evicted = 0;
        while self.bytes() > budget {
            let victim = self
                .entries
                .iter()
                .filter(|(_, (a, _))| Arc::strong_count(a) == 1)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(id, _)| id.clone());
            match victim {
                Some(id) => {
                    self.entries.remove(&id);
                    evicted += 1;
                }
                None => break,
            }
        }
        evicted
    }
}

/// Identity of a compiled mixture: requests with equal keys share one (and one gather group).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MixKey {
    plan: Plan,
    adapters: Vec<(String, u32)>,
    /// The router a `router` mix was compiled with (its address; 0 for other plans).
    router: usize,
}

impl MixKey {
    fn of(mix: &MixRequest, router: Option<&Arc<RouterLora>>) -> Self {
        Self {
            plan: mix.plan,
            router: match (mix.plan, router) {
                (Plan::Router, Some(r)) => Arc::as_ptr(r) as usize,
                _ => 0,
            },
            adapters: mix
                .adapters
                .iter()
                .map(|a| (a.id.clone(), a.gate.to_bits()))
                .collect(),
        }
    }
}

/// A request in the batch.
struct Row {
    sink: Sink,
    cancel: Arc<AtomicBool>,
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// The token to feed next once the prompt is in.
    next: Option<u32>,
    cache: SeqCache,
    decoding: Decoding,
    mix: Option<Arc<CompiledMix>>,
    /// The router's gates so far (`router` plans).
    gates: Option<GateTrace>,
    admitted: Instant,
    first_token: Option<Instant>,
    decode_steps: usize,
}

impl Row {
    fn pending_prompt(&self) -> usize {
        self.prompt.len() - self.prefilled
    }

    fn wants_out(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

struct Worker {
    model: Arc<Model>,
    cfg: EngineConfig,
    shared: Arc<Shared>,
    load_tx: Sender<LoadJob>,
    adapters: AdapterCache,
    mixes: HashMap<MixKey, Weak<CompiledMix>>,
    /// Requests whose adapters are being loaded, by id.
    loading: HashMap<u64, Box<Pending>>,
    /// Requests ready for a row, oldest first.
    ready: VecDeque<(Box<Pending>, Option<Arc<CompiledMix>>)>,
    rows: Vec<Row>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Command>) {
        loop {
            // With nothing to step, wait for a submission or the loader's wake-up.
            if self.rows.is_empty() && self.ready.is_empty() {
                match rx.recv() {
                    Ok(Command::Submit(p)) => self.accept(p),
                    Ok(Command::Wake) => {}
                    Ok(Command::Shutdown) | Err(_) => return self.stop(),
                }
            }
            // Take new requests while there is room for them to run soon (one more batch
            // loading its adapters beside the running one); the rest stay in the bounded
            // channel, which is what makes `submit` wait.
            while self.rows.len() + self.ready.len() + self.loading.len() < 2 * self.cfg.max_rows {
                match rx.try_recv() {
                    Ok(Command::Submit(p)) => self.accept(p),
                    Ok(Command::Wake) => {}
                    Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => {
                        return self.stop();
                    }
                    Err(TryRecvError::Empty) => break,
                }
            }
            self.collect_loaded();
            self.drop_cancelled();
            self.admit();
            if !self.rows.is_empty()
                && let Err(e) = self.step()
            {
                // A failed forward fails every row in it; the engine goes on with new requests.
                for mut row in self.rows.drain(..) {
                    (row.sink)(JobEvent::Failed(e.clone()));
                }
            }
        }
    }

    fn stop(mut self) {
        for (_, mut p) in self.loading.drain() {
            (p.sink)(JobEvent::Failed(EngineError::Stopped));
        }
        for (mut p, _) in self.ready.drain(..) {
            (p.sink)(JobEvent::Failed(EngineError::Stopped));
        }
        for mut r in self.rows.drain(..) {
            (r.sink)(JobEvent::Failed(EngineError::Stopped));
        }
    }

    /// A new request: reuse a live compiled mixture, or have its adapters loaded.
    fn accept(&mut self, p: Box<Pending>) {
        if p.job.mix.plan == Plan::None || p.job.mix.adapters.is_empty() {
            self.ready.push_back((p, None));
            return;
        }
        let router = match p.job.mix.plan {
            Plan::Router => self.shared.router.lock().expect("router").clone(),
            _ => None,
        };
        let key = MixKey::of(&p.job.mix, router.as_ref());
        if let Some(mix) = self.mixes.get(&key).and_then(Weak::upgrade) {
            for a in &p.job.mix.adapters {
                self.adapters.get(&a.id);
            }
            self.ready.push_back((p, Some(mix)));
            return;
        }
        let resident = p
            .job
            .mix
            .adapters
            .iter()
            .filter_map(|a| self.adapters.get(&a.id).map(|r| (a.id.clone(), r)))
            .collect();
        let job = LoadJob {
            id: p.id,
            mix: p.job.mix.clone(),
            router,
            resident,
        };
        if self.load_tx.send(job).is_err() {
            let mut p = p;
            (p.sink)(JobEvent::Failed(EngineError::Stopped));
            return;
        }
        self.loading.insert(p.id, p);
    }

    fn collect_loaded(&mut self) {
        let done: Vec<Loaded> = std::mem::take(&mut *self.shared.loaded.lock().expect("loaded"));
        for l in done {
            let Some(mut p) = self.loading.remove(&l.id) else {
                continue;
            };
            match l.result {
                Ok((mix, fresh)) => {
                    let n = fresh.len() as u64;
                    for (id, a) in fresh {
                        self.adapters.insert(id, a);
                    }
                    self.mixes.retain(|_, w| w.strong_count() > 0);
                    let router = mix.route().and_then(|r| r.router());
                    self.mixes
                        .insert(MixKey::of(&p.job.mix, router), Arc::downgrade(&mix));
                    self.shared.stats.lock().expect("stats").adapters_loaded += n;
                    self.ready.push_back((p, Some(mix)));
                }
                Err(e) => {
                    (p.sink)(JobEvent::Failed(e));
                }
            }
        }
        let evicted = self.adapters.evict(self.cfg.adapter_budget);
        let mut s = self.shared.stats.lock().expect("stats");
        s.adapters_evicted += evicted;
        s.resident_adapter_bytes = self.adapters.bytes();
    }

    /// Finishes cancelled requests wherever they are.
    fn drop_cancelled(&mut self) {
        let cancelled = |c: &AtomicBool| c.load(Ordering::Relaxed);
        let gone: Vec<u64> = self
            .loading
            .values()
            .filter(|p| cancelled(&p.cancel))
            .map(|p| p.id)
            .collect();
        for id in gone {
            if let Some(p) = self.loading.remove(&id) {
                self.finish_unstarted(*p);
            }
        }
        let (keep, gone): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.ready)
            .into_iter()
            .partition(|(p, _)| !cancelled(&p.cancel));
        self.ready = keep;
        for (p, _) in gone {
            self.finish_unstarted(*p);
        }
        let mut i = 0;
        while i < self.rows.len() {
            if self.rows[i].wants_out() {
                let row = self.rows.remove(i);
                self.finish(row, FinishReason::Cancelled);
            } else {
                i += 1;
            }
        }
    }

    fn finish_unstarted(&self, mut p: Pending) {
        let g = Generation {
            text: String::new(),
            prompt_tokens: p.job.prompt.len(),
            generated_tokens: 0,
            token_ids: Vec::new(),
            finish_reason: FinishReason::Cancelled,
            timings: Timings::default(),
            gates: None,
        };
        (p.sink)(JobEvent::Done(g));
    }

    /// Moves ready requests into rows while there is room.
    fn admit(&mut self) {
        while self.rows.len() < self.cfg.max_rows {
            let Some((mut p, mix)) = self.ready.pop_front() else {
                break;
            };
            let decoding = match Decoding::new(&self.model, &p.job.params) {
                Ok(d) => d,
                Err(e) => {
                    (p.sink)(JobEvent::Failed(e.into()));
                    continue;
                }
            };
            if !(p.sink)(JobEvent::Started) {
                p.cancel.store(true, Ordering::Relaxed);
            }
            let Pending {
                job, sink, cancel, ..
            } = *p;
            self.rows.push(Row {
                sink,
                cancel,
                prompt: job.prompt,
                prefilled: 0,
                next: None,
                cache: self.model.decoder.new_cache(),
                decoding,
                gates: mix.as_ref().and_then(|m| m.route()).map(|r| {
                    GateTrace::new(self.model.decoder.config().num_layers, r.adapters().len())
                }),
                mix: mix.filter(|m| !m.is_empty()),
                admitted: Instant::now(),
                first_token: None,
                decode_steps: 0,
            });
        }
    }

    /// One forward over the rows that feed tokens this step, then sampling for the rows whose
    /// prompt is complete.
    fn step(&mut self) -> Result<(), EngineError> {
        let pending: Vec<usize> = self.rows.iter().map(Row::pending_prompt).collect();
        let take = batch::step_tokens(&pending, self.cfg.step_tokens, self.cfg.prefill_chunk);
        let active: Vec<usize> = (0..self.rows.len()).filter(|&i| take[i] > 0).collect();
        let inputs: Vec<Vec<u32>> = active
            .iter()
            .map(|&i| {
                let r = &self.rows[i];
                if pending[i] > 0 {
                    r.prompt[r.prefilled..r.prefilled + take[i]].to_vec()
                } else {
                    vec![r.next.expect("a decoding row has its next token")]
                }
            })
            .collect();
        let decode_only = active.iter().all(|&i| pending[i] == 0);
        let mut delta = MixDelta::new(
            active
                .iter()
                .map(|&i| self.rows[i].mix.clone().filter(|m| m.route().is_none()))
                .collect(),
        );
        if let Some(s) = self.cfg.strategy {
            delta = delta.with_strategy(s);
        }
        // Routed rows, one delta per router (rows keep the router they started with).
        let mut routers: Vec<Arc<RouterLora>> = Vec::new();
        for &i in &active {
            if let Some(r) = self.rows[i].mix.as_ref().and_then(|m| m.route())
                && let Some(router) = r.router()
                && !routers.iter().any(|x| Arc::ptr_eq(x, router))
            {
                routers.push(router.clone());
            }
        }
        let routed: Vec<RouterDelta<'_>> = routers
            .iter()
            .map(|router| {
                let rows = active
                    .iter()
                    .map(|&i| {
                        let r = self.rows[i].mix.as_ref()?.route()?;
                        r.router()
                            .is_some_and(|x| Arc::ptr_eq(x, router))
                            .then(|| RoutedRow {
                                mix: r.clone(),
                                keep: None,
                            })
                    })
                    .collect();
                RouterDelta::new(router, rows).recording()
            })
            .collect();
        let step_delta = StepDelta {
            mix: &delta,
            routed: &routed,
        };
        let strategy = delta.strategy();
        let t = Instant::now();
        let logits = {
            let rows: Vec<RowInput> = inputs.iter().map(|t| RowInput { tokens: t }).collect();
            let mut caches: Vec<&mut SeqCache> = Vec::with_capacity(active.len());
            let mut k = 0;
            for (i, r) in self.rows.iter_mut().enumerate() {
                if k < active.len() && active[k] == i {
                    caches.push(&mut r.cache);
                    k += 1;
                }
            }
            self.model
                .decoder
                .forward(&rows, &mut caches, LogitsAt::Last, &step_delta)?
                .to_vec2::<f32>()?
        };
        for d in &routed {
            for (k, g) in d.take_gates().iter().enumerate() {
                if g.sums.is_empty() {
                    continue;
                }
                let i = active[k];
                let fed = inputs[k].first().copied();
                let row = &mut self.rows[i];
                if let Some(trace) = row.gates.as_mut() {
                    if pending[i] > 0 {
                        trace.add_prompt(g);
                    } else if let Some(t) = fed {
                        trace.push_token(self.model.tokenizer.token_text(t), g);
                    }
                }
            }
        }
        let elapsed = t.elapsed().as_secs_f64();
        {
            let mut s = self.shared.stats.lock().expect("stats");
            s.steps += 1;
            s.most_rows = s.most_rows.max(active.len());
            match strategy {
                Strategy::Gather => s.gather_steps += 1,
                Strategy::Union => s.union_steps += 1,
            }
            if decode_only {
                s.decode_steps += 1;
                s.decode_tokens += active.len() as u64;
                s.decode_s += elapsed;
            } else {
                s.prefill_tokens += active
                    .iter()
                    .filter(|&&i| pending[i] > 0)
                    .map(|&i| take[i] as u64)
                    .sum::<u64>();
            }
        }
        let mut finished: Vec<(usize, FinishReason)> = Vec::new();
        for (k, &i) in active.iter().enumerate() {
            let row = &mut self.rows[i];
            if pending[i] > 0 {
                row.prefilled += take[i];
                if row.pending_prompt() > 0 {
                    continue;
                }
                row.first_token = Some(Instant::now());
            } else {
                row.decode_steps += 1;
            }
            let mut listening = true;
            let sink = &mut row.sink;
            let next =
                row.decoding
                    .advance(&self.model, &logits[k], row.cache.len(), &mut |piece| {
                        listening &= sink(JobEvent::Text(piece.to_string()))
                    })?;
            if !listening {
                finished.push((i, FinishReason::Cancelled));
                continue;
            }
            match next {
                Next::Feed(t) => row.next = Some(t),
                Next::Finish(reason) => finished.push((i, reason)),
            }
        }
        for (i, reason) in finished.into_iter().rev() {
            let row = self.rows.remove(i);
            self.finish(row, reason);
        }
        Ok(())
    }

    fn finish(&self, mut row: Row, reason: FinishReason) {
        let now = Instant::now();
        let first = row.first_token.unwrap_or(now);
        let timings = Timings::new(
            row.prefilled,
            (first - row.admitted).as_secs_f64(),
            row.decode_steps,
            (now - first).as_secs_f64(),
        );
        let mut g = row
            .decoding
            .into_generation(row.prompt.len(), reason, timings);
        g.gates = row.gates.take();
        (row.sink)(JobEvent::Done(g));
    }
}

/// A step's LoRA terms: the compiled mixtures' and each router's, summed.
struct StepDelta<'a> {
    mix: &'a MixDelta,
    routed: &'a [RouterDelta<'a>],
}

impl crate::model::SiteDelta for StepDelta<'_> {
    fn delta(
        &self,
        site: crate::model::Site,
        x: &candle_core::Tensor,
        rows: &[crate::model::RowSpan],
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        let mut sum = self.mix.delta(site, x, rows)?;
        for r in self.routed {
            if let Some(d) = r.delta(site, x, rows)? {
                sum = Some(match sum {
                    Some(s) => (s + d)?,
                    None => d,
                });
            }
        }
        Ok(sum)
    }
}
