//! The linear layers of the decoder and the hook where LoRA plugs in. Each [`Linear`] knows its
//! [`Site`] (layer and projection); at every forward the caller passes a [`SiteDelta`] that may add
//! a per-row low-rank term, so adapters live outside the model and vary per batch row.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, Module, Storage, Tensor};

use ramole_kernels::Isa;
use ramole_kernels::qmat::{QActs, QMatrix};

use super::qgemm;
use crate::batch::RowSpan;

/// The seven projections of a decoder layer, named as PEFT's `target_modules` name them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum SiteKind {
    #[serde(rename = "q_proj")]
    Q,
    #[serde(rename = "k_proj")]
    K,
    #[serde(rename = "v_proj")]
    V,
    #[serde(rename = "o_proj")]
    O,
    #[serde(rename = "gate_proj")]
    Gate,
    #[serde(rename = "up_proj")]
    Up,
    #[serde(rename = "down_proj")]
    Down,
}

impl SiteKind {
    pub const ALL: [SiteKind; 7] = [
        SiteKind::Q,
        SiteKind::K,
        SiteKind::V,
        SiteKind::O,
        SiteKind::Gate,
        SiteKind::Up,
        SiteKind::Down,
    ];

    /// The module name in Hugging Face / PEFT checkpoints (`q_proj`, ..., `down_proj`).
    pub fn hf_name(self) -> &'static str {
        match self {
            SiteKind::Q => "q_proj",
            SiteKind::K => "k_proj",
            SiteKind::V => "v_proj",
            SiteKind::O => "o_proj",
            SiteKind::Gate => "gate_proj",
            SiteKind::Up => "up_proj",
            SiteKind::Down => "down_proj",
        }
    }

    /// Sites of one layer with the same number read the same activations (q, k and v; gate and
    /// up) and are multiplied in one pass.
    pub fn input(self) -> u8 {
        match self {
            SiteKind::Q | SiteKind::K | SiteKind::V => 0,
            SiteKind::O => 1,
            SiteKind::Gate | SiteKind::Up => 2,
            SiteKind::Down => 3,
        }
    }
}

/// Where a linear layer sits in the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Site {
    pub layer: usize,
    pub kind: SiteKind,
}

impl Site {
    /// The module path in Hugging Face / PEFT checkpoints, e.g.
    /// `model.layers.3.self_attn.q_proj` (weights add `.weight`, PEFT factors `.lora_A.weight`).
    pub fn hf_path(self) -> String {
        let block = match self.kind {
            SiteKind::Q | SiteKind::K | SiteKind::V | SiteKind::O => "self_attn",
            SiteKind::Gate | SiteKind::Up | SiteKind::Down => "mlp",
        };
        format!(
            "model.layers.{}.{block}.{}",
            self.layer,
            self.kind.hf_name()
        )
    }
}

/// Adds a per-row term to a linear layer's output: `y = W x + b + delta(site, x)`.
/// The adapter code implements it; the model only calls it.
pub trait SiteDelta: Sync {
    /// `x`: `[n_tokens, in_features]` packed activations of all rows, `rows`: the span of each batch
    /// row. Returns `[n_tokens, out_features]` to add, or `None` when no row has an adapter here.
    fn delta(
        &self,
        site: Site,
        x: &Tensor,
        rows: &[RowSpan],
    ) -> candle_core::Result<Option<Tensor>>;

    /// Adds the same term into `y` (`[n_tokens, out_features]` row-major, on the CPU). A decode
    /// step calls this ~200 times: implementations that write in place spare a tensor and an
    /// addition each time.
    fn add_into(
        &self,
        site: Site,
        x: &Tensor,
        rows: &[RowSpan],
        y: &mut [f32],
    ) -> candle_core::Result<()> {
        match self.delta(site, x, rows)? {
            Some(d) => add_tensor(y, &d),
            None => Ok(()),
        }
    }

    /// Int8 factors to multiply in the base product's own pass over `sites` (sites of one
    /// layer reading one input, see [`SiteKind::input`]), with the activations the base kernel
    /// quantized: the caller hands each one's product `[n, rows]` to [`SiteDelta::add_packed`].
    /// None by default.
    fn packed_a(&self, sites: &[Site]) -> Vec<&QMatrix> {
        let _ = sites;
        Vec::new()
    }

