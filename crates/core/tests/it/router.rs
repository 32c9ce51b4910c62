//! RouterLoRA on the real SmolLM2 with seeded adapters: the `C_i` shortcut equals the formula as
//! written; with `B_r = 0` the router is the uniform mixture; a batch with its own expert set
//! per row equals each row alone; the engine's router rows give what `generate` gives alone and
//! record gates that sum to 1 per layer; the file round-trips and bad files are refused;
//! training lowers the held-out loss, is reproducible from its seed, and an adapter the router
//! never saw still gets gates.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::common::*;
use candle_core::Tensor;
use ramole_core::adapter::LoraAdapter;
use ramole_core::batch::RowSpan;
use ramole_core::engine::{AdapterUse, Engine, EngineConfig, Job, MixRequest};
use ramole_core::model::{
    ChatMessage, GenerateParams, Model, RowInput, Site, SiteDelta, SiteKind, generate,
};
use ramole_core::mole::{CompiledMix, MixDelta};
use ramole_core::router::{
    ExpertRef, RoutedRow, RouterDelta, RouterLora, RouterMix, RouterRef, RouterSite, reference,
};
use ramole_core::train::router::{RouterExample, RouterTrainConfig, RouterTrainer};
use ramole_core::train::{Example, PromptTemplate, encode_example};
use ramole_core::vocab::Plan;
use ramole_core::vocab::Role;
use ramole_testkit::write_random_peft;

struct Fixture {
    model: Arc<Model>,
    dirs: Vec<PathBuf>,
    adapters: Vec<Arc<LoraAdapter>>,
    _tmp: tempfile::TempDir,
}

/// SmolLM2 and four seeded adapters of ranks 4, 4, 6, 4.
fn fixture() -> Fixture {
    let model = Arc::new(load(&smollm2()));
    let tmp = tempfile::tempdir().unwrap();
    let ranks = [4, 4, 6, 4];
    let dirs: Vec<PathBuf> = ranks
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            let dir = tmp.path().join(format!("a{i}"));
            write_random_peft(&dir, &model.decoder, r, 2.0 * r as f64, 300 + i as u64).unwrap();
            dir
        })
        .collect();
    let adapters = dirs
        .iter()
        .map(|d| Arc::new(LoraAdapter::load(d, &model.decoder).unwrap()))
        .collect();
    Fixture {
        model,
        dirs,
        adapters,
        _tmp: tmp,
    }
}

