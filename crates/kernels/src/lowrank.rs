//! The LoRA decode loops: `y_t += s_t B (A x_t)` for the few tokens of a decode step, and the
//! dot product they (and the router's and the index's loops) are built from. Factors are f32 or
//! bf16 ([`Elem`]); the arithmetic is f32.
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
    fn dot_sums_every_element_including_the_tail() {
        for n in [0, 1, 7, 8, 9, 31, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.25).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-3, "{n}");
        }
    }
}
