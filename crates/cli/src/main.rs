//! The `ramole` command line: a thin layer of argument parsing and printing over ramole-core.
//! Errors go to stderr with a non-zero exit status; `--json` prints exactly one JSON object.

mod batch_bench;
mod bench;
mod hub;
mod library;
mod retrieval_bench;
mod retriever;
mod router;
mod tasks_eval;
mod train;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use ramole_core::adapter::LoraAdapter;
use ramole_core::model::{
    ChatMessage, GenerateParams, LoadOptions, LogitsAt, Model, Requantize, RowInput, Sampling,
    generate,
};
use ramole_core::mole::{CompiledMix, MixDelta, Plan, Precision};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "ramole",
    version,
    about = "Chat with a local model that mixes LoRA experts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation (or, with --chat, an assistant reply).
    Generate(GenerateArgs),
    /// Print the next-token logits after a prompt.
    Logits(LogitsArgs),
    /// Record the active base model and embedder in $RAMOLE_HOME.
    Init(library::InitArgs),
    /// Installed adapters: add, list, show, enable, disable, remove.
    #[command(subcommand)]
    Adapter(library::AdapterCommand),
    /// The Hugging Face Hub: search adapters for a base, inspect a repository.
    #[command(subcommand)]
    Hub(hub::HubCommand),
    /// Base models and embedders from the Hub.
    #[command(subcommand)]
    Model(hub::ModelCommand),
    /// The adapters retrieval picks for a message, with scores and gates.
    Retrieve(library::RetrieveArgs),
    /// Answer a message with retrieved adapters and store the exchange with its provenance.
    Chat(library::ChatArgs),
    /// A local OpenAI-compatible API (chat completions, models) over the library's base.
    Serve(library::ServeArgs),
    /// Stored chat sessions and the provenance of their replies.
    #[command(subcommand)]
    Session(library::SessionCommand),
    /// The RouterLoRA of the active base: train, add, show, remove.
    #[command(subcommand)]
    Router(router::RouterCommand),
    /// Fine-tune the retriever's sentence encoder (contrastive, on tasks' profile samples).
    #[command(subcommand)]
    Retriever(retriever::RetrieverCommand),
    /// The active sentence encoder: switch it (adapters re-embedded, index rebuilt).
    #[command(subcommand)]
    Embedder(retriever::EmbedderCommand),
    /// Evaluations on the paper's benchmark data.
    #[command(subcommand)]
    Eval(library::EvalCommand),
    /// Benchmarks, printed as a table or JSON.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Args, Clone)]
pub(crate) struct BaseArgs {
    /// A Hugging Face model folder or a .gguf file.
    #[arg(long)]
    base: PathBuf,
    /// Keep Q4_1/Q5_0/Q5_1 GGUF tensors as stored instead of re-quantizing them to Q8_0 at load
    /// (candle has no SIMD kernel for them: slower, less memory).
    #[arg(long)]
    keep_quant: bool,
}

impl BaseArgs {
    pub(crate) fn load(&self) -> Result<Model> {
        let opts = LoadOptions {
            requantize: if self.keep_quant {
                Requantize::Never
            } else {
                Requantize::SlowTypes
            },
            ..LoadOptions::default()
        };
        Model::load(&self.base, &opts).with_context(|| format!("loading {}", self.base.display()))
    }
}

/// LoRA adapters applied to the request and how they are combined (DESIGN.md 3a).
#[derive(Args)]
struct AdapterArgs {
    /// A PEFT adapter folder, optionally with its gate: `dir=0.3` (repeatable; no gate = 1.0).
    #[arg(long = "adapter", value_name = "DIR[=GATE]")]
    adapters: Vec<String>,
    /// none | selection | mixture | fusion (default: mixture with adapters, none without).
    #[arg(long)]
    plan: Option<String>,
    /// How the per-request mixture holds its factors: f32 (exact) or bf16 (half the bytes per
    /// decode step; the math stays f32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    lora_precision: String,
}

impl AdapterArgs {
    /// Loads the adapters against `model` and compiles the plan for one row.
    fn compile(&self, model: &Model) -> Result<(Plan, MixDelta, Vec<serde_json::Value>)> {
        let plan: Plan = match &self.plan {
            Some(p) => p.parse()?,
            None if self.adapters.is_empty() => Plan::None,
            None => Plan::Mixture,
        };
        if plan != Plan::None && self.adapters.is_empty() {
            bail!("--plan {plan} needs at least one --adapter");
        }
        let mut loaded = Vec::new();
        let mut listed = Vec::new();
        for spec in &self.adapters {
            let (dir, gate) = parse_adapter_spec(spec)?;
            let adapter = LoraAdapter::load(Path::new(dir), &model.decoder)
                .with_context(|| format!("loading adapter {dir}"))?;
            let (attached, total) = adapter.coverage();
            listed.push(json!({
                "name": adapter.name, "path": dir, "gate": gate,
                "ranks": adapter.ranks(), "coverage": {"attached": attached, "linears": total},
            }));
            loaded.push((Arc::new(adapter), gate));
        }
        let precision = match self.lora_precision.as_str() {
            "bf16" => Precision::Bf16,
            _ => Precision::F32,
        };
        let mix = CompiledMix::with_precision(plan, &loaded, precision)?;
        if plan == Plan::None {
            listed.clear();
        }
        Ok((plan, MixDelta::new(vec![Some(Arc::new(mix))]), listed))
    }
}

