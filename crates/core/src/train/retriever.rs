//! Retriever fine-tuning (ramole-paper.md 2.1, "Retriever training"): contrastive training of
//! the BERT sentence encoder on the sample inputs of a fixed subset of tasks, so that inputs of
//! one task embed close together and away from other tasks' inputs.
//!
//! This module owns the trainable copy of the encoder (candle `Var`s and autograd, the same
//! network as [`Embedder`]'s reference forward), the symmetric InfoNCE loss, the batch plan (one
//! (anchor, positive) pair per task per batch, so every in-batch negative is another task), the
//! training loop, the task-list file, and writing the result as a Hugging Face folder that
//! [`Embedder::load`] reads like any embedder.
//!
//! Choices where the paper is silent (ramole-paper.md 2.1 and 7.2 give our reading):
//! - cosine / γ logits, symmetric loss (anchor → positives and positive → anchors);
//! - the token, position and type embeddings stay frozen: only tokens seen in the few training
//!   samples would move, which shifts them away from every token the samples never contain,
//!   hurting exactly the unseen tasks the retriever must generalise to;
//! - no dropout, so a seed fixes the run bit for bit;
//! - AdamW, linear warm-up then linear decay, weight decay on matrices only, global norm clip.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::{AdamW, Result, TrainError, clip_grad_norm};
use crate::embed::bert::{Bert, Ops, Weights};
use crate::embed::{Embedder, WeightPrecision};
use crate::model::WeightStore;
use crate::retrieve::TaskProfile;

/// The default training tasks (19 of the 48 flan-mixed tasks, spread over every domain).
pub const DEFAULT_TASKS: &str = include_str!("../../data/retriever-tasks.txt");

/// Passes over the training pairs: at most this many.
pub const MAX_EPOCHS: usize = 1000;
/// The softmax temperature γ: within these bounds (cosine / γ; 0.01 is Instructor's value).
pub const MIN_TEMPERATURE: f64 = 0.001;
pub const MAX_TEMPERATURE: f64 = 1.0;
/// Learning rate: above 0, at most this.
pub const MAX_LR: f64 = 1e-2;
/// Sequences per forward pass within a batch (sorted by length, so padding stays small).
const PASS_SEQUENCES: usize = 16;

/// Files of the source encoder copied beside the new weights: config and tokenizer, and the
/// sentence-transformers module files so Python tools load the folder too. Other weight formats
/// (pytorch_model.bin, ONNX) are never copied: they would hold the old weights.
const COPIED_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
];

/// Settings of one fine-tuning run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrieverConfig {
    /// Passes over the pairs; one pass uses every sample of every task once.
    pub epochs: usize,
    /// γ in `exp(cos / γ)`.
    pub temperature: f64,
    /// Peak learning rate.
    pub lr: f64,
    pub seed: u64,
    /// Pairs (tasks) per batch, at least 2; with more than the number of tasks every task is in
    /// every batch.
    pub batch_tasks: usize,
    /// Fraction of the updates over which the learning rate ramps up; it then decays linearly.
    pub warmup: f64,
    /// AdamW's decoupled weight decay, on weight matrices only (not biases or LayerNorms).
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    pub max_grad_norm: f64,
}

impl Default for RetrieverConfig {
    fn default() -> Self {
        Self {
            epochs: 10,
            temperature: 0.05,
            lr: 3e-5,
            seed: 0,
            batch_tasks: 64,
            warmup: 0.1,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
        }
    }
}

impl RetrieverConfig {
    /// Every setting within its range, named with its limit when it is not.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Invalid(m));
        if !(1..=MAX_EPOCHS).contains(&self.epochs) {
            return bad(format!("epochs {}: must be 1 to {MAX_EPOCHS}", self.epochs));
        }
        if !(self.temperature.is_finite()
            && (MIN_TEMPERATURE..=MAX_TEMPERATURE).contains(&self.temperature))
        {
            return bad(format!(
                "temperature {}: must be {MIN_TEMPERATURE} to {MAX_TEMPERATURE}",
                self.temperature
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= MAX_LR) {
            return bad(format!("lr {}: must be in (0, {MAX_LR}]", self.lr));
        }
        if !(2..=4096).contains(&self.batch_tasks) {
            return bad(format!(
                "batch_tasks {}: must be 2 to 4096 (a pair needs other tasks as negatives)",
                self.batch_tasks
            ));
        }
        if !(self.warmup.is_finite() && (0.0..=1.0).contains(&self.warmup)) {
            return bad(format!("warmup {}: must be 0 to 1", self.warmup));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("weight_decay {}: must be ≥ 0", self.weight_decay));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm > 0.0) {
            return bad(format!(
                "max_grad_norm {}: must be a positive number",
                self.max_grad_norm
            ));
        }
        Ok(())
    }

