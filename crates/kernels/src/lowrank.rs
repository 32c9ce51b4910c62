//! The LoRA decode loops: `y_t += s_t B (A x_t)` for the few tokens of a decode step, and the
//! dot product they (and the router's and the index's loops) are built from. Factors are f32 or
//! bf16 ([`Elem`]); the arithmetic is f32. [`QRows`] holds a `B` factor in int8 for mixtures whose
//! `A x` comes from the quantized base kernel (`qmat`): it adds the combination of its rows.
//!
//! The loops are plain Rust written so LLVM vectorises them (eight independent partial sums);
//! the AVX2 set compiles the very same loops with AVX2 and FMA enabled (the portable build
//! targets SSE2 only, which halves the vector width and has no FMA).

use crate::Isa;

/// A factor element: f32, or bf16 widened on load.
pub trait Elem: Copy + Send + Sync {
    fn f32(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl Elem for half::bf16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

/// The shape of a low-rank product `B (A x)`: `a` `[rank, inp]`, `b_t` `[rank, out]` (B
/// transposed, gates and scales folded in), so both loops read contiguous rows.
#[derive(Clone, Copy, Debug)]
pub struct LowRank {
    pub rank: usize,
    pub inp: usize,
    pub out: usize,
}

impl LowRank {
    /// `y_t += s_t B (A x_t)` for every token `t` of `x` `[n, inp]` into `y` `[n, out]`, with
    /// `s_t = scales[t]` (1 when `None`), as two plain loops that read each factor row once for
    /// all tokens: a decode step would otherwise pay two GEMM dispatches per site, which cost
    /// more than the arithmetic at these sizes.
    pub fn apply<T: Elem>(
        self,
        a: &[T],
        b_t: &[T],
        x: &[f32],
        scales: Option<&[f32]>,
        y: &mut [f32],
    ) {
        self.apply_with(Isa::detect(), a, b_t, x, scales, y)
    }

    /// [`LowRank::apply`] with the kernels of `isa` (one of [`Isa::available`]).
    pub fn apply_with<T: Elem>(
        self,
        isa: Isa,
        a: &[T],
        b_t: &[T],
        x: &[f32],
        scales: Option<&[f32]>,
        y: &mut [f32],
    ) {
        assert!(
            a.len() >= self.rank * self.inp
                && b_t.len() >= self.rank * self.out
                && x.len().is_multiple_of(self.inp.max(1))
                && y.len() >= x.len() / self.inp.max(1) * self.out,
            "low-rank operands do not fit {self:?}"
        );
        #[cfg(target_arch = "x86_64")]
        if isa.has_avx2() {
            // SAFETY: `has_avx2` holds only for sets chosen after detecting AVX2 and FMA.
            unsafe { crate::cpu::avx2::lowrank(self, a, b_t, x, scales, y) };
            return;
        }
        let _ = isa;
        self.apply_portable(a, b_t, x, scales, y)
    }

    /// The reference (and, compiled with more features enabled, every fast path).
    #[inline(always)]
    pub(crate) fn apply_portable<T: Elem>(
        self,
        a: &[T],
        b_t: &[T],
        x: &[f32],
        scales: Option<&[f32]>,
        y: &mut [f32],
    ) {
        let n = x.len() / self.inp;
        let mut mid = vec![0f32; n * self.rank];
        for r in 0..self.rank {
            let ar = &a[r * self.inp..(r + 1) * self.inp];
            for t in 0..n {
                let s = scales.map_or(1.0, |s| s[t]);
                mid[t * self.rank + r] = s * dot(ar, &x[t * self.inp..(t + 1) * self.inp]);
            }
        }
        for r in 0..self.rank {
            let br = &b_t[r * self.out..(r + 1) * self.out];
            for t in 0..n {
                let m = mid[t * self.rank + r];
                if m == 0.0 {
                    continue;
                }
                for (yo, &b) in y[t * self.out..(t + 1) * self.out].iter_mut().zip(br) {
                    *yo += m * b.f32();
                }
            }
        }
    }
}

/// Values per scale of a [`QRows`] row.
pub const QROWS_BLOCK: usize = 32;

/// `rows` rows of `cols` values held as int8 with an f32 scale per block of [`QROWS_BLOCK`]
/// (the last block of a row may be shorter): a LoRA `B` factor (transposed, a row per rank
/// component) at a quarter of its f32 bytes, every value within half a step of its block's
/// largest / 127. Stored block-major (`[blocks][rows][32]`): a run of output columns reads one
/// contiguous stretch, where row-major rows would be `rows` short streams (k/v rows of a few
/// hundred bytes) that the hardware prefetcher never catches.
pub struct QRows {
    rows: usize,
    cols: usize,
    /// `[blocks, rows, 32]`, the last block zero-padded.
    q: Vec<i8>,
    /// `[blocks, rows]`.
    d: Vec<f32>,
}

impl std::fmt::Debug for QRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QRows([{}, {}])", self.rows, self.cols)
    }
}

