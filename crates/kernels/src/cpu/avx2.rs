//! The AVX2 set (with FMA and F16C, which every AVX2 CPU has): 8-lane bodies of every routine,
//! among them the `vpmaddubsw` tiles of the packed quantized matrices ([`crate::qmat`]).
//! Each function here is the fast path of a routine whose portable reference and dispatch live
//! in the routine's own module; callers reach these only through that dispatch, after
//! [`crate::Isa::detect`] found the features.

use std::arch::x86_64::*;

use crate::activation::{ERF_ALPHA, ERF_BETA};
use crate::gemm::{KIND_F16, KIND_I8, NR, PREFETCH_BYTES, Tile};
use crate::qdot::{Q8_0_BYTES, QK, WeightRow};

// ---- activation -----------------------------------------------------------------------------
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
    let fx = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
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

/// `row[i] = exp((row[i] - max) · scale)`.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp_shifted(row: &mut [f32], max: f32, scale: f32) {
    let (m, s) = (_mm256_set1_ps(max), _mm256_set1_ps(scale));
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: `c` holds exactly 8 floats.
        unsafe {
            let v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m), s);
            _mm256_storeu_ps(c.as_mut_ptr(), exp(v));
        }
    }
    for v in chunks.into_remainder() {
        *v = ((*v - max) * scale).exp();
    }
}

// ---- gemm -----------------------------------------------------------------------------------

/// # Safety
/// `t`'s pointers must be valid for `R` rows, its panel of the element type `KIND` names
/// (`KIND_*`); the CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile<const R: usize, const KIND: u8>(t: &Tile) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mut rows = [std::ptr::null::<f32>(); R];
    for (r, p) in rows.iter_mut().enumerate() {
        // SAFETY: row `r < R` of `a` is valid.
        *p = unsafe { t.a.add(r * t.lda) };
    }
    let line_bytes = match KIND {
        KIND_F16 => 2 * NR,
        KIND_I8 => NR,
        _ => 4 * NR,
    };
    let mut b = t.b;
    for kk in 0..t.k {
        // SAFETY: `b` walks the panel's `k` aligned lines; `rows[r] + kk` stays in row `r`'s
        // `k` floats. A prefetch never faults, so its address may run past the panel.
        unsafe {
            if t.prefetch {
                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH_BYTES).cast());
            }
            let (b0, b1) = match KIND {
                KIND_F16 => {
                    let h = b.cast::<__m128i>();
                    (
                        _mm256_cvtph_ps(_mm_load_si128(h)),
                        _mm256_cvtph_ps(_mm_load_si128(h.add(1))),
                    )
                }
                KIND_I8 => {
                    let q = _mm_load_si128(b.cast::<__m128i>());
                    (
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(q, q))),
                    )
                }
                _ => (
                    _mm256_load_ps(b.cast()),
                    _mm256_load_ps(b.cast::<f32>().add(8)),
                ),
            };
            for r in 0..R {
                let x = _mm256_broadcast_ss(&*rows[r].add(kk));
                acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
            }
            b = b.add(line_bytes);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: forwarded from this function's contract.
        unsafe { store_row::<KIND>(t, r, acc[0], acc[1]) };
    }
}

/// The epilogue of row `r` of a tile: `acc · scale + bias` (columns `0..8` in `acc0`, `8..16`
/// in `acc1`), GELU, the residual, then the store.
///
/// # Safety
/// The bias (and the scales, int8) is one aligned line; `c` and the residual are valid for
/// `cols` columns of row `r`; the CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn store_row<const KIND: u8>(t: &Tile, r: usize, acc0: __m256, acc1: __m256) {
    // SAFETY: whole 8-float stores happen only when `cols == NR`; the rest is the contract.
    unsafe {
        let bias0 = _mm256_load_ps(t.bias);
        let bias1 = _mm256_load_ps(t.bias.add(8));
        let (scale0, scale1) = if KIND == KIND_I8 {
            (_mm256_load_ps(t.scale), _mm256_load_ps(t.scale.add(8)))
        } else {
            (_mm256_set1_ps(1.0), _mm256_set1_ps(1.0))
        };
        let mut v0 = _mm256_fmadd_ps(acc0, scale0, bias0);
        let mut v1 = _mm256_fmadd_ps(acc1, scale1, bias1);
        if t.gelu {
            v0 = gelu(v0);
            v1 = gelu(v1);
        }
        let c = t.c.add(r * t.ldc);
        let res = t.res.wrapping_add(r * t.ldr);
        if t.cols == NR {
            if !t.res.is_null() {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(res));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(res.add(8)));
            }
            _mm256_storeu_ps(c, v0);
            _mm256_storeu_ps(c.add(8), v1);
        } else {
            let mut tmp = [0f32; NR];
            _mm256_storeu_ps(tmp.as_mut_ptr(), v0);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), v1);
            for (j, &v) in tmp[..t.cols].iter().enumerate() {
                let add = if t.res.is_null() { 0.0 } else { *res.add(j) };
                *c.add(j) = v + add;
            }
        }
    }
}

