//! The paper's retrieval accuracy (flan-mixed, 48 tasks, 2,395 inputs) with the query encoder's
//! packed weights at each precision, side by side:
//! `cargo run --release -p ramole-core --example eval_precision [-- DIR]`.
//! Profiles are embedded by the f32 reference in every run, as the library does.

use std::path::PathBuf;

use ramole_core::embed::{Embedder, WeightPrecision};
use ramole_core::retrieve::{RetrievalEval, TaskProfile, TestInput};
use ramole_core::vocab::Scoring;

fn read<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/flan-mixed")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).expect("benchmark data")).expect("json")
}

fn main() {
    // SAFETY: no other thread is running yet.
    unsafe { ramole_core::config::pin_thread_count() };
    let dir = std::env::args()
        .nth(1)
        .map(Into::into)
        .unwrap_or_else(ramole_core::config::starter_embedder);
    let profiles: Vec<TaskProfile> = read("profiles-48.json");
    let tests: Vec<TestInput> = read("test-2395.json");
    let ks = [1, 3, 5, 8];
    for precision in [
        WeightPrecision::F32,
        WeightPrecision::F16,
        WeightPrecision::Int8,
        WeightPrecision::Bf16,
    ] {
        let e = Embedder::load_with(&dir, precision).expect("load the encoder");
        let t = std::time::Instant::now();
        let eval = RetrievalEval::prepare(&e, &profiles, &tests).expect("embed");
        for scoring in [Scoring::Cosine, Scoring::Ip] {
            let r = eval.report(&ks, scoring, false);
            let cells: Vec<String> = ks
                .iter()
                .map(|k| format!("top{k} {:6.2}", r.overall[&k.to_string()]))
                .collect();
            println!(
                "{precision:?}\t{:6}\t{}\t({:.0} s)",
                scoring.as_str(),
                cells.join("  "),
                t.elapsed().as_secs_f64()
            );
        }
    }
}
