//! LoRA training on the real SmolLM2 (trained on its dequantized copy): a toy task ("answer with
//! the input in capitals") changes greedy output as intended and lowers the held-out loss; the
//! same seed gives the same factors; a stopped run resumed from its checkpoint ends exactly where
//! an uninterrupted one does; and the saved PEFT adapter, loaded on the quantized base the way
//! the engine serves it, gives the logits of the in-memory trained model.

use std::sync::Arc;

use crate::common::*;
use ramole_core::adapter::LoraAdapter;
use ramole_core::model::{
    GenerateParams, LoadOptions, LogitsAt, Model, QuantLayout, RowInput, Sampling, SiteKind,
    generate,
};
use ramole_core::mole::{CompiledMix, MixDelta};
use ramole_core::train::{
    Example, LoraTrainer, PromptTemplate, TrainConfig, encode_example, prompt_tokens, train_lora,
};
use ramole_core::vocab::Plan;

const PHRASES: [&str; 28] = [
    "the cat sat on the mat",
    "we walked to the river",
    "a bird sings in the morning",
    "my brother plays chess",
    "the train leaves at noon",
    "she reads a long book",
    "green apples are sour",
    "the wind moves the trees",
    "he painted the old door",
    "children run in the park",
    "the soup is too hot",
    "rain falls on the roof",
    "they built a small boat",
    "the moon is bright tonight",
    "our dog likes to swim",
    "the baker sells fresh bread",
    "a candle lights the room",
    "snow covers the hills",
    "the teacher opened the window",
    "my phone is on the table",
    "fish swim in the lake",
    "the clock ticks slowly",
    "she wrote a letter home",
    "the road turns to the left",
    // Held out.
    "the farmer feeds his horses",
    "a quiet street at night",
    "the music was very loud",
    "people wait for the bus",
];

fn examples(range: std::ops::Range<usize>) -> Vec<Example> {
    PHRASES[range]
        .iter()
        .map(|p| Example {
            input: p.to_string(),
            target: p.to_uppercase(),
        })
        .collect()
}

fn greedy(model: &Model, input: &str, delta: &dyn ramole_core::model::SiteDelta) -> String {
    let prompt = prompt_tokens(model, PromptTemplate::Alpaca, input).unwrap();
    let params = GenerateParams {
        max_tokens: 16,
        sampling: Sampling {
            temperature: 0.0,
            ..Sampling::default()
        },
        ..GenerateParams::default()
    };
    generate(model, &prompt, &params, delta, &mut |_| {})
        .unwrap()
        .text
}

/// Share of letters that are capitals.
fn capitals(text: &str) -> f64 {
    let letters: Vec<char> = text.chars().filter(|c| c.is_alphabetic()).collect();
    if letters.is_empty() {
        return 0.0;
    }
    letters.iter().filter(|c| c.is_uppercase()).count() as f64 / letters.len() as f64
}

fn config(steps: usize, seed: u64) -> TrainConfig {
    TrainConfig {
        steps,
        seed,
        batch: 4,
        lr: 2e-3,
        ..TrainConfig::default()
    }
}

