//! The paper's mixed-task benchmark on real task adapters (ramole-paper.md section 4): every test
//! input is answered greedily (Alpaca prompt, 50 new tokens) under one plan — `perfect` (its own
//! task's adapter), `selection` (top-1 retrieved), `mixture` / `fusion` (top-k retrieved, uniform
//! gates) or `none` (the base) — with OOD masking of the own adapter by the k+1 rule; all inputs
//! run through the [`Engine`], batched; answers are scored with [`crate::metrics`] and averaged
//! per task, then per cluster (the mean of its tasks), as in the paper's Table 1.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc::channel;

use serde::Serialize;

use crate::engine::{AdapterUse, Engine, Job, JobEvent, MixRequest};
use crate::metrics;
use crate::model::{GenerateParams, Model, Sampling};
use crate::retrieve::{RetrievalEval, TestInput, top_k_masking};
use crate::train::lora::alpaca_prompt;
use crate::vocab::{Plan, Scoring};

#[derive(Debug, thiserror::Error)]
pub enum TaskEvalError {
    #[error("{0}")]
    Invalid(String),
    #[error("test input {index} ({task}): {message}")]
    Generation {
        index: usize,
        task: String,
        message: String,
    },
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Adapter(#[from] crate::adapter::AdapterError),
}

type Result<T, E = TaskEvalError> = std::result::Result<T, E>;

/// How each input picks its adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalPlan {
    /// The input's own task adapter alone (an oracle retriever).
    Perfect,
    /// The top-1 retrieved adapter.
    Selection,
    /// The top-k retrieved adapters, outputs mixed with gates 1/k.
    Mixture,
    /// The top-k retrieved adapters' factors averaged into one.
    Fusion,
    /// The top-k retrieved adapters gated per token by the engine's RouterLoRA.
    Router,
    /// The base model alone.
    None,
}

impl std::str::FromStr for EvalPlan {
    type Err = TaskEvalError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "perfect" => Self::Perfect,
            "selection" => Self::Selection,
            "mixture" => Self::Mixture,
            "fusion" => Self::Fusion,
            "router" => Self::Router,
            "none" => Self::None,
            other => {
                return Err(TaskEvalError::Invalid(format!(
                    "plan {other:?}: expected perfect, selection, mixture, fusion, router or none"
                )));
            }
        })
    }
}

impl EvalPlan {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Perfect => "perfect",
            Self::Selection => "selection",
            Self::Mixture => "mixture",
            Self::Fusion => "fusion",
            Self::Router => "router",
            Self::None => "none",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TaskEvalConfig {
    pub plan: EvalPlan,
    /// Adapters per input for mixture and fusion.
    pub k: usize,
    /// Mask each input's own adapter (the paper's k+1 rule).
    pub ood: bool,
    pub scoring: Scoring,
    pub max_new_tokens: usize,
}

impl Default for TaskEvalConfig {
    fn default() -> Self {
        Self {
            plan: EvalPlan::Mixture,
            k: 3,
            ood: false,
            scoring: Scoring::Cosine,
            max_new_tokens: 50,
        }
    }
}

/// The adapters (task positions) and gates `plan` gives test input `i`, and the mixing plan.
pub fn adapters_for(
    retrieval: &RetrievalEval,
    i: usize,
    cfg: &TaskEvalConfig,
) -> (Plan, Vec<(usize, f32)>) {
    let own = retrieval.own_task(i);
    let pick = |k: usize| -> Vec<usize> {
        let order: Vec<usize> = retrieval
            .ranked(i, cfg.scoring)
            .into_iter()
            .map(|r| r.0)
            .collect();
        if cfg.ood {
            top_k_masking(&order, k, Some(&own))
        } else {
            order.into_iter().take(k).collect()
        }
    };
    let uniform = |ids: Vec<usize>| -> Vec<(usize, f32)> {
        let g = 1.0 / ids.len().max(1) as f32;
        ids.into_iter().map(|t| (t, g)).collect()
    };
    match cfg.plan {
        EvalPlan::Perfect => (Plan::Selection, vec![(own, 1.0)]),
        EvalPlan::Selection => (Plan::Selection, uniform(pick(1))),
        EvalPlan::Mixture => (Plan::Mixture, uniform(pick(cfg.k))),
        EvalPlan::Fusion => (Plan::Fusion, uniform(pick(cfg.k))),
        EvalPlan::Router => (Plan::Router, uniform(pick(cfg.k))),
        EvalPlan::None => (Plan::None, Vec::new()),
    }
}

/// One answered input.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    /// Position in the evaluated test list.
    pub index: usize,
    pub task: String,
    pub domain: String,
    pub metric: String,
    pub prediction: String,
    pub reference: String,
    /// Adapters (task names) and gates.
    pub adapters: Vec<(String, f32)>,
    /// EM as 0/100, BLEU, or ROUGE-1 (the metric's main score).
    pub score: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rouge: Option<metrics::Rouge>,
    pub generated_tokens: usize,
}