    /// Adds the terms at `sites` into `ys[i]` (`[n, out_i]`), given `a_out[j]`, the quantized
    /// `x` times `packed_a(sites)[j]`ᵀ. By default each site's [`SiteDelta::add_into`].
    fn add_packed(
        &self,
        sites: &[Site],
        x: &Tensor,
        a_out: &[Vec<f32>],
        rows: &[RowSpan],
        ys: &mut [&mut [f32]],
    ) -> candle_core::Result<()> {
        let _ = a_out;
        for (site, y) in sites.iter().zip(ys.iter_mut()) {
            self.add_into(*site, x, rows, y)?;
        }
        Ok(())
    }
}

/// `y += d` for a term `d` of `y`'s shape, as computed by [`SiteDelta::delta`].
pub(crate) fn add_tensor(y: &mut [f32], d: &Tensor) -> candle_core::Result<()> {
    let d: Vec<f32> = d.flatten_all()?.to_vec1()?;
    if d.len() != y.len() {
        candle_core::bail!("a term of {} values added to {}", d.len(), y.len());
    }
    for (a, b) in y.iter_mut().zip(d) {
        *a += b;
    }
    Ok(())
}

/// The base model alone.
pub struct NoDelta;

impl SiteDelta for NoDelta {
    fn delta(&self, _: Site, _: &Tensor, _: &[RowSpan]) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }
}

/// From this many rows on, a quantized linear dequantizes its weight and multiplies in f32
/// (`ramole bench model` measures both sides of this choice). Below it, [`qgemm`] multiplies the
/// quantized weights directly; measured on SmolLM2's shapes (Q8_0, 2 threads) it is faster than
/// dequantizing up to about 32 rows, where the two are even, and the f32 GEMM wins from 48 on.
pub const DENSE_PREFILL_MIN_ROWS: usize = 32;

/// Which kernel multiplies quantized weights for fewer than [`DENSE_PREFILL_MIN_ROWS`] rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantKernel {
    /// Ours ([`qgemm`]) where measured faster than candle's, else candle's.
    #[default]
    Auto,
    /// Always candle's `QMatMul` (8-bit activations, one dot product per row and column): the
    /// reference the benchmark compares against.
    Candle,
    /// Always ours, for every block type it supports.
    Own,
}

/// How one product runs (see [`Linear::forward_rows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// f32 GEMM (dense weights, or quantized ones dequantized for many rows).
    Dense,
    /// [`qgemm`]: f32 activations, weights decoded in registers.
    Own,
    /// candle's `QMatMul`.
    Candle,
    /// [`QMatrix`]: int8 activations, any number of rows.
    Packed,
}

/// A weight matrix `[out_features, in_features]`, dense f32 or quantized (kept in its GGUF
/// block format and multiplied through candle's quantized matmul).
#[derive(Clone)]
pub enum LinearWeight {
    Dense(Tensor),
    Quantized(Arc<QMatMul>, Arc<QTensor>),
    /// Repacked for our int8 kernels (CPU only): every row count goes through [`QMatrix`].
    Packed(Arc<QMatrix>),
}

impl LinearWeight {
    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        match self {
            LinearWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            LinearWeight::Quantized(_, q) => q.storage_size_in_bytes(),
            LinearWeight::Packed(m) => m.bytes(),
        }
    }
}

#[derive(Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    site: Option<Site>,
    in_features: usize,
    out_features: usize,
    kernel: QuantKernel,
}

impl Linear {
    pub fn new(
        weight: LinearWeight,
        bias: Option<Tensor>,
        site: Option<Site>,
        out_features: usize,
        in_features: usize,
    ) -> Self {
        Self {
            weight,
            bias,
            site,
            in_features,
            out_features,
            kernel: QuantKernel::default(),
        }
    }

    /// The same layer multiplying its quantized weight (few rows) with `kernel`.
    pub fn with_quant_kernel(&self, kernel: QuantKernel) -> Self {
        Self {
            kernel,
            ..self.clone()
        }
    }

    pub fn quant_kernel(&self) -> QuantKernel {
        self.kernel
    }

    pub fn site(&self) -> Option<Site> {
        self.site
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    pub fn is_quantized(&self) -> bool {
        matches!(
            self.weight,
            LinearWeight::Quantized(..) | LinearWeight::Packed(_)
        )
    }

    /// The weight as dense f32 `[out, in]` (dequantized when quantized).
    pub fn dense_weight(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok(w.clone()),
            LinearWeight::Quantized(_, q) => q.dequantize(&q.device()),
            LinearWeight::Packed(m) => Tensor::from_vec(
                m.dequantize(),
                (m.rows(), m.cols()),
                &candle_core::Device::Cpu,
            ),
        }
    }

    /// The same layer with its weight dequantized to f32: the slow reference of the quantized path.
    pub fn dequantized(&self) -> candle_core::Result<Self> {
        Ok(Self {
            weight: LinearWeight::Dense(self.dense_weight()?),
            ..self.clone()
        })
    }

