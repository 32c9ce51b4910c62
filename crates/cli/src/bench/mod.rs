//! `ramole bench ...`: throughput figures measured side by side in one run: `model` and `lora`
//! here, `batch`, `chat` and `retrieval` in their own files.

mod batch;
mod chat;
mod retrieval;

use std::time::Instant;

use anyhow::Result;
use clap::{Args, Subcommand};
use std::sync::Arc;

use ramole_core::adapter::LoraAdapter;
use ramole_core::model::{
    Decoder, LoadOptions, LogitsAt, Model, NoDelta, QuantKernel, QuantLayout, RowInput, SiteDelta,
};
use ramole_core::mole::{CompiledMix, MixDelta, Precision};
use ramole_core::vocab::Plan;
use ramole_testkit::write_random_peft;
use serde_json::json;

use crate::common::BaseArgs;

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
    /// Prefill and decode tokens/s of one model, batch 1. For a GGUF with Q4_1/Q5_x tensors both
    /// the stored form and the Q8_0 re-quantization are measured, side by side.
    Model(ModelBench),
    /// Decode slowdown of a gated mixture of seeded random all-linear adapters against the base,
    /// measured interleaved in one run. The adapters are written to --out (PEFT format) so other
    /// engines can run the same ones.
    Lora(LoraBench),
    /// Latency of one retrieval (embed the query + search) over N synthetic adapters in a
    /// temporary library, and of adding one adapter with 20 samples.
    Retrieval(retrieval::RetrievalBench),
    /// Aggregate decode tokens/s of concurrent requests with different adapter sets: one after
    /// another, and batched by the engine at several batch sizes, side by side.
    Batch(batch::BatchBench),
    /// Time to first token of each turn of a growing chat, with the engine's prefix cache and
    /// without it, side by side.
    Chat(chat::ChatBench),
}

#[derive(Args)]
pub(crate) struct LoraBench {
    #[command(flatten)]
    base: BaseArgs,
    #[arg(long, default_value_t = 3)]
    adapters: usize,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Where the adapters are written (default: a folder under the system temp dir).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct ModelBench {
    #[command(flatten)]
    base: BaseArgs,
    /// Tokens of the prefill measurement.
    #[arg(long, default_value_t = 256)]
    prompt_tokens: usize,
    /// Greedy decode steps after a 32-token prompt.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Runs per figure; the best is reported (the machines are noisy).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Batch sizes of the batched-decode table (rows x 1 token per forward after a 32-token
    /// prompt per row), each with our quantized kernel and candle's side by side; empty skips it.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    batches: Vec<usize>,
    /// Forwards timed per batched-decode figure.
    #[arg(long, default_value_t = 16)]
    batch_steps: usize,
    /// Also measure the other weight layouts (candle's kernels as stored, and with the slow
    /// types re-quantized to Q8_0) after the chosen one.
    #[arg(long)]
    compare_layouts: bool,
    #[arg(long)]
    json: bool,
}

/// The quantized-matmul kernels the batched-decode table compares.
const KERNELS: [(&str, QuantKernel); 2] =
    [("ours", QuantKernel::Auto), ("candle", QuantKernel::Candle)];

pub(crate) fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Model(b) => model_bench(b),
        BenchCommand::Lora(b) => lora_bench(b),
        BenchCommand::Retrieval(b) => retrieval::run(b),
        BenchCommand::Batch(b) => batch::run(b),
        BenchCommand::Chat(b) => chat::run(b),
    }
}

fn synthetic_ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919) % (vocab - 200) + 100) as u32)
        .collect()
}

