//! The worker thread: takes submissions, hands adapter loading to the loader, admits ready
//! requests as rows, and steps the batch (one forward over every row that feeds tokens, then
//! sampling) until each row finishes or is cancelled.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::Instant;

use super::cache::{AdapterCache, MixKey, WeakMix};
use super::loader::{LoadJob, Loaded};
use super::prefix::{PrefixCache, PrefixKey};
use super::{
    Command, EngineConfig, EngineError, Finished, JobEvent, Pending, RowMix, Shared, Sink,
};
use crate::batch;
use crate::model::{Decoding, Generation, LogitsAt, Model, Next, RowInput, SeqCache, Timings};
use crate::mole::{MixDelta, Strategy};
use crate::router::{GateTrace, RoutedRow, RouterDelta, RouterLora};
use crate::vocab::{FinishReason, Plan};

/// A request in the batch.
struct Row {
    sink: Sink,
    cancel: Arc<AtomicBool>,
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// Of those, the ones a cached prefix brought.
    reused: usize,
    /// Where its cache goes when it finishes (`None`: not cached).
    prefix_key: Option<PrefixKey>,
    /// The token to feed next once the prompt is in.
    next: Option<u32>,
    cache: SeqCache,
    decoding: Decoding,
    mix: Option<RowMix>,
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

pub(super) struct Worker {
    model: Arc<Model>,
    cfg: EngineConfig,
    shared: Arc<Shared>,
    load_tx: Sender<LoadJob>,
    adapters: AdapterCache,
    mixes: HashMap<MixKey, WeakMix>,
    /// Requests whose adapters are being loaded, by id.
    loading: HashMap<u64, Box<Pending>>,
    /// Requests ready for a row, oldest first.
    ready: VecDeque<(Box<Pending>, Option<RowMix>)>,
    rows: Vec<Row>,
    prefix: PrefixCache,
}

impl Worker {
    pub(super) fn new(
        model: Arc<Model>,
        cfg: EngineConfig,
        shared: Arc<Shared>,
        load_tx: Sender<LoadJob>,
    ) -> Self {
        Self {
            model,
            shared,
            load_tx,
            adapters: AdapterCache::default(),
            mixes: HashMap::new(),
            loading: HashMap::new(),
            ready: VecDeque::new(),
            rows: Vec::new(),
            prefix: PrefixCache::new(cfg.prefix_cache_bytes),
            cfg,
        }
    }

    pub(super) fn run(mut self, rx: Receiver<Command>) {
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
        if let Some(mix) = self.mixes.get(&key).and_then(WeakMix::upgrade) {
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
                    self.mixes.retain(|_, w| w.is_alive());
                    let router = match &mix {
                        RowMix::Routed(r) => r.router(),
                        RowMix::Fixed(_) => None,
                    };
                    self.mixes
                        .insert(MixKey::of(&p.job.mix, router), WeakMix::of(&mix));
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
        let generation = Generation {
            text: String::new(),
            prompt_tokens: p.job.prompt.len(),
            generated_tokens: 0,
            token_ids: Vec::new(),
            finish_reason: FinishReason::Cancelled,
            timings: Timings::default(),
        };
        (p.sink)(JobEvent::Done(Finished {
            generation,
            gates: None,
        }));
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
            let prefix_key = PrefixKey::of(&job.mix).filter(|_| self.cfg.prefix_cache_bytes > 0);
            let hit = prefix_key
                .as_ref()
                .and_then(|k| self.prefix.take(k, &job.prompt));
            {
                let mut s = self.shared.stats.lock().expect("stats lock");
                match &hit {
                    Some(h) => {
                        s.prefix_hits += 1;
                        s.prefix_tokens_reused += h.len as u64;
                    }
                    None if prefix_key.is_some() => s.prefix_misses += 1,
                    None => {}
                }
                s.prefix_cache_bytes = self.prefix.bytes();
            }
            let (cache, reused) = match hit {
                Some(h) => (h.cache, h.len),
                None => (self.model.decoder.new_cache(), 0),
            };
            self.rows.push(Row {
                sink,
                cancel,
                prompt: job.prompt,
                prefilled: reused,
                reused,
                prefix_key,
                next: None,
                cache,
                decoding,
                gates: match &mix {
                    Some(RowMix::Routed(r)) => Some(GateTrace::new(
                        self.model.decoder.config().num_layers,
                        r.adapters().len(),
                    )),
                    _ => None,
                },
                mix: mix.filter(|m| !matches!(m, RowMix::Fixed(c) if c.is_empty())),
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
                .map(|&i| match &self.rows[i].mix {
                    Some(RowMix::Fixed(m)) => Some(m.clone()),
                    _ => None,
                })
                .collect(),
        );
        if let Some(s) = self.cfg.strategy {
            delta = delta.with_strategy(s);
        }
        // Routed rows, one delta per router (rows keep the router they started with).
        let mut routers: Vec<Arc<RouterLora>> = Vec::new();
        for &i in &active {
            if let Some(RowMix::Routed(r)) = &self.rows[i].mix
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
                        let Some(RowMix::Routed(r)) = &self.rows[i].mix else {
                            return None;
                        };
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

    fn finish(&mut self, mut row: Row, reason: FinishReason) {
        let now = Instant::now();
        let first = row.first_token.unwrap_or(now);
        let timings = Timings::new(
            row.prefilled - row.reused,
            (first - row.admitted).as_secs_f64(),
            row.decode_steps,
            (now - first).as_secs_f64(),
        );
        let generation = row
            .decoding
            .into_generation(row.prompt.len(), reason, timings);
        // The cache holds the prompt and every generated token fed back so far (not the last
        // sampled one); a cancelled row's cache is as good, but its user has moved on.
        if let Some(key) = row.prefix_key.take()
            && reason != FinishReason::Cancelled
        {
            let fed = row.cache.len() - row.prompt.len();
            let mut tokens = std::mem::take(&mut row.prompt);
            tokens.extend(generation.token_ids.iter().take(fed));
            self.prefix.put(key, tokens, row.cache);
            self.shared
                .stats
                .lock()
                .expect("stats lock")
                .prefix_cache_bytes = self.prefix.bytes();
        }
        (row.sink)(JobEvent::Done(Finished {
            generation,
            gates: row.gates.take(),
        }));
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
        rows: &[crate::batch::RowSpan],
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

    fn add_into(
        &self,
        site: crate::model::Site,
        x: &candle_core::Tensor,
        rows: &[crate::batch::RowSpan],
        y: &mut [f32],
    ) -> candle_core::Result<()> {
        self.mix.add_into(site, x, rows, y)?;
        for r in self.routed {
            r.add_into(site, x, rows, y)?;
        }
        Ok(())
    }

    fn packed_a(&self, sites: &[crate::model::Site]) -> Vec<&ramole_kernels::qmat::QMatrix> {
        self.mix.packed_a(sites)
    }

    fn add_packed(
        &self,
        sites: &[crate::model::Site],
        x: &candle_core::Tensor,
        a_out: &[Vec<f32>],
        rows: &[crate::batch::RowSpan],
        ys: &mut [&mut [f32]],
    ) -> candle_core::Result<()> {
        self.mix.add_packed(sites, x, a_out, rows, ys)?;
        for r in self.routed {
            for (&site, y) in sites.iter().zip(ys.iter_mut()) {
                r.add_into(site, x, rows, y)?;
            }
        }
        Ok(())
    }
}
