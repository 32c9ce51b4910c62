//! Element-wise functions of the packed encoder: GELU (erf form) and `exp` for the softmax, as
//! AVX2 lanes and as portable scalars. The erf is a rational approximation (the one Eigen and
//! XLA use for f32): |error| below 1e-6 over all inputs, far under the encoder's 1e-5 parity.

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
const ERF_ALPHA: [f32; 7] = [
    -2.726_142_3e-10,
    2.770_681_4e-8,
    -2.101_024_1e-6,
    -5.692_506_4e-5,
    -7.349_906_3e-4,
    -2.954_600_1e-3,
    -1.609_603_3e-2,
];

/// Denominator coefficients, highest power first (x⁸ .. x⁰, even).
const ERF_BETA: [f32; 5] = [
    -1.456_607_2e-5,
    -2.133_740_5e-4,
    -1.682_827e-3,
    -7.373_329e-3,
    -1.426_474e-2,
];

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    //! The same functions on 8 lanes, for code compiled with AVX2 and FMA.

    use std::arch::x86_64::*;

    use super::{ERF_ALPHA, ERF_BETA};

    /// GELU on 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn gelu(x: __m256) -> __m256 {
        let e = erf(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
        ));
        let half_x = _mm256_mul_ps(x, _mm256_set1_ps(0.5));
        _mm256_fmadd_ps(half_x, e, half_x)
    }

    /// erf on 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn erf(x: __m256) -> __m256 {
        let x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(4.0)), _mm256_set1_ps(-4.0));
        let x2 = _mm256_mul_ps(x, x);
        let mut p = _mm256_fmadd_ps(
            x2,
            _mm256_set1_ps(ERF_ALPHA[0]),
            _mm256_set1_ps(ERF_ALPHA[1]),
        );
        for &a in &ERF_ALPHA[2..] {
            p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(a));
        }
        let p = _mm256_mul_ps(x, p);
        let mut q = _mm256_fmadd_ps(x2, _mm256_set1_ps(ERF_BETA[0]), _mm256_set1_ps(ERF_BETA[1]));
        for &b in &ERF_BETA[2..] {
            q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(b));
        }
        _mm256_div_ps(p, q)
    }

    /// `exp(x)` on 8 lanes (Cephes expf: range reduction by ln 2, degree-6 polynomial), about
    /// 1 ulp; inputs below -87 give 0 or a denormal-free tiny value.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn exp(x: __m256) -> __m256 {
        let x = _mm256_max_ps(
            _mm256_min_ps(x, _mm256_set1_ps(88.376_26)),
            _mm256_set1_ps(-87.336_55),
        );
        let fx = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln 2 split in two so `x - fx·ln 2` keeps its low bits.
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_fmadd_ps(y, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(fx),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::cpu::erf::erf_f64;

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
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
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
                _mm256_storeu_ps(g.as_mut_ptr(), super::avx2::gelu(v));
                _mm256_storeu_ps(e.as_mut_ptr(), super::avx2::exp(v));
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
}