    /// The same layer with `delta` (`[out, in]`) added to its weight, dequantized to f32.
    pub fn with_weight_added(&self, delta: &Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            weight: LinearWeight::Dense((self.dense_weight()? + delta)?),
            ..self.clone()
        })
    }

    /// `x`: `[n, in_features]` -> `[n, out_features]`, plus the site's delta for each row.
    pub fn forward(
        &self,
        x: &Tensor,
        rows: &[RowSpan],
        delta: &dyn SiteDelta,
    ) -> candle_core::Result<Tensor> {
        if matches!(self.weight, LinearWeight::Packed(_)) && !x.track_op() {
            let [y] = Self::forward_many([self], x, rows, delta)?;
            return Ok(y);
        }
        let mut y = self.forward_rows(x, rows)?;
        if let Some(site) = self.site
            && let Some(d) = delta.delta(site, x, rows)?
        {
            y = (y + d)?;
        }
        Ok(y)
    }

    /// [`Linear::forward`] of several linears reading the same `x` (q, k and v; gate and up):
    /// where all hold packed weights, `x` is quantized once and the products share one split over
    /// the threads (each the same numbers as alone). `x`: `[n, in_features]`.
    pub fn forward_many<const N: usize>(
        linears: [&Linear; N],
        x: &Tensor,
        rows: &[RowSpan],
        delta: &dyn SiteDelta,
    ) -> candle_core::Result<[Tensor; N]> {
        let packed: Option<Vec<&QMatrix>> = linears
            .iter()
            .map(|l| match &l.weight {
                LinearWeight::Packed(m) => Some(&**m),
                _ => None,
            })
            .collect();
        let (Some(packed), false) = (packed, x.track_op()) else {
            return try_array(linears.map(|l| l.forward(x, rows, delta)));
        };
        let x = x.contiguous()?;
        let m = x.dim(0)?;
        let mut ys: Vec<Vec<f32>> = packed.iter().map(|w| vec![0f32; m * w.rows()]).collect();
        // Every linear of the decoder has a site; the mixture's int8 `A` factors of these sites
        // ride along in the base product's pass.
        let sites: Option<Vec<Site>> = linears.iter().map(|l| l.site).collect();
        let extra = sites
            .as_deref()
            .map_or_else(Vec::new, |s| delta.packed_a(s));
        let mut a_out: Vec<Vec<f32>> = extra.iter().map(|w| vec![0f32; m * w.rows()]).collect();
        {
            let (storage, layout) = x.storage_and_layout();
            let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) =
                (&*storage, layout.contiguous_offsets())
            else {
                candle_core::bail!("packed weights multiply contiguous f32 activations on the CPU")
            };
            let acts = QActs::quantize(&v[a..b], m, packed[0].cols());
            let mut parts: Vec<(&QMatrix, &mut [f32])> = packed
                .iter()
                .zip(ys.iter_mut())
                .chain(extra.iter().zip(a_out.iter_mut()))
                .map(|(w, y)| (*w, y.as_mut_slice()))
                .collect();
            QMatrix::matmul_many(Isa::detect(), &mut parts, &acts);
        }
        match &sites {
            Some(sites) => {
                let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
                delta.add_packed(sites, &x, &a_out, rows, &mut outs)?;
            }
            None => {
                for (l, y) in linears.iter().zip(ys.iter_mut()) {
                    if let Some(site) = l.site {
                        delta.add_into(site, &x, rows, y)?;
                    }
                }
            }
        }
        let mut ys = ys.into_iter();
        try_array(linears.map(|l| {
            let y = ys.next().expect("one output per linear");
            let y = Tensor::from_vec(y, (m, l.out_features), x.device())?;
            match &l.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            }
        }))
    }

    /// `W x + b` without any delta. `x`: `[n, in_features]`.
    pub fn forward_base(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, self.path(x.dim(0)?))
    }

    /// How a quantized weight is multiplied with `rows` rows of activations.
    fn path(&self, rows: usize) -> Path {
        match &self.weight {
            LinearWeight::Dense(_) => Path::Dense,
            LinearWeight::Packed(_) => Path::Packed,
            // candle's quantized matmul does one dot product per (row, column) with no reuse of
            // weights across rows, so for many rows (prefill) it is much faster to dequantize the
            // weight once and run the f32 GEMM. Same weights, f32 activations: as exact as the
            // dequantized reference, more exact than the 8-bit-activation kernel.
            LinearWeight::Quantized(..) if rows >= DENSE_PREFILL_MIN_ROWS => Path::Dense,
            LinearWeight::Quantized(_, q) => {
                let wanted = match self.kernel {
                    QuantKernel::Candle => false,
                    QuantKernel::Own => true,
                    QuantKernel::Auto => rows >= own_kernel_min_rows(q.dtype()),
                };
                if wanted && qgemm::supports(q.dtype()) {
                    Path::Own
                } else {
                    Path::Candle
                }
            }
        }
    }

    /// The base product of a batch, each row computed by the path it takes when it runs alone:
    /// the paths round differently (candle's kernel quantizes activations to 8 bits), and a row's
    /// numbers must not depend on its neighbours, or greedy decoding in a batch would differ
    /// from the same request alone. `rows` spans `x`'s rows back to back.
    pub fn forward_rows(&self, x: &Tensor, rows: &[RowSpan]) -> candle_core::Result<Tensor> {
        if x.track_op() {
            return self.forward_with(x, Path::Dense);
        }
        let paths: Vec<Path> = rows.iter().map(|r| self.path(r.len)).collect();
        let Some(&first) = paths.first() else {
            return self.forward_base(x);
        };
        if paths.iter().all(|&p| p == first) {
            return self.forward_with(x, first);
        }
        let n = x.dim(0)?;
        let mut y = Tensor::zeros((n, self.out_features), x.dtype(), x.device())?;
        let mut done = vec![false; rows.len()];
        for i in 0..rows.len() {
            if done[i] {
                continue;
            }
            let mut idx: Vec<u32> = Vec::new();
            for (j, r) in rows.iter().enumerate() {
                if !done[j] && paths[j] == paths[i] {
                    done[j] = true;
                    idx.extend((r.start..r.start + r.len).map(|t| t as u32));
                }
            }
            let idx = Tensor::from_vec(idx.clone(), idx.len(), x.device())?;
            let part = self.forward_with(&x.index_select(&idx, 0)?, paths[i])?;
            y = y.index_add(&idx, &part, 0)?;
        }
        Ok(y)
    }

    /// `W x + b` along `path`. `x`: `[n, in_features]`.
    fn forward_with(&self, x: &Tensor, path: Path) -> candle_core::Result<Tensor> {
        // Training: activations that depend on trainable factors need a backward pass, which
        // candle's quantized matmul lacks, and candle's dense matmul would spend as much again on
        // the frozen weight's gradient. The frozen product returns only the input's gradient.
        if x.track_op() && x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
            let w = self.dense_weight()?;
            let y = x.contiguous()?.apply_op1(FrozenProduct { w })?;
            return match &self.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
        }
        let y = match (&self.weight, path) {
            (LinearWeight::Dense(w), _) => x.matmul(&w.t()?)?,
            (LinearWeight::Quantized(_, q), Path::Dense) => {
                x.matmul(&q.dequantize(x.device())?.t()?)?
            }
            (LinearWeight::Quantized(m, q), Path::Own) => {
                let x = x.contiguous()?;
                match self.own_kernel(&x, q)? {
                    Some(y) => y,
                    None => m.forward(&x)?,
                }
            }
            (LinearWeight::Quantized(m, _), Path::Candle) => m.forward(&x.contiguous()?)?,
            (LinearWeight::Packed(m), _) => packed_matmul(m, &x.contiguous()?)?,
            (LinearWeight::Quantized(..), Path::Packed) => {
                unreachable!("only packed weights take the packed path")
            }
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// `x W^T` through [`qgemm`] when the kernel choice and the inputs allow it (f32 activations
    /// on the CPU, a supported block type); `None` leaves it to candle. `x`: `[m, in]`, contiguous.
    fn own_kernel(&self, x: &Tensor, q: &QTensor) -> candle_core::Result<Option<Tensor>> {
        let m = x.dim(0)?;
        let (storage, layout) = x.storage_and_layout();
        let xs = match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
            _ => return Ok(None),
        };
        let y = qgemm::matmul(q, xs, m).map_err(candle_core::Error::wrap)?;
        drop(storage);
        Ok(Some(Tensor::from_vec(
            y,
            (m, self.out_features),
            x.device(),
        )?))
    }
}

