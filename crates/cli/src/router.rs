//! `ramole router`: train a RouterLoRA over task adapters, install it for the active base (the
//! plan `router`, and what `auto` picks once it exists), show or remove it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use ramole_core::config;
use ramole_core::embed::Embedder;
use ramole_core::model::{LoadOptions, Model, inspect_base};
use ramole_core::retrieve::{TaskProfile, TestInput};
use ramole_core::router::RouterLora;
use ramole_core::train::router::{RouterTrainConfig, RouterTrainer, profile_inputs, task_data};
use ramole_core::vocab::TopK;
use serde_json::json;

use crate::common::open;

#[derive(Subcommand)]
pub(crate) enum RouterCommand {
    /// Train a router over task adapters (only the router learns).
    Train(Box<RouterTrainArgs>),
    /// Install a trained router for the active base.
    Add {
        /// The router's .safetensors (its .json beside it).
        file: PathBuf,
        /// Install it although it names another base id (its shapes must still fit).
        #[arg(long)]
        force: bool,
    },
    /// The active base's router, if any.
    Show {
        #[arg(long)]
        json: bool,
    },
    /// Remove the active base's router (`auto` then mixes again).
    Remove,
}

#[derive(Args)]
pub(crate) struct RouterTrainArgs {
    /// Base model (folder or .gguf; default: the library's active base).
    #[arg(long)]
    base: Option<PathBuf>,
    /// Folder with one adapter folder per profile task, named after the task.
    #[arg(long)]
    adapters: PathBuf,
    /// `profiles-*.json`: every task with its samples (inputs and targets).
    #[arg(long)]
    profiles: PathBuf,
    /// Training tasks, one name per line.
    #[arg(long)]
    tasks: PathBuf,
    /// Train on these inputs (a `test-*.json`-format file: inputs, task, targets) of the
    /// training tasks instead of their profile samples — inputs the adapters never saw.
    #[arg(long)]
    examples: Option<PathBuf>,
    /// With --examples: skip the first N inputs of each task (keep them for evaluation).
    #[arg(long, default_value_t = 0)]
    skip_per_task: usize,
    /// With --examples: then take at most this many inputs of each task.
    #[arg(long, default_value_t = 20)]
    per_task: usize,
    /// Where to write the router (.safetensors; the config goes beside it as .json).
    #[arg(long)]
    out: PathBuf,
    /// Candidates per example: the top k retrieved (the own task always among them).
    #[arg(long, default_value_t = TopK::DEFAULT)]
    k: TopK,
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Probability of hiding each candidate per example and step (at least 2 stay).
    #[arg(long, default_value_t = 0.5)]
    dropout: f64,
    /// Router rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens of prompt + answer; longer prompts lose their beginning.
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// Sentence encoder for the candidates (default: the library's, else the test MiniLM).
    #[arg(long)]
    embedder: Option<PathBuf>,
    /// Test file (`test-*.json`) whose inputs of the training tasks give a held-out loss,
    /// measured before and after training.
    #[arg(long)]
    held_out: Option<PathBuf>,
    /// Held-out inputs per training task.
    #[arg(long, default_value_t = 2)]
    held_out_per_task: usize,
    /// Print the outcome as JSON (progress stays on stderr).
    #[arg(long)]
    json: bool,
}

pub(crate) fn run_router(cmd: RouterCommand) -> Result<()> {
    match cmd {
        RouterCommand::Train(a) => run_train(*a),
        RouterCommand::Add { file, force } => {
            let mut lib = open()?;
            let cfg = lib.add_router(&file, force)?;
            println!(
                "router for {} installed: rank {}, {} layers × {} projections",
                lib.settings().base_id,
                cfg.rank,
                cfg.num_layers,
                cfg.targets.len()
            );
            Ok(())
        }
        RouterCommand::Show { json } => {
            let lib = open()?;
            let router = lib.load_router()?;
            let out = json!({
                "base": lib.settings().base_id,
                "path": router.as_ref().map(|_| lib.router_path()),
                "config": router.as_ref().map(|r| r.config().clone()),
                "params": router.as_ref().map(|r| r.params()),
            });
            if json {
                println!("{out}");
            } else if let Some(r) = router {
                println!(
                    "router for {}: rank {}, {} params, {}",
                    lib.settings().base_id,
                    r.rank(),
                    r.params(),
                    lib.router_path().display()
                );
            } else {
                println!("no router for {} (plan auto mixes)", lib.settings().base_id);
            }
            Ok(())
        }
        RouterCommand::Remove => {
            let mut lib = open()?;
            if lib.remove_router()? {
                println!("router for {} removed", lib.settings().base_id);
            } else {
                println!("no router for {}", lib.settings().base_id);
            }
            Ok(())
        }
    }
}

fn read_tasks(path: &PathBuf) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let tasks: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if tasks.is_empty() {
        bail!("{}: no task names", path.display());
    }
    Ok(tasks)
}

