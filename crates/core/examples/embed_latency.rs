//! Latency of embedding one text on the packed path, for every kernel set this CPU has (AMX
//! with bf16 weights, AVX-512 and AVX2 with the chosen precision), interleaved run by run, and
//! each one's largest difference from the candle reference:
//! `cargo run --release -p ramole-core --example embed_latency [-- [--f32|--f16|--int8] [--packed-only] [DIR]]`.

use std::time::Instant;

use ramole_core::embed::{Embedder, Isa, WeightPrecision};

fn median_ms(mut f: impl FnMut(), runs: usize) -> f64 {
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    // SAFETY: no other thread is running yet.
    unsafe { ramole_core::config::pin_thread_count() };
    let dir = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map(Into::into)
        .unwrap_or_else(ramole_core::config::starter_embedder);
    let precision = if std::env::args().any(|a| a == "--int8") {
        WeightPrecision::Int8
    } else if std::env::args().any(|a| a == "--f32") {
        WeightPrecision::F32
    } else {
        WeightPrecision::F16
    };
    // Only the packed path's single texts: quick side-by-side comparisons.
    let packed_only = std::env::args().any(|a| a == "--packed-only");
    // AMX multiplies bf16 weights; the other kernel sets the chosen precision.
    let runs: Vec<(Isa, WeightPrecision, Embedder)> = Isa::available()
        .into_iter()
        .filter(|&i| i != Isa::Portable || Isa::detect() == Isa::Portable)
        .map(|isa| {
            let p = if isa == Isa::Amx {
                WeightPrecision::Bf16
            } else {
                precision
            };
            let mut e = Embedder::load_with(&dir, p).expect("load the encoder");
            e.set_isa(isa).expect("a kernel set this CPU has");
            (isa, p, e)
        })
        .collect();
    let texts = [
        "hi",
        "Please translate this sentence into French — it is about the movie (request 12).",
        &"a long text about many things ".repeat(60),
    ];
    for text in texts {
        let e0 = &runs[0].2;
        let tokens = e0.tokens(text).unwrap().len();
        let slow = e0.embed_reference(&[text]).unwrap().remove(0);
        let n = if tokens > 100 { 30 } else { 200 };
        let mut times = vec![Vec::with_capacity(n); runs.len()];
        for _ in 0..n {
            for ((_, _, e), t) in runs.iter().zip(&mut times) {
                let s = Instant::now();
                drop(e.embed_packed(&[text]).unwrap());
                t.push(s.elapsed().as_secs_f64() * 1e3);
            }
        }
        let reference = if packed_only {
            f64::NAN
        } else {
            median_ms(|| drop(e0.embed_reference(&[text]).unwrap()), n / 4)
        };
        for ((isa, p, e), mut t) in runs.iter().zip(times) {
            let fast = e.embed_packed(&[text]).unwrap().remove(0);
            let diff = fast
                .iter()
                .zip(&slow)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            t.sort_by(f64::total_cmp);
            let (packed, fastest) = (t[t.len() / 2], t[0]);
            println!(
                "{tokens:4} tokens: {isa:?} {p:?} {packed:7.3} ms (fastest {fastest:.3}), candle {reference:7.3} ms, max |diff| {diff:.2e}"
            );
        }
    }
}