/// `x Wᵀ` through [`QMatrix`]: `x` `[m, in]` f32, contiguous, quantized to int8 per group of 32.
fn packed_matmul(w: &QMatrix, x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.dim(0)?;
    let (storage, layout) = x.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) = (&*storage, layout.contiguous_offsets())
    else {
        candle_core::bail!("packed weights multiply contiguous f32 activations on the CPU")
    };
    let acts = QActs::quantize(&v[a..b], m, w.cols());
    drop(storage);
    let mut y = vec![0f32; m * w.rows()];
    w.matmul(Isa::detect(), &acts, &mut y);
    Tensor::from_vec(y, (m, w.rows()), x.device())
}

/// From how many rows [`QuantKernel::Auto`] uses [`qgemm`] for weights of `dtype` (measured with
/// `ramole bench model --batches` on SmolLM2's shapes, AVX2, 1 and 2 threads):
/// - Q8_0: from 1 row. At one row ours is as fast as candle's int8 dot products (29.9 vs 25.6
///   tok/s decode on 1 thread, 48.6 vs 49.3 on 2), much faster from 2 rows on, and it does not
///   spin like candle's barrier pool when the cores are shared.
/// - Q4_1, Q5_0, Q5_1: from 2 rows; candle multiplies them with a scalar loop (2x from 2 rows).
/// - Q4_0: from 8 rows; decoding whole rows to f32 costs more than candle's AVX2 dot products below.
/// - k-quants: never; candle's AVX2 kernels are 5-10x faster than decoding with the scalar
///   `to_float` at every row count up to 8.
fn own_kernel_min_rows(dtype: GgmlDType) -> usize {
    match dtype {
        GgmlDType::Q8_0 => 1,
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => 2,
        GgmlDType::Q4_0 => 8,
        _ => usize::MAX,
    }
}

