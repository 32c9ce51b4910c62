//! `ramole bench retrieval`: one retrieval (embed the query + search + resolve in the catalog)
//! over N synthetic adapters in a temporary library, and adding real adapters with 20 samples.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use ramole_core::catalog::{
    AdapterSource, Compat, Embedding, NewAdapter, Sample, SampleOrigin, Verdict,
};
use ramole_core::config::{self, Settings};
use ramole_core::library::{self, Library};
use ramole_core::model::{LoadOptions, Model};
use ramole_core::vocab::{Gating, TopK};
use ramole_testkit::write_random_peft;
use rand::{Rng, SeedableRng};
use serde_json::json;

#[derive(Args)]
pub(crate) struct RetrievalBench {
    /// Synthetic adapters in the catalog and index.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) adapters: usize,
    /// Queries timed.
    #[arg(long, default_value_t = 200)]
    pub(crate) queries: usize,
    /// Real adapters added (timed) on top of the synthetic ones.
    #[arg(long, default_value_t = 5)]
    pub(crate) adds: usize,
    /// Query texts (repeatable; default: generated one-sentence requests).
    #[arg(long = "query")]
    pub(crate) query_texts: Vec<String>,
    /// Base model (default: the library's, else the test SmolLM2).
    #[arg(long)]
    pub(crate) base: Option<std::path::PathBuf>,
    /// Sentence encoder (default: the library's, else the test MiniLM).
    #[arg(long)]
    pub(crate) embedder: Option<std::path::PathBuf>,
    #[arg(long)]
    pub(crate) json: bool,
}

const TOPICS: &[&str] = &[
    "translate this sentence into French",
    "is the sentiment of this review positive or negative",
    "answer the question about the passage",
    "summarize the article in one sentence",
    "does the premise entail the hypothesis",
    "write a short poem about the sea",
    "solve this arithmetic word problem",
    "generate a description of the restaurant from its attributes",
];