#[test]
fn a_toy_adapter_learns_capitals_and_serves_with_the_trained_logits() {
    // Stored: a 40-token prompt takes candle's dense prefill (f32 activations) on the served
    // side, so both sides multiply the same weights and only the LoRA terms can differ.
    let model = Model::load(
        &smollm2(),
        &LoadOptions {
            layout: QuantLayout::Stored,
            ..Default::default()
        },
    )
    .unwrap();
    let encode = |ex: &[Example]| -> Vec<_> {
        ex.iter()
            .map(|e| {
                encode_example(&model, PromptTemplate::Alpaca, e, 512)
                    .unwrap()
                    .0
            })
            .collect()
    };
    let held_out = examples(24..28);
    let mut trainer =
        LoraTrainer::new(&model.decoder, encode(&examples(0..24)), config(30, 7)).unwrap();
    let before = trainer.eval_loss(&encode(&held_out)).unwrap();
    for _ in 0..30 {
        trainer.train_step().unwrap();
    }
    let after = trainer.eval_loss(&encode(&held_out)).unwrap();
    let losses = trainer.losses();
    eprintln!("held-out loss {before:.3} -> {after:.3}; train losses {losses:.3?}");
    assert!(after < before * 0.3, "held-out loss {before} -> {after}");
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[25..].iter().sum::<f64>() / 5.0;
    assert!(last < first * 0.3, "training loss {first} -> {last}");

    // Save through the public entry point's writer by training the same run into a folder.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("caps");
    let outcome = train_lora(
        &model,
        &examples(0..24),
        &config(30, 7),
        &out,
        Some("HuggingFaceTB/SmolLM2-135M-Instruct"),
        false,
        &mut |_| true,
    )
    .unwrap();
    assert_eq!(outcome.losses, losses, "same seed, same run");
    let adapter = Arc::new(LoraAdapter::load(&out, &model.decoder).unwrap());
    assert_eq!(adapter.coverage(), (30 * 7, 30 * 7));
    let samples = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 20);
    assert!(samples.contains("the cat sat on the mat"));

    // The saved adapter on the quantized base (as the engine serves it) against the trained
    // factors on the dequantized base. A 40-token prompt takes the dense prefill path, so both
    // sides multiply the same weights.
    let mix = Arc::new(CompiledMix::new(Plan::Selection, &[(adapter.clone(), 1.0)]).unwrap());
    let served = MixDelta::single(Some(mix));
    let prompt = prompt_tokens(&model, PromptTemplate::Alpaca, PHRASES[25]).unwrap();
    assert!(prompt.len() >= 32, "{}", prompt.len());
    let logits = |decoder: &ramole_core::model::Decoder,
                  delta: &dyn ramole_core::model::SiteDelta| {
        let mut cache = decoder.new_cache();
        decoder
            .forward(
                &[RowInput { tokens: &prompt }],
                &mut [&mut cache],
                LogitsAt::All,
                delta,
            )
            .unwrap()
    };
    let a = logits(&model.decoder, &served);
    let b = logits(trainer.decoder(), trainer.lora());
    let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
    let range = b.abs().unwrap().max_all().unwrap();
    let (diff, range) = (
        diff.to_scalar::<f32>().unwrap(),
        range.to_scalar::<f32>().unwrap(),
    );
    assert!(
        diff < 1e-3 * range,
        "max |Δ| {diff} over a logit range of {range}"
    );
    let base = logits(&model.decoder, &ramole_core::model::NoDelta);
    let moved = (&a - &base).unwrap().abs().unwrap().max_all().unwrap();
    assert!(
        moved.to_scalar::<f32>().unwrap() > 1.0,
        "the adapter changes the logits"
    );

    // Greedy output on inputs it never saw: the base does not answer in capitals, the adapter does.
    for ex in &held_out {
        let plain = greedy(&model, &ex.input, &ramole_core::model::NoDelta);
        let tuned = greedy(&model, &ex.input, &served);
        eprintln!("{:?}: base {plain:?} / adapter {tuned:?}", ex.input);
        assert!(capitals(&plain) < 0.5, "base answered {plain:?}");
        assert!(capitals(&tuned) > 0.9, "adapter answered {tuned:?}");
    }
}

#[test]
fn same_seed_same_factors_and_a_resumed_run_ends_where_an_uninterrupted_one_does() {
    let model = load(&smollm2());
    let data = examples(0..10);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        targets: vec![SiteKind::Q, SiteKind::V],
        rank: 4,
        alpha: 8.0,
        checkpoint_every: 100,
        ..config(4, 3)
    };
    let straight = tmp.path().join("straight");
    let a = train_lora(&model, &data, &cfg, &straight, None, false, &mut |_| true).unwrap();
    assert!(!a.stopped);

    // Stop after two updates (the checkpoint is written then), then resume to the end.
    let split = tmp.path().join("split");
    let b = train_lora(&model, &data, &cfg, &split, None, false, &mut |r| {
        r.step < 2
    })
    .unwrap();
    assert!(b.stopped);
    assert_eq!(b.steps, 2);
    assert!(
        !split.join("adapter_config.json").exists(),
        "no adapter before the end"
    );
    let again = train_lora(&model, &data, &cfg, &split, None, false, &mut |_| true)
        .unwrap_err()
        .to_string();
    assert!(again.contains("--resume"), "{again}");
    let c = train_lora(&model, &data, &cfg, &split, None, true, &mut |_| true).unwrap();
    assert_eq!(c.resumed_from, 2);
    assert_eq!(c.losses, a.losses);
    let st = |dir: &std::path::Path| std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(st(&straight), st(&split), "bit-identical adapters");

    // A checkpoint of other settings is refused, naming why.
    let other = TrainConfig {
        lr: 1e-4,
        ..cfg.clone()
    };
    let e = train_lora(&model, &data, &other, &split, None, true, &mut |_| true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("settings differ"), "{e}");

    // Another seed gives other factors.
    let seeded = tmp.path().join("seed4");
    let d = train_lora(
        &model,
        &data,
        &TrainConfig { seed: 4, ..cfg },
        &seeded,
        None,
        false,
        &mut |_| true,
    )
    .unwrap();
    assert_ne!(d.losses, a.losses);
    assert_ne!(st(&seeded), st(&straight));
}
