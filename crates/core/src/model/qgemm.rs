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
//! This module owns the split over output columns and the decoding of candle's block types; the
//! arithmetic is `ramole_kernels::qdot` (AVX2 or portable, chosen at run time);
//! [`super::linear::Linear`] decides when to call it.

use std::borrow::Cow;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0, BlockQ8K, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use rayon::prelude::*;

use ramole_kernels::Isa;
use ramole_kernels::qdot::{self, MR, QK, WeightRow};

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
    matmul_with(w, x, m, Isa::detect())
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
            isa,
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

/// One task: the weight rows `w` (`out.len() / m` of them, `row_bytes` each) against all `m`
/// rows of `x` `[m, k]`; `out` `[cols, m]` (column-major output block).
#[allow(clippy::too_many_arguments)]
fn columns(
    format: Format,
    dtype: GgmlDType,
    isa: Isa,
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
                    qdot::dot_rows(
                        isa,
                        WeightRow::Q8_0(wrow),
                        xs,
                        rows,
                        k,
                        &mut o[r0..r0 + rows],
                    );
                }
            }
            Format::Rows => {
                dequantize_row(dtype, wrow, &mut buf);
                for r0 in (0..m).step_by(MR) {
                    let rows = MR.min(m - r0);
                    let xs = &x[r0 * k..(r0 + rows) * k];
                    qdot::dot_rows(
                        isa,
                        WeightRow::F32(&buf),
                        xs,
                        rows,
                        k,
                        &mut o[r0..r0 + rows],
                    );
                }
            }
        }
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
            for isa in Isa::available() {
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
            !cfg!(target_arch = "x86_64") || Isa::detect().has_avx2(),
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