    /// Learning rate of update `step` (0-based) out of `total`: linear warm-up, linear decay.
    fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warm = (self.warmup * total as f64).ceil() as usize;
        if step < warm {
            self.lr * (step + 1) as f64 / warm as f64
        } else {
            self.lr * (total - step) as f64 / (total - warm).max(1) as f64
        }
    }
}

// ---- task lists and profiles --------------------------------------------------------------------

/// Task names, one per line; blank lines and `#` comments are skipped. `origin` names the
/// source in errors. Empty lists and names listed twice are refused.
pub fn parse_task_list(text: &str, origin: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let name = line.trim();
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        let bad = |m: String| TrainError::Invalid(format!("{origin}: line {}: {m}", i + 1));
        if name.chars().any(char::is_whitespace) {
            return Err(bad(format!(
                "{name:?} is not one task name (one name per line)"
            )));
        }
        if out.iter().any(|n| n == name) {
            return Err(bad(format!("task {name:?} is listed twice")));
        }
        out.push(name.to_string());
    }
    if out.is_empty() {
        return Err(TrainError::Invalid(format!(
            "{origin}: no task names (one per line; '#' starts a comment)"
        )));
    }
    Ok(out)
}

/// [`parse_task_list`] of a file.
pub fn read_task_list(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_task_list(&text, &path.display().to_string())
}

/// The committed default list ([`DEFAULT_TASKS`]).
pub fn default_tasks() -> Vec<String> {
    parse_task_list(DEFAULT_TASKS, "built-in task list").expect("the committed list is valid")
}

/// Refuses a task name that `profiles` does not have, naming it.
pub fn check_tasks_known(tasks: &[String], profiles: &[TaskProfile]) -> Result<()> {
    let known: HashSet<&str> = profiles.iter().map(|p| p.model_name.as_str()).collect();
    if let Some(t) = tasks.iter().find(|t| !known.contains(t.as_str())) {
        return Err(TrainError::Invalid(format!(
            "task {t:?} is not among the {} tasks of the profiles file",
            profiles.len()
        )));
    }
    Ok(())
}

/// Reads a `profiles-*.json` file (the format `ramole eval retrieval` reads).
pub fn read_profiles(path: &Path) -> Result<Vec<TaskProfile>> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let profiles: Vec<TaskProfile> = serde_json::from_str(&text).map_err(|e| {
        TrainError::Invalid(format!(
            "{}: not a profiles file (a JSON list of {{model_name, sample: [{{inputs}}]}}): {e}",
            path.display()
        ))
    })?;
    if profiles.is_empty() {
        return Err(TrainError::Invalid(format!(
            "{}: no task profiles",
            path.display()
        )));
    }
    Ok(profiles)
}

// ---- the trainable encoder -------------------------------------------------------------------

/// The embedder's BERT network (`embed::bert`, the same code) with every weight after the
/// embedding tables a candle [`Var`], run with differentiable ops.
pub struct TrainableEncoder {
    bert: Bert,
    /// Every trainable tensor under its name in the source's safetensors, in load order.
    params: Vec<(String, Var)>,
}

impl TrainableEncoder {
    /// Loads the encoder in `dir` (a folder [`Embedder::load`] accepts) with trainable weights.
    pub fn load(dir: &Path) -> Result<Self> {
        let mut weights = Weights::Trainable(Vec::new());
        let (bert, _) = Bert::load(dir, &crate::device::compute(), &mut weights)?;
        let Weights::Trainable(params) = weights else {
            unreachable!("loaded as trainable")
        };
        Ok(Self { bert, params })
    }

    /// The trainable variables with their tensor names, in a fixed order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Unit embeddings of a batch of token sequences (each within the position table): padded
    /// to the longest, masked, mean-pooled over the real tokens, L2-normalised. Returns
    /// `[batch, hidden]`, differentiable with respect to every variable.
    pub fn forward(&self, batch: &[&[u32]]) -> Result<Tensor> {
        if batch.is_empty() {
            return Err(TrainError::Invalid("no sequences to embed".into()));
        }
        let t = batch.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let positions = self.bert.position.dim(0)?;
        if t > positions {
            return Err(TrainError::Invalid(format!(
                "a sequence of {t} tokens exceeds the encoder's {positions} positions"
            )));
        }
        Ok(self.bert.forward(batch, Ops::Differentiable)?)
    }

