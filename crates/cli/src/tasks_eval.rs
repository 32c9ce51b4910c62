//! `ramole eval tasks`: the paper's mixed-task benchmark (Table 1) on task adapters, batched
//! through the engine; prints the per-task and per-cluster tables and writes JSON.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ramole_core::config;
use ramole_core::embed::Embedder;
use ramole_core::engine::{Engine, EngineConfig};
use ramole_core::index::Scoring;
use ramole_core::model::{LoadOptions, Model};
use ramole_core::retrieve::{RetrievalEval, TaskProfile, TestInput};
use ramole_core::router::RouterLora;
use ramole_core::tasks::{self, EvalPlan, TaskEvalConfig};
use serde_json::json;

#[derive(Args)]
pub(crate) struct EvalTasksArgs {
    /// `profiles-*.json`: one entry per task with its sample inputs (retrieval profiles).
    #[arg(long)]
    profiles: PathBuf,
    /// `test-*.json`: inputs with task, targets and metric.
    #[arg(long)]
    test: PathBuf,
    /// Folder with one adapter folder per task, named after the task.
    #[arg(long)]
    adapters: PathBuf,
    /// perfect | selection | mixture | fusion | router | none.
    #[arg(long)]
    plan: String,
    /// The RouterLoRA of plan router (.safetensors; default: the library's for the base).
    #[arg(long)]
    router: Option<PathBuf>,
    /// Mask each input's own adapter (the paper's k+1 rule).
    #[arg(long)]
    ood: bool,
    /// Adapters per input for mixture and fusion.
    #[arg(long, default_value_t = 3)]
    k: usize,
    /// Only the first N inputs of each task.
    #[arg(long)]
    limit_per_task: Option<usize>,
    #[arg(long, default_value = "cosine")]
    scoring: String,
    #[arg(long, default_value_t = 50)]
    max_new_tokens: usize,
    /// Base model (default: the library's active base, else the test SmolLM2).
    #[arg(long)]
    base: Option<PathBuf>,
    /// Sentence encoder folder (default: the library's, else the test MiniLM).
    #[arg(long)]
    embedder: Option<PathBuf>,
    /// Rows decoded together.
    #[arg(long, default_value_t = 8)]
    max_rows: usize,
    /// Also write the report with every prediction to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the report as JSON instead of tables.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run_eval_tasks(a: EvalTasksArgs) -> Result<()> {
    let plan: EvalPlan = a.plan.parse()?;
    let scoring: Scoring = a.scoring.parse().map_err(anyhow::Error::msg)?;
    if !(1..=64).contains(&a.max_rows) {
        anyhow::bail!("--max-rows {} must be between 1 and 64", a.max_rows);
    }
    let settings = config::Settings::load(&config::data_dir()).ok();
    let base = a
        .base
        .clone()
        .or_else(|| settings.as_ref().map(|s| s.base_path.clone()))
        .unwrap_or_else(config::smollm2_gguf);
    let embedder_dir = a
        .embedder
        .clone()
        .or_else(|| settings.as_ref().map(|s| s.embedder_path.clone()))
        .unwrap_or_else(config::minilm_dir);
    let profiles: Vec<TaskProfile> = crate::library::read_json(&a.profiles)?;
    let all: Vec<TestInput> = crate::library::read_json(&a.test)?;
    let tests = tasks::limit_per_task(&all, a.limit_per_task);
    let embedder = Embedder::load(&embedder_dir)
        .with_context(|| format!("loading the embedder {}", embedder_dir.display()))?;
    let retrieval = RetrievalEval::prepare(&embedder, &profiles, &tests)?;
    drop(embedder);
    let model = Model::load(&base, &LoadOptions::default())
        .with_context(|| format!("loading {}", base.display()))?;
    let router = match (&a.router, plan) {
        (Some(p), _) => Some(Arc::new(
            RouterLora::load(p, model.decoder.config())
                .with_context(|| format!("loading the router {}", p.display()))?,
        )),
        (None, EvalPlan::Router) => {
            let lib = crate::library::open()
                .context("plan router needs --router or a library with a router")?;
            Some(lib.load_router()?.context(
                "plan router: the library has no router for its base; pass --router FILE",
            )?)
        }
        (None, _) => None,
    };
    let engine = Engine::start(
        Arc::new(model),
        EngineConfig {
            max_rows: a.max_rows,
            ..EngineConfig::default()
        },
    );
    engine.set_router(router);
    let cfg = TaskEvalConfig {
        plan,
        k: a.k,
        ood: a.ood,
        scoring,
        max_new_tokens: a.max_new_tokens,
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = ProgressBar::new(tests.len() as u64);
        b.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len}  ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        b.set_message(format!(
            "{}{}",
            plan.as_str(),
            if a.ood { " ood" } else { "" }
        ));
        b
    });
    let mut on_done = |_: &tasks::Prediction, done: usize| {
        if let Some(b) = &bar {
            b.set_position(done as u64);
        }
    };
    let (report, preds) = tasks::run(&engine, &retrieval, &tests, &a.adapters, &cfg, &mut on_done)?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let full = json!({"report": report, "predictions": preds,
                      "base": base, "embedder": embedder_dir, "adapters": a.adapters,
                      "limit_per_task": a.limit_per_task, "scoring": scoring.as_str(),
                      "router": a.router});
    if let Some(out) = &a.out {
        ramole_core::files::write_atomic(out, serde_json::to_string_pretty(&full)?.as_bytes())
            .with_context(|| format!("writing {}", out.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "plan {}{}, k {}, {} inputs of {} tasks, {} tokens generated in {:.0} s",
        plan.as_str(),
        if a.ood { " (ood)" } else { "" },
        a.k,
        report.n,
        report.per_task.len(),
        report.generated_tokens,
        report.seconds
    );
    println!("{:<34}{:<8}{:>5}{:>9}", "task", "metric", "n", "score");
    for (t, s) in &report.per_task {
        let extra = match (s.rouge2, s.rouge_l) {
            (Some(r2), Some(rl)) => format!("  (R2 {r2:.1}, RL {rl:.1})"),
            _ => String::new(),
        };
        println!("{t:<34}{:<8}{:>5}{:>9.1}{extra}", s.metric, s.n, s.score);
    }
    println!();
    println!(
        "{:<34}{:<8}{:>5}{:>9}",
        "cluster", "metric", "tasks", "score"
    );
    for (d, s) in &report.per_cluster {
        let extra = match (s.rouge2, s.rouge_l) {
            (Some(r2), Some(rl)) => format!("  (R2 {r2:.1}, RL {rl:.1})"),
            _ => String::new(),
        };
        println!("{d:<34}{:<8}{:>5}{:>9.1}{extra}", s.metric, s.n, s.score);
    }
    Ok(())
}
