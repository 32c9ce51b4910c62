//! LoRA training from examples: trainable factors at the chosen sites of a frozen base, the loss
//! on the answer tokens only, gradient accumulation over passes that pack several examples
//! without padding, AdamW, checkpoints to resume from, and the result written as a standard PEFT
//! adapter (plus the training inputs as the adapter's retrieval samples).
//!
//! Quantized weights have no backward pass in candle, so training runs on a dequantized copy of
//! the base; the adapter then serves on the quantized base (the same weights up to
//! quantization). The frozen base only ever computes gradients for its activations
//! ([`crate::model::Linear`]'s frozen product), never for its weights.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::{AdamW, Example, Result, TrainError, accumulated_update};
use crate::batch::RowSpan;
use crate::model::{
    ChatMessage, Decoder, Model, ModelConfig, RopeStyle, RowInput, Site, SiteDelta, SiteKind,
};
use crate::vocab::Role;

/// The paper's Alpaca prompt (no-input form) with the task input as the instruction.
pub const ALPACA_TEMPLATE: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{input}\n\n### Response:\n";

/// The prompt `input` is wrapped in, for training and for serving the adapter alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptTemplate {
    /// [`ALPACA_TEMPLATE`]; the answer ends with the end-of-sequence token.
    Alpaca,
    /// The base model's own chat template: the input is the user turn, the target the
    /// assistant's, ending with the template's end-of-turn marker.
    Chat,
}

impl PromptTemplate {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "alpaca" => Ok(Self::Alpaca),
            "chat" => Ok(Self::Chat),
            other => Err(TrainError::Invalid(format!(
                "template {other:?}: expected alpaca or chat"
            ))),
        }
    }
}

/// `{input}` in the Alpaca prompt.
pub fn alpaca_prompt(input: &str) -> String {
    ALPACA_TEMPLATE.replace("{input}", input)
}

/// Hyper-parameters of one LoRA training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub rank: usize,
    pub alpha: f64,
    /// The projections that get factors, in every layer.
    pub targets: Vec<SiteKind>,
    /// Optimizer updates.
    pub steps: usize,
    pub lr: f64,
    /// Examples per update (gradients accumulate over passes of at most `pass_tokens`).
    pub batch: usize,
    pub template: PromptTemplate,
    pub seed: u64,
    /// Tokens of prompt + answer; longer prompts lose their beginning.
    pub max_len: usize,
    /// Tokens packed into one forward/backward pass.
    pub pass_tokens: usize,
    /// Updates over which the learning rate ramps up linearly.
    pub warmup: usize,
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    pub max_grad_norm: f64,
    /// Save a checkpoint every this many updates (and at the end).
    pub checkpoint_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            targets: SiteKind::ALL.to_vec(),
            steps: 0,
            lr: 1e-3,
            batch: 4,
            template: PromptTemplate::Alpaca,
            seed: 0,
            max_len: 512,
            pass_tokens: 2048,
            warmup: 0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            checkpoint_every: 50,
        }
    }
}

impl TrainConfig {
    /// Steps for `epochs` passes over `examples` examples.
    pub fn steps_for_epochs(&self, examples: usize, epochs: f64) -> usize {
        ((examples as f64 * epochs) / self.batch.max(1) as f64).ceil() as usize
    }

    /// Every setting within its range, named when it is not.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Invalid(m));
        if !(1..=256).contains(&self.rank) {
            return bad(format!("rank {}: must be 1 to 256", self.rank));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("alpha {}: must be a positive number", self.alpha));
        }
        if self.targets.is_empty() {
            return bad("targets: at least one projection is needed".into());
        }
        if self.steps == 0 || self.steps > 1_000_000 {
            return bad(format!("steps {}: must be 1 to 1000000", self.steps));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 1.0) {
            return bad(format!("lr {}: must be in (0, 1]", self.lr));
        }
        if !(1..=4096).contains(&self.batch) {
            return bad(format!("batch {}: must be 1 to 4096", self.batch));
        }
        if self.max_len < 16 {
            return bad(format!("max_len {}: must be at least 16", self.max_len));
        }
        if self.pass_tokens < self.max_len {
            return bad(format!(
                "pass_tokens {} must be at least max_len {}",
                self.pass_tokens, self.max_len
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("weight_decay {}: must be ≥ 0", self.weight_decay));
        }
        if self.checkpoint_every == 0 {
            return bad("checkpoint_every must be at least 1".into());
        }
        Ok(())
    }

    fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            self.lr * (step + 1) as f64 / self.warmup as f64
        } else {
            self.lr
        }
    }
}