/// `x Wᵀ` with `W` a constant: its backward pass computes only `∂x = ∂y W`, never the weight's
/// gradient that candle's matmul would compute and throw away. `x`: `[n, in]`, `W`: `[out, in]`.
struct FrozenProduct {
    w: Tensor,
}

impl candle_core::CustomOp1 for FrozenProduct {
    fn name(&self) -> &'static str {
        "frozen-product"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let (CpuStorage::F32(v), Some((a, b))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("frozen-product: expects contiguous f32 activations")
        };
        // A CPU op: the activations are in host memory.
        let x = Tensor::from_slice(&v[a..b], layout.shape(), &candle_core::Device::Cpu)?;
        let y = x.matmul(&self.w.t()?)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1()?), shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_y.matmul(&self.w)?))
    }
}

/// The first error of `N` results, or their values.
fn try_array<T, const N: usize>(
    results: [candle_core::Result<T>; N],
) -> candle_core::Result<[T; N]> {
    let mut out = Vec::with_capacity(N);
    for r in results {
        out.push(r?);
    }
    Ok(out
        .try_into()
        .unwrap_or_else(|_| unreachable!("N results give N values")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Our packing decodes every GGUF block type as ggml (candle) does: the packed values equal
    /// candle's dequantized ones up to the f16 rounding of the k-quants' combined scales, and the
    /// packed linear multiplies within the activation-rounding bound of the f32 product.
    #[test]
    fn packed_weights_decode_as_candle_does_for_every_block_type() {
        use candle_core::quantized::GgmlDType;
        let dev = Device::Cpu;
        let (n, k) = (40, 512);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let want: Vec<f32> = q
                .dequantize(&dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let qtype = super::super::decoder::qtype_of(dtype).unwrap();
            let m = QMatrix::pack(qtype, &q.data().unwrap(), n, k).unwrap();
            let got = m.dequantize();
            let amax = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // f16 scales: 2^-11 relative; the largest value sets the scale of the error.
            assert!(
                worst <= 2e-3 * amax,
                "{dtype:?}: max |diff| {worst} (values up to {amax})"
            );
            let lin = Linear::new(LinearWeight::Packed(Arc::new(m)), None, None, n, k);
            let x = Tensor::randn(0f32, 1.0, (3, k), &dev).unwrap();
            let y = lin.forward_base(&x).unwrap();
            let reference = x.matmul(&lin.dense_weight().unwrap().t().unwrap()).unwrap();
            let diff: f32 = (y - &reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            let spread: f32 = reference
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(
                diff < 0.02 * spread,
                "{dtype:?}: packed product off by {diff} of {spread}"
            );
        }
    }

    /// The frozen product's backward (input gradient only) against candle's matmul backward.
    #[test]
    fn frozen_product_gradient_matches_candle_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        let lin = Linear::new(
            LinearWeight::Dense(w.clone()),
            Some(bias.clone()),
            None,
            5,
            3,
        );
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap();
        let ours = lin.forward_base(x.as_tensor()).unwrap();
        let reference = x
            .as_tensor()
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        let close = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            d.to_scalar::<f32>().unwrap()
        };
        assert!(close(&ours, &reference) < 1e-5);
        let grad = |y: &Tensor| {
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(x.as_tensor()).unwrap().clone()
        };
        assert!(close(&grad(&ours), &grad(&reference)) < 1e-5);
    }
}
