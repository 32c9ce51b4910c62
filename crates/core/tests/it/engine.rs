//! The engine's continuous batching on the real SmolLM2: every row of a mixed batch (different
//! plans, adapter sets and gates) gives the greedy tokens of the same request run alone through
//! `generate`, also when it joins mid-batch or a neighbour is cancelled; a full queue answers
//! Busy; a broken adapter fails only its own request.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use crate::common::*;
use ramole_core::adapter::LoraAdapter;
use ramole_core::engine::{
    AdapterUse, Engine, EngineConfig, EngineError, Job, JobEvent, JobHandle, MixRequest,
};
use ramole_core::model::{ChatMessage, GenerateParams, Generation, Model, generate};
use ramole_core::mole::{CompiledMix, MixDelta, Strategy};
use ramole_core::vocab::FinishReason;
use ramole_core::vocab::Plan;
use ramole_core::vocab::Role;
use ramole_testkit::write_random_peft;

struct Fixture {
    model: Arc<Model>,
    dirs: Vec<PathBuf>,
    _tmp: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let model = Arc::new(load(&smollm2()));
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..4)
        .map(|i| {
            let dir = tmp.path().join(format!("a{i}"));
            write_random_peft(&dir, &model.decoder, 4, 8.0, 77 + i).unwrap();
            dir
        })
        .collect();
    Fixture {
        model,
        dirs,
        _tmp: tmp,
    }
}

fn uses(f: &Fixture, spec: &[(usize, f32)]) -> Vec<AdapterUse> {
    spec.iter()
        .map(|&(i, gate)| AdapterUse {
            id: format!("a{i}"),
            dir: f.dirs[i].clone(),
            gate,
        })
        .collect()
}

fn job(f: &Fixture, text: &str, plan: Plan, spec: &[(usize, f32)], max_tokens: usize) -> Job {
    Job {
        prompt: f
            .model
            .chat_prompt(&[ChatMessage::new(Role::User, text)])
            .unwrap(),
        params: GenerateParams {
            max_tokens,
            ..GenerateParams::default()
        },
        mix: MixRequest {
            plan,
            adapters: uses(f, spec),
        },
    }
}

/// The request alone through the single-request loop.
fn alone(f: &Fixture, j: &Job) -> Generation {
    let parts: Vec<_> = j
        .mix
        .adapters
        .iter()
        .map(|a| {
            (
                Arc::new(LoraAdapter::load(&a.dir, &f.model.decoder).unwrap()),
                a.gate,
            )
        })
        .collect();
    let mix = (!parts.is_empty()).then(|| {
        Arc::new(
            CompiledMix::with_precision(j.mix.plan, &parts, EngineConfig::default().precision)
                .unwrap(),
        )
    });
    generate(
        &f.model,
        &j.prompt,
        &j.params,
        &MixDelta::single(mix),
        &mut |_| {},
    )
    .unwrap()
}

fn submit(engine: &Engine, j: Job) -> (JobHandle, Receiver<JobEvent>) {
    let (tx, rx) = channel();
    let h = engine
        .submit(j, Box::new(move |e| tx.send(e).is_ok()))
        .unwrap();
    (h, rx)
}

/// Waits for the end of a request: (its generation, the text streamed before it).
fn wait(rx: &Receiver<JobEvent>) -> Result<(Generation, String), EngineError> {
    let mut text = String::new();
    loop {
        match rx
            .recv_timeout(Duration::from_secs(300))
            .expect("the engine answers")
        {
            JobEvent::Started => {}
            JobEvent::Text(t) => text.push_str(&t),
            JobEvent::Done(f) => return Ok((f.generation, text)),
            JobEvent::Failed(e) => return Err(e),
        }
    }
}

fn mixed_jobs(f: &Fixture) -> Vec<Job> {
    vec![
        job(f, "What is the capital of France?", Plan::None, &[], 10),
        job(
            f,
            "Write a haiku about the sea.",
            Plan::Selection,
            &[(0, 1.0)],
            12,
        ),
        job(
            f,
            "List three prime numbers.",
            Plan::Mixture,
            &[(0, 0.5), (1, 0.5)],
            9,
        ),
        job(
            f,
            "Translate 'good morning' into German.",
            Plan::Mixture,
            &[(2, 0.3), (3, 0.7)],
            11,
        ),
        job(
            f,
            "Explain photosynthesis in one sentence.",
            Plan::Fusion,
            &[(0, 0.6), (2, 0.4)],
            10,
        ),
        // The same adapter set as row 2: it shares that row's compiled mixture.
        job(
            f,
            "Name a colour of the rainbow.",
            Plan::Mixture,
            &[(0, 0.5), (1, 0.5)],
            8,
        ),
    ]
}