/// Parses `all-linear` or a comma-separated list of projection names (`q_proj,v_proj`).
pub fn parse_targets(s: &str) -> Result<Vec<SiteKind>> {
    if s == "all-linear" {
        return Ok(SiteKind::ALL.to_vec());
    }
    let mut out = Vec::new();
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let kind = SiteKind::ALL
            .into_iter()
            .find(|k| k.hf_name() == name)
            .ok_or_else(|| {
                TrainError::Invalid(format!(
                    "target {name:?}: expected all-linear or names among {}",
                    SiteKind::ALL.map(|k| k.hf_name()).join(", ")
                ))
            })?;
        if !out.contains(&kind) {
            out.push(kind);
        }
    }
    if out.is_empty() {
        return Err(TrainError::Invalid("targets: none given".into()));
    }
    out.sort();
    Ok(out)
}

/// An example as tokens: the prompt, then the answer the loss is taken on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
}

impl Encoded {
    pub fn answer_len(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// The prompt tokens the adapter is served with for `input`.
pub fn prompt_tokens(model: &Model, template: PromptTemplate, input: &str) -> Result<Vec<u32>> {
    Ok(match template {
        PromptTemplate::Alpaca => model.tokenizer.encode(&alpaca_prompt(input))?,
        PromptTemplate::Chat => model.chat_prompt(&[ChatMessage::new(Role::User, input)])?,
    })
}

/// Tokens of `ex`; `truncated` is true when the prompt lost its beginning to `max_len`.
pub fn encode_example(
    model: &Model,
    template: PromptTemplate,
    ex: &Example,
    max_len: usize,
) -> Result<(Encoded, bool)> {
    let prompt = prompt_tokens(model, template, &ex.input)?;
    if prompt.is_empty() {
        return Err(TrainError::Invalid("an input encodes to no tokens".into()));
    }
    let answer = answer_tokens(model, template, &ex.input, &ex.target, &prompt)?;
    if answer.len() + 8 > max_len {
        return Err(TrainError::Invalid(format!(
            "a target is {} tokens; with max_len {max_len} at least 8 prompt tokens must fit \
             (target starts {:?})",
            answer.len(),
            ex.target.chars().take(40).collect::<String>()
        )));
    }
    let keep = (max_len - answer.len()).min(prompt.len());
    let truncated = keep < prompt.len();
    let mut tokens = prompt[prompt.len() - keep..].to_vec();
    tokens.extend_from_slice(&answer);
    Ok((
        Encoded {
            tokens,
            prompt_len: keep,
        },
        truncated,
    ))
}

fn answer_tokens(
    model: &Model,
    template: PromptTemplate,
    input: &str,
    target: &str,
    prompt: &[u32],
) -> Result<Vec<u32>> {
    if template == PromptTemplate::Chat
        && let Some(t) = &model.template
    {
        // The whole conversation rendered by the template carries its own end-of-turn marker.
        let full = t.render(
            &[
                ChatMessage::new(Role::User, input),
                ChatMessage::new(Role::Assistant, target),
            ],
            false,
        )?;
        let full = model.tokenizer.encode(&full)?;
        if full.len() > prompt.len() && full.starts_with(prompt) {
            return Ok(full[prompt.len()..].to_vec());
        }
    }
    let mut ids = model.tokenizer.encode(target)?;
    let bos = model.decoder.config().bos_token_id;
    if bos.is_some() && ids.first().copied() == bos {
        ids.remove(0);
    }
    let eos = model
        .decoder
        .config()
        .eos_token_ids
        .first()
        .copied()
        .or_else(|| model.tokenizer.eos_ids().min())
        .ok_or_else(|| {
            TrainError::Invalid("the base model names no end-of-sequence token".into())
        })?;
    ids.push(eos);
    Ok(ids)
}

/// Trainable LoRA factors: `A` `[r, in]` (Kaiming-uniform like PEFT) and `B` `[out, r]` (zero),
/// adding `scale · B (A x)` at each site. Implements [`SiteDelta`] so the decoder's own forward
/// trains them.
pub struct TrainableLora {
    sites: BTreeMap<Site, (Var, Var)>,
    scale: f64,
    rank: usize,
}

impl TrainableLora {
    pub fn new(
        cfg: &ModelConfig,
        device: &Device,
        targets: &[SiteKind],
        rank: usize,
        alpha: f64,
        seed: u64,
    ) -> Result<Self> {
        use rand::Rng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut sites = BTreeMap::new();
        for layer in 0..cfg.num_layers {
            for &kind in targets {
                let (out_f, in_f) = cfg.linear_shape(kind);
                let bound = 1.0 / (in_f as f32).sqrt();
                let a: Vec<f32> = (0..rank * in_f)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (rank, in_f), device)?)?;
                let b = Var::zeros((out_f, rank), DType::F32, device)?;
                sites.insert(Site { layer, kind }, (a, b));
            }
        }
        Ok(Self {
            sites,
            scale: alpha / rank as f64,
            rank,
        })
    }

