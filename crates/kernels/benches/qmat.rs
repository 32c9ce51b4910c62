//! `cargo bench -p ramole-kernels --bench qmat`: the packed int8 kernel on the shapes of
//! Qwen2.5-1.5B (Q4_K and Q6_K) and SmolLM2 (Q4_1), 1, 8 and 128 rows, every kernel set this
//! CPU has side by side (avx512: VNNI, avx2: `vpmaddubsw`, portable at one row only): µs per
//! product, GB/s of weights streamed and GOP/s. `RAYON_NUM_THREADS=1` for one core's numbers.
//! Arguments narrow the run (for `perf`): words keep the shapes whose name contains one of
//! them, numbers replace the row counts (`-- q6_k 2 8`).

use std::time::Instant;

use ramole_kernels::Isa;
use ramole_kernels::qmat::{QActs, QMatrix, QType};

fn random_matrix(qtype: QType, n: usize, k: usize, seed: u64) -> QMatrix {
    let mut s = seed;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let blocks = n * k / qtype.block_values();
    let mut bytes: Vec<u8> = (0..blocks * qtype.block_bytes())
        .map(|_| next() as u8)
        .collect();
    // Keep every f16 finite: clear the exponent's top bit of each byte pair that could be a
    // scale (the kernel's speed does not depend on the values).
    for b in bytes.chunks_exact_mut(2) {
        b[1] &= 0x3b;
    }
    QMatrix::pack(qtype, &bytes, n, k).expect("valid shape")
}

fn main() {
    let shapes = [
        ("qwen1.5b ffn_up q4_k", QType::Q4K, 8960, 1536),
        ("qwen1.5b ffn_down q6_k", QType::Q6K, 1536, 8960),
        ("qwen1.5b attn_q q4_k", QType::Q4K, 1536, 1536),
        ("smollm2 ffn_up q4_1", QType::Q4_1, 1536, 576),
        ("qwen0.5b head q8_0", QType::Q8_0, 151936, 896),
        ("qwen1.5b head q6_k", QType::Q6K, 151936, 1536),
    ];
    // `cargo bench` passes `--bench`.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let mut rows: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    if rows.is_empty() {
        rows = vec![1, 8, 128];
    }
    let words: Vec<&String> = args
        .iter()
        .filter(|a| a.parse::<usize>().is_err())
        .collect();
    println!(
        "{:<26} {:>5} {:>9} {:>10} {:>9} {:>9}",
        "shape", "rows", "set", "µs", "GB/s", "GOP/s"
    );
    for (name, qtype, n, k) in shapes {
        if !words.is_empty() && !words.iter().any(|w| name.contains(w.as_str())) {
            continue;
        }
        let w = random_matrix(qtype, n, k, 7);
        for &m in &rows {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let acts = QActs::quantize(&x, m, k);
            let mut y = vec![0f32; m * n];
            for isa in Isa::available() {
                if isa == Isa::Portable && m > 1 {
                    continue;
                }
                let reps = if isa == Isa::Portable {
                    2
                } else {
                    (2_000_000_000 / (n * k * m)).clamp(3, 200)
                };
                w.matmul(isa, &acts, &mut y);
                let mut best = f64::MAX;
                for _ in 0..reps {
                    let t = Instant::now();
                    w.matmul(isa, &acts, &mut y);
                    best = best.min(t.elapsed().as_secs_f64());
                }
                println!(
                    "{name:<26} {m:>5} {isa:>9} {:>10.1} {:>9.1} {:>9.1}",
                    best * 1e6,
                    w.bytes() as f64 / best / 1e9,
                    2.0 * (m * n * k) as f64 / best / 1e9
                );
            }
        }
    }
}
