//! `ramole bench batch`: aggregate decode tokens/s of heterogeneous requests (each with its own
//! set of seeded random adapters) run one after another through the single-request loop, and
//! through the engine at batch sizes 1, 2, 4 and 8, side by side in one run.

use std::sync::Arc;

use anyhow::{Result, bail};
use clap::Args;
use serde_json::json;

use ramole_core::adapter::LoraAdapter;
use ramole_core::engine::{AdapterUse, Engine, EngineConfig, Job, JobEvent, MixRequest};
use ramole_core::model::{GenerateParams, Generation, Model, generate};
use ramole_core::mole::{CompiledMix, MixDelta, Strategy};
use ramole_core::vocab::Plan;
use ramole_testkit::write_random_peft;

use crate::common::BaseArgs;

#[derive(Args)]
pub(crate) struct BatchBench {
    #[command(flatten)]
    base: BaseArgs,
    /// Concurrent requests.
    #[arg(long, default_value_t = 8)]
    requests: usize,
    /// Adapters each request mixes (gates 1/k).
    #[arg(long, default_value_t = 3)]
    adapters_per_request: usize,
    /// Distinct adapter sets; request i uses set i mod N, and sets share no adapter.
    #[arg(long, default_value_t = 8)]
    distinct_sets: usize,
    /// Tokens each request generates (end-of-text is ignored so every run is this long).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Prompt tokens of each request.
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// Batch sizes measured, comma-separated.
    #[arg(long, default_value = "1,2,4,8", value_delimiter = ',')]
    batch_sizes: Vec<usize>,
    /// gather | union (default: the engine picks the cheaper per step).
    #[arg(long)]
    strategy: Option<String>,
    /// Runs per figure, interleaved; the best is reported.
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Where the adapters are written (default: a folder under the system temp dir).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    #[arg(long)]
    json: bool,
}

struct Request {
    prompt: Vec<u32>,
    adapters: Vec<AdapterUse>,
}