    /// Every variable, site by site, `A` then `B`: the order of optimizer and checkpoint state.
    pub fn vars(&self) -> Vec<Var> {
        self.sites
            .values()
            .flat_map(|(a, b)| [a.clone(), b.clone()])
            .collect()
    }

    fn var_names(&self) -> Vec<String> {
        self.sites
            .keys()
            .flat_map(|s| {
                let p = s.hf_path();
                [format!("{p}.lora_A"), format!("{p}.lora_B")]
            })
            .collect()
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn sites(&self) -> impl Iterator<Item = (&Site, &Var, &Var)> {
        self.sites.iter().map(|(s, (a, b))| (s, a, b))
    }

    /// The factors as PEFT stores them: `base_model.model.<path>.lora_{A,B}.weight`, in the
    /// Hugging Face row order of q/k (undoing the GGUF llama permutation the base may use).
    pub fn peft_tensors(&self, cfg: &ModelConfig) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (site, (a, b)) in &self.sites {
            let p = format!("base_model.model.{}", site.hf_path());
            let b = b.as_tensor().detach();
            let b = if cfg.rope_style == RopeStyle::Interleaved
                && matches!(site.kind, SiteKind::Q | SiteKind::K)
            {
                let heads = if site.kind == SiteKind::Q {
                    cfg.num_heads
                } else {
                    cfg.num_kv_heads
                };
                crate::adapter::unpermute_rows_for_interleaved_rope(&b, heads)?
            } else {
                b
            };
            out.insert(format!("{p}.lora_A.weight"), a.as_tensor().detach());
            out.insert(format!("{p}.lora_B.weight"), b.contiguous()?);
        }
        Ok(out)
    }
}

impl SiteDelta for TrainableLora {
    fn delta(
        &self,
        site: Site,
        x: &Tensor,
        _rows: &[RowSpan],
    ) -> candle_core::Result<Option<Tensor>> {
        let Some((a, b)) = self.sites.get(&site) else {
            return Ok(None);
        };
        // x [n, in] · Aᵀ [in, r] · Bᵀ [r, out]
        let y = x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)?;
        Ok(Some((y * self.scale)?))
    }
}

/// The `batch` example indices of update `step` (0-based) over `n` examples: consecutive slots
/// of a sequence of epochs, each a seeded shuffle of all examples, so the order depends only on
/// the seed and the step.
pub fn shuffled_batch(n: usize, batch: usize, seed: u64, step: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(batch);
    let mut perm: Option<(usize, Vec<usize>)> = None;
    for slot in step * batch..(step + 1) * batch {
        let epoch = slot / n;
        if perm.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut p: Vec<usize> = (0..n).collect();
            let seed = seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            p.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
            perm = Some((epoch, p));
        }
        out.push(perm.as_ref().expect("set above").1[slot % n]);
    }
    out
}