fn model_bench(b: ModelBench) -> Result<()> {
    let chosen: QuantLayout = b.base.quant_layout.into();
    let mut variants = vec![chosen];
    if b.compare_layouts {
        for l in [
            QuantLayout::Packed,
            QuantLayout::Stored,
            QuantLayout::SlowTypesAsQ8_0,
        ] {
            if l.effective(&ramole_core::device::compute())
                != chosen.effective(&ramole_core::device::compute())
                && !variants.contains(&l)
            {
                variants.push(l);
            }
        }
    }
    let isa = ramole_core::model::kernel_set();
    let mut results = Vec::new();
    for layout in variants {
        let name = match layout.effective(&ramole_core::device::compute()) {
            QuantLayout::Packed => format!("packed ({isa} int8)"),
            QuantLayout::Stored => "candle as stored".to_string(),
            QuantLayout::SlowTypesAsQ8_0 => "candle, slow types q8_0".to_string(),
        };
        let t = Instant::now();
        let model = Model::load(
            &b.base.base,
            &LoadOptions {
                layout,
                ..LoadOptions::default()
            },
        )?;
        let load_s = t.elapsed().as_secs_f64();
        let d = &model.decoder;
        let vocab = d.config().vocab_size;
        let prompt = synthetic_ids(b.prompt_tokens, vocab);
        let short = synthetic_ids(32, vocab);
        let mut best_prefill = 0f64;
        let mut best_decode = 0f64;
        // One warm-up run, then the measured ones.
        for rep in 0..=b.repeats {
            let mut cache = d.new_cache();
            let t = Instant::now();
            d.forward(
                &[RowInput { tokens: &prompt }],
                &mut [&mut cache],
                LogitsAt::Last,
                &NoDelta,
            )?;
            let prefill = prompt.len() as f64 / t.elapsed().as_secs_f64();
            let mut cache = d.new_cache();
            let logits = d.forward(
                &[RowInput { tokens: &short }],
                &mut [&mut cache],
                LogitsAt::Last,
                &NoDelta,
            )?;
            let mut next = argmax(&logits.squeeze(0)?.to_vec1()?);
            let t = Instant::now();
            for _ in 0..b.decode_tokens {
                let l = d.forward(
                    &[RowInput { tokens: &[next] }],
                    &mut [&mut cache],
                    LogitsAt::Last,
                    &NoDelta,
                )?;
                next = argmax(&l.squeeze(0)?.to_vec1()?);
            }
            let decode = b.decode_tokens as f64 / t.elapsed().as_secs_f64();
            if rep > 0 {
                best_prefill = best_prefill.max(prefill);
                best_decode = best_decode.max(decode);
            }
        }
        let batched = batch_table(d, &b)?;
        results.push(json!({
            "variant": name,
            "weight_mb": d.weight_bytes() as f64 / 1e6,
            "load_s": load_s,
            "prefill_tok_s": best_prefill,
            "decode_tok_s": best_decode,
            "batch_decode": batched,
        }));
    }
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all cores".into());
    if b.json {
        println!(
            "{}",
            json!({"base": b.base.base, "prompt_tokens": b.prompt_tokens, "decode_tokens": b.decode_tokens,
                   "threads": threads, "kernel_set": isa, "results": results})
        );
    } else {
        println!(
            "{} | prefill {} tokens, decode {} tokens, threads {threads}, kernel set {isa}, best of {}",
            b.base.base.display(),
            b.prompt_tokens,
            b.decode_tokens,
            b.repeats
        );
        println!(
            "{:<22} {:>10} {:>14} {:>14}",
            "variant", "weights MB", "prefill tok/s", "decode tok/s"
        );
        for r in &results {
            println!(
                "{:<22} {:>10.1} {:>14.1} {:>14.1}",
                r["variant"].as_str().unwrap_or(""),
                r["weight_mb"].as_f64().unwrap_or(0.0),
                r["prefill_tok_s"].as_f64().unwrap_or(0.0),
                r["decode_tok_s"].as_f64().unwrap_or(0.0)
            );
        }
        for r in &results {
            let Some(rows) = r["batch_decode"].as_array().filter(|a| !a.is_empty()) else {
                continue;
            };
            println!(
                "\nbatched decode, {}: aggregate tok/s (batch x 1 token per forward, {} forwards, best of {})",
                r["variant"].as_str().unwrap_or(""),
                b.batch_steps,
                b.repeats
            );
            println!(
                "{:>5} {:>10} {:>10} {:>12} {:>12} {:>11}",
                "batch", "ours", "candle", "ours/candle", "ours vs b=1", "ms/forward"
            );
            for row in rows {
                let f = |k: &str| row[k].as_f64().unwrap_or(0.0);
                println!(
                    "{:>5} {:>10.1} {:>10.1} {:>11.2}x {:>11.2}x {:>11.1}",
                    row["batch"].as_u64().unwrap_or(0),
                    f("ours_tok_s"),
                    f("candle_tok_s"),
                    f("ours_tok_s") / f("candle_tok_s"),
                    f("ours_vs_batch1"),
                    f("ours_ms_per_forward")
                );
            }
        }
    }
    Ok(())
}