// ---- lowrank --------------------------------------------------------------------------------

/// The low-rank loops compiled for AVX2+FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA; the operands fit `shape` (asserted by the caller).
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn lowrank<T: crate::lowrank::Elem>(
    shape: crate::lowrank::LowRank,
    a: &[T],
    b_t: &[T],
    x: &[f32],
    scales: Option<&[f32]>,
    y: &mut [f32],
) {
    shape.apply_portable(a, b_t, x, scales, y)
}

/// [`crate::lowrank::QRows::add_combination`] for AVX2: row by row, each whole block of 32
/// as four 8-lane multiplies and adds (separate, no fused ones: the portable loop's bits).
///
/// # Safety
/// The CPU must support AVX2; the operands fit (asserted by the caller).
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn qrows_add(
    rows: &crate::lowrank::QRows,
    c: &[f32],
    y: &mut [f32],
    first: usize,
) {
    use crate::lowrank::QROWS_BLOCK;
    let (q, d) = rows.parts();
    let n = rows.rows();
    let whole = y.len() / QROWS_BLOCK;
    // A block of 32 outputs stays in four registers while every row adds into it (the rows'
    // order per value is the portable loop's), reading the block's rows as one stretch.
    for i in 0..whole {
        let b = first + i;
        // SAFETY: block `i < whole` lies inside `y`; block `b` of the quants holds `n * 32`
        // values and of the scales `n` (`b < blocks`, asserted by the caller). AVX2 is enabled.
        unsafe {
            let dst = y.as_mut_ptr().add(i * QROWS_BLOCK);
            let mut acc = [
                _mm256_loadu_ps(dst),
                _mm256_loadu_ps(dst.add(8)),
                _mm256_loadu_ps(dst.add(16)),
                _mm256_loadu_ps(dst.add(24)),
            ];
            let src = q.as_ptr().add(b * n * QROWS_BLOCK);
            let ds = d.as_ptr().add(b * n);
            for (r, &cr) in c.iter().enumerate() {
                let sv = _mm256_set1_ps(cr * *ds.add(r));
                let row = src.add(r * QROWS_BLOCK);
                for (l, a) in acc.iter_mut().enumerate() {
                    let qi =
                        _mm256_cvtepi8_epi32(_mm_loadl_epi64(row.add(8 * l) as *const __m128i));
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(sv, _mm256_cvtepi32_ps(qi)));
                }
            }
            for (l, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(dst.add(8 * l), *a);
            }
        }
    }
    if whole * QROWS_BLOCK < y.len() {
        let (t, b) = (whole * QROWS_BLOCK, first + whole);
        for (r, &cr) in c.iter().enumerate() {
            let s = cr * d[b * n + r];
            let row = &q[(b * n + r) * QROWS_BLOCK..][..y.len() - t];
            for (a, &v) in y[t..].iter_mut().zip(row) {
                *a += s * f32::from(v);
            }
        }
    }
}

// ---- attention ------------------------------------------------------------------------------
/// # Safety
/// The CPU must support AVX2 and FMA; the operands fit (checked by `Attention::causal_with`).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attention_query(
    a: crate::attention::Attention,
    isa: crate::Isa,
    q: &[f32],
    at: usize,
    head: usize,
    k: crate::attention::KvView<'_>,
    v: crate::attention::KvView<'_>,
    out: &mut [f32],
) {
    a.query_reference::<true>(isa, q, at, head, k, v, out)
}

/// Eight lanes of the tiled attention ([`crate::attention::Lanes`]).
pub(crate) struct Lanes8;