/// A router whose `B_r` is scaled by `b_scale` (a fresh one scores ≈ 0; a larger `B_r` makes the
/// gates differ clearly from uniform).
fn router(f: &Fixture, seed: u64, b_scale: f64) -> Arc<RouterLora> {
    let init = RouterLora::init(
        f.model.decoder.config(),
        "test/base",
        &SiteKind::ALL,
        8,
        seed,
    )
    .unwrap();
    let sites: BTreeMap<Site, RouterSite> = init
        .sites()
        .map(|(s, r)| {
            (
                *s,
                RouterSite {
                    a: r.a.clone(),
                    b: (&r.b * b_scale).unwrap(),
                },
            )
        })
        .collect();
    Arc::new(RouterLora::from_sites(init.config().clone(), sites).unwrap())
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn rows_of(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn the_shortcut_equals_the_formula_and_gates_sum_to_one() {
    let f = fixture();
    let r = router(&f, 1, 300.0);
    let experts = vec![
        f.adapters[0].clone(),
        f.adapters[2].clone(),
        f.adapters[3].clone(),
    ];
    for site in [
        Site {
            layer: 0,
            kind: SiteKind::Q,
        },
        Site {
            layer: 7,
            kind: SiteKind::Down,
        },
    ] {
        // 5 tokens take candle's ops, 2 the decode loop (with C_i precomputed).
        for t in [5, 2] {
            let rs = r.site(site).unwrap();
            let (out_f, in_f) = f.model.decoder.config().linear_shape(site.kind);
            let xv = values(t * in_f, 11 + site.layer as u64);
            let x =
                Tensor::from_vec(xv.clone(), (t, in_f), &ramole_core::device::compute()).unwrap();
            let span = [RowSpan { start: 0, len: t }];
            // With C_i precomputed (inference) and computed per call from B_r (training).
            let pre = Arc::new(RouterMix::new(&experts, Some(&r)).unwrap());
            let live = Arc::new(RouterMix::new(&experts, None).unwrap());
            let delta_of = |mix: &Arc<RouterMix>| {
                let d = RouterDelta::new(
                    &r,
                    vec![Some(RoutedRow {
                        mix: mix.clone(),
                        keep: None,
                    })],
                )
                .recording();
                let y = rows_of(&d.delta(site, &x, &span).unwrap().unwrap());
                (y, d.take_gates())
            };
            let (fast, gates) = delta_of(&pre);
            let (fast_live, _) = delta_of(&live);
            let a_r = rows_of(&rs.a);
            let b_r = rows_of(&rs.b);
            let factors: Vec<_> = experts.iter().map(|a| a.factors(site).unwrap()).collect();
            let flat: Vec<(Vec<f32>, Vec<f32>)> = factors
                .iter()
                .map(|fa| (rows_of(&fa.a), rows_of(&fa.b.contiguous().unwrap())))
                .collect();
            let refs: Vec<ExpertRef<'_>> = factors
                .iter()
                .zip(&flat)
                .map(|(fa, (a, b))| ExpertRef {
                    a,
                    b,
                    rank: fa.rank(),
                    scale: fa.scale,
                })
                .collect();
            let (slow, slow_gates) = reference(
                &xv,
                in_f,
                out_f,
                &RouterRef {
                    a: &a_r,
                    b: &b_r,
                    rank: 8,
                },
                &refs,
                &[true, true, true],
            );
            let range = slow.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(range > 1e-3, "the term is not trivial ({range})");
            assert!(
                max_abs_diff(&fast, &slow) < 1e-4 * range.max(1.0),
                "shortcut vs formula: {}",
                max_abs_diff(&fast, &slow)
            );
            assert!(max_abs_diff(&fast, &fast_live) < 1e-5 * range.max(1.0));
            // Per token: finite, sum 1, and not all uniform (the router really routes).
            let mut spread = 0f32;
            for tok in slow_gates.chunks(3) {
                assert!(tok.iter().all(|g| g.is_finite() && *g >= 0.0));
                assert!((tok.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                spread = spread.max(tok.iter().fold(0f32, |m, g| m.max((g - 1.0 / 3.0).abs())));
            }
            assert!(spread > 0.05, "gates stay uniform ({spread})");
            // The recorded gates: per layer the mean over this site's tokens sums to 1 and equals
            // the formula's mean.
            let means = gates[0].means(3);
            let mean_ref: Vec<f32> = (0..3)
                .map(|e| slow_gates.chunks(3).map(|g| g[e]).sum::<f32>() / t as f32)
                .collect();
            assert!(max_abs_diff(&means[site.layer], &mean_ref) < 1e-4);
            assert_eq!(gates[0].counts[site.layer * 3], t as u32);
        }
    }
}

#[test]
fn zero_router_is_the_uniform_mixture_and_rows_route_alone() {
    let f = fixture();
    let zero = router(&f, 2, 0.0);
    let set = vec![
        f.adapters[0].clone(),
        f.adapters[1].clone(),
        f.adapters[2].clone(),
    ];
    let routed = Arc::new(RouterMix::new(&set, Some(&zero)).unwrap());
    let parts: Vec<_> = set.iter().map(|a| (a.clone(), 1.0 / 3.0)).collect();
    let mixture = MixDelta::single(Some(Arc::new(
        CompiledMix::new(Plan::Mixture, &parts).unwrap(),
    )));
    let row = |mix: &Arc<RouterMix>, keep: Option<Vec<bool>>| {
        Some(RoutedRow {
            mix: mix.clone(),
            keep,
        })
    };
    let ids = f
        .model
        .chat_prompt(&[ChatMessage::new(Role::User, "Name three rivers.")])
        .unwrap();
    // On the exact (dequantized) weights: with activations rounded to int8 the last-bit
    // differences of two ways to the same sum would be amplified into the comparison.
    let exact = f.model.decoder.dequantized().unwrap();
    let logits = |delta: &dyn SiteDelta| {
        let mut cache = exact.new_cache();
        rows_of(
            &exact
                .forward(
                    &[RowInput { tokens: &ids }],
                    &mut [&mut cache],
                    ramole_core::model::LogitsAt::All,
                    delta,
                )
                .unwrap(),
        )
    };
    let by_router = logits(&RouterDelta::new(&zero, vec![row(&routed, None)]));
    let by_mixture = logits(&mixture);
    let base = logits(&ramole_core::model::NoDelta);
    assert!(
        max_abs_diff(&base, &by_mixture) > 0.1,
        "the adapters matter"
    );
    assert!(
        max_abs_diff(&by_router, &by_mixture) < 2e-3,
        "B_r = 0 vs uniform mixture: {}",
        max_abs_diff(&by_router, &by_mixture)
    );

    // A batch: rows with different sets, one with a dropout mask, one unrouted, against each
    // row's term alone.
    let r = router(&f, 3, 300.0);
    let sets = [
        vec![f.adapters[0].clone(), f.adapters[1].clone()],
        vec![
            f.adapters[2].clone(),
            f.adapters[3].clone(),
            f.adapters[0].clone(),
        ],
    ];
    let mixes: Vec<Arc<RouterMix>> = sets
        .iter()
        .map(|s| Arc::new(RouterMix::new(s, Some(&r)).unwrap()))
        .collect();
    let rows = vec![
        row(&mixes[0], None),
        None,
        row(&mixes[1], Some(vec![true, false, true])),
        row(&mixes[1], None),
    ];
    let lens = [3usize, 2, 4, 1];
    let site = Site {
        layer: 4,
        kind: SiteKind::Up,
    };
    let (_, in_f) = f.model.decoder.config().linear_shape(site.kind);
    let n: usize = lens.iter().sum();
    let x = Tensor::from_vec(
        values(n * in_f, 5),
        (n, in_f),
        &ramole_core::device::compute(),
    )
    .unwrap();
    let mut spans = Vec::new();
    let mut at = 0;
    for &l in &lens {
        spans.push(RowSpan { start: at, len: l });
        at += l;
    }
    let batch = RouterDelta::new(&r, rows.clone());
    let together = rows_of(&batch.delta(site, &x, &spans).unwrap().unwrap());
    let out_f = together.len() / n;
    for (i, span) in spans.iter().enumerate() {
        let xi = x.narrow(0, span.start, span.len).unwrap();
        let alone = RouterDelta::new(&r, vec![rows[i].clone()]);
        let got = &together[span.start * out_f..(span.start + span.len) * out_f];
        match alone
            .delta(
                site,
                &xi,
                &[RowSpan {
                    start: 0,
                    len: span.len,
                }],
            )
            .unwrap()
        {
            Some(y) => {
                let y = rows_of(&y);
                assert!(
                    max_abs_diff(got, &y) < 1e-4,
                    "row {i}: {}",
                    max_abs_diff(got, &y)
                );
            }
            None => assert!(got.iter().all(|v| *v == 0.0), "unrouted row {i} got a term"),
        }
    }
    // The dropped expert changes the row: the mask is applied.
    let open = RouterDelta::new(&r, vec![row(&mixes[1], None)]);
    let x2 = x.narrow(0, 5, 4).unwrap();
    let span = [RowSpan { start: 0, len: 4 }];
    let a = rows_of(&open.delta(site, &x2, &span).unwrap().unwrap());
    assert!(max_abs_diff(&together[5 * out_f..9 * out_f], &a) > 1e-4);
}

fn router_job(f: &Fixture, text: &str, set: &[usize], plan: Plan) -> Job {
    Job {
        prompt: f
            .model
            .chat_prompt(&[ChatMessage::new(Role::User, text)])
            .unwrap(),
        params: GenerateParams {
            max_tokens: 8,
            ..GenerateParams::default()
        },
        mix: MixRequest {
            plan,
            adapters: set
                .iter()
                .map(|&i| AdapterUse {
                    id: format!("a{i}"),
                    dir: f.dirs[i].clone(),
                    gate: 1.0 / set.len() as f32,
                })
                .collect(),
        },
    }
}

#[test]
fn engine_router_rows_match_generate_alone_and_record_gates() {
    let f = fixture();
    let r = router(&f, 4, 300.0);
    let engine = Engine::start(f.model.clone(), EngineConfig::default());
    // Without a router the plan is refused up front.
    let err = engine
        .run(router_job(&f, "hi", &[0, 1], Plan::Router), &mut |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("router"), "{err}");
    engine.set_router(Some(r.clone()));
    let jobs = [
        router_job(&f, "Write a haiku about rain.", &[0, 1, 2], Plan::Router),
        router_job(&f, "What is 2 + 2?", &[3, 1], Plan::Router),
        router_job(&f, "Say hello.", &[0, 2], Plan::Mixture),
    ];
    // All three together in the engine's batch.
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|j| {
                let engine = &engine;
                s.spawn(move || engine.run(j.clone(), &mut |_| {}).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(engine.stats().most_rows >= 2, "the rows shared a batch");
    for (j, finished) in jobs.iter().zip(&results) {
        let got = &finished.generation;
        let adapters: Vec<Arc<LoraAdapter>> = j
            .mix
            .adapters
            .iter()
            .map(|u| Arc::new(LoraAdapter::load(&u.dir, &f.model.decoder).unwrap()))
            .collect();
        let alone = if j.mix.plan == Plan::Router {
            let mix = Arc::new(RouterMix::new(&adapters, Some(&r)).unwrap());
            let d = RouterDelta::new(&r, vec![Some(RoutedRow { mix, keep: None })]);
            generate(&f.model, &j.prompt, &j.params, &d, &mut |_| {}).unwrap()
        } else {
            let parts: Vec<_> = adapters.iter().map(|a| (a.clone(), 0.5)).collect();
            let d = MixDelta::single(Some(Arc::new(
                CompiledMix::with_precision(j.mix.plan, &parts, EngineConfig::default().precision)
                    .unwrap(),
            )));
            generate(&f.model, &j.prompt, &j.params, &d, &mut |_| {}).unwrap()
        };
        assert_eq!(got.token_ids, alone.token_ids, "batched row = alone");
        match (&finished.gates, j.mix.plan) {
            (Some(trace), Plan::Router) => {
                let n = j.mix.adapters.len();
                assert_eq!(trace.adapters, n);
                assert_eq!(trace.layers, f.model.decoder.config().num_layers);
                // One column per reply token fed back: all but the last when it stopped at
                // max_tokens; all when the end token (not counted) came next.
                let fed = match got.finish_reason {
                    ramole_core::vocab::FinishReason::Length => got.generated_tokens - 1,
                    _ => got.generated_tokens,
                };
                assert_eq!(trace.tokens.len(), fed, "{:?}", got.finish_reason);
                for (_, layers) in &trace.tokens {
                    for l in layers {
                        assert!((l.iter().sum::<f32>() - 1.0).abs() < 1e-4, "{l:?}");
                    }
                }
                let mean = trace.mean();
                assert!((mean.iter().sum::<f32>() - 1.0).abs() < 1e-4);
                let summary = trace.summary(&(0..n).map(|i| format!("x{i}")).collect::<Vec<_>>());
                assert_eq!(summary.tokens[0], "<prompt>");
                assert_eq!(summary.tokens.len(), trace.tokens.len() + 1);
                assert_eq!(summary.gates.len(), summary.layers);
                for l in &summary.gates {
                    for col in l {
                        assert!((col.iter().sum::<f64>() - 1.0).abs() < 0.01, "{col:?}");
                    }
                }
            }
            (None, Plan::Mixture) => {}
            (g, p) => panic!("plan {p} with gates {:?}", g.is_some()),
        }
    }
}

#[test]
fn router_files_round_trip_and_bad_ones_are_refused() {
    let f = fixture();
    let r = router(&f, 5, 1.0);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("router.safetensors");
    r.save(&path, f.model.decoder.config()).unwrap();
    let back = RouterLora::load(&path, f.model.decoder.config()).unwrap();
    assert_eq!(back.config(), r.config());
    for (site, s) in r.sites() {
        let b = back.site(*site).unwrap();
        assert_eq!(rows_of(&s.a), rows_of(&b.a), "{site:?} A");
        assert_eq!(rows_of(&s.b), rows_of(&b.b), "{site:?} B");
    }
    // Another layer count, a missing tensor, a wrong shape: refused, naming what is wrong.
    let json = RouterLora::json_path(&path);
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let mut other = cfg.clone();
    other["num_layers"] = 3.into();
    std::fs::write(&json, other.to_string()).unwrap();
    let e = RouterLora::load(&path, f.model.decoder.config())
        .err()
        .unwrap();
    assert!(e.to_string().contains("num_layers 3"), "{e}");
    std::fs::write(&json, cfg.to_string()).unwrap();
    let mut tensors =
        candle_core::safetensors::load(&path, &ramole_core::device::compute()).unwrap();
    let key = "model.layers.2.mlp.up_proj.router_B.weight";
    tensors.insert(
        key.into(),
        Tensor::zeros(
            (5, 8),
            candle_core::DType::F32,
            &ramole_core::device::compute(),
        )
        .unwrap(),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let e = RouterLora::load(&path, f.model.decoder.config())
        .err()
        .unwrap();
    assert!(
        e.to_string().contains(key) && e.to_string().contains("[5, 8]"),
        "{e}"
    );
    tensors.remove(key);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let e = RouterLora::load(&path, f.model.decoder.config())
        .err()
        .unwrap();
    assert!(e.to_string().contains("missing tensor"), "{e}");
}

/// Examples whose answers are the greedy reply of the base with adapter 0 alone: adapter 0 is
/// the ideal expert for them, adapters 1 and 2 only disturb it.
fn ideal_examples(f: &Fixture, prompts: &[&str]) -> Vec<RouterExample> {
    let mix = MixDelta::single(Some(Arc::new(
        CompiledMix::new(Plan::Selection, &[(f.adapters[0].clone(), 1.0)]).unwrap(),
    )));
    prompts
        .iter()
        .map(|p| {
            let prompt =
                ramole_core::train::prompt_tokens(&f.model, PromptTemplate::Alpaca, p).unwrap();
            let params = GenerateParams {
                max_tokens: 10,
                ..GenerateParams::default()
            };
            let g = generate(&f.model, &prompt, &params, &mix, &mut |_| {}).unwrap();
            let ex = Example {
                input: p.to_string(),
                target: g.text,
            };
            let (encoded, _) = encode_example(&f.model, PromptTemplate::Alpaca, &ex, 256).unwrap();
            RouterExample {
                encoded,
                candidates: vec![0, 1, 2],
            }
        })
        .collect()
}

#[test]
fn training_prefers_the_ideal_adapter_is_seeded_and_routes_unseen_adapters() {
    let f = fixture();
    let train_prompts = [
        "Describe a quiet morning.",
        "List two colours of the sky.",
        "Explain why bread rises.",
        "Give a name for a cat.",
        "What do bees make?",
        "Write one line about snow.",
        "Say something about trains.",
        "Which fruit is yellow?",
    ];
    let held_prompts = [
        "Describe a busy market.",
        "What do cows eat?",
        "Write one line about wind.",
    ];
    let train = ideal_examples(&f, &train_prompts);
    let held = ideal_examples(&f, &held_prompts);
    let experts = f.adapters[..3].to_vec();
    let cfg = RouterTrainConfig {
        rank: 8,
        steps: 12,
        batch: 4,
        lr: 1e-2,
        dropout: 0.5,
        seed: 7,
        ..RouterTrainConfig::default()
    };
    let mut t = RouterTrainer::new(
        &f.model.decoder,
        "test/base",
        experts.clone(),
        train.clone(),
        cfg.clone(),
    )
    .unwrap();
    let before = t.eval_loss(&held).unwrap();
    for _ in 0..cfg.steps {
        let r = t.train_step().unwrap();
        assert!(r.loss.is_finite() && r.grad_norm.is_finite());
    }
    let after = t.eval_loss(&held).unwrap();
    eprintln!(
        "held-out loss {before:.4} -> {after:.4}; train losses {:?}",
        t.losses()
    );
    assert!(after < before - 0.05, "held-out loss {before} -> {after}");

    // The same seed gives the same router, bit for bit; another seed another one.
    let short = RouterTrainConfig {
        steps: 2,
        ..cfg.clone()
    };
    let run = |c: &RouterTrainConfig| {
        let mut t = RouterTrainer::new(
            &f.model.decoder,
            "test/base",
            experts.clone(),
            train.clone(),
            c.clone(),
        )
        .unwrap();
        for _ in 0..c.steps {
            t.train_step().unwrap();
        }
        let site = Site {
            layer: 3,
            kind: SiteKind::V,
        };
        let s = t.router().site(site).unwrap();
        (rows_of(&s.a), rows_of(&s.b), t.losses().to_vec())
    };
    let (a1, b1, l1) = run(&short);
    let (a2, b2, l2) = run(&short);
    assert!(a1 == a2 && b1 == b2 && l1 == l2, "same seed, same router");
    let (a3, _, _) = run(&RouterTrainConfig { seed: 8, ..short });
    assert!(a1 != a3, "another seed, another router");

    // The trained router, saved and loaded, gates an adapter it never saw (a3) with no
    // retraining: non-zero, finite, summing to 1 with the others.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("r.safetensors");
    t.router().save(&path, f.model.decoder.config()).unwrap();
    let trained = Arc::new(RouterLora::load(&path, f.model.decoder.config()).unwrap());
    let set = vec![
        f.adapters[0].clone(),
        f.adapters[1].clone(),
        f.adapters[3].clone(),
    ];
    let mix = Arc::new(RouterMix::new(&set, Some(&trained)).unwrap());
    let d = RouterDelta::new(&trained, vec![Some(RoutedRow { mix, keep: None })]).recording();
    let prompt =
        ramole_core::train::prompt_tokens(&f.model, PromptTemplate::Alpaca, held_prompts[0])
            .unwrap();
    let mut cache = f.model.decoder.new_cache();
    f.model
        .decoder
        .forward(
            &[RowInput { tokens: &prompt }],
            &mut [&mut cache],
            ramole_core::model::LogitsAt::Last,
            &d,
        )
        .unwrap();
    let means = d.take_gates()[0].means(3);
    let unseen: f32 = means.iter().map(|l| l[2]).sum::<f32>() / means.len() as f32;
    eprintln!(
        "mean gates of the unseen adapter per layer: {:?}",
        means.iter().map(|l| l[2]).collect::<Vec<_>>()
    );
    assert!(
        unseen.is_finite() && unseen > 0.01,
        "unseen adapter's mean gate {unseen}"
    );
    for l in &means {
        assert!((l.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    }
}
