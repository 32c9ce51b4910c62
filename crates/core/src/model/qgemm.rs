//! Our quantized matrix multiply for few rows (decode, batched decode): `y = x W^T` with `W` kept
//! in its GGUF block format and `x` in f32. candle's CPU quantized matmul quantizes `x` to 8 bits
//! and runs one dot product per (row, column), so every row reads and decodes the whole weight
//! again and batched decode costs as much per row as decoding one row. Here each weight block is
//! decoded into registers once and multiplied with up to [`MR`] rows, so a batch of 8 costs little
//! more than one row while the weights stream from memory once. Activations stay f32: the result
//! equals the dequantized-weight reference up to summation order.
//!
//! Q8_0 weights are read in place from the tensor's own bytes (no copy, no repacking): with 8 rows
//! the kernel is bound by its 32 FMAs per block, not by reading the block, and reading in place
//! avoids holding a second copy of the weights next to candle's. Other block types are decoded
//! one weight row at a time with candle's `to_float` into a small per-task f32 buffer and
//! multiplied with the same f32 kernel.
//!
//! This module owns the kernels (AVX2/FMA/F16C chosen at run time, a portable fallback) and their
//! parallel split over output columns; [`super::linear::Linear`] decides when to call them.

use std::borrow::Cow;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0, BlockQ8K, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use rayon::prelude::*;

/// Rows multiplied per pass over a weight column: 8 rows x 1 column of f32 accumulators fill
/// 8 of the 16 AVX2 registers and leave room for the 4 decoded weight vectors.
pub const MR: usize = 8;

/// Bytes of a GGUF Q8_0 block: f16 scale, then 32 signed 8-bit values.
const Q8_0_BYTES: usize = 34;
/// Elements per Q8_0 block, and the chunk the f32 kernels walk `k` in (every GGUF block type has
/// 32 or 256 elements, so `k` is always a multiple of it).
const QK: usize = 32;

/// Which kernel runs; `Auto` takes AVX2/FMA/F16C when the CPU has them.
// `Portable` is forced only by the tests, which check both kernels on an AVX2 machine.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Auto,
    Portable,
}

/// How the weights are decoded: Q8_0 in registers, anything else through an f32 row buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Q8_0,
    /// Decoded per weight row with candle's `to_float`.
    Rows,
}

/// Whether [`matmul`] handles weights of `dtype` (the block types candle quantizes into).
pub fn supports(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q4_0
            | GgmlDType::Q4_1
            | GgmlDType::Q5_0
            | GgmlDType::Q5_1
            | GgmlDType::Q8_0
            | GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
            | GgmlDType::Q8K
    )
}

