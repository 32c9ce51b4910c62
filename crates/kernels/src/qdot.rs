//! The inner kernel of the quantized matrix multiply for few rows (decode, batched decode):
//! `out[r] = dot(x[r], w)` for up to [`MR`] activation rows against one weight row, the weight
//! either in GGUF's Q8_0 blocks (read in place) or already decoded to f32. Each weight block is
//! decoded into registers once and multiplied with every row, so a batch of 8 rows costs little
//! more than one while the weights stream from memory once. Activations stay f32.
//!
//! The model's `qgemm` module owns the rest (which tensors, the split over threads, decoding
//! other block types with candle); this module owns the arithmetic.

use crate::Isa;

/// Rows multiplied per pass over a weight row: 8 rows x 1 column of f32 accumulators fill 8 of
/// the 16 AVX2 registers and leave room for the 4 decoded weight vectors.
pub const MR: usize = 8;
/// Bytes of a GGUF Q8_0 block: f16 scale, then 32 signed 8-bit values.
pub const Q8_0_BYTES: usize = 34;
/// Elements per Q8_0 block, and the chunk the f32 kernel walks `k` in (every GGUF block type has
/// 32 or 256 elements, so `k` is always a multiple of it).
pub const QK: usize = 32;

/// One weight row in either form.
#[derive(Clone, Copy, Debug)]
pub enum WeightRow<'a> {
    /// `k / 32` Q8_0 blocks.
    Q8_0(&'a [u8]),
    /// `k` values.
    F32(&'a [f32]),
}

/// `out[r] = dot(x[r], w)` for `rows <= MR` rows of `x` `[rows, k]`, `k % 32 == 0`, with the
/// kernels of `isa`.
pub fn dot_rows(isa: Isa, w: WeightRow<'_>, x: &[f32], rows: usize, k: usize, out: &mut [f32]) {
    assert!(
        rows <= MR && x.len() == rows * k && out.len() == rows && k.is_multiple_of(QK),
        "qdot: {rows} rows of {k} into {} outputs",
        out.len()
    );
    match w {
        WeightRow::Q8_0(b) => assert_eq!(b.len(), k / QK * Q8_0_BYTES, "qdot: Q8_0 row bytes"),
        WeightRow::F32(v) => assert_eq!(v.len(), k, "qdot: f32 row length"),
    }
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: `has_avx2` holds only for sets chosen after detecting AVX2, FMA and F16C; the
        // lengths are asserted above.
        unsafe { crate::cpu::avx2::qdot_rows(w, x, rows, k, out) };
        return;
    }
    let _ = isa;
    dot_rows_portable(w, x, rows, k, out);
}

/// The reference kernel: each weight block is decoded once into f32 (`q * d`, as candle's
/// `to_float` does) and multiplied with every row.
fn dot_rows_portable(w: WeightRow<'_>, x: &[f32], rows: usize, k: usize, out: &mut [f32]) {
    let mut acc = [[0f32; 8]; MR];
    let mut wb = [0f32; QK];
    for b in 0..k / QK {
        let wb: &[f32] = match w {
            WeightRow::Q8_0(bytes) => {
                let blk = &bytes[b * Q8_0_BYTES..(b + 1) * Q8_0_BYTES];
                let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                for (v, &q) in wb.iter_mut().zip(&blk[2..]) {
                    *v = f32::from(q as i8) * d;
                }
                &wb
            }
            WeightRow::F32(v) => &v[b * QK..(b + 1) * QK],
        };
        for (r, a) in acc.iter_mut().enumerate().take(rows) {
            let xr = &x[r * k + b * QK..r * k + (b + 1) * QK];
            // Eight interleaved partial sums, like the eight SIMD lanes, so the compiler can
            // vectorise without reassociating.
            for (i, (&wv, &xv)) in wb.iter().zip(xr).enumerate() {
                a[i % 8] += wv * xv;
            }
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = a.iter().sum();
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// `blocks` random Q8_0 blocks and their f32 values.
    fn q8_row(blocks: usize, rng: &mut impl Rng) -> (Vec<u8>, Vec<f32>) {
        let (mut bytes, mut values) = (Vec::new(), Vec::new());
        for _ in 0..blocks {
            let d = half::f16::from_f32(rng.random::<f32>() * 0.02 + 1e-3);
            bytes.extend_from_slice(&d.to_le_bytes());
            for _ in 0..QK {
                let q = rng.random_range(-127i8..=127);
                bytes.push(q as u8);
                values.push(f32::from(q) * d.to_f32());
            }
        }
        (bytes, values)
    }

    #[test]
    fn q8_0_and_f32_rows_agree_with_a_naive_dot_on_every_kernel_set() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (k, rows) in [(32, 1), (64, 3), (256, 8), (96, 5)] {
            let (bytes, w) = q8_row(k / QK, &mut rng);
            let x: Vec<f32> = (0..rows * k).map(|_| rng.random::<f32>() - 0.5).collect();
            let want: Vec<f64> = (0..rows)
                .map(|r| (0..k).map(|i| w[i] as f64 * x[r * k + i] as f64).sum())
                .collect();
            for isa in Isa::available() {
                for row in [WeightRow::Q8_0(&bytes), WeightRow::F32(&w)] {
                    let mut out = vec![0f32; rows];
                    dot_rows(isa, row, &x, rows, k, &mut out);
                    for (o, w) in out.iter().zip(&want) {
                        assert!((*o as f64 - w).abs() < 1e-4, "{isa} k={k}: {o} vs {w}");
                    }
                }
            }
        }
    }
}
