//! `ramole bench chat`: time to first token of every turn of a chat whose history grows to
//! about `--turns × (--message-tokens + --reply-tokens)` tokens, through the engine with the
//! prefix cache and without it, side by side (the same greedy replies both ways).

use std::sync::Arc;

use anyhow::{Result, bail};
use clap::Args;
use serde_json::json;

use ramole_core::engine::{Engine, EngineConfig, Job, MixRequest};
use ramole_core::model::{ChatMessage, GenerateParams};
use ramole_core::vocab::{Plan, Role};

use crate::common::BaseArgs;

#[derive(Args)]
pub(crate) struct ChatBench {
    #[command(flatten)]
    base: BaseArgs,
    #[arg(long, default_value_t = 5)]
    turns: usize,
    /// Tokens of each user message (about; built from whole sentences).
    #[arg(long, default_value_t = 150)]
    message_tokens: usize,
    /// Greedy reply tokens per turn (at most).
    #[arg(long, default_value_t = 48)]
    reply_tokens: usize,
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    #[arg(long)]
    json: bool,
}

const SENTENCES: [&str; 8] = [
    "The river bends twice before it reaches the old mill at the edge of town.",
    "Our team measured the water level every morning for three weeks in a row.",
    "Each reading went into a notebook that we later copied into a spreadsheet.",
    "Heavy rain in the hills raised the level by almost a metre in one night.",
    "The mill's wheel has not turned since the factory closed forty years ago.",
    "Children still fish from the bridge on summer evenings when the air is warm.",
    "A heron stands in the shallows near the reeds, waiting without a sound.",
    "The council plans to repair the footpath along the east bank next spring.",
];

pub(crate) fn run(b: ChatBench) -> Result<()> {
    if b.turns == 0 || b.message_tokens == 0 {
        bail!("--turns and --message-tokens must be at least 1");
    }
    let model = Arc::new(b.base.load()?);
    let message = |turn: usize| -> Result<String> {
        let mut text = format!("Part {} of my notes.", turn + 1);
        let mut i = turn;
        while model.tokenizer.encode(&text)?.len() < b.message_tokens {
            text.push(' ');
            text.push_str(SENTENCES[i % SENTENCES.len()]);
            i += 3;
        }
        Ok(format!("{text} Summarise this part in one sentence."))
    };
    let messages: Vec<String> = (0..b.turns).map(message).collect::<Result<_>>()?;
    // ttft[variant][turn]: best over the repeats; prompt tokens per turn.
    let mut ttft = vec![vec![f64::INFINITY; b.turns]; 2];
    let mut prompt_tokens = vec![0; b.turns];
    let mut reused = vec![0u64; b.turns];
    for _ in 0..b.repeats.max(1) {
        for (v, cache_bytes) in [EngineConfig::default().prefix_cache_bytes, 0]
            .into_iter()
            .enumerate()
        {
            let engine = Engine::start(
                model.clone(),
                EngineConfig {
                    prefix_cache_bytes: cache_bytes,
                    ..EngineConfig::default()
                },
            );
            let mut history = Vec::new();
            for (turn, m) in messages.iter().enumerate() {
                history.push(ChatMessage::new(Role::User, m.clone()));
                let prompt = model.chat_prompt(&history)?;
                prompt_tokens[turn] = prompt.len();
                let before = engine.stats().prefix_tokens_reused;
                let done = engine.run(
                    Job {
                        prompt,
                        params: GenerateParams {
                            max_tokens: b.reply_tokens,
                            ..GenerateParams::default()
                        },
                        mix: MixRequest {
                            plan: Plan::None,
                            adapters: Vec::new(),
                        },
                    },
                    &mut |_| {},
                )?;
                if v == 0 {
                    reused[turn] = engine.stats().prefix_tokens_reused - before;
                }
                ttft[v][turn] = ttft[v][turn].min(done.generation.timings.prefill_s);
                history.push(ChatMessage::new(Role::Assistant, done.generation.text));
            }
        }
    }
    let rows: Vec<_> = (0..b.turns)
        .map(|t| {
            json!({"turn": t + 1, "prompt_tokens": prompt_tokens[t], "reused_tokens": reused[t],
                   "ttft_s_cached": ttft[0][t], "ttft_s_uncached": ttft[1][t],
                   "vs_first_turn_cached": ttft[0][t] / ttft[0][0]})
        })
        .collect();
    if b.json {
        println!("{}", json!({"base": b.base.base, "turns": rows}));
        return Ok(());
    }
    println!(
        "{:>4} {:>7} {:>7} {:>12} {:>12} {:>10}",
        "turn", "prompt", "reused", "ttft cached", "ttft none", "vs turn 1"
    );
    for r in &rows {
        println!(
            "{:>4} {:>7} {:>7} {:>11.3}s {:>11.3}s {:>9.2}x",
            r["turn"],
            r["prompt_tokens"],
            r["reused_tokens"],
            r["ttft_s_cached"].as_f64().unwrap_or(0.0),
            r["ttft_s_uncached"].as_f64().unwrap_or(0.0),
            r["vs_first_turn_cached"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}
