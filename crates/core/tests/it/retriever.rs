//! Retriever fine-tuning on the real all-MiniLM-L6-v2 and the paper's flan-mixed samples: the
//! trainable forward equals the reference encoder (and its gradient the loss's slope), a short
//! run lowers the contrastive loss without hurting held-out retrieval, seeds make runs
//! bit-identical, the written folder loads as an embedder, bad inputs write nothing, and
//! switching a library to the new encoder re-embeds its adapters and rebuilds its index.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ramole_core::embed::{Embedder, WeightPrecision};
use ramole_core::library::{self, Library};
use ramole_core::retrieve::{self, RetrievalEval, TaskProfile, TestInput};
use ramole_core::train::retriever::{
    self, RetrieverConfig, TrainableEncoder, info_nce, train_retriever,
};
use ramole_core::vocab::{Gating, TopK};

fn minilm() -> PathBuf {
    let dir = ramole_core::config::starter_embedder();
    assert!(
        dir.join("model.safetensors").exists(),
        "test model missing: {} — run scripts/fetch-test-models.sh",
        dir.display()
    );
    dir
}

fn flan(name: &str) -> PathBuf {
    crate::common::fixture("flan-mixed").join(name)
}

/// The profiles of `tasks`, each cut to its first `samples` samples.
fn profiles(tasks: &[&str], samples: usize) -> Vec<TaskProfile> {
    let all = retriever::read_profiles(&flan("profiles-48.json")).unwrap();
    tasks
        .iter()
        .map(|t| {
            let mut p = all.iter().find(|p| p.model_name == *t).unwrap().clone();
            p.sample.truncate(samples);
            p
        })
        .collect()
}

fn tests_of(tasks: &[&str], per_task: usize) -> Vec<TestInput> {
    let all: Vec<TestInput> =
        serde_json::from_str(&std::fs::read_to_string(flan("test-2395.json")).unwrap()).unwrap();
    tasks
        .iter()
        .flat_map(|t| all.iter().filter(move |x| x.task == *t).take(per_task))
        .cloned()
        .collect()
}

fn names(tasks: &[&str]) -> Vec<String> {
    tasks.iter().map(|t| t.to_string()).collect()
}

fn quiet() -> impl FnMut(&retriever::EpochReport) {
    |_| {}
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Short-input tasks of different domains: a one-epoch run takes a few seconds.
const TINY: &[&str] = &["sst2", "wmt16_translate_deen", "common_gen"];

/// A retriever trained once for the tests that need one (3 tasks, 6 samples, 1 epoch, seed 1).
fn tiny_trained() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = tempfile::tempdir().unwrap().keep().join("minilm-tiny");
        train_tiny(&out, 1);
        out
    })
}

/// Trains the tiny retriever (3 tasks, 6 samples, 1 epoch) with `seed` into `out`.
fn train_tiny(out: &Path, seed: u64) {
    let cfg = RetrieverConfig {
        epochs: 1,
        seed,
        lr: 5e-5,
        ..RetrieverConfig::default()
    };
    train_retriever(
        &minilm(),
        &profiles(TINY, 6),
        &names(TINY),
        &cfg,
        out,
        &mut quiet(),
    )
    .unwrap();
}