/// Aggregate decode tokens/s for each batch size of `b.batches`, our kernel and candle's,
/// interleaved in every repeat so both see the same machine conditions (best of the repeats).
fn batch_table(d: &Decoder, b: &ModelBench) -> Result<Vec<serde_json::Value>> {
    if b.batches.is_empty() {
        return Ok(Vec::new());
    }
    let decoders = KERNELS
        .iter()
        .map(|(_, k)| d.with_quant_kernel(*k))
        .collect::<Result<Vec<_>, _>>()?;
    let vocab = d.config().vocab_size;
    let mut best = vec![[0f64; KERNELS.len()]; b.batches.len()];
    for rep in 0..=b.repeats {
        for (bi, &batch) in b.batches.iter().enumerate() {
            for (ki, dk) in decoders.iter().enumerate() {
                let r = batch_decode_rate(dk, batch, b.batch_steps, vocab)?;
                if rep > 0 {
                    best[bi][ki] = best[bi][ki].max(r);
                }
            }
        }
    }
    let base = best[0][0] / b.batches[0] as f64;
    Ok(b.batches
        .iter()
        .zip(&best)
        .map(|(&batch, r)| {
            json!({
                "batch": batch,
                "ours_tok_s": r[0],
                "candle_tok_s": r[1],
                "ours_ms_per_forward": 1e3 * batch as f64 / r[0],
                "candle_ms_per_forward": 1e3 * batch as f64 / r[1],
                // Relative to the first batch size's per-row rate (batch 1 by default).
                "ours_vs_batch1": r[0] / base,
            })
        })
        .collect())
}

/// `batch` rows each prefilled with its own 32-token prompt, then `steps` forwards of
/// `batch` x 1 greedy token; returns the aggregate new tokens per second.
fn batch_decode_rate(d: &Decoder, batch: usize, steps: usize, vocab: usize) -> Result<f64> {
    let all = synthetic_ids(32 * batch, vocab);
    let prompts: Vec<&[u32]> = all.chunks(32).collect();
    let mut caches: Vec<_> = (0..batch).map(|_| d.new_cache()).collect();
    let rows: Vec<RowInput> = prompts.iter().map(|p| RowInput { tokens: p }).collect();
    let mut refs: Vec<&mut _> = caches.iter_mut().collect();
    let logits = d.forward(&rows, &mut refs, LogitsAt::Last, &NoDelta)?;
    let mut next: Vec<[u32; 1]> = logits
        .to_vec2::<f32>()?
        .iter()
        .map(|l| [argmax(l)])
        .collect();
    let t = Instant::now();
    for _ in 0..steps {
        let rows: Vec<RowInput> = next.iter().map(|t| RowInput { tokens: t }).collect();
        let mut refs: Vec<&mut _> = caches.iter_mut().collect();
        let logits = d.forward(&rows, &mut refs, LogitsAt::Last, &NoDelta)?;
        next = logits
            .to_vec2::<f32>()?
            .iter()
            .map(|l| [argmax(l)])
            .collect();
    }
    Ok((batch * steps) as f64 / t.elapsed().as_secs_f64())
}