    /// [`TrainableEncoder::forward`] over many sequences: sorted by length into passes of a few
    /// sequences (little padding), the rows put back in the given order. `[n, hidden]`.
    pub fn forward_many(&self, seqs: &[&[u32]]) -> Result<Tensor> {
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| (seqs[i].len(), i));
        let mut parts = Vec::new();
        for chunk in order.chunks(PASS_SEQUENCES) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| seqs[i]).collect();
            parts.push(self.forward(&batch)?);
        }
        let sorted = Tensor::cat(&parts, 0)?;
        // Row `i` of the result is row `inverse[i]` of the sorted passes.
        let mut inverse = vec![0u32; seqs.len()];
        for (pos, &i) in order.iter().enumerate() {
            inverse[i] = pos as u32;
        }
        let inverse = Tensor::from_vec(inverse, seqs.len(), self.bert.word.device())?;
        Ok(sorted.index_select(&inverse, 0)?)
    }

    /// Writes the weights as a safetensors file at `path`: every tensor of the source folder
    /// `source` under its own name and dtype, the trained ones replaced by their current values
    /// (f32), so [`Embedder::load`] reads it as it reads the source.
    pub fn save_weights(&self, source: &Path, path: &Path) -> Result<()> {
        let st = WeightStore::open_safetensors_dir(source)?;
        let trained: BTreeMap<&str, &Var> =
            self.params.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let mut files: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
        for name in st.names() {
            files.entry(st.file_for(&name)).or_default().push(name);
        }
        let bytes: Vec<(&PathBuf, Vec<u8>)> = files
            .keys()
            .map(|f| Ok((f, std::fs::read(f).map_err(io_at(f))?)))
            .collect::<Result<_>>()?;
        let mut out: Vec<(String, Stored<'_>)> = Vec::new();
        for (file, data) in &bytes {
            let view = safetensors::SafeTensors::deserialize(data).map_err(|e| {
                TrainError::Invalid(format!("{}: not a safetensors file: {e}", file.display()))
            })?;
            for name in &files[*file] {
                let stored = match trained.get(name.as_str()) {
                    Some(v) => Stored::Trained(v.as_tensor().detach().contiguous()?),
                    None => Stored::Source(view.tensor(name).map_err(|e| {
                        TrainError::Invalid(format!("{}: {name}: {e}", file.display()))
                    })?),
                };
                out.push((name.clone(), stored));
            }
        }
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::tensor::serialize(out.iter().map(|(n, s)| (n, s)), Some(meta))
            .map_err(|e| TrainError::Invalid(format!("cannot serialize the weights: {e}")))?;
        write_synced(path, &bytes)
    }
}

/// Maps an I/O error to [`TrainError::Io`] at `path`.
fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + use<> {
    let path = path.to_path_buf();
    move |source| TrainError::Io { path, source }
}

/// A tensor of the output file: copied from the source as stored, or a trained variable.
enum Stored<'a> {
    Source(safetensors::tensor::TensorView<'a>),
    Trained(Tensor),
}

impl safetensors::View for &Stored<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            Stored::Source(v) => v.dtype(),
            Stored::Trained(t) => safetensors::View::dtype(t),
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Stored::Source(v) => v.shape(),
            Stored::Trained(t) => t.dims(),
        }
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Stored::Source(v) => std::borrow::Cow::Borrowed(v.data()),
            Stored::Trained(t) => safetensors::View::data(t),
        }
    }

    fn data_len(&self) -> usize {
        match self {
            Stored::Source(v) => v.data().len(),
            Stored::Trained(t) => safetensors::View::data_len(t),
        }
    }
}

/// Creates `path` with `bytes` and fsyncs it (inside a folder that is renamed into place later).
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_at(parent))?;
    }
    let mut f = std::fs::File::create(path).map_err(io_at(path))?;
    f.write_all(bytes).map_err(io_at(path))?;
    f.sync_all().map_err(io_at(path))
}

// ---- the loss and the batches ------------------------------------------------------------------