impl QRows {
    /// Quantizes `v` `[rows, cols]`: per block, `d = max|v| / 127`, `q = round(v / d)`.
    pub fn quantize(v: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(
            v.len(),
            rows * cols,
            "qrows: {} values for {rows} x {cols}",
            v.len()
        );
        let blocks = cols.div_ceil(QROWS_BLOCK);
        let mut q = vec![0i8; blocks * rows * QROWS_BLOCK];
        let mut d = vec![0f32; blocks * rows];
        for r in 0..rows {
            for b in 0..blocks {
                let at = r * cols + b * QROWS_BLOCK;
                let len = QROWS_BLOCK.min(cols - b * QROWS_BLOCK);
                let xs = &v[at..at + len];
                let amax = xs.iter().fold(0f32, |a, x| a.max(x.abs()));
                let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                let dst = &mut q[(b * rows + r) * QROWS_BLOCK..][..len];
                for (o, &x) in dst.iter_mut().zip(xs) {
                    *o = (x * inv).round() as i8;
                }
                d[b * rows + r] = amax / 127.0;
            }
        }
        Self { rows, cols, q, d }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.q.len() + self.d.len() * 4
    }

    /// Quants `[blocks, rows, 32]` and scales `[blocks, rows]`, for the SIMD sets.
    pub(crate) fn parts(&self) -> (&[i8], &[f32]) {
        (&self.q, &self.d)
    }

    /// The values as held, `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.rows * self.cols)
            .map(|i| {
                let (r, c) = (i / self.cols, i % self.cols);
                let (b, j) = (c / QROWS_BLOCK, c % QROWS_BLOCK);
                self.d[b * self.rows + r] * f32::from(self.q[(b * self.rows + r) * QROWS_BLOCK + j])
            })
            .collect()
    }

    /// `y[o - first·32] += Σ_r c[r] · row_r[o]` for the columns `o` from block `first` on
    /// that `y` covers (a whole number of blocks, or up to the last column), the rows summed in
    /// order into each value: the result does not depend on how the columns are split between
    /// callers. `c` `[rows]`.
    pub fn add_combination(&self, isa: Isa, c: &[f32], y: &mut [f32], first: usize) {
        let at = first * QROWS_BLOCK;
        assert!(
            c.len() == self.rows
                && at + y.len() <= self.cols
                && (y.len().is_multiple_of(QROWS_BLOCK) || at + y.len() == self.cols),
            "qrows: {} coefficients, {} outputs from block {first} for {self:?}",
            c.len(),
            y.len()
        );
        #[cfg(target_arch = "x86_64")]
        if isa.has_avx2() {
            // SAFETY: `has_avx2` holds only for sets chosen after detecting AVX2; lengths
            // asserted above.
            unsafe { crate::cpu::avx2::qrows_add(self, c, y, first) };
            return;
        }
        let _ = isa;
        self.add_portable(c, y, first)
    }

    /// The reference: block by block, the rows in order into each value, plain multiplies and
    /// adds (no fused ones, so every set gives the same bits).
    fn add_portable(&self, c: &[f32], y: &mut [f32], first: usize) {
        for (i, ys) in y.chunks_mut(QROWS_BLOCK).enumerate() {
            let b = first + i;
            for (r, &cr) in c.iter().enumerate() {
                let s = cr * self.d[b * self.rows + r];
                let qs = &self.q[(b * self.rows + r) * QROWS_BLOCK..][..ys.len()];
                for (a, &q) in ys.iter_mut().zip(qs) {
                    *a += s * f32::from(q);
                }
            }
        }
    }
}

