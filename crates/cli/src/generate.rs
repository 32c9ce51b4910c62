//! `ramole generate` and `ramole logits`: a model file and adapter folders given on the command
//! line, no library: the decoder and the plans checked directly (and against oracles).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use ramole_core::adapter::LoraAdapter;
use ramole_core::model::{ChatMessage, LogitsAt, Model, RowInput, generate};
use ramole_core::mole::{CompiledMix, MixDelta, Precision};
use ramole_core::vocab::{Plan, Role};
use serde_json::json;

use crate::common::{BaseArgs, ReplyOut, SamplingArgs};

/// LoRA adapters applied to the request and how they are combined (DESIGN.md 3a).
#[derive(Args)]
pub(crate) struct AdapterArgs {
    /// A PEFT adapter folder, optionally with its gate: `dir=0.3` (repeatable; no gate = 1.0).
    #[arg(long = "adapter", value_name = "DIR[=GATE]")]
    adapters: Vec<String>,
    /// none | selection | mixture | fusion (default: mixture with adapters, none without).
    #[arg(long)]
    plan: Option<String>,
    /// How the per-request mixture holds its factors: f32 (exact), bf16 (half the bytes per
    /// decode step; the math stays f32) or int8 (a quarter; `A x` in the quantized base
    /// kernel's pass, as the engine runs it).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "int8"])]
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
        let precision: Precision = self.lora_precision.parse()?;
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
pub(crate) struct GenerateArgs {
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

#[derive(Args)]
pub(crate) struct LogitsArgs {
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

pub(crate) fn run_generate(a: GenerateArgs) -> Result<()> {
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
            messages.push(ChatMessage::new(Role::System, s));
        }
        messages.push(ChatMessage::new(Role::User, &a.prompt));
        model.chat_prompt(&messages)?
    } else {
        model.tokenizer.encode(&a.prompt)?
    };
    let params = a.sampling.params(a.stop.clone());
    let mut out = ReplyOut::new(a.json);
    let g = generate(&model, &prompt_ids, &params, &delta, &mut |piece: &str| {
        out.text(piece)
    })?;
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

pub(crate) fn run_logits(a: LogitsArgs) -> Result<()> {
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
