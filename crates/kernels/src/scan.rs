//! The adapter index's exact scan: an f32 query against rows of IEEE f16 values (half the bytes
//! of f32 rows, so half the memory traffic), one score per row, f32 products and sums.

use crate::Isa;

/// `out[i]` = `q · row i` for the `out.len()` rows of `rows` (`q.len()` f16 bits each), with the
/// kernels of `isa`.
pub fn f16_rows(isa: Isa, q: &[f32], rows: &[u16], out: &mut [f32]) {
    assert!(
        rows.len() >= out.len() * q.len(),
        "scan: {} f16 values for {} rows of {}",
        rows.len(),
        out.len(),
        q.len()
    );
    if q.is_empty() {
        out.iter_mut().for_each(|o| *o = 0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: `has_avx2` holds only for sets chosen after detecting AVX2, FMA and F16C;
        // `rows` holds `out.len()` rows of `q.len()` values (asserted above).
        unsafe { crate::cpu::avx2::scan_f16(q, rows, out) };
        return;
    }
    let _ = isa;
    for (o, row) in out.iter_mut().zip(rows.chunks_exact(q.len())) {
        *o = row
            .iter()
            .zip(q)
            .map(|(&h, &x)| half::f16::from_bits(h).to_f32() * x)
            .sum();
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn f16_scan_agrees_with_a_naive_dot_on_every_kernel_set() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for dims in [1, 7, 32, 33, 384, 100] {
            let n = 9;
            let q: Vec<f32> = (0..dims).map(|_| rng.random::<f32>() - 0.5).collect();
            let rows: Vec<u16> = (0..n * dims)
                .map(|_| half::f16::from_f32(rng.random::<f32>() - 0.5).to_bits())
                .collect();
            let want: Vec<f64> = rows
                .chunks_exact(dims)
                .map(|r| {
                    r.iter()
                        .zip(&q)
                        .map(|(&h, &x)| half::f16::from_bits(h).to_f64() * x as f64)
                        .sum()
                })
                .collect();
            for isa in Isa::available() {
                let mut out = vec![0f32; n];
                f16_rows(isa, &q, &rows, &mut out);
                for (o, w) in out.iter().zip(&want) {
                    assert!(
                        (*o as f64 - w).abs() < 1e-4,
                        "{isa} dims {dims}: {o} vs {w}"
                    );
                }
            }
        }
    }
}
