//! `ramole eval retrieval` (retrieval accuracy on the paper's data, split into trained and
//! unseen tasks for a fine-tuned encoder) and `ramole eval tasks` (the paper's mixed-task
//! benchmark on task adapters).

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ramole_core::config;
use ramole_core::embed::Embedder;
use ramole_core::engine::{Engine, EngineConfig};
use ramole_core::model::{LoadOptions, Model};
use ramole_core::retrieve::{self, RetrievalEval, TaskProfile, TestInput};
use ramole_core::router::RouterLora;
use ramole_core::tasks::{self, EvalPlan, TaskEvalConfig};
use ramole_core::train::retriever;
use ramole_core::vocab::Scoring;
use serde_json::json;

use crate::common::{embedder_or_default, open, read_json};

#[derive(Subcommand)]
pub(crate) enum EvalCommand {
    /// Retrieval accuracy on the paper's data format (flan-mixed): top-k overall and per domain.
    Retrieval(EvalRetrievalArgs),
    /// The paper's mixed-task benchmark on task adapters (Table 1): one plan, IID or OOD.
    Tasks(EvalTasksArgs),
}

#[derive(Args)]
pub(crate) struct EvalRetrievalArgs {
    /// `profiles-*.json`: one entry per task with its sample inputs.
    #[arg(long)]
    profiles: PathBuf,
    /// `test-*.json`: inputs with their task.
    #[arg(long)]
    test: PathBuf,
    /// Comma-separated k values.
    #[arg(long, default_value = "1,3,5,8")]
    k: String,
    #[arg(long, default_value = "cosine")]
    scoring: String,
    /// Mask each input's own task (the paper's k+1 rule); a hit is then a task of the same domain.
    #[arg(long)]
    ood: bool,
    /// Sentence encoder folder (default: the library's, else the test MiniLM).
    #[arg(long)]
    embedder: Option<PathBuf>,
    /// The tasks an encoder was fine-tuned on (one per line): also report those tasks' inputs
    /// (`trained`) and the other tasks' (`unseen`) apart.
    #[arg(long)]
    tasks: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

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
        .unwrap_or_else(config::starter_base);
    let embedder_dir = a
        .embedder
        .clone()
        .or_else(|| settings.as_ref().map(|s| s.embedder_path.clone()))
        .unwrap_or_else(config::starter_embedder);
    let profiles: Vec<TaskProfile> = crate::common::read_json(&a.profiles)?;
    let all: Vec<TestInput> = crate::common::read_json(&a.test)?;
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
            let lib = open().context("plan router needs --router or a library with a router")?;
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

pub(crate) fn run_eval(cmd: EvalCommand) -> Result<()> {
    let a = match cmd {
        EvalCommand::Retrieval(a) => a,
        EvalCommand::Tasks(a) => return run_eval_tasks(a),
    };
    let ks: Vec<usize> =
        a.k.split(',')
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|k| *k >= 1)
                    .with_context(|| format!("--k {:?}: {s:?} is not a positive integer", a.k))
            })
            .collect::<Result<_>>()?;
    let scoring: Scoring = a.scoring.parse().map_err(anyhow::Error::msg)?;
    let embedder_dir = embedder_or_default(a.embedder.clone());
    let profiles: Vec<TaskProfile> = read_json(&a.profiles)?;
    let tests: Vec<TestInput> = read_json(&a.test)?;
    let trained = match &a.tasks {
        Some(f) => {
            let tasks = retriever::read_task_list(f)?;
            retriever::check_tasks_known(&tasks, &profiles)?;
            Some(tasks)
        }
        None => None,
    };
    let embedder = Embedder::load(&embedder_dir)
        .with_context(|| format!("loading the embedder {}", embedder_dir.display()))?;
    let t0 = std::time::Instant::now();
    let eval = retrieve::RetrievalEval::prepare(&embedder, &profiles, &tests)?;
    let report = eval.report(&ks, scoring, a.ood);
    // Inputs of the trained tasks and of the others, each ranked against every task.
    let split = trained.as_ref().map(|tasks| {
        let seen: HashSet<&str> = tasks.iter().map(String::as_str).collect();
        let unseen: HashSet<&str> = eval
            .tasks()
            .iter()
            .map(String::as_str)
            .filter(|t| !seen.contains(t))
            .collect();
        (
            (
                seen.len(),
                eval.report_for_tasks(&ks, scoring, a.ood, &seen),
            ),
            (
                unseen.len(),
                eval.report_for_tasks(&ks, scoring, a.ood, &unseen),
            ),
        )
    });
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(((nt, t), (nu, u))) = &split {
            let part = |tasks: usize, r: &retrieve::RetrievalReport| {
                json!({"overall": r.overall, "per_domain": r.per_domain, "n": r.n,
                       "tasks": tasks})
            };
            v["trained"] = part(*nt, t);
            v["unseen"] = part(*nu, u);
        }
        println!("{v}");
    } else {
        let head: Vec<String> = ks
            .iter()
            .map(|k| format!("{:>7}", format!("top{k}")))
            .collect();
        println!(
            "{} inputs, {} tasks, scoring {}, {}{} ({:.0} s)",
            report.n,
            profiles.len(),
            scoring.as_str(),
            embedder.id(),
            if a.ood { ", ood" } else { "" },
            t0.elapsed().as_secs_f64()
        );
        println!("{:<28}{}", "domain", head.join(""));
        // One line: a label and the accuracy at each k.
        let line = |label: &str, row: &std::collections::BTreeMap<String, f64>| {
            let cells: Vec<String> = ks
                .iter()
                .map(|k| format!("{:>7.2}", row[&k.to_string()]))
                .collect();
            println!("{label:<28}{}", cells.join(""));
        };
        for (d, row) in &report.per_domain {
            line(d, row);
        }
        line("overall", &report.overall);
        if let Some(((nt, t), (nu, u))) = &split {
            line(&format!("trained ({nt} tasks, {} in)", t.n), &t.overall);
            line(&format!("unseen ({nu} tasks, {} in)", u.n), &u.overall);
        }
    }
    if report.n == 0 {
        bail!("no test inputs");
    }
    Ok(())
}