fn query(i: usize) -> String {
    let subjects = [
        "the movie",
        "my grandmother",
        "a small startup",
        "the old bridge",
        "this recipe",
    ];
    format!(
        "Please {} — it is about {} (request {i}).",
        TOPICS[i % TOPICS.len()],
        subjects[(i / TOPICS.len()) % subjects.len()]
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

pub(crate) fn run(b: RetrievalBench) -> Result<()> {
    if b.adapters == 0 || b.queries == 0 {
        anyhow::bail!("--adapters and --queries must be at least 1");
    }
    let settings = Settings::load(&config::data_dir()).ok();
    let base = b
        .base
        .clone()
        .or_else(|| settings.as_ref().map(|s| s.base_path.clone()))
        .unwrap_or_else(config::starter_base);
    let embedder = b
        .embedder
        .clone()
        .or_else(|| settings.as_ref().map(|s| s.embedder_path.clone()))
        .unwrap_or_else(config::starter_embedder);
    let dir: PathBuf =
        std::env::temp_dir().join(format!("ramole-bench-retrieval-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    library::init(&dir, &base, &embedder, None, None)?;
    let mut lib = Library::open(&dir)?;
    let dims = lib.index().spec().dims;
    let base_id = lib.settings().base_id.clone();

    // Synthetic adapters: each profile the mean of 20 noisy unit vectors around a random topic.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let unit = |rng: &mut rand::rngs::StdRng| -> Vec<f32> {
        let v: Vec<f32> = (0..dims).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        ramole_core::index::normalized(&v)
    };
    let t0 = Instant::now();
    let mut items = Vec::with_capacity(b.adapters);
    for i in 0..b.adapters {
        let center = unit(&mut rng);
        let samples: Vec<Vec<f32>> = (0..20)
            .map(|_| {
                let n = unit(&mut rng);
                let v: Vec<f32> = center.iter().zip(&n).map(|(c, e)| c + 0.5 * e).collect();
                ramole_core::index::normalized(&v)
            })
            .collect();
        items.push((
            NewAdapter {
                id: format!("synthetic-{i}"),
                name: format!("synthetic {i}"),
                source: AdapterSource::Local {
                    path: PathBuf::from(format!("/synthetic/{i}")),
                },
                base_model: None,
                architecture: "llama".into(),
                ranks: vec![8],
                alpha: 16.0,
                target_modules: vec!["q_proj".into(), "v_proj".into()],
                size_bytes: 0,
                license: None,
                card_summary: None,
                verdict: Verdict {
                    compat: Compat::Compatible,
                    reason: String::new(),
                    base: base_id.clone(),
                },
            },
            vec![Sample {
                text: format!("synthetic sample {i}"),
                origin: SampleOrigin::Probe,
            }],
            Some(Embedding {
                embedder: lib.embedder_id().to_string(),
                samples: 20,
                vector: ramole_core::retrieve::mean(&samples),
            }),
        ));
    }
    lib.import_records(&items)?;
    let fill_s = t0.elapsed().as_secs_f64();
    drop(items);

    // Queries: embed + search + resolve, as `ramole retrieve` does; also the two parts apart.
    let embed = lib.embedder()?;
    let query = |i: usize| -> String {
        if b.query_texts.is_empty() {
            query(i)
        } else {
            b.query_texts[i % b.query_texts.len()].clone()
        }
    };
    let mut query_tokens = 0usize;
    for i in 0..5 {
        lib.retrieve(&query(i), TopK::DEFAULT, &[], Gating::Uniform)?;
    }
    let mut total = Vec::with_capacity(b.queries);
    let mut embed_ms = Vec::with_capacity(b.queries);
    let mut search_ms = Vec::with_capacity(b.queries);
    for i in 0..b.queries {
        let q = query(i + 5);
        query_tokens += embed.tokens(&q)?.len();
        let t = Instant::now();
        let hits = lib.retrieve(&q, TopK::DEFAULT, &[], Gating::Uniform)?;
        total.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            hits.len() == 3,
            "retrieval returned {} adapters",
            hits.len()
        );
        let t = Instant::now();
        let v = embed.embed(&[q.as_str()])?.pop().expect("one vector");
        embed_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        lib.index().search(&v, 3, &|_| false)?;
        search_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    for v in [&mut total, &mut embed_ms, &mut search_ms] {
        v.sort_by(f64::total_cmp);
    }

    // Real adds: a random rank-8 all-linear adapter with 20 samples each, through the install path.
    let mut add_ms = Vec::new();
    if b.adds > 0 {
        let model = Model::load(&base, &LoadOptions::default())
            .with_context(|| format!("loading {}", base.display()))?;
        for j in 0..b.adds {
            let src = dir.join(format!("src-{j}"));
            write_random_peft(&src, &model.decoder, 8, 16.0, j as u64)?;
            let lines: String = (0..20)
                .map(|s| format!("{}\n", json!({"input": query(j * 20 + s)})))
                .collect();
            let samples = src.join("samples.jsonl");
            std::fs::write(&samples, lines)?;
            let t = Instant::now();
            lib.add_local(&src, Some(&samples), Some(&format!("bench add {j}")))?;
            add_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        add_ms.sort_by(f64::total_cmp);
    }

    let v = json!({
        "adapters": b.adapters,
        "queries": b.queries,
        "query_tokens_mean": query_tokens as f64 / b.queries as f64,
        "p50_ms": percentile(&total, 0.5),
        "p95_ms": percentile(&total, 0.95),
        "embed_p50_ms": percentile(&embed_ms, 0.5),
        "search_p50_ms": percentile(&search_ms, 0.5),
        "search_p95_ms": percentile(&search_ms, 0.95),
        "add_p50_ms": percentile(&add_ms, 0.5),
        "add_max_ms": add_ms.last().copied(),
        "fill_s": fill_s,
    });
    if b.json {
        println!("{v}");
    } else {
        println!(
            "retrieval over {} adapters, {} queries of {:.1} tokens on average",
            b.adapters,
            b.queries,
            query_tokens as f64 / b.queries as f64
        );
        println!(
            "  one retrieval   p50 {:.2} ms   p95 {:.2} ms",
            v["p50_ms"].as_f64().unwrap_or(f64::NAN),
            v["p95_ms"].as_f64().unwrap_or(f64::NAN)
        );
        println!(
            "  embed query     p50 {:.2} ms;  index search p50 {:.3} ms",
            v["embed_p50_ms"].as_f64().unwrap_or(f64::NAN),
            v["search_p50_ms"].as_f64().unwrap_or(f64::NAN)
        );
        if !add_ms.is_empty() {
            println!(
                "  add one adapter (20 samples)  p50 {:.0} ms   max {:.0} ms",
                percentile(&add_ms, 0.5),
                add_ms.last().copied().unwrap_or(f64::NAN)
            );
        }
        println!("  (filling the catalog and index took {fill_s:.1} s)");
    }
    Ok(())
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