// SAFETY: every method needs AVX2 and FMA, which the trait's contract has its caller detect;
// pointers are valid for 8 floats by that contract.
unsafe impl crate::attention::Lanes for Lanes8 {
    type V = __m256;
    const L: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        // SAFETY: the trait's contract (AVX2 detected, run inside an AVX2 function).
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        // SAFETY: as in `zero`.
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        // SAFETY: as in `zero`; `p` is valid for 8 floats.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, x: __m256) {
        // SAFETY: as in `load`.
        unsafe { _mm256_storeu_ps(p, x) }
    }
    #[inline(always)]
    unsafe fn madd(a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: as in `zero` (FMA is detected with AVX2).
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        // SAFETY: as in `zero`.
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        // SAFETY: as in `zero`.
        unsafe { _mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        // SAFETY: as in `zero`.
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        // SAFETY: as in `zero`.
        unsafe { _mm256_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn exp(x: __m256) -> __m256 {
        // SAFETY: as in `zero`.
        unsafe { exp(x) }
    }
    /// Three rounds of shuffles and adds fold 8 vectors at once: halves (`x[l] + x[l + 4]`),
    /// then pairs, then neighbours — [`crate::attention::fold`]'s tree for every vector. The
    /// inputs enter in the order that leaves lane `n` holding `ys[n]`'s sum.
    #[inline(always)]
    unsafe fn fold_each(ys: &[__m256]) -> __m256 {
        let x = [ys[0], ys[4], ys[1], ys[5], ys[2], ys[6], ys[3], ys[7]];
        // SAFETY: as in `zero`.
        unsafe {
            let mut h = [_mm256_setzero_ps(); 4];
            for (i, h) in h.iter_mut().enumerate() {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                *h = _mm256_add_ps(
                    _mm256_permute2f128_ps::<0x20>(a, b),
                    _mm256_permute2f128_ps::<0x31>(a, b),
                );
            }
            let mut q = [_mm256_setzero_ps(); 2];
            for (j, q) in q.iter_mut().enumerate() {
                let (a, b) = (h[2 * j], h[2 * j + 1]);
                *q = _mm256_add_ps(
                    _mm256_shuffle_ps::<0x44>(a, b),
                    _mm256_shuffle_ps::<0xEE>(a, b),
                );
            }
            _mm256_add_ps(
                _mm256_shuffle_ps::<0x88>(q[0], q[1]),
                _mm256_shuffle_ps::<0xDD>(q[0], q[1]),
            )
        }
    }
}

/// The tiled attention of one work item on 8 lanes.
///
/// # Safety
/// The CPU must support AVX2 and FMA; as [`crate::attention::Tile::compute`]'s.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn attention_tile(
    tile: &crate::attention::Tile<'_>,
    scores: &mut [f32],
    acc: &mut [f32],
    inv: &mut [f32],
) {
    // SAFETY: forwarded from this function's contract.
    unsafe { tile.compute::<Lanes8>(scores, acc, inv) }
}

// ---- qdot -----------------------------------------------------------------------------------

/// `out[r] = dot(x[r], w)` for `rows <= MR` rows of `x` `[rows, k]`, `k % 32 == 0`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; the lengths fit (asserted by `qdot::dot_rows`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn qdot_rows(
    w: WeightRow<'_>,
    x: &[f32],
    rows: usize,
    k: usize,
    out: &mut [f32],
) {
    // Few rows give few independent FMA chains; with P partial sums per row there are
    // rows * P chains, enough to cover the FMA latency (4 cycles, 2 units on Zen3).
    // SAFETY (all arms): the features are enabled on this function; lengths asserted by the
    // caller.
    unsafe {
        match rows {
            1 => qdot_kernel::<1, 4>(w, x, k, out),
            2 => qdot_kernel::<2, 4>(w, x, k, out),
            3 => qdot_kernel::<3, 2>(w, x, k, out),
            4 => qdot_kernel::<4, 2>(w, x, k, out),
            5 => qdot_kernel::<5, 1>(w, x, k, out),
            6 => qdot_kernel::<6, 1>(w, x, k, out),
            7 => qdot_kernel::<7, 1>(w, x, k, out),
            _ => qdot_kernel::<8, 1>(w, x, k, out),
        }
    }
}

