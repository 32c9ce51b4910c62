//! Latency of one adapter-index search over N random unit vectors:
//! `cargo run --release -p ramole-core --example search_latency [-- N]`.

use std::time::Instant;

use ramole_core::index::{AdapterIndex, IndexSpec};
use ramole_core::vocab::Scoring;
use rand::{Rng, SeedableRng};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(10_000, |a| a.parse().expect("N"));
    let dims = 384;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut unit = || {
        let v: Vec<f32> = (0..dims).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        ramole_core::index::normalized(&v)
    };
    let rows: Vec<(u64, Vec<f32>)> = (0..n as u64).map(|k| (k, unit())).collect();
    let spec = IndexSpec {
        embedder: "e".into(),
        dims,
        scoring: Scoring::Cosine,
        base: "b".into(),
    };
    let idx = AdapterIndex::build(spec, 1, &rows).expect("build");
    let queries: Vec<Vec<f32>> = (0..200).map(|_| unit()).collect();
    let mut t: Vec<f64> = queries
        .iter()
        .map(|q| {
            let s = Instant::now();
            let hits = idx.search(q, 7, &|k| k % 97 == 0).expect("search");
            assert_eq!(hits.len(), 7);
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    println!(
        "N={n}: search p50 {:.3} ms, p95 {:.3} ms",
        t[t.len() / 2],
        t[t.len() * 95 / 100]
    );
}