#[derive(Debug, thiserror::Error)]
pub enum QGemmError {
    #[error("quantized matmul: weights of type {0:?} are not supported")]
    Unsupported(GgmlDType),
    #[error("quantized matmul: {0}")]
    Shape(String),
    #[error("quantized matmul: reading the weights: {0}")]
    Candle(#[from] candle_core::Error),
}

/// `x` `[m, k]` (row-major f32) times the transpose of `w` `[n, k]` (GGUF blocks along `k`):
/// returns `y` `[m, n]` row-major.
pub fn matmul(w: &QTensor, x: &[f32], m: usize) -> Result<Vec<f32>, QGemmError> {
    matmul_with(w, x, m, Isa::Auto)
}

pub(crate) fn matmul_with(
    w: &QTensor,
    x: &[f32],
    m: usize,
    isa: Isa,
) -> Result<Vec<f32>, QGemmError> {
    let dtype = w.dtype();
    if !supports(dtype) {
        return Err(QGemmError::Unsupported(dtype));
    }
    let (n, k) = w
        .shape()
        .dims2()
        .map_err(|_| QGemmError::Shape(format!("weights {:?} are not a matrix", w.shape())))?;
    if x.len() != m * k {
        return Err(QGemmError::Shape(format!(
            "x has {} values, expected {m} x {k}",
            x.len()
        )));
    }
    let row_bytes = k / dtype.block_size() * dtype.type_size();
    // On the CPU this borrows candle's storage: no copy.
    let data: Cow<'_, [u8]> = w.data()?;
    if data.len() != n * row_bytes || !k.is_multiple_of(QK) {
        return Err(QGemmError::Shape(format!(
            "{} weight bytes for [{n}, {k}] of {dtype:?}",
            data.len()
        )));
    }
    let format = if dtype == GgmlDType::Q8_0 {
        Format::Q8_0
    } else {
        Format::Rows
    };
    let avx2 = isa == Isa::Auto && has_avx2();
    let mut yt = vec![0f32; n * m];
    if m == 0 || n == 0 {
        return Ok(yt);
    }
    // Columns are split into tasks of at least ~32K weights (a few microseconds of work), so the
    // split costs little next to the work; at most 8 tasks per thread keeps the load balanced
    // when the other core is busy.
    // One thread runs it all inline: handing work to a one-thread pool only adds a hop.
    let threads = rayon::current_num_threads().max(1);
    let tasks = if threads == 1 {
        1
    } else {
        (n * k / (32 * 1024)).clamp(1, threads * 8).min(n)
    };
    let cols = n.div_ceil(tasks);
    let run = |c0: usize, out: &mut [f32]| {
        let c1 = (c0 + out.len() / m).min(n);
        columns(
            format,
            dtype,
            avx2,
            &data[c0 * row_bytes..c1 * row_bytes],
            row_bytes,
            x,
            m,
            k,
            out,
        );
    };
    // Each task writes the columns it owns into `yt` `[n, m]`, a contiguous slice per task;
    // the transpose to `[m, n]` below is one cheap pass over the output.
    if tasks == 1 {
        run(0, &mut yt);
    } else {
        yt.par_chunks_mut(cols * m)
            .enumerate()
            .for_each(|(t, out)| run(t * cols, out));
    }
    if m == 1 {
        return Ok(yt);
    }
    let mut y = vec![0f32; m * n];
    for (j, col) in yt.chunks_exact(m).enumerate() {
        for (r, v) in col.iter().enumerate() {
            y[r * n + j] = *v;
        }
    }
    Ok(y)
}

/// Whether the CPU has what the AVX2 kernels here (and the index's f16 scan) use: AVX2, FMA, F16C.
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One task: the weight rows `w` (`out.len() / m` of them, `row_bytes` each) against all `m`
/// rows of `x` `[m, k]`; `out` `[cols, m]` (column-major output block).
#[allow(clippy::too_many_arguments)]
fn columns(
    format: Format,
    dtype: GgmlDType,
    avx2: bool,
    w: &[u8],
    row_bytes: usize,
    x: &[f32],
    m: usize,
    k: usize,
    out: &mut [f32],
) {
    // Only the row-decoding format needs a buffer: one weight row in f32, reused (k * 4 bytes,
    // stays in L1/L2 while the m rows read it).
    let mut buf = match format {
        Format::Q8_0 => Vec::new(),
        Format::Rows => vec![0f32; k],
    };
    for (wrow, o) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(m)) {
        // The column is the outer loop and the row groups the inner one, so the weight row
        // (at most a few KB) is still in L1 when the next group of rows reads it.
        match format {
            Format::Q8_0 => {
                for r0 in (0..m).step_by(MR) {
                    let rows = MR.min(m - r0);
                    let xs = &x[r0 * k..(r0 + rows) * k];
                    dot_rows(Src::Q8_0(wrow), avx2, xs, rows, k, &mut o[r0..r0 + rows]);
                }
            }
            Format::Rows => {
                dequantize_row(dtype, wrow, &mut buf);
                for r0 in (0..m).step_by(MR) {
                    let rows = MR.min(m - r0);
                    let xs = &x[r0 * k..(r0 + rows) * k];
                    dot_rows(Src::F32(&buf), avx2, xs, rows, k, &mut o[r0..r0 + rows]);
                }
            }
        }
    }
}

/// One weight row in either form.
#[derive(Clone, Copy)]
enum Src<'a> {
    /// `k / 32` Q8_0 blocks.
    Q8_0(&'a [u8]),
    /// `k` values.
    F32(&'a [f32]),
}

/// `out[r] = dot(x[r], w)` for `rows <= MR` rows of `x` `[rows, k]`.
fn dot_rows(w: Src<'_>, avx2: bool, x: &[f32], rows: usize, k: usize, out: &mut [f32]) {
    debug_assert!(rows <= MR && x.len() == rows * k && out.len() == rows);
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is true only when the CPU has AVX2, FMA and F16C (`has_avx2`); the
        // slice lengths are checked by the callers (`matmul_with`) and asserted in the kernel.
        unsafe { avx2::dot_rows(w, x, rows, k, out) };
        return;
    }
    let _ = avx2;
    portable_dot_rows(w, x, rows, k, out);
}