/// Eight f32 weights of chunk `c` (0..4) of block `b`: for Q8_0 sign-extended, converted and
/// scaled by the block's `d` (exact in f32: 8-bit times 11-bit mantissa), as candle's
/// `to_float` computes them.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn qdot_block(w: WeightRow<'_>, b: usize) -> [__m256; 4] {
    match w {
        WeightRow::Q8_0(bytes) => {
            let p = bytes[b * Q8_0_BYTES..(b + 1) * Q8_0_BYTES].as_ptr();
            // SAFETY: the slice above holds the 34 bytes read here (2-byte scale, 4 x 8
            // bytes); unaligned loads.
            unsafe {
                let bits = u16::from_le_bytes([*p, *p.add(1)]);
                let d = _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                    bits,
                )))));
                let q = p.add(2);
                [
                    qdot_q8_chunk(q, d),
                    qdot_q8_chunk(q.add(8), d),
                    qdot_q8_chunk(q.add(16), d),
                    qdot_q8_chunk(q.add(24), d),
                ]
            }
        }
        WeightRow::F32(v) => {
            let p = v[b * QK..(b + 1) * QK].as_ptr();
            // SAFETY: the slice above holds the 32 values read here.
            unsafe {
                [
                    _mm256_loadu_ps(p),
                    _mm256_loadu_ps(p.add(8)),
                    _mm256_loadu_ps(p.add(16)),
                    _mm256_loadu_ps(p.add(24)),
                ]
            }
        }
    }
}

/// Eight signed bytes at `q` as f32, times `d`.
///
/// # Safety
/// AVX2/F16C; `q` points at 8 readable bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn qdot_q8_chunk(q: *const u8, d: __m256) -> __m256 {
    // SAFETY: 8 readable bytes at `q` (caller); unaligned load.
    let i8s = unsafe { _mm_loadl_epi64(q.cast()) };
    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(i8s)), d)
}

/// `R` rows, `P` partial sums per row (chunk `c` of a block goes to sum `c % P`).
///
/// # Safety
/// AVX2/FMA/F16C; `x.len() == R * k`, `out.len() == R`, `w` holds `k` weights.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn qdot_kernel<const R: usize, const P: usize>(
    w: WeightRow<'_>,
    x: &[f32],
    k: usize,
    out: &mut [f32],
) {
    let mut acc = [[_mm256_setzero_ps(); P]; R];
    let xp = x.as_ptr();
    for b in 0..k / QK {
        // SAFETY: `qdot_block` reads inside `w` (asserted by `qdot::dot_rows`); each x load reads
        // 8 values at r * k + b * 32 + 8 * c < R * k = x.len().
        unsafe {
            let wv = qdot_block(w, b);
            for (r, a) in acc.iter_mut().enumerate() {
                let xr = xp.add(r * k + b * QK);
                for (c, &wc) in wv.iter().enumerate() {
                    a[c % P] = _mm256_fmadd_ps(wc, _mm256_loadu_ps(xr.add(8 * c)), a[c % P]);
                }
            }
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        let mut s = a[0];
        for &v in &a[1..] {
            s = _mm256_add_ps(s, v);
        }
        *o = hsum(s);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

// ---- scan -----------------------------------------------------------------------------------

/// # Safety
/// The CPU must support AVX2, FMA and F16C; `rows.len() >= out.len() * q.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn scan_f16(q: &[f32], rows: &[u16], out: &mut [f32]) {
    let d = q.len();
    let body = d / 32 * 32;
    for (o, row) in out.iter_mut().zip(rows.chunks_exact(d)) {
        // SAFETY: every load reads elements `j..j + 8` with `j + 8 <= body <= d` of a
        // `d`-long row and query.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            let (r, qp) = (row.as_ptr(), q.as_ptr());
            let mut j = 0;
            while j < body {
                for (u, a) in acc.iter_mut().enumerate() {
                    let at = j + 8 * u;
                    let h = _mm256_cvtph_ps(_mm_loadu_si128(r.add(at).cast()));
                    *a = _mm256_fmadd_ps(h, _mm256_loadu_ps(qp.add(at)), *a);
                }
                j += 32;
            }
            let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            let tail: f32 = row[body..]
                .iter()
                .zip(&q[body..])
                .map(|(&h, &x)| half::f16::from_bits(h).to_f32() * x)
                .sum();
            *o = _mm_cvtss_f32(s) + tail;
        }
    }
}

// ---- qmat -----------------------------------------------------------------------------------

/// One panel of a [`crate::qmat::QMatrix`] against activation rows `r0 .. r0 + rows` into
/// `tile[r]`: the AVX2 twin of `avx512::qmat_tile`, on the same packed bytes. A ymm holds half
/// a panel's line (8 columns × 4 `k`), so each group is taken one column half at a time, and
/// `vpdpbusd` becomes `vpmaddubsw` (u8 × i8 into i16 pairs) then `vpmaddwd` (into i32). The
/// integer sums are those of `vpdpbusd` and the scales are applied by the same operations in
/// the same order, so both sets give the same bits. `prefetch` as there.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `panel` holds `acts.k / 32` groups (and
/// `acts.k / 256` headers with `sc.supers`) laid out for `sc`; `rows <= MR` and
/// `r0 + rows <= acts.m`.
pub(crate) unsafe fn qmat_tile(
    sc: crate::qmat::Scheme,
    panel: &[u8],
    acts: &crate::qmat::QActs,
    r0: usize,
    rows: usize,
    prefetch: usize,
    tile: &mut [[f32; crate::qmat::PANEL]; crate::qmat::MR],
) {
    let (gb, sb) = (sc.group_bytes(), sc.super_bytes());
    debug_assert!(
        panel.len() == acts.k / 32 * gb + acts.k / 256 * sb && r0 + rows <= acts.m,
        "{sc:?}"
    );
    let args = (sc.zero, gb, sb, panel.as_ptr(), acts, r0, prefetch);
    macro_rules! by_rows {
        ($b:literal, $h:literal, $s:literal) => {
            // SAFETY: forwarded from the caller.
            unsafe {
                match rows {
                    1 => qmat_rows::<$b, $h, $s, 1>(args, tile),
                    2 => qmat_rows::<$b, $h, $s, 2>(args, tile),
                    3 => qmat_rows::<$b, $h, $s, 3>(args, tile),
                    4 => qmat_rows::<$b, $h, $s, 4>(args, tile),
                    5 => qmat_rows::<$b, $h, $s, 5>(args, tile),
                    6 => qmat_rows::<$b, $h, $s, 6>(args, tile),
                    7 => qmat_rows::<$b, $h, $s, 7>(args, tile),
                    _ => qmat_rows::<$b, $h, $s, 8>(args, tile),
                }
            }
        };
    }
    match (sc.bits, sc.halves, sc.supers) {
        (4, false, false) => by_rows!(4, false, false),
        (4, false, true) => by_rows!(4, false, true),
        (4, true, true) => by_rows!(4, true, true),
        (5, false, false) => by_rows!(5, false, false),
        (5, false, true) => by_rows!(5, false, true),
        (6, true, true) => by_rows!(6, true, true),
        (8, false, false) => by_rows!(8, false, false),
        _ => unreachable!("no packed scheme {sc:?}"),
    }
}

/// Zero point, group and header bytes, panel, activations, first row, prefetch distance.
type QmatArgs<'a> = (
    Option<u8>,
    usize,
    usize,
    *const u8,
    &'a crate::qmat::QActs,
    usize,
    usize,
);