/// Symmetric InfoNCE over `n` pairs: `anchors` and `positives` `[n, h]`, unit rows, pair `i` is
/// (anchor `i`, positive `i`). Logits are cosine / `temperature` (`[n, n]`); the loss is the
/// mean of the cross-entropy of each anchor against all positives (the others are its
/// negatives) and of each positive against all anchors. Returns a scalar.
pub fn info_nce(anchors: &Tensor, positives: &Tensor, temperature: f64) -> Result<Tensor> {
    let n = anchors.dim(0)?;
    let logits = (anchors.matmul(&positives.t()?)? / temperature)?; // [n, n]
    let labels = Tensor::arange(0u32, n as u32, anchors.device())?;
    let forward = candle_nn::loss::cross_entropy(&logits, &labels)?;
    let backward = candle_nn::loss::cross_entropy(&logits.t()?.contiguous()?, &labels)?;
    Ok(((forward + backward)? * 0.5)?)
}

/// One pair: a task and two of its samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pair {
    task: usize,
    anchor: usize,
    positive: usize,
}

/// The batches of one epoch for tasks with `sizes[t]` samples: each task's samples shuffled and
/// taken two by two (every sample in at most one pair per epoch); round `r` holds pair `r` of
/// every task that has one, in a shuffled task order, cut into batches of `batch_tasks`.
/// Every batch has distinct tasks, so all its negatives are other tasks; a batch of one pair
/// (no negatives) is dropped.
fn plan_epoch(rng: &mut rand::rngs::StdRng, sizes: &[usize], batch_tasks: usize) -> Vec<Vec<Pair>> {
    let pairs: Vec<Vec<Pair>> = sizes
        .iter()
        .enumerate()
        .map(|(task, &n)| {
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(rng);
            order
                .chunks_exact(2)
                .map(|c| Pair {
                    task,
                    anchor: c[0],
                    positive: c[1],
                })
                .collect()
        })
        .collect();
    let rounds = pairs.iter().map(Vec::len).max().unwrap_or(0);
    let mut batches = Vec::new();
    for r in 0..rounds {
        let mut round: Vec<Pair> = pairs.iter().filter_map(|p| p.get(r).copied()).collect();
        round.shuffle(rng);
        // Near-equal batches (4 pairs in batches of ≤ 3 → 2 + 2, not 3 + a lone pair that has
        // no negative and would be dropped).
        let parts = round.len().div_ceil(batch_tasks.max(1));
        let mut at = 0;
        for i in 0..parts {
            let len = (round.len() - at).div_ceil(parts - i);
            if len >= 2 {
                batches.push(round[at..at + len].to_vec());
            }
            at += len;
        }
    }
    batches
}

// ---- the training run --------------------------------------------------------------------------

/// One finished epoch, as reported to the caller.
#[derive(Debug, Clone, Serialize)]
pub struct EpochReport {
    /// 1-based.
    pub epoch: usize,
    pub epochs: usize,
    /// Mean InfoNCE loss over the epoch's updates.
    pub loss: f64,
    /// Updates done so far, and in the whole run.
    pub steps: usize,
    pub steps_total: usize,
    pub seconds: f64,
}

/// How a [`train_retriever`] run ended.
#[derive(Debug, Clone, Serialize)]
pub struct RetrieverOutcome {
    pub out: PathBuf,
    /// The id [`Embedder::load`] gives the written folder.
    pub embedder_id: String,
    pub source: PathBuf,
    pub source_id: String,
    pub tasks: Vec<String>,
    /// Sample inputs trained on (all samples of the tasks).
    pub samples: usize,
    pub steps: usize,
    /// Mean loss of every epoch, first to last.
    pub epoch_losses: Vec<f64>,
    /// Loss of every update.
    pub step_losses: Vec<f64>,
    pub seconds: f64,
    pub config: RetrieverConfig,
}

