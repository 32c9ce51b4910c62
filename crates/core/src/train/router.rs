//! Training a RouterLoRA (ramole-paper.md 2.4): only the router's `A_r`, `B_r` learn; the base,
//! the expert adapters and the retriever stay frozen. Each example is answered by its candidate
//! adapters (top-k retrieved, its own task's included), with Random LoRA Dropout hiding some of
//! them per example and step so the router cannot just lock onto the ideal adapter. Loss: the
//! answer tokens' cross-entropy, as when training an adapter.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Tensor, Var};
use rand::SeedableRng;
use serde::Serialize;

use super::lora::{Encoded, answer_nll, shuffled_batch};
use super::{AdamW, Result, StepReport, TrainError, accumulated_update};
use crate::adapter::LoraAdapter;
use crate::model::{Decoder, SiteKind};
use crate::router::{RoutedRow, RouterDelta, RouterLora, RouterMix, RouterSite, dropout_keep};
use crate::vocab::{Scoring, TopK};

/// Settings of a router training run.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct RouterTrainConfig {
    /// Router rank `r_r`.
    pub rank: usize,
    pub steps: usize,
    /// Examples per update.
    pub batch: usize,
    pub lr: f64,
    /// Probability of hiding each candidate adapter (at least 2 stay).
    pub dropout: f64,
    pub seed: u64,
    pub max_grad_norm: f64,
    /// Projections the router attaches to (the adapters' union when empty).
    pub targets: Vec<SiteKind>,
}

impl Default for RouterTrainConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            steps: 100,
            batch: 4,
            lr: 1e-3,
            dropout: 0.5,
            seed: 0,
            max_grad_norm: 1.0,
            targets: Vec::new(),
        }
    }
}

impl RouterTrainConfig {
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Invalid(m));
        if !(1..=crate::router::MAX_RANK).contains(&self.rank) {
            return bad(format!(
                "rank {}: must be 1 to {}",
                self.rank,
                crate::router::MAX_RANK
            ));
        }
        if self.steps == 0 || self.steps > 1_000_000 {
            return bad(format!("steps {}: must be 1 to 1000000", self.steps));
        }
        if !(1..=256).contains(&self.batch) {
            return bad(format!("batch {}: must be 1 to 256", self.batch));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 1.0) {
            return bad(format!("lr {}: must be in (0, 1]", self.lr));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {}: must be in [0, 1)", self.dropout));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm > 0.0) {
            return bad(format!(
                "max_grad_norm {}: must be positive",
                self.max_grad_norm
            ));
        }
        Ok(())
    }
}

/// One training example: its tokens and the adapters (indices into the trainer's list) that
/// answer it.
#[derive(Debug, Clone)]
pub struct RouterExample {
    pub encoded: Encoded,
    pub candidates: Vec<usize>,
}

/// A router training run, one update at a time.
pub struct RouterTrainer {
    decoder: Decoder,
    router: RouterLora,
    vars: Vec<Var>,
    opt: AdamW,
    adapters: Vec<Arc<LoraAdapter>>,
    mixes: HashMap<Vec<usize>, Arc<RouterMix>>,
    data: Vec<RouterExample>,
    cfg: RouterTrainConfig,
    losses: Vec<f64>,
}

impl RouterTrainer {
    /// `base` may be quantized (training runs on its dequantized copy); `adapters` are the
    /// experts, loaded against it; `base_id` names the base in the router's config.
    pub fn new(
        base: &Decoder,
        base_id: &str,
        adapters: Vec<Arc<LoraAdapter>>,
        data: Vec<RouterExample>,
        cfg: RouterTrainConfig,
    ) -> Result<Self> {
        cfg.check()?;
        if data.is_empty() {
            return Err(TrainError::Invalid("no examples to train on".into()));
        }
        if adapters.is_empty() {
            return Err(TrainError::Invalid("no adapters to route between".into()));
        }
        for (i, ex) in data.iter().enumerate() {
            if ex.candidates.is_empty() {
                return Err(TrainError::Invalid(format!("example {i} has no candidate")));
            }
            if let Some(&c) = ex.candidates.iter().find(|&&c| c >= adapters.len()) {
                return Err(TrainError::Invalid(format!(
                    "example {i} names adapter {c}, but there are {}",
                    adapters.len()
                )));
            }
        }
        let decoder = base.dequantized()?;
        let mut targets = cfg.targets.clone();
        if targets.is_empty() {
            for a in &adapters {
                for (site, _) in a.sites() {
                    if !targets.contains(&site.kind) {
                        targets.push(site.kind);
                    }
                }
            }
            targets.sort();
        }
        let init = RouterLora::init(decoder.config(), base_id, &targets, cfg.rank, cfg.seed)
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        let mut vars = Vec::new();
        let mut sites = std::collections::BTreeMap::new();
        for (site, s) in init.sites() {
            let a = Var::from_tensor(&s.a)?;
            let b = Var::from_tensor(&s.b)?;
            sites.insert(
                *site,
                RouterSite {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                },
            );
            vars.push(a);
            vars.push(b);
        }
        let router = RouterLora::from_sites(init.config().clone(), sites)
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        let opt = AdamW::new(&vars, cfg.lr, 0.0)?;
        Ok(Self {
            decoder,
            router,
            vars,
            opt,
            adapters,
            mixes: HashMap::new(),
            data,
            cfg,
            losses: Vec::new(),
        })
    }