/// A task's or a cluster's mean scores (percent).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Scores {
    pub metric: String,
    /// Inputs (for a task) or tasks (for a cluster) averaged.
    pub n: usize,
    /// EM, BLEU or ROUGE-1.
    pub score: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rouge2: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rouge_l: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    pub plan: EvalPlan,
    pub ood: bool,
    pub k: usize,
    pub n: usize,
    pub per_task: BTreeMap<String, Scores>,
    /// Keyed by domain: the mean of its tasks' scores.
    pub per_cluster: BTreeMap<String, Scores>,
    pub generated_tokens: usize,
    pub seconds: f64,
}

fn mean(xs: impl Iterator<Item = f64>) -> (f64, usize) {
    let (s, n) = xs.fold((0.0, 0), |(s, n), x| (s + x, n + 1));
    (if n == 0 { 0.0 } else { s / n as f64 }, n)
}

/// Per-task and per-cluster means of `preds`.
pub fn summarize(preds: &[Prediction]) -> (BTreeMap<String, Scores>, BTreeMap<String, Scores>) {
    let mut by_task: BTreeMap<&str, Vec<&Prediction>> = BTreeMap::new();
    for p in preds {
        by_task.entry(&p.task).or_default().push(p);
    }
    let mut per_task = BTreeMap::new();
    let mut by_domain: BTreeMap<String, Vec<Scores>> = BTreeMap::new();
    for (task, ps) in by_task {
        let (score, n) = mean(ps.iter().map(|p| p.score));
        let rouge = ps[0].rouge.is_some();
        let s = Scores {
            metric: ps[0].metric.clone(),
            n,
            score,
            rouge2: rouge.then(|| mean(ps.iter().filter_map(|p| p.rouge).map(|r| r.rouge2)).0),
            rouge_l: rouge.then(|| mean(ps.iter().filter_map(|p| p.rouge).map(|r| r.rouge_l)).0),
        };
        by_domain
            .entry(ps[0].domain.clone())
            .or_default()
            .push(s.clone());
        per_task.insert(task.to_string(), s);
    }
    let per_cluster = by_domain
        .into_iter()
        .map(|(d, ss)| {
            let (score, n) = mean(ss.iter().map(|s| s.score));
            let rouge = ss[0].rouge2.is_some();
            let c = Scores {
                metric: ss[0].metric.clone(),
                n,
                score,
                rouge2: rouge.then(|| mean(ss.iter().filter_map(|s| s.rouge2)).0),
                rouge_l: rouge.then(|| mean(ss.iter().filter_map(|s| s.rouge_l)).0),
            };
            (d, c)
        })
        .collect();
    (per_task, per_cluster)
}

/// Scores `prediction` against `reference` with `metric` (`em`, `bleu` or `rouge`): the main
/// score and, for ROUGE, all three.
pub fn score(
    metric: &str,
    prediction: &str,
    reference: &str,
) -> Result<(f64, Option<metrics::Rouge>)> {
    Ok(match metric {
        "em" => (
            if metrics::exact_match(prediction, reference) {
                100.0
            } else {
                0.0
            },
            None,
        ),
        "bleu" => (metrics::bleu(prediction, reference), None),
        "rouge" => {
            let r = metrics::rouge(prediction, reference);
            (r.rouge1, Some(r))
        }
        other => {
            return Err(TaskEvalError::Invalid(format!(
                "metric {other:?}: expected em, bleu or rouge"
            )));
        }
    })
}