/// Removes a folder when dropped unless disarmed: a failed run leaves no partial output.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// The profiles of `tasks`, every input checked: at least two tasks, none twice, all known,
/// each with two non-empty samples at least.
fn chosen_profiles<'a>(
    profiles: &'a [TaskProfile],
    tasks: &[String],
) -> Result<Vec<&'a TaskProfile>> {
    if tasks.len() < 2 {
        return Err(TrainError::Invalid(format!(
            "{} training task(s): at least 2 are needed (the negatives are other tasks)",
            tasks.len()
        )));
    }
    let mut seen = HashSet::new();
    if let Some(t) = tasks.iter().find(|t| !seen.insert(t.as_str())) {
        return Err(TrainError::Invalid(format!("task {t:?} is listed twice")));
    }
    check_tasks_known(tasks, profiles)?;
    let chosen: Vec<&TaskProfile> = tasks
        .iter()
        .map(|t| {
            profiles
                .iter()
                .find(|p| &p.model_name == t)
                .expect("checked above")
        })
        .collect();
    for p in &chosen {
        if p.sample.len() < 2 {
            return Err(TrainError::Invalid(format!(
                "task {:?} has {} sample(s): at least 2 are needed to make a pair",
                p.model_name,
                p.sample.len()
            )));
        }
        if let Some(i) = p.sample.iter().position(|s| s.inputs.trim().is_empty()) {
            return Err(TrainError::Invalid(format!(
                "task {:?}: sample {} has an empty input",
                p.model_name,
                i + 1
            )));
        }
    }
    Ok(chosen)
}

/// Fine-tunes the encoder in `source` on the samples of `tasks` (names in `profiles`) and
/// writes it to `out` (which must not exist) as a Hugging Face folder: config.json and
/// tokenizer files copied, model.safetensors with the source's tensor names, training.json with
/// the settings, losses and task list. The folder appears under its name only once complete
/// (written beside it, then renamed). Every input is checked before anything is written.
/// `on_epoch` sees every finished epoch.
pub fn train_retriever(
    source: &Path,
    profiles: &[TaskProfile],
    tasks: &[String],
    cfg: &RetrieverConfig,
    out: &Path,
    on_epoch: &mut dyn FnMut(&EpochReport),
) -> Result<RetrieverOutcome> {
    let started = Instant::now();
    cfg.check()?;
    let chosen = chosen_profiles(profiles, tasks)?;
    if out.exists() {
        return Err(TrainError::Invalid(format!(
            "{} already exists; choose another --out (nothing is overwritten)",
            out.display()
        )));
    }
    let Some(name) = out.file_name() else {
        return Err(TrainError::Invalid(format!(
            "--out {}: needs a folder name",
            out.display()
        )));
    };
    // The reference encoder validates the folder and tokenizes as retrieval does.
    let reference = Embedder::load_with(source, WeightPrecision::F32)?;
    let tokens: Vec<Vec<Vec<u32>>> = chosen
        .iter()
        .map(|p| {
            p.sample
                .iter()
                .map(|s| reference.tokens(&s.inputs))
                .collect()
        })
        .collect::<std::result::Result<_, _>>()?;
    let source_id = reference.id().to_string();
    drop(reference);
    let encoder = TrainableEncoder::load(source)?;

    let sizes: Vec<usize> = tokens.iter().map(Vec::len).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let plan: Vec<Vec<Vec<Pair>>> = (0..cfg.epochs)
        .map(|_| plan_epoch(&mut rng, &sizes, cfg.batch_tasks))
        .collect();
    let total: usize = plan.iter().map(Vec::len).sum();

    // Weight decay on matrices only (the usual BERT recipe): biases and LayerNorms keep theirs.
    let (decay, plain): (Vec<Var>, Vec<Var>) = encoder
        .params()
        .iter()
        .map(|(_, v)| v.clone())
        .partition(|v| v.as_tensor().rank() == 2);
    let mut groups = [
        (AdamW::new(&decay, cfg.lr, cfg.weight_decay)?, decay),
        (AdamW::new(&plain, cfg.lr, 0.0)?, plain),
    ];

    let mut step_losses = Vec::with_capacity(total);
    let mut epoch_losses = Vec::with_capacity(cfg.epochs);
    let mut step = 0;
    for (e, batches) in plan.iter().enumerate() {
        let epoch_started = Instant::now();
        let mut sum = 0.0;
        for batch in batches {
            let n = batch.len();
            let seqs: Vec<&[u32]> = batch
                .iter()
                .map(|p| tokens[p.task][p.anchor].as_slice())
                .chain(batch.iter().map(|p| tokens[p.task][p.positive].as_slice()))
                .collect();
            let emb = encoder.forward_many(&seqs)?; // [2n, h]: anchors, then positives
            let loss = info_nce(
                &emb.narrow(0, 0, n)?,
                &emb.narrow(0, n, n)?,
                cfg.temperature,
            )?;
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                return Err(TrainError::Invalid(format!(
                    "the loss became {value} at update {}; try a lower lr than {} or a higher \
                     temperature than {}",
                    step + 1,
                    cfg.lr,
                    cfg.temperature
                )));
            }
            let store = loss.backward()?;
            let mut grads: Vec<Tensor> = Vec::new();
            for (_, vars) in &groups {
                for v in vars {
                    grads.push(match store.get(v.as_tensor()) {
                        Some(g) => g.clone(),
                        None => v.as_tensor().zeros_like()?,
                    });
                }
            }
            drop(store);
            // One norm over all gradients, then each group's share to its optimizer.
            clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
            let lr = cfg.lr_at(step, total);
            let mut rest = grads.as_slice();
            for (opt, vars) in groups.iter_mut() {
                let (mine, others) = rest.split_at(vars.len());
                opt.update(vars, mine, lr)?;
                rest = others;
            }
            step += 1;
            sum += value;
            step_losses.push(value);
        }
        let loss = sum / batches.len().max(1) as f64;
        epoch_losses.push(loss);
        on_epoch(&EpochReport {
            epoch: e + 1,
            epochs: cfg.epochs,
            loss,
            steps: step,
            steps_total: total,
            seconds: epoch_started.elapsed().as_secs_f64(),
        });
    }

    let mut outcome = RetrieverOutcome {
        out: out.to_path_buf(),
        embedder_id: String::new(),
        source: source.to_path_buf(),
        source_id,
        tasks: tasks.to_vec(),
        samples: sizes.iter().sum(),
        steps: step,
        epoch_losses,
        step_losses,
        seconds: started.elapsed().as_secs_f64(),
        config: cfg.clone(),
    };
    write_folder(source, &encoder, out, &name.to_string_lossy(), &outcome)?;
    // The folder's name is part of its id, so it is identified under its final name.
    outcome.embedder_id = Embedder::identify(out)?.0;
    Ok(outcome)
}