/// The reference kernel: each weight block is decoded once into f32 (`q * d`, as candle's
/// `to_float` does) and multiplied with every row.
fn portable_dot_rows(w: Src<'_>, x: &[f32], rows: usize, k: usize, out: &mut [f32]) {
    let mut acc = [[0f32; 8]; MR];
    let mut wb = [0f32; QK];
    for b in 0..k / QK {
        let wb: &[f32] = match w {
            Src::Q8_0(bytes) => {
                let blk = &bytes[b * Q8_0_BYTES..(b + 1) * Q8_0_BYTES];
                let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                for (v, &q) in wb.iter_mut().zip(&blk[2..]) {
                    *v = f32::from(q as i8) * d;
                }
                &wb
            }
            Src::F32(v) => &v[b * QK..(b + 1) * QK],
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

/// Decodes one weight row (`k` values) of a candle block type into `out`.
fn dequantize_row(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    fn go<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
        let size = std::mem::size_of::<T>();
        assert!(
            bytes.len().is_multiple_of(size)
                && (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()),
            "weight row is not a whole, aligned run of blocks"
        );
        // SAFETY: candle's block types are `#[repr(C)]` plain data (f16 and integer fields, any
        // bit pattern is valid); the bytes come from candle's own `Vec<T>` storage (a row starts at
        // a whole number of blocks), and length and alignment are checked just above.
        let blocks =
            unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) };
        T::to_float(blocks, out);
    }
    match dtype {
        GgmlDType::Q4_0 => go::<BlockQ4_0>(bytes, out),
        GgmlDType::Q4_1 => go::<BlockQ4_1>(bytes, out),
        GgmlDType::Q5_0 => go::<BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => go::<BlockQ5_1>(bytes, out),
        GgmlDType::Q8_0 => go::<BlockQ8_0>(bytes, out),
        GgmlDType::Q2K => go::<BlockQ2K>(bytes, out),
        GgmlDType::Q3K => go::<BlockQ3K>(bytes, out),
        GgmlDType::Q4K => go::<BlockQ4K>(bytes, out),
        GgmlDType::Q5K => go::<BlockQ5K>(bytes, out),
        GgmlDType::Q6K => go::<BlockQ6K>(bytes, out),
        GgmlDType::Q8K => go::<BlockQ8K>(bytes, out),
        other => unreachable!("{other:?} is refused by `supports`"),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{MR, Q8_0_BYTES, QK, Src};

    /// `out[r] = dot(x[r], w)` for `rows <= MR` rows of `x` `[rows, k]`, `k % 32 == 0`.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows(w: Src<'_>, x: &[f32], rows: usize, k: usize, out: &mut [f32]) {
        assert!(rows <= MR && x.len() == rows * k && out.len() == rows && k.is_multiple_of(QK));
        match w {
            Src::Q8_0(b) => assert_eq!(b.len(), k / QK * Q8_0_BYTES),
            Src::F32(v) => assert_eq!(v.len(), k),
        }
        // Few rows give few independent FMA chains; with P partial sums per row there are
        // rows * P chains, enough to cover the FMA latency (4 cycles, 2 units on Zen3).
        // SAFETY (all arms): the features are enabled on this function; lengths asserted above.
        unsafe {
            match rows {
                1 => kernel::<1, 4>(w, x, k, out),
                2 => kernel::<2, 4>(w, x, k, out),
                3 => kernel::<3, 2>(w, x, k, out),
                4 => kernel::<4, 2>(w, x, k, out),
                5 => kernel::<5, 1>(w, x, k, out),
                6 => kernel::<6, 1>(w, x, k, out),
                7 => kernel::<7, 1>(w, x, k, out),
                _ => kernel::<8, 1>(w, x, k, out),
            }
        }
    }

    /// Eight f32 weights of chunk `c` (0..4) of block `b`: for Q8_0 sign-extended, converted and
    /// scaled by the block's `d` (exact in f32: 8-bit times 11-bit mantissa), as candle's
    /// `to_float` computes them.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block(w: Src<'_>, b: usize) -> [__m256; 4] {
        match w {
            Src::Q8_0(bytes) => {
                let p = bytes[b * Q8_0_BYTES..(b + 1) * Q8_0_BYTES].as_ptr();
                // SAFETY: the slice above holds the 34 bytes read here (2-byte scale, 4 x 8
                // bytes); unaligned loads.
                unsafe {
                    let bits = u16::from_le_bytes([*p, *p.add(1)]);
                    let d = _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                        i32::from(bits),
                    ))));
                    let q = p.add(2);
                    [
                        q8_chunk(q, d),
                        q8_chunk(q.add(8), d),
                        q8_chunk(q.add(16), d),
                        q8_chunk(q.add(24), d),
                    ]
                }
            }
            Src::F32(v) => {
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
    unsafe fn q8_chunk(q: *const u8, d: __m256) -> __m256 {
        // SAFETY: 8 readable bytes at `q` (caller); unaligned load.
        let i8s = unsafe { _mm_loadl_epi64(q.cast()) };
        _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(i8s)), d)
    }

    /// `R` rows, `P` partial sums per row (chunk `c` of a block goes to sum `c % P`).
    ///
    /// # Safety
    /// AVX2/FMA/F16C; `x.len() == R * k`, `out.len() == R`, `w` holds `k` weights.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn kernel<const R: usize, const P: usize>(
        w: Src<'_>,
        x: &[f32],
        k: usize,
        out: &mut [f32],
    ) {
        let mut acc = [[_mm256_setzero_ps(); P]; R];
        let xp = x.as_ptr();
        for b in 0..k / QK {
            // SAFETY: `block` reads inside `w` (asserted by `dot_rows`); each x load reads
            // 8 values at r * k + b * 32 + 8 * c < R * k = x.len().
            unsafe {
                let wv = block(w, b);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    /// Random `[n, k]` weights quantized to `dtype`, and `x` `[m, k]`.
    fn case(dtype: GgmlDType, n: usize, k: usize, m: usize, seed: u64) -> (QTensor, Vec<f32>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        (QTensor::quantize(&w, dtype).unwrap(), x)
    }

    /// The reference: candle dequantizes, then the f32 matmul.
    fn reference(w: &QTensor, x: &[f32], m: usize) -> Vec<f32> {
        let k = w.shape().dims2().unwrap().1;
        let wd = w.dequantize(&Device::Cpu).unwrap();
        let x = Tensor::from_slice(x, (m, k), &Device::Cpu).unwrap();
        x.matmul(&wd.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn check(dtype: GgmlDType, n: usize, k: usize, ms: &[usize]) {
        for &m in ms {
            let (w, x) = case(dtype, n, k, m, (n * 31 + k * 7 + m) as u64);
            let want = reference(&w, &x, m);
            for isa in [Isa::Auto, Isa::Portable] {
                let got = matmul_with(&w, &x, m, isa).unwrap();
                assert_eq!(got.len(), want.len());
                // Dot products of k terms of size ~1: only the summation order differs.
                let tol = 1e-5 * (k as f32).sqrt() * 4.0;
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - w).abs())
                    .fold(0.0, f32::max);
                assert!(
                    worst < tol,
                    "{dtype:?} n={n} k={k} m={m} {isa:?}: max |diff| {worst}"
                );
            }
        }
    }

    const MS: [usize; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 17];

    #[test]
    fn qgemm_q8_0_equals_dequantized_reference() {
        assert!(
            !cfg!(target_arch = "x86_64") || has_avx2(),
            "the AVX2 path is what these tests check on x86_64"
        );
        // k = 576, 1536 are not multiples of 256; n = 193, 77 are not multiples of anything.
        for (n, k) in [(193, 576), (77, 1536), (64, 32), (5, 96), (1200, 576)] {
            check(GgmlDType::Q8_0, n, k, &MS);
        }
    }

    #[test]
    fn qgemm_other_types_equal_dequantized_reference() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_1] {
            check(dtype, 67, 576, &MS);
        }
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q2K] {
            check(dtype, 37, 1536, &MS);
            check(dtype, 11, 256, &[1, 8, 9]);
        }
    }

    #[test]
    fn qgemm_refuses_bad_shapes_and_types() {
        let (w, x) = case(GgmlDType::Q8_0, 4, 64, 2, 1);
        assert!(matches!(
            matmul(&w, &x[..100], 2),
            Err(QGemmError::Shape(_))
        ));
        assert!(!supports(GgmlDType::F16));
    }
}