/// `R` rows of one panel. With 16 ymm registers the AVX-512 kernel's shape (all of a group's
/// quants held while every row passes) would spill, so the loops run the other way: each pair
/// of quant registers (both column halves, the same 4 `k`) meets a block of rows, whose i16
/// sums stay in registers until they are widened, and each row's activations are broadcast
/// once for both halves.
///
/// `vpmaddubsw` saturates its i16 pair sums; summing several of them in i16 before the
/// widening `vpmaddwd` saves an instruction per register, so they are widened every `run`
/// registers: the most whose worst case, `run · 2 · umax · 127`, stays within `i16::MAX`
/// (8 for 4 bits, 4 for 5, 2 for 6). 8-bit quants go as two nibbles (8 registers each), the
/// high one weighed by 16 in `vpmaddwd`: `2 · 255 · 127` would not fit even once.
///
/// # Safety
/// As [`qmat_tile`]'s, with `R` rows of the scheme `BITS`/`HALVES`/`SUPERS` names.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn qmat_rows<const BITS: u8, const HALVES: bool, const SUPERS: bool, const R: usize>(
    (zero, gb, sb, panel, acts, r0, prefetch): QmatArgs<'_>,
    tile: &mut [[f32; crate::qmat::PANEL]; crate::qmat::MR],
) {
    let k = acts.k;
    let (kd, ks) = (k / 32, k / 16);
    let quant_bytes = match BITS {
        4 => 256,
        5 => 320,
        6 => 384,
        _ => 512,
    };
    // A column's scale (or offset) is an f16, or an i8 under the block's super-scale.
    let elem = if SUPERS { 1 } else { 2 };
    let scale_bytes = elem * if HALVES { 32 } else { 16 };
    let run = match BITS {
        5 => 4,
        6 => 2,
        _ => 8,
    };
    // Rows per block: their i16 sums for both halves (and for 5 and 6 bits the i32 sums
    // carried across runs, for 8 bits the high nibbles' sums) in 8 registers, beside the
    // quants and the broadcast activations.
    let block = if BITS == 4 { 4 } else { 2 };
    // Scale groups per 32 `k` and quant registers per scale group.
    let parts = if HALVES { 2 } else { 1 };
    let per_part = 8 / parts;
    let lo = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let sixteens = _mm256_set1_epi16(16);
    // A bit plane's 32 bits of one column half and chunk become a byte each: `spread` copies
    // mask byte i / 8 to byte i, `probe` keeps bit i % 8 of it.
    let spread = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let probe = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    let neg_zero = zero.map(|z| _mm256_set1_ps(-f32::from(z)));
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    // The block's super-scales and negated super-mins of each column half.
    let (mut sup_d, mut sup_m) = ([_mm256_setzero_ps(); 2], [_mm256_setzero_ps(); 2]);
    // SAFETY (whole body): every pointer below stays inside `panel` (k / 32 groups of `gb`
    // bytes, with `SUPERS` k / 256 headers of `sb` bytes each before its 8 groups) or inside
    // rows r0 .. r0 + R of `acts` (the caller's contract).
    unsafe {
        let xq = acts.q.as_ptr().add(r0 * k);
        let dx = acts.d.as_ptr().add(r0 * kd);
        let sums = acts.sums.as_ptr().add(r0 * ks);
        let cvt = |p: *const u8| _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
        for g in 0..kd {
            let gp = if SUPERS {
                let header = panel.add(g / 8 * (sb + 8 * gb));
                if g % 8 == 0 {
                    for h in 0..2 {
                        sup_d[h] = cvt(header.add(16 * h));
                        if zero.is_none() {
                            sup_m[h] = cvt(header.add(32 + 16 * h));
                        }
                    }
                }
                header.add(sb + g % 8 * gb)
            } else {
                panel.add(g * gb)
            };
            if prefetch > 0 {
                // Every line of the group `prefetch` bytes ahead (steps of a line reach each
                // one); a prefetch never faults, so it may run past the panel and the matrix.
                let mut off = 0;
                while off < gb {
                    _mm_prefetch::<_MM_HINT_T0>(gp.wrapping_add(prefetch + off).cast());
                    off += 64;
                }
            }
            let sp = gp.add(quant_bytes);
            // Row `r`'s activations `4j .. 4j + 4` of this group in every dword.
            let bx = |r: usize, j: usize| {
                let x = xq.add(r * k + g * 32 + 4 * j);
                _mm256_set1_epi32(std::ptr::read_unaligned(x.cast()))
            };
            // Quant register `j` (`k = 4j .. 4j + 4`) of column half `h`, whose columns are
            // 32 bytes (half `h`) of each 64-byte line and 32 bits of each bit plane's u64.
            // For 8 bits the pair is (low nibbles, high nibbles).
            let unpack = |h: usize, j: usize| -> (__m256i, __m256i) {
                if BITS == 8 {
                    let v = _mm256_loadu_si256(gp.add(64 * j + 32 * h).cast());
                    return (
                        _mm256_and_si256(v, lo),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(v), lo),
                    );
                }
                let v = _mm256_loadu_si256(gp.add(64 * (j % 4) + 32 * h).cast());
                let v = if j < 4 { v } else { _mm256_srli_epi16::<4>(v) };
                let mut w = _mm256_and_si256(v, lo);
                for b in 0..usize::from(BITS - 4) {
                    let m = std::ptr::read_unaligned(gp.add(256 + 64 * b + 8 * j + 4 * h).cast());
                    let bits = _mm256_shuffle_epi8(_mm256_set1_epi32(m), spread);
                    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bits, probe), probe);
                    w = _mm256_or_si256(w, _mm256_and_si256(set, _mm256_set1_epi8(16 << b)));
                }
                (w, w)
            };
            // The bit planes cost more to unpack than to keep (spilled) for the next row
            // block; nibbles and bytes are cheaper to unpack again.
            let mut kept = [[(_mm256_setzero_si256(), _mm256_setzero_si256()); 8]; 2];
            if (BITS == 5 || BITS == 6) && R > block {
                for (h, kh) in kept.iter_mut().enumerate() {
                    for (j, q) in kh.iter_mut().enumerate() {
                        *q = unpack(h, j);
                    }
                }
            }
            let quants = |h: usize, j: usize| {
                if (BITS == 5 || BITS == 6) && R > block {
                    kept[h][j]
                } else {
                    unpack(h, j)
                }
            };
            // Column half `h`'s scales (or offsets) at `p`: as `avx512::qmat_rows` forms them.
            let level = |p: *const u8, h: usize, sup: [__m256; 2]| {
                if SUPERS {
                    let l = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8 * h).cast()));
                    _mm256_mul_ps(sup[h], _mm256_cvtepi32_ps(l))
                } else {
                    cvt(p.add(16 * h))
                }
            };
            // Scales and offsets of column half `h`, scale group `p`.
            let form = |h: usize, p: usize| {
                let s = level(sp.add(16 * elem * p), h, sup_d);
                let o = match neg_zero {
                    Some(z) => _mm256_mul_ps(s, z),
                    None => level(sp.add(scale_bytes + 16 * elem * p), h, sup_m),
                };
                (s, o)
            };
            // Several row blocks would form them again, so they are formed once; one row
            // block forms them where it needs them, which spills less.
            let hoist = R > block;
            let mut formed = [[(_mm256_setzero_ps(), _mm256_setzero_ps()); 2]; 2];
            if hoist {
                for (p, fp) in formed.iter_mut().enumerate().take(parts) {
                    for (h, f) in fp.iter_mut().enumerate() {
                        *f = form(h, p);
                    }
                }
            }
            let scale = |h: usize, p: usize| if hoist { formed[p][h] } else { form(h, p) };
            for rb in (0..R).step_by(block) {
                let nb = block.min(R - rb);
                for p in 0..parts {
                    let mut isum = [[_mm256_setzero_si256(); 2]; 4];
                    let js = p * per_part..(p + 1) * per_part;
                    for j0 in js.clone().step_by(run) {
                        let mut lo16 = [[_mm256_setzero_si256(); 2]; 4];
                        let mut hi16 = [[_mm256_setzero_si256(); 2]; 4];
                        for j in j0..(j0 + run).min(js.end) {
                            let w = [quants(0, j), quants(1, j)];
                            for b in 0..nb {
                                let xj = bx(rb + b, j);
                                for h in 0..2 {
                                    let m = _mm256_maddubs_epi16(w[h].0, xj);
                                    lo16[b][h] = _mm256_add_epi16(lo16[b][h], m);
                                    if BITS == 8 {
                                        let m = _mm256_maddubs_epi16(w[h].1, xj);
                                        hi16[b][h] = _mm256_add_epi16(hi16[b][h], m);
                                    }
                                }
                            }
                        }
                        for b in 0..nb {
                            for h in 0..2 {
                                let mut v = _mm256_madd_epi16(lo16[b][h], ones);
                                if BITS == 8 {
                                    let v1 = _mm256_madd_epi16(hi16[b][h], sixteens);
                                    v = _mm256_add_epi32(v, v1);
                                }
                                isum[b][h] = _mm256_add_epi32(isum[b][h], v);
                            }
                        }
                    }
                    for b in 0..nb {
                        let d = _mm256_set1_ps(*dx.add((rb + b) * kd + g));
                        for h in 0..2 {
                            let s = _mm256_mul_ps(scale(h, p).0, d);
                            let a = &mut acc[rb + b][h];
                            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[b][h]), s, *a);
                        }
                    }
                }
                for (r, ar) in acc.iter_mut().enumerate().skip(rb).take(nb) {
                    let sm = sums.add(r * ks + 2 * g);
                    for (h, a) in ar.iter_mut().enumerate() {
                        if HALVES {
                            *a = _mm256_fmadd_ps(scale(h, 0).1, _mm256_set1_ps(*sm), *a);
                            *a = _mm256_fmadd_ps(scale(h, 1).1, _mm256_set1_ps(*sm.add(1)), *a);
                        } else {
                            let sm = _mm256_set1_ps(*sm + *sm.add(1));
                            *a = _mm256_fmadd_ps(scale(h, 0).1, sm, *a);
                        }
                    }
                }
            }
        }
        for (t, a) in tile.iter_mut().zip(acc) {
            _mm256_storeu_ps(t.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(t.as_mut_ptr().add(8), a[1]);
        }
    }
}