#[test]
fn every_row_of_a_mixed_batch_equals_the_request_alone() {
    let f = fixture();
    let jobs = mixed_jobs(&f);
    let want: Vec<Generation> = jobs.iter().map(|j| alone(&f, j)).collect();
    for strategy in [Strategy::Gather, Strategy::Union] {
        let engine = Engine::start(
            f.model.clone(),
            EngineConfig {
                strategy: Some(strategy),
                // Small chunks so prompts are prefilled over several steps beside decoding rows.
                prefill_chunk: 7,
                step_tokens: 20,
                ..EngineConfig::default()
            },
        );
        let rxs: Vec<_> = jobs.iter().map(|j| submit(&engine, j.clone()).1).collect();
        for (i, rx) in rxs.iter().enumerate() {
            let (g, streamed) = wait(rx).unwrap();
            assert_eq!(
                g.token_ids, want[i].token_ids,
                "{strategy:?}: row {i} differs from the request alone ({:?} vs {:?})",
                g.text, want[i].text
            );
            assert_eq!(g.text, want[i].text);
            assert_eq!(
                streamed, g.text,
                "row {i}: the streamed pieces make the text"
            );
            assert_eq!(g.finish_reason, want[i].finish_reason);
        }
        let stats = engine.stats();
        assert!(stats.most_rows >= 5, "the rows ran together: {stats:?}");
        assert!(stats.adapters_loaded <= 4, "{stats:?}");
    }
}

#[test]
fn a_request_joining_mid_batch_and_a_cancelled_neighbour_leave_the_others_correct() {
    let f = fixture();
    let first = job(
        &f,
        "Tell me a short story about a cat.",
        Plan::Mixture,
        &[(0, 0.5), (1, 0.5)],
        24,
    );
    let doomed = job(
        &f,
        "Count from one to twenty.",
        Plan::Selection,
        &[(2, 1.0)],
        40,
    );
    let late = job(
        &f,
        "What is two plus two?",
        Plan::Mixture,
        &[(1, 0.2), (3, 0.8)],
        10,
    );
    let want_first = alone(&f, &first);
    let want_late = alone(&f, &late);
    let engine = Engine::start(f.model.clone(), EngineConfig::default());
    let (_, rx_first) = submit(&engine, first);
    let (h_doomed, rx_doomed) = submit(&engine, doomed);
    // Let both decode a few tokens, then a third joins and the second is cancelled.
    let mut seen = 0;
    while seen < 3 {
        if let JobEvent::Text(_) = rx_first.recv_timeout(Duration::from_secs(300)).unwrap() {
            seen += 1;
        }
    }
    let (_, rx_late) = submit(&engine, late);
    h_doomed.cancel();
    let (g_doomed, _) = wait(&rx_doomed).unwrap();
    assert_eq!(g_doomed.finish_reason, FinishReason::Cancelled);
    assert!(g_doomed.generated_tokens < 40, "{g_doomed:?}");
    let (g_first, _) = wait(&rx_first).unwrap();
    assert_eq!(g_first.token_ids, want_first.token_ids);
    let (g_late, _) = wait(&rx_late).unwrap();
    assert_eq!(g_late.token_ids, want_late.token_ids);
}