fn run_train(a: RouterTrainArgs) -> Result<()> {
    let started = Instant::now();
    let cfg = RouterTrainConfig {
        rank: a.rank,
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        dropout: a.dropout,
        seed: a.seed,
        ..RouterTrainConfig::default()
    };
    cfg.check()?;
    if a.max_len < 16 {
        bail!("--max-len {}: must be at least 16", a.max_len);
    }
    let settings = config::Settings::load(&config::data_dir()).ok();
    let base = a
        .base
        .clone()
        .or_else(|| settings.as_ref().map(|s| s.base_path.clone()))
        .context("no --base given and no library to take the active base from")?;
    let embedder_dir = a
        .embedder
        .clone()
        .or_else(|| settings.as_ref().map(|s| s.embedder_path.clone()))
        .unwrap_or_else(config::starter_embedder);
    let train_tasks = read_tasks(&a.tasks)?;
    let profiles: Vec<TaskProfile> = crate::common::read_json(&a.profiles)?;
    let train: Vec<TestInput> = match &a.examples {
        Some(p) => {
            let all: Vec<TestInput> = crate::common::read_json(p)?;
            let mut seen = std::collections::HashMap::<&str, usize>::new();
            let picked: Vec<TestInput> = all
                .iter()
                .filter(|t| train_tasks.contains(&t.task))
                .filter(|t| {
                    let n = seen.entry(t.task.as_str()).or_default();
                    *n += 1;
                    *n > a.skip_per_task && *n <= a.skip_per_task + a.per_task
                })
                .cloned()
                .collect();
            if let Some(t) = train_tasks.iter().find(|t| !seen.contains_key(t.as_str())) {
                bail!("{}: no input of the training task {t:?}", p.display());
            }
            picked
        }
        None => profile_inputs(&profiles, &train_tasks)?,
    };
    let held: Vec<TestInput> = match &a.held_out {
        Some(p) => {
            let all: Vec<TestInput> = crate::common::read_json(p)?;
            let of_tasks: Vec<TestInput> = all
                .into_iter()
                .filter(|t| train_tasks.contains(&t.task))
                .collect();
            ramole_core::tasks::limit_per_task(&of_tasks, Some(a.held_out_per_task))
        }
        None => Vec::new(),
    };
    let base_id = inspect_base(&base)?.id;
    let model = Model::load(&base, &LoadOptions::default())
        .with_context(|| format!("loading {}", base.display()))?;
    let embedder = Embedder::load(&embedder_dir)
        .with_context(|| format!("loading the embedder {}", embedder_dir.display()))?;
    let (data, held) = task_data(
        &model,
        &embedder,
        &profiles,
        &train,
        &a.adapters,
        a.k,
        a.max_len,
        &held,
    )?;
    drop(embedder);
    let n_examples = data.examples.len();
    eprintln!(
        "{} examples of {} tasks, {} held out; {} adapters; k {}",
        n_examples,
        train_tasks.len(),
        held.len(),
        data.adapters.len(),
        a.k
    );
    let mut trainer = RouterTrainer::new(
        &model.decoder,
        &base_id,
        data.adapters,
        data.examples,
        cfg.clone(),
    )?;
    drop(model);
    let held_before = if held.is_empty() {
        None
    } else {
        Some(trainer.eval_loss(&held)?)
    };
    if let Some(l) = held_before {
        eprintln!("held-out loss before: {l:.4}");
    }
    while trainer.step() < cfg.steps {
        let r = trainer.train_step()?;
        eprintln!(
            "step {}/{}  loss {:.4}  grad norm {:.3}  {:.1} s",
            r.step, r.steps, r.loss, r.grad_norm, r.seconds
        );
    }
    let held_after = if held.is_empty() {
        None
    } else {
        Some(trainer.eval_loss(&held)?)
    };
    if let Some(l) = held_after {
        eprintln!("held-out loss after: {l:.4}");
    }
    let seconds = started.elapsed().as_secs_f64();
    let record = json!({
        "trainer": format!("ramole {}", env!("CARGO_PKG_VERSION")),
        "config": cfg,
        "k": a.k,
        "max_len": a.max_len,
        "tasks": train_tasks,
        "examples_from": a.examples.as_ref().map_or("profile samples".to_string(), |p| {
            format!("{} (skip {} per task, then {})", p.display(), a.skip_per_task, a.per_task)
        }),
        "examples": n_examples,
        "truncated": data.truncated,
        "adapters": data.tasks,
        "losses": trainer.losses(),
        "held_out": held.len(),
        "held_out_loss_before": held_before,
        "held_out_loss_after": held_after,
        "seconds": seconds,
    });
    trainer.router_mut().config_mut().training = record.clone();
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    trainer.router().save(&a.out, trainer.decoder().config())?;
    if a.json {
        println!(
            "{}",
            json!({"out": a.out, "json": RouterLora::json_path(&a.out), "steps": trainer.step(),
                   "final_loss": trainer.losses().last(), "held_out_loss_before": held_before,
                   "held_out_loss_after": held_after, "seconds": seconds})
        );
    } else {
        println!(
            "router written to {} ({} steps, final loss {:.4}, {:.0} s)",
            a.out.display(),
            trainer.step(),
            trainer.losses().last().copied().unwrap_or(f64::NAN),
            seconds
        );
    }
    Ok(())
}