/// Summed cross-entropy of the answer tokens of `examples` with `delta` at the LoRA sites, run
/// as one packed pass (row `i` is example `i`). Returns (sum as a scalar tensor, answer tokens).
pub fn answer_nll(
    decoder: &Decoder,
    examples: &[&Encoded],
    delta: &dyn SiteDelta,
) -> Result<(Tensor, usize)> {
    let rows: Vec<RowInput<'_>> = examples
        .iter()
        .map(|e| RowInput {
            tokens: &e.tokens[..e.tokens.len() - 1],
        })
        .collect();
    let mut caches: Vec<_> = examples.iter().map(|_| decoder.new_cache()).collect();
    let mut refs: Vec<_> = caches.iter_mut().collect();
    let (hidden, spans) = decoder.forward_hidden(&rows, &mut refs, delta)?;
    // Logits only where an answer token is predicted: position p predicts token p + 1.
    let mut at = Vec::new();
    let mut labels = Vec::new();
    for (e, span) in examples.iter().zip(&spans) {
        for p in e.prompt_len - 1..e.tokens.len() - 1 {
            at.push((span.start + p) as u32);
            labels.push(e.tokens[p + 1]);
        }
    }
    let n = at.len();
    let at = Tensor::from_vec(at, n, hidden.device())?;
    let labels = Tensor::from_vec(labels, n, hidden.device())?;
    let h = hidden.index_select(&at, 0)?;
    let logits = decoder.head(&h, &[RowSpan { start: 0, len: n }])?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let nll = logp.gather(&labels.unsqueeze(1)?, 1)?.sum_all()?.neg()?;
    Ok((nll, n))
}

/// One optimizer update, as reported to the caller.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// 1-based.
    pub step: usize,
    pub steps: usize,
    /// Mean cross-entropy per answer token over the update's examples.
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens (prompt + answer) processed in this update.
    pub tokens: usize,
    pub seconds: f64,
}

/// A training run over encoded examples, one update at a time.
pub struct LoraTrainer {
    decoder: Decoder,
    lora: TrainableLora,
    vars: Vec<Var>,
    opt: AdamW,
    data: Vec<Encoded>,
    cfg: TrainConfig,
    fingerprint: String,
    losses: Vec<f64>,
}

/// What a checkpoint records beside the tensors.
#[derive(Serialize, Deserialize)]
struct CheckpointState {
    version: u32,
    step: usize,
    fingerprint: String,
    vars: Vec<String>,
    losses: Vec<f64>,
    config: TrainConfig,
}

const CHECKPOINT_KEY: &str = "ramole.train";

impl LoraTrainer {
    /// `base` may be quantized: training runs on its dequantized copy.
    pub fn new(base: &Decoder, data: Vec<Encoded>, cfg: TrainConfig) -> Result<Self> {
        cfg.check()?;
        if data.is_empty() {
            return Err(TrainError::Invalid("no examples to train on".into()));
        }
        if !base.device().is_cpu() {
            return Err(TrainError::Invalid(
                "training runs on the CPU; load the base with the CPU device".into(),
            ));
        }
        let decoder = base.dequantized()?;
        let lora = TrainableLora::new(
            decoder.config(),
            decoder.device(),
            &cfg.targets,
            cfg.rank,
            cfg.alpha,
            cfg.seed,
        )?;
        let vars = lora.vars();
        let opt = AdamW::new(&vars, cfg.lr, cfg.weight_decay)?;
        let fingerprint = fingerprint(&data, &cfg);
        Ok(Self {
            decoder,
            lora,
            vars,
            opt,
            data,
            cfg,
            fingerprint,
            losses: Vec::new(),
        })
    }