/// Greedy decode steps per second after prefilling `prompt`.
fn decode_rate(d: &Decoder, prompt: &[u32], steps: usize, delta: &dyn SiteDelta) -> Result<f64> {
    let mut cache = d.new_cache();
    let logits = d.forward(
        &[RowInput { tokens: prompt }],
        &mut [&mut cache],
        LogitsAt::Last,
        delta,
    )?;
    let mut next = argmax(&logits.squeeze(0)?.to_vec1()?);
    let t = Instant::now();
    for _ in 0..steps {
        let l = d.forward(
            &[RowInput { tokens: &[next] }],
            &mut [&mut cache],
            LogitsAt::Last,
            delta,
        )?;
        next = argmax(&l.squeeze(0)?.to_vec1()?);
    }
    Ok(steps as f64 / t.elapsed().as_secs_f64())
}

fn lora_bench(b: LoraBench) -> Result<()> {
    if b.adapters == 0 || b.rank == 0 {
        anyhow::bail!("--adapters and --rank must be at least 1");
    }
    let model = b.base.load()?;
    let d = &model.decoder;
    let out = b
        .out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("ramole-bench-lora"));
    let mut loaded = Vec::new();
    for i in 0..b.adapters {
        let dir = out.join(format!("adapter-{i}"));
        write_random_peft(&dir, d, b.rank, 2.0 * b.rank as f64, 1000 + i as u64)?;
        loaded.push((
            Arc::new(LoraAdapter::load(&dir, d)?),
            1.0 / b.adapters as f32,
        ));
    }
    let adapter_mb = loaded.iter().map(|(a, _)| a.bytes()).sum::<usize>() as f64 / 1e6;
    let compile = |p: Precision| -> Result<MixDelta> {
        let mix = CompiledMix::with_precision(Plan::Mixture, &loaded, p)?;
        Ok(MixDelta::single(Some(Arc::new(mix))))
    };
    let (f32_mix, bf16_mix, int8_mix) = (
        compile(Precision::F32)?,
        compile(Precision::Bf16)?,
        compile(Precision::Int8)?,
    );
    let reference = f32_mix.reference();
    let variants: [(&str, &dyn SiteDelta); 5] = [
        ("base (no adapter)", &NoDelta),
        ("mixture, int8 factors", &int8_mix),
        ("mixture, bf16 factors", &bf16_mix),
        ("mixture, f32 factors", &f32_mix),
        ("mixture, f32 via GEMM", &reference),
    ];
    let prompt = synthetic_ids(32, d.config().vocab_size);
    let mut best = [0f64; 5];
    // Interleaved, best of N: every variant sees the same machine conditions.
    for rep in 0..=b.repeats {
        for (i, (_, delta)) in variants.iter().enumerate() {
            let r = decode_rate(d, &prompt, b.decode_tokens, *delta)?;
            if rep > 0 {
                best[i] = best[i].max(r);
            }
        }
    }
    let rows: Vec<_> = variants
        .iter()
        .zip(best)
        .map(|((name, _), r)| {
            json!({"variant": name, "decode_tok_s": r, "slowdown": 1.0 - r / best[0]})
        })
        .collect();
    if b.json {
        println!(
            "{}",
            json!({"base": b.base.base, "adapters": b.adapters, "rank": b.rank, "adapter_dir": out,
                   "adapter_mb_f32": adapter_mb, "results": rows})
        );
    } else {
        println!(
            "{} adapters of rank {} (all-linear, {:.1} MB in f32), gates 1/{}, in {}",
            b.adapters,
            b.rank,
            adapter_mb,
            b.adapters,
            out.display()
        );
        for r in &rows {
            println!(
                "{:<24} {:>8.1} tok/s  {:>6.1}% slower",
                r["variant"].as_str().unwrap_or(""),
                r["decode_tok_s"].as_f64().unwrap_or(0.0),
                r["slowdown"].as_f64().unwrap_or(0.0) * 100.0
            );
        }
    }
    Ok(())
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}