#[test]
fn the_trainable_forward_equals_the_reference_encoder_and_its_gradient_the_slope() {
    let dir = minilm();
    let reference = Embedder::load_with(&dir, WeightPrecision::F32).unwrap();
    let enc = TrainableEncoder::load(&dir).unwrap();
    let long = "a long input that the tokenizer truncates at 256 tokens ".repeat(40);
    let texts = [
        "hi",
        "Is the following movie review positive or negative? A moving, beautifully acted story.",
        "Translate to German: The weather is nice today.",
        long.as_str(),
        "",
    ];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| reference.tokens(t).unwrap()).collect();
    assert_eq!(ids[3].len(), 256);
    let seqs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let got: Vec<Vec<f32>> = enc.forward_many(&seqs).unwrap().to_vec2().unwrap();
    let want = reference.embed_reference(&texts).unwrap();
    for ((t, g), w) in texts.iter().zip(&got).zip(&want) {
        let d = max_abs_diff(g, w);
        assert!(d <= 1e-5, "{t:?}: max |diff| {d}");
    }

    // The gradient is the loss's slope: along its direction u = g/|g|, the central difference
    // (L(θ + εu) − L(θ − εu)) / 2ε equals |g| up to O(ε²).
    let pairs = [
        ("It was a great film.", "What a wonderful movie!"),
        (
            "Translate to German: good morning",
            "Translate to German: thank you",
        ),
        (
            "Write a sentence with: dog, ball, park",
            "Write a sentence with: cat, sofa",
        ),
    ];
    let ids: Vec<Vec<u32>> = pairs
        .iter()
        .map(|p| p.0)
        .chain(pairs.iter().map(|p| p.1))
        .map(|t| reference.tokens(t).unwrap())
        .collect();
    let seqs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let loss_of = |enc: &TrainableEncoder| {
        let e = enc.forward_many(&seqs).unwrap();
        info_nce(
            &e.narrow(0, 0, 3).unwrap(),
            &e.narrow(0, 3, 3).unwrap(),
            0.05,
        )
        .unwrap()
    };
    let loss = loss_of(&enc);
    let l0 = loss.to_scalar::<f32>().unwrap() as f64;
    let grads = loss.backward().unwrap();
    let gs: Vec<candle_core::Tensor> = enc
        .params()
        .iter()
        .map(|(n, v)| {
            grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {n}"))
                .clone()
        })
        .collect();
    let norm: f64 = gs
        .iter()
        .map(|g| {
            g.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        })
        .sum::<f64>()
        .sqrt();
    assert!(norm > 0.0 && norm.is_finite(), "{norm}");
    let eps = 1e-3;
    let step = |scale: f64| {
        for ((_, v), g) in enc.params().iter().zip(&gs) {
            let moved = (v.as_tensor() + (g * (scale / norm)).unwrap()).unwrap();
            v.set(&moved).unwrap();
        }
        loss_of(&enc).to_scalar::<f32>().unwrap() as f64
    };
    let up = step(eps);
    let down = step(-2.0 * eps);
    let slope = (up - down) / (2.0 * eps);
    assert!(
        (slope - norm).abs() <= 0.01 * norm,
        "loss {l0}: +ε {up}, −ε {down}; slope {slope}, |gradient| {norm}"
    );
}