/// `dir` or `dir=gate`; a suffix after `=` that is not a number belongs to the path.
fn parse_adapter_spec(spec: &str) -> Result<(&str, f32)> {
    if let Some((dir, gate)) = spec.rsplit_once('=')
        && let Ok(g) = gate.trim().parse::<f32>()
    {
        if dir.is_empty() {
            bail!("--adapter {spec:?} names no folder");
        }
        return Ok((dir, g));
    }
    Ok((spec, 1.0))
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    base: BaseArgs,
    #[command(flatten)]
    lora: AdapterArgs,
    /// The prompt (with --chat: the user message).
    #[arg(long)]
    prompt: String,
    /// Render the prompt as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Stop before this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

/// Generation settings shared by `generate` and `chat`.
#[derive(Args)]
pub(crate) struct SamplingArgs {
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = no limit.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    pub(crate) fn params(&self, stop: Vec<String>) -> GenerateParams {
        GenerateParams {
            max_tokens: self.max_tokens,
            sampling: Sampling {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                seed: self.seed,
            },
            stop,
            ignore_eos: false,
        }
    }
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    base: BaseArgs,
    #[command(flatten)]
    lora: AdapterArgs,
    #[arg(long)]
    prompt: String,
    /// How many of the largest logits to print.
    #[arg(long, default_value_t = 10)]
    top: usize,
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    // SAFETY: first statement of main; no other thread exists yet.
    unsafe { ramole_core::config::pin_thread_count() };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => run_generate(a),
        Command::Logits(a) => run_logits(a),
        Command::Init(a) => library::run_init(a),
        Command::Adapter(c) => library::run_adapter(c),
        Command::Hub(c) => hub::run_hub(c),
        Command::Model(c) => hub::run_model(c),
        Command::Retrieve(a) => library::run_retrieve(a),
        Command::Chat(a) => library::run_chat(a),
        Command::Serve(a) => library::run_serve(a),
        Command::Session(c) => library::run_session(c),
        Command::Router(c) => router::run_router(c),
        Command::Retriever(c) => retriever::run_retriever(c),
        Command::Embedder(c) => retriever::run_embedder(c),
        Command::Eval(c) => library::run_eval(c),
        Command::Bench(b) => bench::run(b),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by `: `, skipping a cause whose text the message before it
/// already includes (our errors print their source inline).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

const MAX_PROMPT_BYTES: usize = 1 << 20;

fn check_prompt(prompt: &str) -> Result<()> {
    if prompt.len() > MAX_PROMPT_BYTES {
        bail!(
            "--prompt is {} bytes; the limit is {MAX_PROMPT_BYTES}",
            prompt.len()
        );
    }
    Ok(())
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    check_prompt(&a.prompt)?;
    if a.sampling.max_tokens == 0 || a.sampling.max_tokens > 1 << 20 {
        bail!(
            "--max-tokens {} must be between 1 and 1048576",
            a.sampling.max_tokens
        );
    }
    let model = a.base.load()?;
    let (plan, delta, adapters) = a.lora.compile(&model)?;
    let prompt_ids = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage::new("system", s));
        }
        messages.push(ChatMessage::new("user", &a.prompt));
        model.chat_prompt(&messages)?
    } else {
        model.tokenizer.encode(&a.prompt)?
    };
    let params = a.sampling.params(a.stop.clone());
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let stream = !a.json;
    let mut on_text = |piece: &str| {
        if stream {
            // A closed pipe must not kill generation with a panic; the result is still returned.
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    };
    let g = generate(&model, &prompt_ids, &params, &delta, &mut on_text)?;
    if a.json {
        let v = json!({
            "text": g.text,
            "tokens": {"prompt": g.prompt_tokens, "generated": g.generated_tokens},
            "finish_reason": g.finish_reason,
            "plan": plan,
            "adapters": adapters,
            "timings": g.timings,
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(out)?;
        eprintln!(
            "[{} prompt tokens, {} generated, {:?}; prefill {:.1} tok/s, decode {:.1} tok/s]",
            g.prompt_tokens,
            g.generated_tokens,
            g.finish_reason,
            g.timings.prefill_tok_s,
            g.timings.decode_tok_s
        );
    }
    Ok(())
}

fn run_logits(a: LogitsArgs) -> Result<()> {
    check_prompt(&a.prompt)?;
    let model = a.base.load()?;
    let (_, delta, _) = a.lora.compile(&model)?;
    let ids = model.tokenizer.encode(&a.prompt)?;
    if ids.is_empty() {
        bail!("--prompt {:?} has no tokens", a.prompt);
    }
    let mut cache = model.decoder.new_cache();
    let logits = model.decoder.forward(
        &[RowInput { tokens: &ids }],
        &mut [&mut cache],
        LogitsAt::Last,
        &delta,
    )?;
    let logits: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]).then(x.cmp(&y)));
    order.truncate(a.top);
    let top: Vec<_> = order
        .iter()
        .map(|&i| {
            json!({"id": i, "token": model.tokenizer.token_text(i as u32), "logit": logits[i]})
        })
        .collect();
    if a.json {
        println!("{}", json!({"prompt_ids": ids, "top": top}));
    } else {
        for t in &top {
            println!(
                "{:>8} {:>12.5} {:?}",
                t["id"],
                t["logit"].as_f64().unwrap_or(f64::NAN),
                t["token"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}