/// Dot product with 8 independent partial sums, which LLVM vectorises.
#[inline(always)]
pub fn dot<T: Elem>(a: &[T], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x.f32() * y)
        .sum();
    for (xa, xb) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += xa[k].f32() * xb[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    fn values(n: usize, rng: &mut impl Rng) -> Vec<f32> {
        (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
    }

    /// `y += s B (A x)` in f64, term by term: the reference of the reference.
    fn naive(s: LowRank, a: &[f32], b_t: &[f32], x: &[f32], scales: &[f32]) -> Vec<f32> {
        let n = x.len() / s.inp;
        let mut y = vec![0f32; n * s.out];
        for t in 0..n {
            for o in 0..s.out {
                let mut acc = 0f64;
                for r in 0..s.rank {
                    let ax: f64 = (0..s.inp)
                        .map(|i| a[r * s.inp + i] as f64 * x[t * s.inp + i] as f64)
                        .sum();
                    acc += scales[t] as f64 * ax * b_t[r * s.out + o] as f64;
                }
                y[t * s.out + o] = acc as f32;
            }
        }
        y
    }

    #[test]
    fn lowrank_loops_match_a_naive_product_on_every_kernel_set() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (rank, inp, out, tokens) in
            [(1, 5, 3, 1), (8, 64, 48, 3), (5, 37, 29, 4), (16, 9, 70, 2)]
        {
            let s = LowRank { rank, inp, out };
            let (a, b_t) = (values(rank * inp, &mut rng), values(rank * out, &mut rng));
            let x = values(tokens * inp, &mut rng);
            let scales: Vec<f32> = (0..tokens).map(|t| 0.5 + t as f32).collect();
            let want = naive(s, &a, &b_t, &x, &scales);
            let a16: Vec<half::bf16> = a.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let b16: Vec<half::bf16> = b_t.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let a_r: Vec<f32> = a16.iter().map(|v| v.to_f32()).collect();
            let b_r: Vec<f32> = b16.iter().map(|v| v.to_f32()).collect();
            let want16 = naive(s, &a_r, &b_r, &x, &scales);
            for isa in Isa::available() {
                let mut y = vec![0f32; tokens * out];
                s.apply_with(isa, &a, &b_t, &x, Some(&scales), &mut y);
                let mut y16 = vec![0f32; tokens * out];
                s.apply_with(isa, &a16, &b16, &x, Some(&scales), &mut y16);
                for (got, want) in [(&y, &want), (&y16, &want16)] {
                    for (g, w) in got.iter().zip(want.iter()) {
                        assert!(
                            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{isa} {s:?}: {g} vs {w}"
                        );
                    }
                }
                // Without scales every token counts once.
                let mut y1 = vec![0f32; tokens * out];
                s.apply_with(isa, &a, &b_t, &x, None, &mut y1);
                let want1 = naive(s, &a, &b_t, &x, &vec![1.0; tokens]);
                for (g, w) in y1.iter().zip(&want1) {
                    assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{isa}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn int8_rows_add_their_combination_within_the_rounding_of_each_value_on_every_set() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        for (rows, cols) in [(1, 32), (24, 576), (8, 70), (5, 3)] {
            let v = values(rows * cols, &mut rng);
            let q = QRows::quantize(&v, rows, cols);
            let held = q.dequantize();
            for (i, (a, b)) in v.iter().zip(&held).enumerate() {
                let (r, c) = (i / cols, i % cols);
                let blk = &v[r * cols + c / 32 * 32..r * cols + (c / 32 * 32 + 32).min(cols)];
                let amax = blk.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!((a - b).abs() <= amax / 254.0 * 1.0001, "{a} held as {b}");
            }
            let c = values(rows, &mut rng);
            let y0 = values(cols, &mut rng);
            let want: Vec<f64> = (0..cols)
                .map(|o| {
                    y0[o] as f64
                        + (0..rows)
                            .map(|r| c[r] as f64 * held[r * cols + o] as f64)
                            .sum::<f64>()
                })
                .collect();
            let mut outs = Vec::new();
            for isa in Isa::available() {
                let mut y = y0.clone();
                q.add_combination(isa, &c, &mut y, 0);
                for (g, w) in y.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{isa}: {g} vs {w}"
                    );
                }
                // Any split of the blocks gives the same bits.
                let mut split = y0.clone();
                for (b, part) in split.chunks_mut(QROWS_BLOCK).enumerate() {
                    q.add_combination(isa, &c, part, b);
                }
                assert_eq!(y, split, "{isa}");
                outs.push(y);
            }
            // Plain multiplies and adds on every set: the same bits.
            assert!(outs.windows(2).all(|w| w[0] == w[1]));
        }
    }

    #[test]
    fn dot_sums_every_element_including_the_tail() {
        for n in [0, 1, 7, 8, 9, 31, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.25).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-3, "{n}");
        }
    }
}
