//! The mixed-task benchmark harness on the real SmolLM2 and MiniLM with three seeded adapters
//! standing in for task adapters: each plan picks the adapters the paper's protocol says (own
//! adapter for `perfect`, never the own one under OOD, k with gates 1/k for mixture), every
//! batched answer equals the same request generated alone, and scores are the metrics' own.

use std::path::PathBuf;
use std::sync::Arc;

use crate::common::*;
use ramole_core::adapter::LoraAdapter;
use ramole_core::embed::Embedder;
use ramole_core::engine::{Engine, EngineConfig};
use ramole_core::metrics;
use ramole_core::model::{GenerateParams, NoDelta, Sampling, SiteDelta, generate};
use ramole_core::mole::{CompiledMix, MixDelta};
use ramole_core::retrieve::{RetrievalEval, TaskProfile, TaskSample, TestInput};
use ramole_core::tasks::{self, EvalPlan, TaskEvalConfig};
use ramole_core::train::lora::alpaca_prompt;
use ramole_core::vocab::Plan;
use ramole_testkit::write_random_peft;

fn profile(name: &str, domain: &str, samples: &[&str]) -> TaskProfile {
    TaskProfile {
        model_name: name.into(),
        domain: Some(domain.into()),
        sample: samples
            .iter()
            .map(|s| TaskSample {
                inputs: s.to_string(),
                targets: None,
            })
            .collect(),
    }
}

fn test(task: &str, metric: &str, inputs: &str, targets: &str) -> TestInput {
    TestInput {
        inputs: inputs.into(),
        task: task.into(),
        domain: None,
        targets: Some(targets.into()),
        metric: Some(metric.into()),
    }
}

#[test]
fn plans_pick_the_protocols_adapters_and_batched_answers_equal_alone() {
    let model = Arc::new(load(&smollm2()));
    let embedder = Embedder::load(&ramole_core::config::starter_embedder()).unwrap();
    let profiles = vec![
        profile(
            "movie_sentiment",
            "sentiment",
            &[
                "Is this movie review positive or negative? A dull film.",
                "Review: loved it. Sentiment?",
            ],
        ),
        profile(
            "tweet_sentiment",
            "sentiment",
            &[
                "What is the sentiment of this tweet: great day at the beach",
                "Tweet: my phone broke again. Positive or negative?",
            ],
        ),
        profile(
            "translate_fr",
            "translation",
            &[
                "Translate to French: good morning",
                "Translate the following sentence to French: I like bread.",
            ],
        ),
    ];
    let tests = vec![
        test(
            "movie_sentiment",
            "em",
            "Is this review positive or negative? The plot was boring.",
            "negative",
        ),
        test(
            "tweet_sentiment",
            "em",
            "Sentiment of the tweet: finally friday, so happy",
            "positive",
        ),
        test(
            "translate_fr",
            "bleu",
            "Translate to French: the house is big.",
            "la maison est grande .",
        ),
        test(
            "translate_fr",
            "rouge",
            "Translate to French: thank you very much.",
            "merci beaucoup .",
        ),
    ];
    let retrieval = RetrievalEval::prepare(&embedder, &profiles, &tests).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = profiles
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let d = tmp.path().join(&p.model_name);
            write_random_peft(&d, &model.decoder, 4, 8.0, 500 + i as u64).unwrap();
            d
        })
        .collect();
    let loaded: Vec<Arc<LoraAdapter>> = dirs
        .iter()
        .map(|d| Arc::new(LoraAdapter::load(d, &model.decoder).unwrap()))
        .collect();
    let engine = Engine::start(model.clone(), EngineConfig::default());
    let names: Vec<String> = profiles.iter().map(|p| p.model_name.clone()).collect();
    let params = GenerateParams {
        max_tokens: 12,
        sampling: Sampling {
            temperature: 0.0,
            ..Sampling::default()
        },
        ..GenerateParams::default()
    };
    for (plan, ood) in [
        (EvalPlan::Perfect, false),
        (EvalPlan::Mixture, true),
        (EvalPlan::Selection, false),
        (EvalPlan::None, false),
    ] {
        let cfg = TaskEvalConfig {
            plan,
            k: 2,
            ood,
            max_new_tokens: 12,
            ..TaskEvalConfig::default()
        };
        let mut heard = 0;
        let (report, preds) = tasks::run(
            &engine,
            &retrieval,
            &tests,
            tmp.path(),
            &cfg,
            &mut |_, done| heard = done,
        )
        .unwrap();
        assert_eq!(heard, tests.len());
        assert_eq!(report.n, tests.len());
        assert_eq!(preds.len(), tests.len());
        for (i, p) in preds.iter().enumerate() {
            assert_eq!(p.index, i);
            let own = &tests[i].task;
            let used: Vec<&str> = p.adapters.iter().map(|(n, _)| n.as_str()).collect();
            match plan {
                EvalPlan::Perfect => assert_eq!(p.adapters, vec![(own.clone(), 1.0)]),
                EvalPlan::Mixture => {
                    assert_eq!(used.len(), 2, "{plan:?}: {used:?}");
                    assert!(
                        !used.contains(&own.as_str()),
                        "ood used the own adapter: {used:?}"
                    );
                    assert!(p.adapters.iter().all(|(_, g)| *g == 0.5));
                }
                EvalPlan::Selection => assert_eq!(used.len(), 1),
                _ => assert!(used.is_empty()),
            }
            // The same request alone, outside the engine.
            let parts: Vec<(Arc<LoraAdapter>, f32)> = p
                .adapters
                .iter()
                .map(|(n, g)| {
                    (
                        loaded[names.iter().position(|x| x == n).unwrap()].clone(),
                        *g,
                    )
                })
                .collect();
            let mix_plan = match plan {
                EvalPlan::Mixture => Plan::Mixture,
                _ => Plan::Selection,
            };
            let delta: Box<dyn SiteDelta> = if parts.is_empty() {
                Box::new(NoDelta)
            } else {
                Box::new(MixDelta::single(Some(Arc::new(
                    CompiledMix::with_precision(
                        mix_plan,
                        &parts,
                        EngineConfig::default().precision,
                    )
                    .unwrap(),
                ))))
            };
            let prompt = model
                .tokenizer
                .encode(&alpaca_prompt(&tests[i].inputs))
                .unwrap();
            let alone = generate(&model, &prompt, &params, delta.as_ref(), &mut |_| {}).unwrap();
            assert_eq!(
                p.prediction,
                metrics::answer(&alone.text),
                "{plan:?} input {i}"
            );
            let (score, rouge) =
                tasks::score(&p.metric, &p.prediction, tests[i].targets.as_ref().unwrap()).unwrap();
            assert_eq!(p.score, score);
            assert_eq!(p.rouge, rouge);
            assert_eq!(p.rouge.is_some(), p.metric == "rouge");
        }
        assert_eq!(report.per_task.len(), 3);
        assert_eq!(report.per_cluster["sentiment"].n, 2);
        assert_eq!(report.per_task["translate_fr"].n, 2);
    }

    // A missing task adapter is named before anything runs.
    std::fs::remove_file(dirs[2].join("adapter_config.json")).unwrap();
    let e = tasks::run(
        &engine,
        &retrieval,
        &tests,
        tmp.path(),
        &TaskEvalConfig::default(),
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("translate_fr") && e.contains("1 of 3"), "{e}");
}