/// The first `limit` inputs of every task (all when `None`), in file order.
pub fn limit_per_task(tests: &[TestInput], limit: Option<usize>) -> Vec<TestInput> {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    tests
        .iter()
        .filter(|t| {
            let n = seen.entry(&t.task).or_default();
            *n += 1;
            limit.is_none_or(|l| *n <= l)
        })
        .cloned()
        .collect()
}

/// Answers every input of `tests` (embedded in `retrieval` in the same order) under `cfg` through
/// `engine`, using the task adapters in `adapters` (`<dir>/<task>`). `on_done` hears each
/// finished prediction (for progress). Predictions come back in input order.
pub fn run(
    engine: &Engine,
    retrieval: &RetrievalEval,
    tests: &[TestInput],
    adapters: &Path,
    cfg: &TaskEvalConfig,
    on_done: &mut dyn FnMut(&Prediction, usize),
) -> Result<(TaskReport, Vec<Prediction>)> {
    let started = std::time::Instant::now();
    if cfg.k == 0
        && matches!(
            cfg.plan,
            EvalPlan::Mixture | EvalPlan::Fusion | EvalPlan::Router
        )
    {
        return Err(TaskEvalError::Invalid("k must be at least 1".into()));
    }
    let tasks = retrieval.tasks();
    let dirs = if cfg.plan == EvalPlan::None {
        Vec::new()
    } else {
        crate::adapter::task_dirs(adapters, tasks)?
    };
    let model: &Model = engine.model();
    let params = GenerateParams {
        max_tokens: cfg.max_new_tokens,
        sampling: Sampling {
            temperature: 0.0,
            ..Sampling::default()
        },
        ..GenerateParams::default()
    };
    let mut jobs = Vec::with_capacity(tests.len());
    for (i, t) in tests.iter().enumerate() {
        let metric = t.metric.clone().ok_or_else(|| {
            TaskEvalError::Invalid(format!("test input {i} ({}) has no metric", t.task))
        })?;
        if t.targets.is_none() {
            return Err(TaskEvalError::Invalid(format!(
                "test input {i} ({}) has no targets",
                t.task
            )));
        }
        // An unknown metric is refused before anything is generated.
        score(&metric, "", "")?;
        let (plan, picked) = adapters_for(retrieval, i, cfg);
        let uses = picked
            .iter()
            .map(|&(task, gate)| AdapterUse {
                id: tasks[task].clone(),
                dir: dirs[task].clone(),
                gate,
            })
            .collect();
        let prompt = model.tokenizer.encode(&alpaca_prompt(&t.inputs))?;
        let job = Job {
            prompt,
            params: params.clone(),
            mix: MixRequest {
                plan,
                adapters: uses,
            },
        };
        let names = picked
            .iter()
            .map(|&(task, g)| (tasks[task].clone(), g))
            .collect::<Vec<_>>();
        jobs.push((job, metric, names));
    }
    let n = jobs.len();
    let (tx, rx) = channel::<(usize, std::result::Result<(String, usize), String>)>();
    let mut meta = Vec::with_capacity(n);
    let submitted = std::thread::scope(|s| -> Result<Vec<Prediction>> {
        let mut to_submit = Vec::with_capacity(n);
        for (i, (job, metric, names)) in jobs.into_iter().enumerate() {
            meta.push((metric, names));
            to_submit.push((i, job));
        }
        let submitter = s.spawn(move || {
            for (i, job) in to_submit {
                let tx = tx.clone();
                let sink = Box::new(move |ev: JobEvent| {
                    match ev {
                        JobEvent::Done(g) => {
                            let g = g.generation;
                            let _ = tx.send((i, Ok((g.text, g.generated_tokens))));
                        }
                        JobEvent::Failed(e) => {
                            let _ = tx.send((i, Err(e.to_string())));
                        }
                        JobEvent::Started | JobEvent::Text(_) => {}
                    }
                    true
                });
                if let Err(e) = engine.submit(job, sink) {
                    return Err((i, e.to_string()));
                }
            }
            Ok(())
        });
        let mut preds: Vec<Option<Prediction>> = vec![None; n];
        let mut done = 0;
        while done < n {
            let Ok((i, result)) = rx.recv() else { break };
            let t = &tests[i];
            let (text, generated) = result.map_err(|message| TaskEvalError::Generation {
                index: i,
                task: t.task.clone(),
                message,
            })?;
            let (metric, names) = &meta[i];
            let prediction = metrics::answer(&text).to_string();
            let reference = t.targets.clone().unwrap_or_default();
            let (main, rouge) = score(metric, &prediction, &reference)?;
            let p = Prediction {
                index: i,
                task: t.task.clone(),
                domain: t
                    .domain
                    .clone()
                    .unwrap_or_else(|| retrieval.domains()[retrieval.own_task(i)].clone()),
                metric: metric.clone(),
                prediction,
                reference,
                adapters: names.clone(),
                score: main,
                rouge,
                generated_tokens: generated,
            };
            done += 1;
            on_done(&p, done);
            preds[i] = Some(p);
        }
        if let Err((i, message)) = submitter.join().expect("submitter does not panic") {
            return Err(TaskEvalError::Generation {
                index: i,
                task: tests[i].task.clone(),
                message,
            });
        }
        Ok(preds.into_iter().flatten().collect())
    })?;
    if submitted.len() != n {
        return Err(TaskEvalError::Invalid(format!(
            "the engine answered {} of {n} inputs",
            submitted.len()
        )));
    }
    let (per_task, per_cluster) = summarize(&submitted);
    let report = TaskReport {
        plan: cfg.plan,
        ood: cfg.ood,
        k: cfg.k,
        n,
        per_task,
        per_cluster,
        generated_tokens: submitted.iter().map(|p| p.generated_tokens).sum(),
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((report, submitted))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(task: &str, domain: &str, metric: &str, pred: &str, reference: &str) -> Prediction {
        let (score, rouge) = score(metric, pred, reference).unwrap();
        Prediction {
            index: 0,
            task: task.into(),
            domain: domain.into(),
            metric: metric.into(),
            prediction: pred.into(),
            reference: reference.into(),
            adapters: Vec::new(),
            score,
            rouge,
            generated_tokens: 1,
        }
    }

    #[test]
    fn clusters_average_their_tasks_not_their_inputs() {
        let preds = vec![
            pred("sst2", "sentiment", "em", "positive", "positive"),
            pred("sst2", "sentiment", "em", "negative", "positive"),
            pred("imdb", "sentiment", "em", "positive", "positive"),
            pred("e2e", "struct to text", "rouge", "a b c", "a b c"),
        ];
        let (tasks, clusters) = summarize(&preds);
        assert_eq!(tasks["sst2"].score, 50.0);
        assert_eq!(tasks["sst2"].n, 2);
        assert_eq!(tasks["imdb"].score, 100.0);
        // (50 + 100) / 2, not 2 of 3 inputs.
        assert_eq!(clusters["sentiment"].score, 75.0);
        assert_eq!(clusters["sentiment"].n, 2);
        let s2t = &clusters["struct to text"];
        assert!(s2t.score > 99.9 && s2t.rouge2.unwrap() > 99.9 && s2t.rouge_l.unwrap() > 99.9);
        assert!(clusters["sentiment"].rouge2.is_none());
    }

    #[test]
    fn limits_keep_the_first_inputs_of_each_task() {
        let t = |task: &str, x: &str| TestInput {
            inputs: x.into(),
            task: task.into(),
            domain: None,
            targets: None,
            metric: None,
        };
        let tests = vec![
            t("a", "1"),
            t("a", "2"),
            t("b", "3"),
            t("a", "4"),
            t("b", "5"),
        ];
        let kept: Vec<String> = limit_per_task(&tests, Some(1))
            .into_iter()
            .map(|t| t.inputs)
            .collect();
        assert_eq!(kept, vec!["1", "3"]);
        assert_eq!(limit_per_task(&tests, None).len(), 5);
    }

    #[test]
    fn unknown_plans_and_metrics_are_named() {
        let e = "best".parse::<EvalPlan>().unwrap_err().to_string();
        assert!(e.contains("\"best\"") && e.contains("perfect"), "{e}");
        let e = score("f1", "a", "a").unwrap_err().to_string();
        assert!(e.contains("\"f1\""), "{e}");
    }
}
