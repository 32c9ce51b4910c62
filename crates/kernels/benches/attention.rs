//! `cargo bench -p ramole-kernels --bench attention`: the tiled causal attention against its
//! per-query reference (`Attention::causal_reference_with`), alternated in one run so a busy
//! machine slows both alike, on the shapes of SmolLM2-135M (9 heads, 3 kv, head 64),
//! Qwen2.5-0.5B (14, 2, 64) and Qwen2.5-1.5B (12, 2, 128): a message prefilled after a history
//! (150 tokens at 900), a decode step (1 at 1000), and prompts of 256 and 1500 tokens. Prints
//! the best of each side, µs per call (one layer), and reference / tiled. Arguments narrow the
//! run: words keep the shapes whose name contains one of them, `avx2` or `portable` picks that
//! set instead of the detected one. `RAYON_NUM_THREADS=1` for one core's numbers.

use std::time::Instant;

use ramole_kernels::Isa;
use ramole_kernels::attention::{Attention, KvView};

fn main() {
    let shapes = [
        ("smollm2-135m", 9, 3, 64),
        ("qwen2.5-0.5b", 14, 2, 64),
        ("qwen2.5-1.5b", 12, 2, 128),
    ];
    let cases = [(150, 900), (1, 1000), (256, 0), (1500, 0)];
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let isa = Isa::available()
        .into_iter()
        .find(|i| args.iter().any(|a| a == i.name()))
        .unwrap_or_else(Isa::detect);
    let words: Vec<&String> = args
        .iter()
        .filter(|a| Isa::available().iter().all(|i| i.name() != a.as_str()))
        .collect();
    println!("set {isa}");
    println!(
        "{:<14} {:>5} {:>5} {:>12} {:>12} {:>7}",
        "shape", "t", "pos", "reference µs", "tiled µs", "ratio"
    );
    for (name, heads, kv_heads, hd) in shapes {
        if !words.is_empty() && !words.iter().any(|w| name.contains(w.as_str())) {
            continue;
        }
        let a = Attention {
            heads,
            kv_heads,
            head_dim: hd,
            window: None,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        for (t, pos) in cases {
            let cap = pos + t;
            let fill = |n: usize, seed: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| (((i * 37 + seed) % 101) as f32 - 50.0) / 50.0)
                    .collect()
            };
            let k = fill(kv_heads * cap * hd, 1);
            let v = fill(kv_heads * cap * hd, 2);
            let q = fill(heads * t * hd, 3);
            let view = |data| KvView {
                data,
                start: 0,
                head_stride: cap * hd,
            };
            let mut out = vec![0f32; q.len()];
            let time = |tiled: bool, out: &mut [f32]| {
                let s = Instant::now();
                if tiled {
                    a.causal_with(isa, &q, pos, view(&k), view(&v), out);
                } else {
                    a.causal_reference_with(isa, &q, pos, view(&k), view(&v), out);
                }
                s.elapsed().as_secs_f64()
            };
            let once = time(false, &mut out);
            time(true, &mut out);
            let reps = ((0.4 / once) as usize).clamp(3, 400);
            let (mut r, mut n) = (f64::MAX, f64::MAX);
            for _ in 0..reps {
                r = r.min(time(false, &mut out));
                n = n.min(time(true, &mut out));
            }
            println!(
                "{name:<14} {t:>5} {pos:>5} {:>12.1} {:>12.1} {:>7.2}",
                r * 1e6,
                n * 1e6,
                r / n
            );
        }
    }
}
