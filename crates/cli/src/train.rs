//! `ramole adapter train`: LoRA training from a JSON-lines file, with a progress bar showing the
//! loss, a checkpoint to resume from and the adapter written in PEFT format.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ramole_core::config;
use ramole_core::model::{LoadOptions, Model, inspect_base};
use ramole_core::train::{self, PromptTemplate, TrainConfig};
use serde_json::json;

#[derive(Args)]
pub(crate) struct TrainArgs {
    /// Base model (folder or .gguf; default: the library's active base). A quantized base is
    /// trained on a dequantized copy; the adapter then serves on the quantized one.
    #[arg(long)]
    base: Option<PathBuf>,
    /// JSON lines with `input`/`inputs` and `target`/`targets`.
    #[arg(long)]
    data: PathBuf,
    /// Folder to write the PEFT adapter into (and its checkpoint while training).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// `all-linear` or comma-separated projections (`q_proj,v_proj`).
    #[arg(long, default_value = "all-linear")]
    targets: String,
    /// Optimizer updates (default: `--epochs` passes over the data).
    #[arg(long)]
    steps: Option<usize>,
    /// Passes over the data when `--steps` is not given.
    #[arg(long, default_value_t = 3.0)]
    epochs: f64,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Examples per update (gradients accumulate over packed passes).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// `alpaca` (the paper's prompt) or `chat` (the base's chat template).
    #[arg(long, default_value = "alpaca")]
    template: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokens of prompt + answer; longer prompts lose their beginning.
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// Tokens per forward/backward pass (gradient accumulation beyond).
    #[arg(long, default_value_t = 2048)]
    pass_tokens: usize,
    /// Updates of linear learning-rate warm-up.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Save a checkpoint every this many updates.
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Continue from the checkpoint in `--out`.
    #[arg(long)]
    resume: bool,
    /// Print the outcome as JSON (and no progress bar).
    #[arg(long)]
    json: bool,
}

pub(crate) fn run_train(a: TrainArgs) -> Result<()> {
    if !(a.epochs.is_finite() && a.epochs > 0.0) {
        bail!("--epochs {}: must be a positive number", a.epochs);
    }
    let base = match &a.base {
        Some(b) => b.clone(),
        None => {
            config::Settings::load(&config::data_dir())
                .context("no --base given and no library to take the active base from")?
                .base_path
        }
    };
    let examples = train::read_examples(&a.data)?;
    let mut cfg = TrainConfig {
        rank: a.rank,
        alpha: a.alpha,
        targets: train::parse_targets(&a.targets)?,
        steps: 0,
        lr: a.lr,
        batch: a.batch,
        template: PromptTemplate::parse(&a.template)?,
        seed: a.seed,
        max_len: a.max_len,
        pass_tokens: a.pass_tokens,
        warmup: a.warmup,
        weight_decay: a.weight_decay,
        max_grad_norm: 1.0,
        checkpoint_every: a.checkpoint_every,
    };
    cfg.steps = a
        .steps
        .unwrap_or_else(|| cfg.steps_for_epochs(examples.len(), a.epochs).max(1));
    let info = inspect_base(&base).with_context(|| format!("reading {}", base.display()))?;
    let model = Model::load(&base, &LoadOptions::default())
        .with_context(|| format!("loading {}", base.display()))?;
    let bar = (!a.json && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(cfg.steps as u64);
        b.set_style(
            ProgressStyle::with_template("{spinner} train [{bar:20}] {pos}/{len} {msg} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        b
    });
    let quiet = a.json;
    let mut on_step = |r: &train::StepReport| {
        let msg = format!(
            "loss {:.4}  {:.0} tok/s",
            r.loss,
            r.tokens as f64 / r.seconds.max(1e-9)
        );
        match &bar {
            Some(b) => {
                b.set_message(msg);
                b.set_position(r.step as u64);
            }
            None if !quiet => eprintln!("step {}/{}  {msg}", r.step, r.steps),
            None => {}
        }
        true
    };
    let outcome = train::train_lora(
        &model,
        &examples,
        &cfg,
        &a.out,
        Some(&info.id),
        a.resume,
        &mut on_step,
    )
    .with_context(|| format!("training into {}", a.out.display()))?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if a.json {
        println!(
            "{}",
            json!({"out": outcome.out, "steps": outcome.steps, "resumed_from": outcome.resumed_from,
                   "final_loss": outcome.final_loss, "first_loss": outcome.losses.first(),
                   "examples": outcome.examples, "truncated": outcome.truncated,
                   "seconds": outcome.seconds, "config": cfg})
        );
    } else {
        println!(
            "trained {} ({} steps{}, loss {:.4} -> {:.4}, {:.0} s); add it with: ramole adapter add {}",
            a.out.display(),
            outcome.steps,
            if outcome.resumed_from > 0 {
                format!(", resumed at {}", outcome.resumed_from)
            } else {
                String::new()
            },
            outcome.losses.first().copied().unwrap_or(f64::NAN),
            outcome.final_loss.unwrap_or(f64::NAN),
            outcome.seconds,
            a.out.display()
        );
        if outcome.truncated > 0 {
            eprintln!(
                "ramole: {} examples were longer than --max-len {} and lost the beginning of their prompt",
                outcome.truncated, a.max_len
            );
        }
    }
    Ok(())
}
