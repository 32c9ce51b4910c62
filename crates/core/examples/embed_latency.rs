//! Latency of embedding one text on the packed path and on the candle reference, and their
//! largest difference: `cargo run --release -p ramole-core --example embed_latency [-- [--f32|--f16|--int8] [--packed-only] [DIR]]`.

use std::time::Instant;

use ramole_core::embed::Embedder;

/// The median and the fastest run (the fastest is the least disturbed by other processes).
fn timed_ms(mut f: impl FnMut(), runs: usize) -> (f64, f64) {
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[t.len() / 2], t[0])
}

fn median_ms(f: impl FnMut(), runs: usize) -> f64 {
    timed_ms(f, runs).0
}

fn main() {
    // SAFETY: no other thread is running yet.
    unsafe { ramole_core::config::pin_thread_count() };
    let dir = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map(Into::into)
        .unwrap_or_else(ramole_core::config::minilm_dir);
    let precision = if std::env::args().any(|a| a == "--f16") {
        ramole_core::embed::WeightPrecision::F16
    } else if std::env::args().any(|a| a == "--int8") {
        ramole_core::embed::WeightPrecision::Int8
    } else if std::env::args().any(|a| a == "--f32") {
        ramole_core::embed::WeightPrecision::F32
    } else {
        ramole_core::embed::DEFAULT_PRECISION
    };
    println!("packed weights: {precision:?}");
    // Only the packed path's single texts: quick side-by-side comparisons.
    let packed_only = std::env::args().any(|a| a == "--packed-only");
    let e = Embedder::load_with(&dir, precision).expect("load the encoder");
    let texts = [
        "hi",
        "Please translate this sentence into French — it is about the movie (request 12).",
        &"a long text about many things ".repeat(60),
    ];
    for text in texts {
        let tokens = e.tokens(text).unwrap().len();
        let fast = e.embed_packed(&[text]).unwrap().remove(0);
        let slow = e.embed_reference(&[text]).unwrap().remove(0);
        let diff = fast
            .iter()
            .zip(&slow)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let runs = if tokens > 100 { 30 } else { 200 };
        let (packed, fastest) = timed_ms(|| drop(e.embed_packed(&[text]).unwrap()), runs);
        let reference = if packed_only {
            f64::NAN
        } else {
            median_ms(|| drop(e.embed_reference(&[text]).unwrap()), runs / 4)
        };
        println!(
            "{tokens:4} tokens: packed {packed:7.3} ms (fastest {fastest:.3}), candle {reference:7.3} ms, max |diff| {diff:.2e}"
        );
    }
    if packed_only {
        return;
    }
    let batch: Vec<String> = (0..64)
        .map(|i| format!("Please summarize article number {i} in one sentence for me."))
        .collect();
    let batch: Vec<&str> = batch.iter().map(String::as_str).collect();
    for n in [2usize, 4, 8, 16, 64] {
        let packed = median_ms(|| drop(e.embed_packed(&batch[..n]).unwrap()), 5);
        let reference = median_ms(|| drop(e.embed_reference(&batch[..n]).unwrap()), 5);
        println!("batch of {n:2}: packed {packed:7.2} ms, candle {reference:7.2} ms");
    }
}