    pub fn lora(&self) -> &TrainableLora {
        &self.lora
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// Updates done so far.
    pub fn step(&self) -> usize {
        self.opt.step
    }

    pub fn losses(&self) -> &[f64] {
        &self.losses
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The examples of update `step` (0-based): consecutive slots of a sequence of epochs, each a
    /// seeded shuffle of all examples, so the order depends only on the seed and the step.
    fn batch_of(&self, step: usize) -> Vec<usize> {
        shuffled_batch(self.data.len(), self.cfg.batch, self.cfg.seed, step)
    }

    /// Summed cross-entropy of the answer tokens of `examples`, run as one packed pass.
    /// Returns (sum, answer tokens).
    fn pass_loss(&self, examples: &[&Encoded]) -> Result<(Tensor, usize)> {
        answer_nll(&self.decoder, examples, &self.lora)
    }

    /// Packs `ids` into passes of at most `pass_tokens` tokens (one example at least).
    fn passes(&self, ids: &[usize]) -> Vec<Vec<usize>> {
        let mut out: Vec<Vec<usize>> = Vec::new();
        let mut used = 0;
        for &i in ids {
            let len = self.data[i].tokens.len();
            match out.last_mut() {
                Some(p) if used + len <= self.cfg.pass_tokens => {
                    p.push(i);
                    used += len;
                }
                _ => {
                    out.push(vec![i]);
                    used = len;
                }
            }
        }
        out
    }

    /// One optimizer update over the next batch.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let started = Instant::now();
        let step = self.opt.step;
        let ids = self.batch_of(step);
        let answer_tokens: usize = ids.iter().map(|&i| self.data[i].answer_len()).sum();
        let tokens: usize = ids.iter().map(|&i| self.data[i].tokens.len()).sum();
        let passes = self.passes(&ids);
        let lr = self.cfg.lr_at(step);
        let (loss, grad_norm) = accumulated_update(
            &mut self.opt,
            &self.vars,
            lr,
            self.cfg.max_grad_norm,
            answer_tokens,
            passes.len(),
            |p| {
                let exs: Vec<&Encoded> = passes[p].iter().map(|&i| &self.data[i]).collect();
                Ok(answer_nll(&self.decoder, &exs, &self.lora)?.0)
            },
        )?;
        self.losses.push(loss);
        Ok(StepReport {
            step: step + 1,
            steps: self.cfg.steps,
            loss,
            lr,
            grad_norm,
            tokens,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Mean answer-token cross-entropy of `examples` under the current factors (no update).
    pub fn eval_loss(&self, examples: &[Encoded]) -> Result<f64> {
        let (mut sum, mut n) = (0f64, 0usize);
        let ids: Vec<usize> = (0..examples.len()).collect();
        for chunk in ids.chunks(8) {
            let exs: Vec<&Encoded> = chunk.iter().map(|&i| &examples[i]).collect();
            let (nll, k) = self.pass_loss(&exs)?;
            sum += nll.to_scalar::<f32>()? as f64;
            n += k;
        }
        Ok(sum / n.max(1) as f64)
    }

    /// Saves factors, optimizer moments and progress into one file, atomically.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let state = CheckpointState {
            version: 1,
            step: self.opt.step,
            fingerprint: self.fingerprint.clone(),
            vars: self.lora.var_names(),
            losses: self.losses.clone(),
            config: self.cfg.clone(),
        };
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (i, var) in self.vars.iter().enumerate() {
            tensors.push((format!("var.{i}"), var.as_tensor().detach()));
            tensors.push((format!("m.{i}"), self.opt.m[i].clone()));
            tensors.push((format!("v.{i}"), self.opt.v[i].clone()));
        }
        let meta = HashMap::from([(
            CHECKPOINT_KEY.to_string(),
            serde_json::to_string(&state).expect("serializable"),
        )]);
        let bytes = safetensors::tensor::serialize(tensors.iter().map(|(k, t)| (k, t)), Some(meta))
            .map_err(|e| TrainError::Checkpoint {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        crate::files::write_atomic(path, &bytes).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Restores a checkpoint written by [`LoraTrainer::save_checkpoint`] for the same data and
    /// settings (the number of steps may differ, so a finished run can be continued).
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let bad = |message: String| TrainError::Checkpoint {
            path: path.to_path_buf(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a checkpoint: {e}")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a checkpoint: {e}")))?;
        let state: CheckpointState = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(CHECKPOINT_KEY))
            .ok_or_else(|| bad("not a ramole training checkpoint".into()))
            .and_then(|s| {
                serde_json::from_str(s).map_err(|e| bad(format!("damaged state: {e}")))
            })?;
        if state.fingerprint != self.fingerprint {
            let mut was = state.config.clone();
            was.steps = self.cfg.steps;
            let why = if was != self.cfg {
                format!(
                    "its settings differ: {}",
                    serde_json::to_string(&state.config).expect("serializable")
                )
            } else {
                "its training data differ".to_string()
            };
            return Err(bad(format!(
                "made for another run ({why}); train into a new folder"
            )));
        }
        if state.vars != self.lora.var_names() {
            return Err(bad("its factors do not match this base".into()));
        }
        let read = |key: String, like: &Tensor| -> Result<Tensor> {
            let view = st.tensor(&key).map_err(|e| bad(format!("{key}: {e}")))?;
            let t = Tensor::from_raw_buffer(view.data(), DType::F32, view.shape(), like.device())?;
            if t.dims() != like.dims() {
                return Err(bad(format!(
                    "{key}: shape {:?}, expected {:?}",
                    t.dims(),
                    like.dims()
                )));
            }
            Ok(t)
        };
        for (i, var) in self.vars.iter().enumerate() {
            var.set(&read(format!("var.{i}"), var.as_tensor())?)?;
            self.opt.m[i] = read(format!("m.{i}"), var.as_tensor())?;
            self.opt.v[i] = read(format!("v.{i}"), var.as_tensor())?;
        }
        self.opt.step = state.step;
        self.losses = state.losses;
        self.losses.truncate(state.step);
        Ok(())
    }
}

/// Identifies a run by its data and every setting but the step count.
fn fingerprint(data: &[Encoded], cfg: &TrainConfig) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut c = cfg.clone();
    c.steps = 0;
    c.checkpoint_every = 0;
    h.update(serde_json::to_vec(&c).expect("serializable"));
    for e in data {
        h.update((e.prompt_len as u64).to_le_bytes());
        h.update((e.tokens.len() as u64).to_le_bytes());
        for t in &e.tokens {
            h.update(t.to_le_bytes());
        }
    }
    format!("{:x}", h.finalize())
}

/// How a [`train_lora`] run ended.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOutcome {
    pub out: PathBuf,
    /// Updates done in total (including those before a resume).
    pub steps: usize,
    pub resumed_from: usize,
    pub final_loss: Option<f64>,
    /// Loss of every update, first to last.
    pub losses: Vec<f64>,
    pub examples: usize,
    /// Examples whose prompt lost its beginning to `max_len`.
    pub truncated: usize,
    pub seconds: f64,
    /// The caller asked to stop before the last step (a checkpoint holds the progress).
    pub stopped: bool,
}

