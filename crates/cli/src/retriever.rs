//! `ramole retriever train` (contrastive fine-tuning of the sentence encoder on a fixed set of
//! tasks' profile samples) and `ramole embedder use` (switch the library's active encoder,
//! re-embedding every adapter and rebuilding the index).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use ramole_core::train::retriever::{self, RetrieverConfig};
use serde_json::json;

use crate::common::{embedder_or_default, open};

#[derive(Subcommand)]
pub(crate) enum RetrieverCommand {
    /// Fine-tune the sentence encoder on the sample inputs of a set of tasks (symmetric
    /// InfoNCE, negatives from other tasks) and write it as an embedder folder.
    Train(RetrieverTrainArgs),
}

#[derive(Args)]
pub(crate) struct RetrieverTrainArgs {
    /// `profiles-*.json`: one entry per task with its sample inputs (the training data).
    #[arg(long)]
    profiles: PathBuf,
    /// Task names to train on, one per line (default: the committed 40% list, 19 of the 48
    /// flan-mixed tasks).
    #[arg(long)]
    tasks: Option<PathBuf>,
    /// The folder to write (must not exist): config, tokenizer, model.safetensors, training.json.
    #[arg(long)]
    out: PathBuf,
    /// The encoder to start from (default: the library's embedder, else the test MiniLM).
    #[arg(long)]
    embedder: Option<PathBuf>,
    /// Passes over the pairs (each uses every sample once).
    #[arg(long, default_value_t = RetrieverConfig::default().epochs)]
    epochs: usize,
    /// γ: logits are cosine / γ.
    #[arg(long, default_value_t = RetrieverConfig::default().temperature)]
    temperature: f64,
    /// Peak learning rate (AdamW; linear warm-up over the first 10% of updates, then decay).
    #[arg(long, default_value_t = RetrieverConfig::default().lr)]
    lr: f64,
    /// Pairs (distinct tasks) per batch.
    #[arg(long, default_value_t = RetrieverConfig::default().batch_tasks)]
    batch_tasks: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the outcome as one JSON object (progress stays on stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub(crate) enum EmbedderCommand {
    /// Make an encoder folder the active embedder: every adapter's samples are re-embedded by
    /// it and the index is rebuilt.
    Use {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run_retriever(cmd: RetrieverCommand) -> Result<()> {
    let RetrieverCommand::Train(a) = cmd;
    let cfg = RetrieverConfig {
        epochs: a.epochs,
        temperature: a.temperature,
        lr: a.lr,
        seed: a.seed,
        batch_tasks: a.batch_tasks,
        ..RetrieverConfig::default()
    };
    // Settings first: a bad value is refused before any file is read.
    cfg.check()?;
    let tasks = match &a.tasks {
        Some(f) => retriever::read_task_list(f)?,
        None => retriever::default_tasks(),
    };
    let profiles = retriever::read_profiles(&a.profiles)?;
    let source = embedder_or_default(a.embedder);
    let mut on_epoch = |r: &retriever::EpochReport| {
        eprintln!(
            "epoch {}/{}  loss {:.4}  ({}/{} updates, {:.0} s)",
            r.epoch, r.epochs, r.loss, r.steps, r.steps_total, r.seconds
        );
    };
    let outcome =
        retriever::train_retriever(&source, &profiles, &tasks, &cfg, &a.out, &mut on_epoch)
            .with_context(|| format!("training the retriever into {}", a.out.display()))?;
    if a.json {
        println!(
            "{}",
            json!({"out": outcome.out, "embedder_id": outcome.embedder_id,
                   "source": {"path": outcome.source, "id": outcome.source_id},
                   "tasks": outcome.tasks, "samples": outcome.samples, "steps": outcome.steps,
                   "epoch_losses": outcome.epoch_losses,
                   "first_loss": outcome.epoch_losses.first(),
                   "final_loss": outcome.epoch_losses.last(),
                   "seconds": outcome.seconds, "config": outcome.config})
        );
    } else {
        println!(
            "trained {} ({} tasks, {} samples, {} updates, loss {:.4} -> {:.4}, {:.0} s); use it \
             with: ramole embedder use {}",
            outcome.embedder_id,
            outcome.tasks.len(),
            outcome.samples,
            outcome.steps,
            outcome.epoch_losses.first().copied().unwrap_or(f64::NAN),
            outcome.epoch_losses.last().copied().unwrap_or(f64::NAN),
            outcome.seconds,
            outcome.out.display()
        );
    }
    Ok(())
}

pub(crate) fn run_embedder(cmd: EmbedderCommand) -> Result<()> {
    let EmbedderCommand::Use { dir, json } = cmd;
    let mut lib = open()?;
    let switch = lib
        .use_embedder(&dir)
        .with_context(|| format!("switching the embedder to {}", dir.display()))?;
    if json {
        println!("{}", serde_json::to_string(&switch)?);
    } else {
        println!(
            "embedder  {} ({}); was {}",
            switch.embedder,
            switch.path.display(),
            switch.previous
        );
        println!(
            "re-embedded {} adapters; the index holds {}",
            switch.embedded, switch.indexed
        );
    }
    Ok(())
}