#[test]
fn a_full_queue_is_busy_and_a_broken_adapter_fails_only_its_request() {
    let f = fixture();
    let engine = Engine::start(
        f.model.clone(),
        EngineConfig {
            max_rows: 1,
            queue: 1,
            ..EngineConfig::default()
        },
    );
    let long = job(&f, "Describe the moon.", Plan::None, &[], 40);
    let mut held = Vec::new();
    let mut busy = None;
    for _ in 0..6 {
        let (tx, rx) = channel();
        match engine.try_submit(long.clone(), Box::new(move |e| tx.send(e).is_ok())) {
            Ok(h) => held.push((h, rx)),
            Err(e) => {
                busy = Some(e);
                break;
            }
        }
    }
    let busy = busy.expect("a one-row engine with a queue of one refuses the sixth request");
    assert!(matches!(busy, EngineError::Busy { limit: 1 }), "{busy}");
    assert!(busy.to_string().contains("retry"), "{busy}");
    for (h, _) in &held {
        h.cancel();
    }
    for (_, rx) in &held {
        wait(rx).unwrap();
    }

    let mut broken = job(&f, "Hello", Plan::Mixture, &[(0, 0.5)], 4);
    broken.mix.adapters.push(AdapterUse {
        id: "missing".into(),
        dir: Path::new("/nonexistent/adapter").to_path_buf(),
        gate: 0.5,
    });
    let ok = job(&f, "Hello", Plan::Selection, &[(1, 1.0)], 4);
    let want = alone(&f, &ok);
    let (_, rx_broken) = submit(&engine, broken);
    let (_, rx_ok) = submit(&engine, ok);
    let err = wait(&rx_broken).unwrap_err();
    assert!(
        matches!(&err, EngineError::Adapter { id, .. } if id == "missing"),
        "{err}"
    );
    assert_eq!(wait(&rx_ok).unwrap().0.token_ids, want.token_ids);

    // Requests that can never run are refused at submission, naming the problem.
    let mut empty = job(&f, "Hello", Plan::None, &[], 4);
    empty.prompt.clear();
    let e = engine
        .submit(empty, Box::new(|_| true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no tokens"), "{e}");
    let mut bad_gate = job(&f, "Hello", Plan::Mixture, &[(0, -1.0)], 4);
    bad_gate.mix.plan = Plan::Mixture;
    let e = engine
        .submit(bad_gate, Box::new(|_| true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("gate 0 = -1"), "{e}");
}

#[test]
fn a_chats_next_turns_reuse_its_prefix_only_under_the_same_adapters_and_answer_as_without() {
    let f = fixture();
    let cached = Engine::start(f.model.clone(), EngineConfig::default());
    let uncached = Engine::start(
        f.model.clone(),
        EngineConfig {
            prefix_cache_bytes: 0,
            ..EngineConfig::default()
        },
    );
    let questions = [
        "Tell me about the sea.",
        "And about rivers?",
        "Which is larger?",
        "Name one fish.",
        "Thanks!",
    ];
    // Turns 1-4 under one mixture; turn 5 under other gates: it must not reuse turn 4's cache.
    let mixes = [
        (Plan::Mixture, vec![(0, 0.5), (1, 0.5)]),
        (Plan::Mixture, vec![(0, 0.5), (1, 0.5)]),
        (Plan::Mixture, vec![(0, 0.5), (1, 0.5)]),
        (Plan::Mixture, vec![(0, 0.5), (1, 0.5)]),
        (Plan::Mixture, vec![(0, 0.3), (1, 0.7)]),
    ];
    let mut history = Vec::new();
    let mut reused_before = 0;
    for (turn, (q, (plan, spec))) in questions.iter().zip(&mixes).enumerate() {
        history.push(ChatMessage::new(Role::User, *q));
        let j = Job {
            prompt: f.model.chat_prompt(&history).unwrap(),
            params: GenerateParams {
                max_tokens: 12,
                ..GenerateParams::default()
            },
            mix: MixRequest {
                plan: *plan,
                adapters: uses(&f, spec),
            },
        };
        let (with, _) = wait(&submit(&cached, j.clone()).1).unwrap();
        let (without, _) = wait(&submit(&uncached, j.clone()).1).unwrap();
        assert_eq!(
            with.token_ids, without.token_ids,
            "turn {turn}: {:?} with the prefix cache, {:?} without",
            with.text, without.text
        );
        let s = cached.stats();
        let reused = s.prefix_tokens_reused - reused_before;
        reused_before = s.prefix_tokens_reused;
        match turn {
            0 => assert_eq!(reused, 0),
            // Everything up to the previous reply is cached; only the new message is fed.
            1..=3 => assert!(
                reused as usize + 24 >= j.prompt.len() && reused > 0,
                "turn {turn}: {reused} of {} prompt tokens reused",
                j.prompt.len()
            ),
            _ => assert_eq!(reused, 0, "other gates must not reuse the cache"),
        }
        assert_eq!(uncached.stats().prefix_tokens_reused, 0);
        history.push(ChatMessage::new(Role::Assistant, with.text.clone()));
    }
    let s = cached.stats();
    assert_eq!((s.prefix_hits, s.prefix_misses), (3, 2));
    assert!(s.prefix_cache_bytes > 0);
}