/// Samples written beside the adapter for retrieval (the paper embeds 20 per adapter).
pub const ADAPTER_SAMPLES: usize = 20;
/// The checkpoint inside the output folder.
pub const CHECKPOINT_FILE: &str = "checkpoint/train-state.safetensors";

/// Trains an adapter on `examples` and writes it to `out` as a PEFT adapter (adapter_config.json,
/// adapter_model.safetensors), with `samples.jsonl` (up to [`ADAPTER_SAMPLES`] training inputs,
/// spread over the data), `training.json` and a README card. A checkpoint is kept in
/// `out/checkpoint/`; `resume` continues from it. `on_step` sees every update and may return
/// false to stop (the checkpoint is saved first). `base_id` names the base in the config.
pub fn train_lora(
    model: &Model,
    examples: &[Example],
    cfg: &TrainConfig,
    out: &Path,
    base_id: Option<&str>,
    resume: bool,
    on_step: &mut dyn FnMut(&StepReport) -> bool,
) -> Result<TrainOutcome> {
    let started = Instant::now();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TrainError::Io { path, source }
    };
    let ckpt = out.join(CHECKPOINT_FILE);
    if !resume {
        if out.join("adapter_config.json").exists() {
            return Err(TrainError::Invalid(format!(
                "{} already holds an adapter; choose another --out (or --resume to continue it)",
                out.display()
            )));
        }
        if ckpt.exists() {
            return Err(TrainError::Invalid(format!(
                "{} has a checkpoint of an unfinished run; pass --resume to continue it or \
                 choose another --out",
                out.display()
            )));
        }
    } else if !ckpt.exists() {
        return Err(TrainError::Invalid(format!(
            "--resume: {} has no checkpoint",
            out.display()
        )));
    }
    let mut data = Vec::with_capacity(examples.len());
    let mut truncated = 0;
    for (i, ex) in examples.iter().enumerate() {
        let (e, cut) =
            encode_example(model, cfg.template, ex, cfg.max_len).map_err(|e| match e {
                TrainError::Invalid(m) => TrainError::Invalid(format!("example {}: {m}", i + 1)),
                e => e,
            })?;
        truncated += cut as usize;
        data.push(e);
    }
    let mut trainer = LoraTrainer::new(&model.decoder, data, cfg.clone())?;
    if resume {
        trainer.load_checkpoint(&ckpt)?;
    }
    let resumed_from = trainer.step();
    std::fs::create_dir_all(out.join("checkpoint")).map_err(io(out))?;
    let mut stopped = false;
    while trainer.step() < cfg.steps {
        let report = trainer.train_step()?;
        let done = trainer.step() == cfg.steps;
        let go_on = on_step(&report);
        if done || !go_on || trainer.step() % cfg.checkpoint_every == 0 {
            trainer.save_checkpoint(&ckpt)?;
        }
        if !go_on && !done {
            stopped = true;
            break;
        }
    }
    let outcome = TrainOutcome {
        out: out.to_path_buf(),
        steps: trainer.step(),
        resumed_from,
        final_loss: trainer.losses().last().copied(),
        losses: trainer.losses().to_vec(),
        examples: examples.len(),
        truncated,
        seconds: started.elapsed().as_secs_f64(),
        stopped,
    };
    if !stopped {
        write_adapter(model, &trainer, examples, cfg, out, base_id, &outcome)?;
    }
    Ok(outcome)
}