/// Writes the encoder folder into a hidden sibling of `out`, syncs it, and renames it to `out`.
fn write_folder(
    source: &Path,
    encoder: &TrainableEncoder,
    out: &Path,
    name: &str,
    outcome: &RetrieverOutcome,
) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_at(parent))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_at(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io_at(&tmp))?;
    let mut guard = RemoveOnDrop(Some(tmp.clone()));
    encoder.save_weights(source, &tmp.join("model.safetensors"))?;
    for f in COPIED_FILES {
        let from = source.join(f);
        if from.is_file() {
            let bytes = std::fs::read(&from).map_err(io_at(&from))?;
            write_synced(&tmp.join(f), &bytes)?;
        }
    }
    let record = serde_json::json!({
        "trainer": format!("ramole {}", env!("CARGO_PKG_VERSION")),
        "method": "contrastive fine-tuning: symmetric InfoNCE over cosine / temperature, \
                   one pair per task per batch, in-batch negatives from other tasks \
                   (ramole-paper.md 2.1)",
        "source": {"path": outcome.source, "id": outcome.source_id},
        "config": outcome.config,
        "frozen": ["word, position and token-type embeddings"],
        "tasks": outcome.tasks,
        "samples": outcome.samples,
        "steps": outcome.steps,
        "epoch_losses": outcome.epoch_losses,
        "step_losses": outcome.step_losses,
        "seconds": outcome.seconds,
    });
    write_synced(
        &tmp.join("training.json"),
        serde_json::to_string_pretty(&record)
            .expect("serializable")
            .as_bytes(),
    )?;
    crate::config::fail_point("retriever-train:written");
    std::fs::File::open(&tmp)
        .and_then(|d| d.sync_all())
        .map_err(io_at(&tmp))?;
    if out.exists() {
        return Err(TrainError::Invalid(format!(
            "{} appeared while training; the result is not written over it",
            out.display()
        )));
    }
    std::fs::rename(&tmp, out).map_err(io_at(out))?;
    guard.0 = None;
    crate::files::sync_parent(out).map_err(io_at(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn info_nce_matches_the_formula_in_f64() {
        let dev = Device::Cpu;
        let unit = |v: &[f32]| -> Vec<f32> {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter().map(|x| x / n).collect()
        };
        let a = [
            unit(&[1.0, 0.2, -0.3]),
            unit(&[0.1, 1.0, 0.4]),
            unit(&[-0.5, 0.3, 1.0]),
        ];
        let p = [
            unit(&[0.9, 0.1, -0.1]),
            unit(&[0.3, 0.8, 0.2]),
            unit(&[-0.2, 0.1, 0.7]),
        ];
        let t = 0.1;
        let cos = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(a, b)| (a * b) as f64).sum::<f64>();
        // −log softmax(row / t)[i]
        let ce = |row: &dyn Fn(usize) -> f64, i: usize| {
            let lse = (0..3).map(|j| (row(j) / t).exp()).sum::<f64>().ln();
            lse - row(i) / t
        };
        let mut want = 0.0;
        for i in 0..3 {
            want += ce(&|j| cos(&a[i], &p[j]), i) + ce(&|j| cos(&p[i], &a[j]), i);
        }
        want /= 6.0;
        let ta = Tensor::from_vec(a.concat(), (3, 3), &dev).unwrap();
        let tp = Tensor::from_vec(p.concat(), (3, 3), &dev).unwrap();
        let got = info_nce(&ta, &tp, t).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn batches_pair_samples_of_one_task_and_never_repeat_a_task() {
        let sizes = [20, 20, 7, 2, 1];
        let batches = plan_epoch(&mut rand::rngs::StdRng::seed_from_u64(3), &sizes, 3);
        let mut used = HashSet::new();
        for b in &batches {
            assert!((2..=3).contains(&b.len()), "{b:?}");
            let tasks: HashSet<usize> = b.iter().map(|p| p.task).collect();
            assert_eq!(tasks.len(), b.len(), "a task twice in {b:?}");
            for p in b {
                assert!(p.anchor < sizes[p.task] && p.positive < sizes[p.task]);
                assert!(used.insert((p.task, p.anchor)) && used.insert((p.task, p.positive)));
            }
        }
        // The task with one sample never pairs; the others give 10 + 10 + 3 + 1 pairs.
        assert!(batches.iter().all(|b| b.iter().all(|p| p.task != 4)));
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 24);
        // The same seed plans the same epoch.
        let again = plan_epoch(&mut rand::rngs::StdRng::seed_from_u64(3), &sizes, 3);
        assert_eq!(batches, again);
    }

    #[test]
    fn task_lists_skip_comments_and_refuse_duplicates_and_emptiness() {
        let list = parse_task_list("# c\n\nsst2\n  copa  \n", "f").unwrap();
        assert_eq!(list, ["sst2", "copa"]);
        let e = parse_task_list("sst2\ncopa\nsst2\n", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("listed twice"), "{e}");
        let e = parse_task_list("# only\n\n", "f").unwrap_err().to_string();
        assert!(e.contains("no task names"), "{e}");
        let e = parse_task_list("sst2 copa\n", "f").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        assert_eq!(default_tasks().len(), 19);
    }

    #[test]
    fn settings_out_of_range_name_the_value_and_the_limit() {
        let ok = RetrieverConfig::default();
        ok.check().unwrap();
        for (cfg, want) in [
            (
                RetrieverConfig {
                    epochs: 0,
                    ..ok.clone()
                },
                "epochs 0: must be 1 to 1000",
            ),
            (
                RetrieverConfig {
                    temperature: 0.0,
                    ..ok.clone()
                },
                "temperature 0: must be 0.001 to 1",
            ),
            (
                RetrieverConfig {
                    temperature: f64::NAN,
                    ..ok.clone()
                },
                "temperature NaN",
            ),
            (
                RetrieverConfig {
                    lr: 0.5,
                    ..ok.clone()
                },
                "lr 0.5: must be in (0, 0.01]",
            ),
            (
                RetrieverConfig {
                    batch_tasks: 1,
                    ..ok.clone()
                },
                "batch_tasks 1",
            ),
        ] {
            let e = cfg.check().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn the_schedule_warms_up_then_decays_linearly() {
        let cfg = RetrieverConfig {
            lr: 1.0,
            warmup: 0.1,
            ..RetrieverConfig::default()
        };
        assert!((cfg.lr_at(0, 100) - 0.1).abs() < 1e-12);
        assert!((cfg.lr_at(9, 100) - 1.0).abs() < 1e-12);
        assert!((cfg.lr_at(10, 100) - 1.0).abs() < 1e-12);
        assert!((cfg.lr_at(99, 100) - 1.0 / 90.0).abs() < 1e-12);
    }
}