#[test]
fn a_short_run_lowers_the_loss_and_held_out_retrieval_does_not_get_worse() {
    // Four NLI-style tasks that MiniLM confuses: 4 profile samples each to train on, 12 test
    // inputs each held out.
    let tasks = ["snli", "qnli", "wnli", "mnli_matched"];
    let train = profiles(&tasks, 4);
    let held_out = tests_of(&tasks, 12);
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("minilm-nli");
    let cfg = RetrieverConfig {
        epochs: 2,
        lr: 5e-5,
        seed: 7,
        ..RetrieverConfig::default()
    };
    let mut reports = Vec::new();
    let t0 = std::time::Instant::now();
    let outcome = train_retriever(&minilm(), &train, &names(&tasks), &cfg, &out, &mut |r| {
        reports.push(r.clone())
    })
    .unwrap();
    eprintln!(
        "trained in {:.1} s: {:?}",
        t0.elapsed().as_secs_f64(),
        outcome.epoch_losses
    );
    assert_eq!(reports.len(), 2);
    assert_eq!(outcome.samples, 16);
    // 2 pairs per task and epoch, all four tasks in one batch: 2 updates an epoch.
    assert_eq!(outcome.steps, 4);
    assert_eq!(reports[1].steps, 4);
    assert!(
        outcome.epoch_losses[1] < outcome.epoch_losses[0],
        "{:?}",
        outcome.epoch_losses
    );

    // The loss over every training pair, before and after.
    let base = Embedder::load_with(&minilm(), WeightPrecision::F32).unwrap();
    let pair_loss = |dir: &Path| -> f64 {
        let enc = TrainableEncoder::load(dir).unwrap();
        let mut a = Vec::new();
        let mut p = Vec::new();
        for round in 0..2 {
            for t in &train {
                a.push(base.tokens(&t.sample[2 * round].inputs).unwrap());
                p.push(base.tokens(&t.sample[2 * round + 1].inputs).unwrap());
            }
        }
        let mut total = 0.0;
        for (a, p) in a.chunks(4).zip(p.chunks(4)) {
            let seqs: Vec<&[u32]> = a.iter().chain(p).map(Vec::as_slice).collect();
            let e = enc.forward_many(&seqs).unwrap();
            let l = info_nce(
                &e.narrow(0, 0, 4).unwrap(),
                &e.narrow(0, 4, 4).unwrap(),
                0.05,
            );
            total += l.unwrap().to_scalar::<f32>().unwrap() as f64;
        }
        total / 2.0
    };
    let (before, after) = (pair_loss(&minilm()), pair_loss(&out));
    assert!(after < before, "training-pair loss {before} -> {after}");

    // Held-out inputs of the same tasks, against profiles of the 4 samples.
    let top = |e: &Embedder| {
        let r = RetrievalEval::prepare(e, &train, &held_out)
            .unwrap()
            .report(&[1, 2], ramole_core::vocab::Scoring::Cosine, false);
        (r.overall["1"], r.overall["2"])
    };
    let tuned = Embedder::load(&out).unwrap();
    let (b1, b2) = top(&Embedder::load(&minilm()).unwrap());
    let (t1, t2) = top(&tuned);
    eprintln!("held-out top-1 {b1} -> {t1}, top-2 {b2} -> {t2}");
    assert!(
        t1 >= b1 && t2 >= b2,
        "top-1 {b1} -> {t1}, top-2 {b2} -> {t2}"
    );
}

#[test]
fn the_same_seed_gives_identical_weights_and_the_folder_loads_as_an_embedder() {
    let first = tiny_trained();
    let root = tempfile::tempdir().unwrap();
    let run = |seed: u64, name: &str| -> PathBuf {
        let out = root.path().join(name);
        train_tiny(&out, seed);
        out
    };
    let same = run(1, "again");
    let other = run(2, "other");
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(weights(first) == weights(&same), "seed 1 twice differs");
    assert!(weights(first) != weights(&other), "seeds 1 and 2 agree");
    let base = weights(&minilm());
    assert!(weights(first) != base, "training changed nothing");

    // The same tensor names, shapes and dtypes as the source; the frozen tables unchanged.
    let read = |bytes: &[u8]| {
        let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
        let mut v: Vec<(String, Vec<usize>, String)> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.shape().to_vec(), format!("{:?}", t.dtype())))
            .collect();
        v.sort();
        v
    };
    let tuned = weights(first);
    assert_eq!(read(&tuned), read(&base));
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&tuned).unwrap(),
        safetensors::SafeTensors::deserialize(&base).unwrap(),
    );
    let name = "embeddings.word_embeddings.weight";
    assert!(a.tensor(name).unwrap().data() == b.tensor(name).unwrap().data());
    let name = "encoder.layer.5.output.dense.weight";
    assert!(a.tensor(name).unwrap().data() != b.tensor(name).unwrap().data());

    // A folder like any embedder: tokenizer and config copied, its own id, unit embeddings
    // close to (not equal to) the base's after one short epoch.
    for f in [
        "config.json",
        "tokenizer.json",
        "vocab.txt",
        "training.json",
    ] {
        assert!(first.join(f).is_file(), "{f} missing");
    }
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(first.join("training.json")).unwrap())
            .unwrap();
    assert_eq!(record["tasks"], serde_json::json!(TINY));
    assert_eq!(record["config"]["seed"], 1);
    assert_eq!(record["epoch_losses"].as_array().unwrap().len(), 1);
    let tuned = Embedder::load(first).unwrap();
    let base = Embedder::load(&minilm()).unwrap();
    assert_ne!(tuned.id(), base.id());
    assert!(tuned.id().starts_with("minilm-tiny:384:"), "{}", tuned.id());
    let text = "Translate to German: where is the station?";
    let (t, b) = (
        tuned.embed(&[text]).unwrap().remove(0),
        base.embed(&[text]).unwrap().remove(0),
    );
    let norm: f32 = t.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    let cos: f32 = t.iter().zip(&b).map(|(x, y)| x * y).sum();
    assert!(cos > 0.9 && cos < 0.999_99, "cosine to the base {cos}");
    // Its packed (query) path and its reference path agree, as for the source.
    let r = tuned.embed_reference(&[text]).unwrap().remove(0);
    let tolerance = ramole_core::embed::packed_tolerance(ramole_core::embed::default_precision());
    assert!(max_abs_diff(&t, &r) < tolerance, "{}", max_abs_diff(&t, &r));
}