pub(crate) fn run(b: BatchBench) -> Result<()> {
    if b.requests == 0 || b.adapters_per_request == 0 || b.distinct_sets == 0 {
        bail!("--requests, --adapters-per-request and --distinct-sets must be at least 1");
    }
    if b.max_tokens < 2 || b.prompt_tokens == 0 || b.rank == 0 {
        bail!("--max-tokens must be at least 2, --prompt-tokens and --rank at least 1");
    }
    if b.batch_sizes.is_empty() || b.batch_sizes.contains(&0) {
        bail!("--batch-sizes must list sizes of at least 1");
    }
    let strategy = match b.strategy.as_deref() {
        None => None,
        Some("gather") => Some(Strategy::Gather),
        Some("union") => Some(Strategy::Union),
        Some(other) => bail!("--strategy {other:?}: expected gather or union"),
    };
    let model = Arc::new(b.base.load()?);
    let d = &model.decoder;
    let out = b
        .out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("ramole-bench-batch"));
    let n_adapters = b.distinct_sets * b.adapters_per_request;
    let mut dirs = Vec::with_capacity(n_adapters);
    for i in 0..n_adapters {
        let dir = out.join(format!("adapter-{i}"));
        write_random_peft(&dir, d, b.rank, 2.0 * b.rank as f64, 2000 + i as u64)?;
        dirs.push(dir);
    }
    let vocab = d.config().vocab_size;
    let gate = 1.0 / b.adapters_per_request as f32;
    let requests: Vec<Request> = (0..b.requests)
        .map(|i| {
            let set = i % b.distinct_sets;
            Request {
                prompt: (0..b.prompt_tokens)
                    .map(|t| ((t * 7919 + i * 104_729) % (vocab - 200) + 100) as u32)
                    .collect(),
                adapters: (0..b.adapters_per_request)
                    .map(|k| {
                        let a = set * b.adapters_per_request + k;
                        AdapterUse {
                            id: format!("adapter-{a}"),
                            dir: dirs[a].clone(),
                            gate,
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    let params = GenerateParams {
        max_tokens: b.max_tokens,
        ignore_eos: true,
        ..GenerateParams::default()
    };

    let mut best_seq = 0f64;
    let mut best: Vec<f64> = vec![0.0; b.batch_sizes.len()];
    let mut strategies: Vec<String> = vec![String::new(); b.batch_sizes.len()];
    let mut all_match = true;
    for _ in 0..b.repeats.max(1) {
        let (rate, reference) = sequential(&model, &requests, &params)?;
        best_seq = best_seq.max(rate);
        for (k, &size) in b.batch_sizes.iter().enumerate() {
            let (rate, tokens, used) = batched(&model, &requests, &params, size, strategy)?;
            best[k] = best[k].max(rate);
            strategies[k] = used;
            all_match &= tokens == reference;
        }
    }
    let base1 = b.batch_sizes.iter().position(|&s| s == 1).map(|k| best[k]);
    let rows: Vec<serde_json::Value> = b
        .batch_sizes
        .iter()
        .zip(&best)
        .zip(&strategies)
        .map(|((s, r), st)| {
            json!({"batch": s, "decode_tok_s": r, "x_batch1": base1.map(|b1| r / b1),
                   "x_sequential": r / best_seq, "strategy": st})
        })
        .collect();
    if b.json {
        let batched: serde_json::Map<String, serde_json::Value> = b
            .batch_sizes
            .iter()
            .zip(&best)
            .map(|(s, r)| (s.to_string(), json!(r)))
            .collect();
        println!(
            "{}",
            json!({"base": b.base.base, "requests": b.requests,
                   "adapters_per_request": b.adapters_per_request, "distinct_sets": b.distinct_sets,
                   "rank": b.rank, "max_tokens": b.max_tokens, "prompt_tokens": b.prompt_tokens,
                   "threads": threads(), "sequential_tok_s": best_seq, "batched": batched,
                   "rows": rows, "tokens_match_sequential": all_match})
        );
    } else {
        println!(
            "{} requests x {} rank-{} adapters ({} distinct sets), {} prompt + {} new tokens, threads {}, best of {}",
            b.requests,
            b.adapters_per_request,
            b.rank,
            b.distinct_sets,
            b.prompt_tokens,
            b.max_tokens,
            threads(),
            b.repeats.max(1)
        );
        println!(
            "{:<22} {:>14} {:>10} {:>12}  strategy",
            "run", "decode tok/s", "x batch 1", "x sequential"
        );
        println!(
            "{:<22} {:>14.1} {:>10} {:>12.2}",
            "sequential (generate)", best_seq, "", 1.0
        );
        for r in &rows {
            println!(
                "{:<22} {:>14.1} {:>10} {:>12.2}  {}",
                format!("engine, batch {}", r["batch"]),
                r["decode_tok_s"].as_f64().unwrap_or(0.0),
                r["x_batch1"]
                    .as_f64()
                    .map_or(String::new(), |x| format!("{x:.2}")),
                r["x_sequential"].as_f64().unwrap_or(0.0),
                r["strategy"].as_str().unwrap_or("")
            );
        }
        println!(
            "greedy tokens of every batched request equal the sequential run: {}",
            if all_match { "yes" } else { "NO" }
        );
    }
    Ok(())
}

fn threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all cores".into())
}

/// The requests one after another through `generate`: (decode tokens/s over all of them, the
/// token ids of each).
fn sequential(
    model: &Model,
    requests: &[Request],
    params: &GenerateParams,
) -> Result<(f64, Vec<Vec<u32>>)> {
    let (mut steps, mut secs) = (0f64, 0f64);
    let mut tokens = Vec::with_capacity(requests.len());
    for r in requests {
        let parts = r
            .adapters
            .iter()
            .map(|a| Ok((Arc::new(LoraAdapter::load(&a.dir, &model.decoder)?), a.gate)))
            .collect::<Result<Vec<_>>>()?;
        let delta = MixDelta::single(Some(Arc::new(CompiledMix::with_precision(
            Plan::Mixture,
            &parts,
            EngineConfig::default().precision,
        )?)));
        let g = generate(model, &r.prompt, params, &delta, &mut |_| {})?;
        steps += (g.generated_tokens - 1) as f64;
        secs += g.timings.decode_s;
        tokens.push(g.token_ids);
    }
    Ok((steps / secs, tokens))
}

/// The requests submitted together to an engine of `size` rows: (decode tokens/s over the
/// steps in which every row decoded, the token ids of each request, the strategies used).
fn batched(
    model: &Arc<Model>,
    requests: &[Request],
    params: &GenerateParams,
    size: usize,
    strategy: Option<Strategy>,
) -> Result<(f64, Vec<Vec<u32>>, String)> {
    let engine = Engine::start(
        model.clone(),
        EngineConfig {
            max_rows: size,
            queue: requests.len(),
            strategy,
            ..EngineConfig::default()
        },
    );
    // Warm the adapter cache so the figures measure decoding, not file reads.
    for r in requests.iter().take(size.min(requests.len())) {
        engine.run(
            Job {
                prompt: r.prompt[..1].to_vec(),
                params: GenerateParams {
                    max_tokens: 1,
                    ..params.clone()
                },
                mix: MixRequest {
                    plan: Plan::Mixture,
                    adapters: r.adapters.clone(),
                },
            },
            &mut |_| {},
        )?;
    }
    engine.reset_stats();
    let (tx, rx) = std::sync::mpsc::channel::<(usize, JobEvent)>();
    for (i, r) in requests.iter().enumerate() {
        let tx = tx.clone();
        engine.submit(
            Job {
                prompt: r.prompt.clone(),
                params: params.clone(),
                mix: MixRequest {
                    plan: Plan::Mixture,
                    adapters: r.adapters.clone(),
                },
            },
            Box::new(move |e| tx.send((i, e)).is_ok()),
        )?;
    }
    drop(tx);
    let mut done: Vec<Option<Generation>> = vec![None; requests.len()];
    for (i, e) in rx {
        match e {
            JobEvent::Done(f) => done[i] = Some(f.generation),
            JobEvent::Failed(e) => bail!("request {i}: {e}"),
            JobEvent::Started | JobEvent::Text(_) => {}
        }
    }
    let stats = engine.stats();
    let tokens = done
        .into_iter()
        .map(|g| g.map(|g| g.token_ids).unwrap_or_default())
        .collect();
    let used = match (stats.gather_steps, stats.union_steps) {
        (_, 0) => "gather".to_string(),
        (0, _) => "union".to_string(),
        (g, u) => format!("gather {g} / union {u} steps"),
    };
    Ok((stats.decode_tokens as f64 / stats.decode_s, tokens, used))
}
