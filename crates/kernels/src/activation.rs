//! Element-wise functions of the packed encoder: GELU (erf form), and `exp` for the row
//! softmax, as portable scalars here and as AVX2 lanes in `cpu/avx2.rs`. The erf is a rational
//! approximation (the one Eigen and XLA use for f32): |error| below 1e-6 over all inputs, far
//! under the encoder's 1e-5 parity.

use crate::Isa;

/// `erf(x)` in f32 by an odd/even rational polynomial on `x` clamped to [-4, 4] (erf is ±1 to
/// f32 precision beyond).
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * ERF_ALPHA[0] + ERF_ALPHA[1];
    for &a in &ERF_ALPHA[2..] {
        p = x2 * p + a;
    }
    let p = x * p;
    let mut q = x2 * ERF_BETA[0] + ERF_BETA[1];
    for &b in &ERF_BETA[2..] {
        q = x2 * q + b;
    }
    p / q
}

/// `x · Φ(x)`, the exact (erf) GELU of BERT.
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Numerator coefficients, highest power first (x¹³ .. x¹, odd).
pub(crate) const ERF_ALPHA: [f32; 7] = [
    -2.726_142_3e-10,
    2.770_681_4e-8,
    -2.101_024_1e-6,
    -5.692_506_4e-5,
    -7.349_906_3e-4,
    -2.954_600_1e-3,
    -1.609_603_3e-2,
];

/// Denominator coefficients, highest power first (x⁸ .. x⁰, even).
pub(crate) const ERF_BETA: [f32; 5] = [
    -1.456_607_2e-5,
    -2.133_740_5e-4,
    -1.682_827e-3,
    -7.373_329e-3,
    -1.426_474e-2,
];

/// `row = softmax(row · scale)` with the kernels of `isa`.
pub fn softmax_scaled(isa: Isa, row: &mut [f32], scale: f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    exp_shifted(isa, row, max, scale);
    let inv = 1.0 / lane_sum(row);
    row.iter_mut().for_each(|v| *v *= inv);
}

/// `row[i] = exp((row[i] - max) · scale)`.
fn exp_shifted(isa: Isa, row: &mut [f32], max: f32, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: `has_avx2` holds only for kernel sets chosen after detecting AVX2 and FMA.
        unsafe { crate::cpu::avx2::exp_shifted(row, max, scale) };
        return;
    }
    let _ = isa;
    for v in row.iter_mut() {
        *v = ((*v - max) * scale).exp();
    }
}

/// Sum with 8 independent partial sums, so the compiler can keep it in vector registers.
pub fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (s, &v) in acc.iter_mut().zip(c) {
            *s += v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use libm::erf as erf_f64;

    fn grid() -> impl Iterator<Item = f32> {
        (-6000..=6000).map(|i| i as f32 * 1e-3)
    }

    #[test]
    fn scalar_erf_and_gelu_match_f64() {
        let mut worst = 0f64;
        for x in grid() {
            let want = erf_f64(x as f64);
            worst = worst.max((super::erf(x) as f64 - want).abs());
            let g = x as f64 * 0.5 * (1.0 + erf_f64(x as f64 / std::f64::consts::SQRT_2));
            let err = (super::gelu(x) as f64 - g).abs();
            assert!(err <= 2e-6 * (1.0 + g.abs()), "gelu({x}): {err}");
        }
        assert!(worst < 1e-6, "erf max error {worst}");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_lanes_match_the_scalar_forms() {
        use std::arch::x86_64::*;
        if !crate::Isa::detect().has_avx2() {
            return;
        }
        let xs: Vec<f32> = grid().chain([-100.0, -88.0, 0.0, 30.0]).collect();
        let mut exp_worst = 0f64;
        for c in xs.chunks(8) {
            let mut lane = [0f32; 8];
            lane[..c.len()].copy_from_slice(c);
            let (mut g, mut e) = ([0f32; 8], [0f32; 8]);
            // SAFETY: AVX2 and FMA were detected above; the arrays hold 8 floats each.
            unsafe {
                let v = _mm256_loadu_ps(lane.as_ptr());
                _mm256_storeu_ps(g.as_mut_ptr(), crate::cpu::avx2::gelu(v));
                _mm256_storeu_ps(e.as_mut_ptr(), crate::cpu::avx2::exp(v));
            }
            for i in 0..c.len() {
                let x = lane[i];
                assert!(
                    (g[i] - super::gelu(x)).abs() <= 1e-6 * (1.0 + x.abs()),
                    "{x}"
                );
                if x < -87.0 {
                    assert!(e[i] < 1e-37, "exp({x}) = {}", e[i]);
                    continue;
                }
                let want = (x as f64).exp();
                exp_worst = exp_worst.max((e[i] as f64 - want).abs() / want.max(1e-30));
            }
        }
        assert!(exp_worst < 1e-6, "exp max relative error {exp_worst}");
    }

    #[test]
    fn softmax_agrees_on_every_kernel_set() {
        let row: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 23) as f32 * 0.37 - 4.0)
            .collect();
        let mut want = row.clone();
        super::softmax_scaled(crate::Isa::Portable, &mut want, 0.125);
        assert!((want.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        for isa in crate::Isa::available() {
            let mut got = row.clone();
            super::softmax_scaled(isa, &mut got, 0.125);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-6 * w.max(1e-3), "{isa}: {g} vs {w}");
            }
        }
    }
}