#[test]
fn bad_inputs_are_refused_naming_the_value_and_nothing_is_written() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("out");
    let good = profiles(TINY, 4);
    let ok = RetrieverConfig::default();
    let fails = |cfg: &RetrieverConfig, profiles: &[TaskProfile], tasks: &[String], out: &Path| {
        train_retriever(&minilm(), profiles, tasks, cfg, out, &mut quiet())
            .unwrap_err()
            .to_string()
    };
    let cases: Vec<(RetrieverConfig, Vec<TaskProfile>, Vec<String>, &str)> = vec![
        (
            RetrieverConfig {
                epochs: 0,
                ..ok.clone()
            },
            good.clone(),
            names(TINY),
            "epochs 0: must be 1 to 1000",
        ),
        (
            RetrieverConfig {
                epochs: 5000,
                ..ok.clone()
            },
            good.clone(),
            names(TINY),
            "epochs 5000: must be 1 to 1000",
        ),
        (
            RetrieverConfig {
                temperature: -1.0,
                ..ok.clone()
            },
            good.clone(),
            names(TINY),
            "temperature -1: must be 0.001 to 1",
        ),
        (
            ok.clone(),
            good.clone(),
            names(&["sst2", "no_such_task"]),
            "task \"no_such_task\" is not among the 3 tasks",
        ),
        (
            ok.clone(),
            good.clone(),
            names(&["sst2"]),
            "at least 2 are needed",
        ),
        (
            ok.clone(),
            good.clone(),
            names(&["sst2", "common_gen", "sst2"]),
            "\"sst2\" is listed twice",
        ),
        (
            ok.clone(),
            {
                let mut p = good.clone();
                p[0].sample.truncate(1);
                p
            },
            names(TINY),
            "task \"sst2\" has 1 sample(s)",
        ),
        (
            ok.clone(),
            {
                let mut p = good.clone();
                p[1].sample[2].inputs = "  ".into();
                p
            },
            names(TINY),
            "sample 3 has an empty input",
        ),
    ];
    for (cfg, p, t, want) in &cases {
        let e = fails(cfg, p, t, &out);
        assert!(e.contains(want), "{e}");
    }
    // An existing output folder is never written over.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), "x").unwrap();
    let e = fails(&ok, &good, &names(TINY), &out);
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    std::fs::remove_dir_all(&out).unwrap();
    // Nothing was written by any refused run.
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    // An empty task-list file is refused by name.
    let list = root.path().join("tasks.txt");
    std::fs::write(&list, "# none\n").unwrap();
    let e = retriever::read_task_list(&list).unwrap_err().to_string();
    assert!(
        e.contains("tasks.txt") && e.contains("no task names"),
        "{e}"
    );
}

