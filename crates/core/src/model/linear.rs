//! The linear layers of the decoder and the hook where LoRA plugs in. Each [`Linear`] knows its
//! [`Site`] (layer and projection); at every forward the caller passes a [`SiteDelta`] that may add
//! a per-row low-rank term, so adapters live outside the model and vary per batch row.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Tensor};

/// The seven projections of a decoder layer, named as PEFT's `target_modules` name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SiteKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
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

/// The tokens of one batch row inside the packed `[n_tokens, features]` activations:
/// rows `start .. start + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSpan {
    pub start: usize,
    pub len: usize,
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
}

/// The base model alone.
pub struct NoDelta;

impl SiteDelta for NoDelta {
    fn delta(&self, _: Site, _: &Tensor, _: &[RowSpan]) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }
}

/// From this many rows on, a quantized linear dequantizes its weight and multiplies in f32
/// (`ramole bench model` measures both sides of this choice).
pub const DENSE_PREFILL_MIN_ROWS: usize = 24;

/// A weight matrix `[out_features, in_features]`, dense f32 or quantized (kept in its GGUF
/// block format and multiplied through candle's quantized matmul).
#[derive(Clone)]
pub enum LinearWeight {
    Dense(Tensor),
    Quantized(Arc<QMatMul>, Arc<QTensor>),
}

#[derive(Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    site: Option<Site>,
    in_features: usize,
    out_features: usize,
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
        }
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
        matches!(self.weight, LinearWeight::Quantized(..))
    }

    /// The weight as dense f32 `[out, in]` (dequantized when quantized).
    pub fn dense_weight(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok(w.clone()),
            LinearWeight::Quantized(_, q) => q.dequantize(&q.device()),
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
        let mut y = self.forward_base(x)?;
        if let Some(site) = self.site
            && let Some(d) = delta.delta(site, x, rows)?
        {
            y = (y + d)?;
        }
        Ok(y)
    }

    /// `W x + b` without any delta. `x`: `[n, in_features]`.
    pub fn forward_base(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense(w) => x.matmul(&w.t()?)?,
            // candle's quantized matmul does one dot product per (row, column) with no reuse of
            // weights across rows, so for many rows (prefill) it is much faster to dequantize the
            // weight once and run the f32 GEMM. Same weights, f32 activations: as exact as the
            // dequantized reference, more exact than the 8-bit-activation kernel.
            LinearWeight::Quantized(_, q) if x.dim(0)? >= DENSE_PREFILL_MIN_ROWS => {
                x.matmul(&q.dequantize(x.device())?.t()?)?
            }
            LinearWeight::Quantized(m, _) => m.forward(&x.contiguous()?)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