fn write_adapter(
    model: &Model,
    trainer: &LoraTrainer,
    examples: &[Example],
    cfg: &TrainConfig,
    out: &Path,
    base_id: Option<&str>,
    outcome: &TrainOutcome,
) -> Result<()> {
    let write = |name: &str, bytes: &[u8]| {
        let path = out.join(name);
        crate::files::write_atomic(&path, bytes).map_err(|source| TrainError::Io { path, source })
    };
    let tensors = trainer.lora().peft_tensors(model.decoder.config())?;
    let st = safetensors::tensor::serialize(tensors.iter(), None)
        .map_err(|e| TrainError::Invalid(format!("cannot serialize the adapter: {e}")))?;
    write("adapter_model.safetensors", &st)?;
    let step = (examples.len() as f64 / ADAPTER_SAMPLES as f64).max(1.0);
    let mut samples = String::new();
    for i in 0..examples.len().min(ADAPTER_SAMPLES) {
        let ex = &examples[(i as f64 * step) as usize];
        samples.push_str(&serde_json::json!({"input": ex.input, "target": ex.target}).to_string());
        samples.push('\n');
    }
    write("samples.jsonl", samples.as_bytes())?;
    let record = serde_json::json!({
        "trainer": format!("ramole {}", env!("CARGO_PKG_VERSION")),
        "base": base_id,
        "config": cfg,
        "examples": outcome.examples,
        "truncated": outcome.truncated,
        "steps": outcome.steps,
        "final_loss": outcome.final_loss,
        "losses": outcome.losses,
        "seconds": outcome.seconds,
    });
    write(
        "training.json",
        serde_json::to_string_pretty(&record)
            .expect("serializable")
            .as_bytes(),
    )?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let card = format!(
        "---\nlibrary_name: peft\nbase_model: {}\n---\n# {name}\n\nA LoRA adapter (rank {}, alpha {}, \
         on {}) trained by ramole on {} examples for {} steps with the {} prompt. The inputs it \
         was trained on are in samples.jsonl; its settings in training.json.\n",
        base_id.unwrap_or("unknown"),
        cfg.rank,
        cfg.alpha,
        cfg.targets
            .iter()
            .map(|k| k.hf_name())
            .collect::<Vec<_>>()
            .join(", "),
        outcome.examples,
        outcome.steps,
        match cfg.template {
            PromptTemplate::Alpaca => "Alpaca",
            PromptTemplate::Chat => "chat",
        }
    );
    write("README.md", card.as_bytes())?;
    // Last: a folder is a loadable adapter only once its config is there.
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "target_modules": cfg.targets.iter().map(|k| k.hf_name()).collect::<Vec<_>>(),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": false,
        "use_dora": false,
        "fan_in_fan_out": false,
        "modules_to_save": null,
        "init_lora_weights": true,
        "inference_mode": true,
        "base_model_name_or_path": base_id,
    });
    write(
        "adapter_config.json",
        serde_json::to_string_pretty(&config)
            .expect("serializable")
            .as_bytes(),
    )
}