#[test]
fn switching_the_embedder_re_embeds_adapters_and_retrieval_uses_the_new_encoder() {
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let base = crate::common::smollm2();
    library::init(home.path(), &base, &minilm(), None, None).unwrap();
    let model = ramole_core::model::Model::load(&base, &Default::default()).unwrap();
    let mut lib = Library::open(home.path()).unwrap();
    let groups: [(&str, &[&str]); 3] = [
        (
            "german",
            &[
                "Translate to German: The weather is nice today.",
                "Translate the following sentence to German: I would like a coffee.",
            ],
        ),
        (
            "sentiment",
            &[
                "Is this review positive or negative? The film was a waste of time.",
                "What is the sentiment of this tweet: I love sunny mornings!",
            ],
        ),
        (
            "concepts",
            &[
                "Write a sentence using these concepts: dog, ball, park.",
                "Make a sentence with the words: river, boat, sunset.",
            ],
        ),
    ];
    for (i, (name, samples)) in groups.iter().enumerate() {
        let dir = work.path().join(name);
        ramole_testkit::write_random_peft(&dir, &model.decoder, 4, 8.0, i as u64).unwrap();
        let file = work.path().join(format!("{name}.jsonl"));
        let lines: String = samples
            .iter()
            .map(|s| format!("{}\n", serde_json::json!({ "input": s })))
            .collect();
        std::fs::write(&file, lines).unwrap();
        lib.add_local(&dir, Some(&file), Some(name)).unwrap();
    }
    let query = "Translate to German: where is the train station?";
    let old_id = lib.embedder_id().to_string();
    let before = lib
        .retrieve(query, TopK::DEFAULT, &[], Gating::Uniform)
        .unwrap();
    assert_eq!(before[0].id, "german");

    let tuned_dir = tiny_trained();
    let switch = lib.use_embedder(tuned_dir).unwrap();
    let tuned = Embedder::load(tuned_dir).unwrap();
    assert_eq!(switch.previous, old_id);
    assert_eq!(switch.embedder, tuned.id());
    assert_eq!((switch.embedded, switch.indexed, switch.dims), (3, 3, 384));
    assert_eq!(lib.index().spec().embedder, tuned.id());
    assert_eq!(lib.index().spec().dims, tuned.dims());
    assert_eq!(lib.embedder_id(), tuned.id());
    assert_eq!(lib.embedder().unwrap().id(), tuned.id());

    // Every stored profile under the new id is the new encoder's mean of the samples, and the
    // retrieval scores are cosines of the new encoder's query against them.
    let q = tuned.embed(&[query]).unwrap().remove(0);
    let after = lib
        .retrieve(query, TopK::DEFAULT, &[], Gating::Uniform)
        .unwrap();
    assert_eq!(after.len(), 3);
    for hit in &after {
        let (_, samples) = groups.iter().find(|g| g.0 == hit.id).unwrap();
        let want = retrieve::profile(&tuned, samples).unwrap();
        let stored = lib
            .catalog()
            .embedding(hit.key, tuned.id())
            .unwrap()
            .expect("a profile under the new embedder");
        assert!(max_abs_diff(&stored.vector, &want.vector) < 1e-6);
        let score = retrieve::score(ramole_core::vocab::Scoring::Cosine, &q, &want.vector);
        assert!(
            (hit.score - score).abs() < 1e-3,
            "{}: {} vs {score}",
            hit.id,
            hit.score
        );
    }
    let old_score = before.iter().find(|h| h.id == "german").unwrap().score;
    let new_score = after.iter().find(|h| h.id == "german").unwrap().score;
    assert!(
        (old_score - new_score).abs() > 1e-4,
        "{old_score} {new_score}"
    );

    // Reopened: the settings name the new encoder and the saved index is used as it is.
    drop(lib);
    let lib = Library::open(home.path()).unwrap();
    assert!(lib.repairs.is_empty(), "{:?}", lib.repairs);
    assert_eq!(lib.embedder_id(), tuned.id());
    assert_eq!(lib.index().spec().embedder, tuned.id());
    assert_eq!(
        lib.settings().embedder_path,
        std::path::absolute(tuned_dir).unwrap()
    );
    let again = lib
        .retrieve(query, TopK::DEFAULT, &[], Gating::Uniform)
        .unwrap();
    assert_eq!(again, after);
}