    pub fn router(&self) -> &RouterLora {
        &self.router
    }

    pub fn router_mut(&mut self) -> &mut RouterLora {
        &mut self.router
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    pub fn step(&self) -> usize {
        self.opt.step
    }

    pub fn losses(&self) -> &[f64] {
        &self.losses
    }

    fn mix(&mut self, candidates: &[usize]) -> Result<Arc<RouterMix>> {
        if let Some(m) = self.mixes.get(candidates) {
            return Ok(m.clone());
        }
        let adapters: Vec<Arc<LoraAdapter>> = candidates
            .iter()
            .map(|&c| self.adapters[c].clone())
            .collect();
        // No router here: `C_i` follows `B_r` as it trains, so the delta computes it per call.
        let mix = Arc::new(
            RouterMix::new(&adapters, None).map_err(|e| TrainError::Invalid(e.to_string()))?,
        );
        self.mixes.insert(candidates.to_vec(), mix.clone());
        Ok(mix)
    }

    /// Summed answer cross-entropy of `examples` (one packed pass), each routed over its
    /// candidates with `keep` from dropout (`None`: all kept). Returns (sum, answer tokens).
    fn pass_loss(
        &mut self,
        examples: &[&RouterExample],
        keep: &[Option<Vec<bool>>],
    ) -> Result<(Tensor, usize)> {
        let mixes = examples
            .iter()
            .map(|e| self.mix(&e.candidates))
            .collect::<Result<Vec<_>>>()?;
        routed_nll(&self.router, &self.decoder, examples, &mixes, keep)
    }

    /// One optimizer update over the next batch; dropout draws depend only on the seed and the
    /// step.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let started = Instant::now();
        let step = self.opt.step;
        let ids = shuffled_batch(self.data.len(), self.cfg.batch, self.cfg.seed, step);
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.cfg.seed ^ 0x5EED_D809 ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let examples: Vec<RouterExample> = ids.iter().map(|&i| self.data[i].clone()).collect();
        let keep: Vec<Option<Vec<bool>>> = examples
            .iter()
            .map(|e| {
                (self.cfg.dropout > 0.0)
                    .then(|| dropout_keep(e.candidates.len(), self.cfg.dropout, &mut rng))
            })
            .collect();
        let answer_tokens: usize = examples.iter().map(|e| e.encoded.answer_len()).sum();
        let tokens: usize = examples.iter().map(|e| e.encoded.tokens.len()).sum();
        let refs: Vec<&RouterExample> = examples.iter().collect();
        let mixes = refs
            .iter()
            .map(|e| self.mix(&e.candidates))
            .collect::<Result<Vec<_>>>()?;
        let (router, decoder) = (&self.router, &self.decoder);
        // Two examples per pass keeps the activations of a backward pass small.
        let (loss, grad_norm) = accumulated_update(
            &mut self.opt,
            &self.vars,
            self.cfg.lr,
            self.cfg.max_grad_norm,
            answer_tokens,
            refs.len().div_ceil(2),
            |p| {
                let at = 2 * p..(2 * p + 2).min(refs.len());
                let (e, m, k) = (&refs[at.clone()], &mixes[at.clone()], &keep[at]);
                Ok(routed_nll(router, decoder, e, m, k)?.0)
            },
        )?;
        self.losses.push(loss);
        Ok(StepReport {
            step: step + 1,
            steps: self.cfg.steps,
            loss,
            lr: self.cfg.lr,
            grad_norm,
            tokens,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Mean answer cross-entropy of `examples` routed over all their candidates (no dropout,
    /// no update).
    pub fn eval_loss(&mut self, examples: &[RouterExample]) -> Result<f64> {
        let (mut sum, mut n) = (0f64, 0usize);
        for chunk in examples.chunks(4) {
            let refs: Vec<&RouterExample> = chunk.iter().collect();
            let keep = vec![None; refs.len()];
            let (nll, k) = self.pass_loss(&refs, &keep)?;
            sum += nll.detach().to_scalar::<f32>()? as f64;
            n += k;
        }
        Ok(sum / n.max(1) as f64)
    }
}

/// Summed answer cross-entropy of `examples`, each routed over its candidates' `mixes` with
/// the experts `keep` leaves (Random LoRA Dropout), in one pass; (sum, answer tokens).
fn routed_nll(
    router: &RouterLora,
    decoder: &Decoder,
    examples: &[&RouterExample],
    mixes: &[Arc<RouterMix>],
    keep: &[Option<Vec<bool>>],
) -> Result<(Tensor, usize)> {
    let rows = mixes
        .iter()
        .zip(keep)
        .map(|(mix, k)| {
            Some(RoutedRow {
                mix: mix.clone(),
                keep: k.clone(),
            })
        })
        .collect();
    let delta = RouterDelta::new(router, rows);
    let encoded: Vec<&Encoded> = examples.iter().map(|e| &e.encoded).collect();
    answer_nll(decoder, &encoded, &delta)
}

/// Router training data drawn from the paper's task format: the experts (one adapter per
/// profile task, `<adapters>/<task>`), and training inputs whose candidates are the top-k tasks
/// retrieved for the input, the own task always among them.
pub struct TaskData {
    /// Task names, in the order of `adapters`.
    pub tasks: Vec<String>,
    pub adapters: Vec<Arc<LoraAdapter>>,
    pub examples: Vec<RouterExample>,
    /// How many examples lost the start of their prompt to `max_len`.
    pub truncated: usize,
}

/// The samples (input → target) of `train_tasks` in `profiles`, as inputs to train on; a task
/// without a profile or a sample without targets is refused.
pub fn profile_inputs(
    profiles: &[crate::retrieve::TaskProfile],
    train_tasks: &[String],
) -> Result<Vec<crate::retrieve::TestInput>> {
    let mut inputs = Vec::new();
    for t in train_tasks {
        let Some(p) = profiles.iter().find(|p| p.model_name == *t) else {
            return Err(TrainError::Invalid(format!(
                "training task {t:?} has no profile (known: {} tasks)",
                profiles.len()
            )));
        };
        for (j, s) in p.sample.iter().enumerate() {
            let Some(target) = s.targets.clone() else {
                return Err(TrainError::Invalid(format!(
                    "profile {:?} sample {}: no targets to train on",
                    p.model_name,
                    j + 1
                )));
            };
            inputs.push(crate::retrieve::TestInput {
                inputs: s.inputs.clone(),
                task: p.model_name.clone(),
                domain: p.domain.clone(),
                targets: Some(target),
                metric: None,
            });
        }
    }
    Ok(inputs)
}

/// Builds [`TaskData`] from `train` (inputs with their task and targets; each task must have a
/// profile) over the adapters of every profile task. `held_out` inputs become extra examples
/// returned separately, routed the same way, for a held-out loss.
#[allow(clippy::too_many_arguments)]
pub fn task_data(
    model: &crate::model::Model,
    embedder: &crate::embed::Embedder,
    profiles: &[crate::retrieve::TaskProfile],
    train: &[crate::retrieve::TestInput],
    adapters_dir: &std::path::Path,
    k: TopK,
    max_len: usize,
    held_out: &[crate::retrieve::TestInput],
) -> Result<(TaskData, Vec<RouterExample>)> {
    use crate::retrieve::RetrievalEval;
    let k = k.get();
    let tasks: Vec<String> = profiles.iter().map(|p| p.model_name.clone()).collect();
    if train.is_empty() {
        return Err(TrainError::Invalid("no training input".into()));
    }
    for (i, t) in train.iter().chain(held_out).enumerate() {
        if !tasks.contains(&t.task) {
            return Err(TrainError::Invalid(format!(
                "input {i} is of task {:?}, which has no profile",
                t.task
            )));
        }
        if t.targets.is_none() {
            return Err(TrainError::Invalid(format!(
                "input {i} ({}) has no targets to train on",
                t.task
            )));
        }
    }
    let dirs = crate::adapter::task_dirs(adapters_dir, &tasks)?;
    let adapters: Vec<Arc<LoraAdapter>> = dirs
        .iter()
        .map(|d| LoraAdapter::load(d, &model.decoder).map(Arc::new))
        .collect::<std::result::Result<_, _>>()?;
    let mut inputs = train.to_vec();
    let train_n = inputs.len();
    inputs.extend(held_out.iter().cloned());
    let retrieval = RetrievalEval::prepare(embedder, profiles, &inputs)
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    let mut examples = Vec::with_capacity(inputs.len());
    let mut truncated = 0;
    for (i, t) in inputs.iter().enumerate() {
        let own = retrieval.own_task(i);
        let mut candidates: Vec<usize> = retrieval
            .ranked(i, Scoring::Cosine)
            .into_iter()
            .take(k)
            .map(|r| r.0)
            .collect();
        if !candidates.contains(&own) {
            *candidates.last_mut().expect("k ≥ 1") = own;
        }
        let ex = super::Example {
            input: t.inputs.clone(),
            target: t.targets.clone().expect("checked above"),
        };
        let (encoded, cut) =
            super::encode_example(model, super::PromptTemplate::Alpaca, &ex, max_len)?;
        truncated += cut as usize;
        examples.push(RouterExample {
            encoded,
            candidates,
        });
    }
    let held = examples.split_off(train_n);
    Ok((
        TaskData {
            tasks,
            adapters,
            examples,
            truncated,
        },
        held,
    ))
}
