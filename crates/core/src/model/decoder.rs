//! The Llama-family decoder: embeddings, pre-norm attention (GQA, RoPE) and SwiGLU blocks,
//! final norm and LM head. A forward pass takes a batch of rows, each with its own new tokens
//! and its own [`SeqCache`]; rows are packed into one `[n_tokens, hidden]` matrix for every linear
//! layer (no padding is ever computed), and attention runs per row with a causal mask offset by
//! that row's cache length, which is what padding plus masks would compute, without the waste.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use ramole_kernels::Isa;
use ramole_kernels::attention::{Attention, KvView};
use ramole_kernels::qmat::{QMatrix, QType};

use super::cache::SeqCache;
use super::config::{ModelConfig, RopeStyle};
use super::linear::{Linear, LinearWeight, QuantKernel, Site, SiteDelta, SiteKind};
use super::weights::{StoredTensor, WeightStore};
use super::{ModelError, Result};
use crate::batch::RowSpan;

/// Which positions to return logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsAt {
    /// The last new token of each row: `[rows, vocab]`.
    Last,
    /// Every new token: `[n_tokens, vocab]`, rows one after another.
    All,
}

/// One row of a batch: the tokens to feed after what its cache already holds.
#[derive(Debug, Clone, Copy)]
pub struct RowInput<'a> {
    pub tokens: &'a [u32],
}

/// How quantized GGUF tensors are held in memory and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantLayout {
    /// Repacked into [`QMatrix`] panels at load, on the stored types (the file's bytes, the
    /// k-quants' scales as f16), and multiplied by our int8 kernels for every row count, where
    /// the CPU has them ([`QMatrix::has_fast_kernel`]); elsewhere as [`Self::SlowTypesAsQ8_0`].
    /// Activations are rounded to int8 per row, so a row's numbers never depend on the other
    /// rows of its batch (the LoRA terms keep that too, `mole::MixDelta`).
    #[default]
    Packed,
    /// candle's tensors as stored.
    Stored,
    /// candle's tensors, with Q4_1, Q5_0 and Q5_1 re-quantized to Q8_0 at load: candle multiplies
    /// them with a scalar loop (about 4x slower than its Q8_0 kernel here) at the cost of 1.5x
    /// their memory.
    SlowTypesAsQ8_0,
}

impl QuantLayout {
    /// What this layout becomes on this machine: [`Self::Packed`] only where the kernels exist.
    pub fn effective(self, device: &Device) -> Self {
        match self {
            QuantLayout::Packed
                if !(device.is_cpu() && QMatrix::has_fast_kernel(Isa::detect())) =>
            {
                QuantLayout::SlowTypesAsQ8_0
            }
            other => other,
        }
    }
}

/// The [`QType`] of a candle block type, if [`QMatrix`] packs it.
pub(crate) fn qtype_of(dtype: GgmlDType) -> Option<QType> {
    Some(match dtype {
        GgmlDType::Q4_0 => QType::Q4_0,
        GgmlDType::Q4_1 => QType::Q4_1,
        GgmlDType::Q5_0 => QType::Q5_0,
        GgmlDType::Q5_1 => QType::Q5_1,
        GgmlDType::Q8_0 => QType::Q8_0,
        GgmlDType::Q2K => QType::Q2K,
        GgmlDType::Q3K => QType::Q3K,
        GgmlDType::Q4K => QType::Q4K,
        GgmlDType::Q5K => QType::Q5K,
        GgmlDType::Q6K => QType::Q6K,
        _ => return None,
    })
}

#[derive(Clone)]
enum Embedding {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
    Packed(Arc<QMatrix>),
}

impl Embedding {
    /// Rows `ids` as f32 `[n, hidden]`.
    fn lookup(&self, ids: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        let n = ids.len();
        let idx = || Tensor::from_slice(ids, n, device);
        match self {
            Embedding::Dense(w) => w.index_select(&idx()?, 0),
            Embedding::Quantized(q) => q.embedding(&idx()?),
            Embedding::Packed(m) => {
                let d = m.cols();
                let mut out = vec![0f32; n * d];
                for (row, &id) in out.chunks_exact_mut(d).zip(ids) {
                    m.dequantize_row(id as usize, row);
                }
                Tensor::from_vec(out, (n, d), device)
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Embedding::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Embedding::Quantized(q) => q.storage_size_in_bytes(),
            Embedding::Packed(m) => m.bytes(),
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    mlp_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Decoder {
    cfg: ModelConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    /// The LM head shares the embedding matrix.
    tied_head: bool,
    inv_freq: Vec<f64>,
    device: Device,
}

/// Tensor names of the two layouts.
#[derive(Clone, Copy)]
enum Naming {
    HuggingFace,
    Gguf,
}

impl Naming {
    fn embed(self) -> &'static str {
        match self {
            Naming::HuggingFace => "model.embed_tokens.weight",
            Naming::Gguf => "token_embd.weight",
        }
    }
    fn norm(self) -> &'static str {
        match self {
            Naming::HuggingFace => "model.norm.weight",
            Naming::Gguf => "output_norm.weight",
        }
    }
    fn lm_head(self) -> &'static str {
        match self {
            Naming::HuggingFace => "lm_head.weight",
            Naming::Gguf => "output.weight",
        }
    }
    fn attn_norm(self, i: usize) -> String {
        match self {
            Naming::HuggingFace => format!("model.layers.{i}.input_layernorm.weight"),
            Naming::Gguf => format!("blk.{i}.attn_norm.weight"),
        }
    }
    fn mlp_norm(self, i: usize) -> String {
        match self {
            Naming::HuggingFace => format!("model.layers.{i}.post_attention_layernorm.weight"),
            Naming::Gguf => format!("blk.{i}.ffn_norm.weight"),
        }
    }
    /// Name without the `.weight` / `.bias` suffix.
    fn linear(self, i: usize, kind: SiteKind) -> String {
        match self {
            Naming::HuggingFace => Site { layer: i, kind }.hf_path(),
            Naming::Gguf => {
                let n = match kind {
                    SiteKind::Q => "attn_q",
                    SiteKind::K => "attn_k",
                    SiteKind::V => "attn_v",
                    SiteKind::O => "attn_output",
                    SiteKind::Gate => "ffn_gate",
                    SiteKind::Up => "ffn_up",
                    SiteKind::Down => "ffn_down",
                };
                format!("blk.{i}.{n}")
            }
        }
    }
}

/// A quantized tensor as a loader holds it.
enum Quant {
    Candle(Arc<QTensor>),
    Packed(Arc<QMatrix>),
}

struct Loader<'a> {
    store: &'a WeightStore,
    device: &'a Device,
    layout: QuantLayout,
}

impl Loader<'_> {
    fn tensor_err(&self, name: &str, e: impl std::fmt::Display) -> ModelError {
        ModelError::Tensor {
            file: self.store.file_for(name),
            tensor: name.to_string(),
            message: e.to_string(),
        }
    }

    /// The stored tensor in this loader's layout: packed, as stored, or re-quantized.
    fn quantized(&self, name: &str, q: Arc<QTensor>) -> Result<Quant> {
        if self.layout == QuantLayout::Packed
            && let Some(qtype) = qtype_of(q.dtype())
        {
            let (n, k) = q.shape().dims2().map_err(|e| self.tensor_err(name, e))?;
            let bytes = q.data().map_err(|e| self.tensor_err(name, e))?;
            let m = QMatrix::pack(qtype, &bytes, n, k).map_err(|e| self.tensor_err(name, e))?;
            return Ok(Quant::Packed(Arc::new(m)));
        }
        let slow = matches!(
            q.dtype(),
            GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
        );
        if slow && self.layout == QuantLayout::SlowTypesAsQ8_0 {
            let dense = q
                .dequantize(self.device)
                .map_err(|e| self.tensor_err(name, e))?;
            let q8 =
                QTensor::quantize(&dense, GgmlDType::Q8_0).map_err(|e| self.tensor_err(name, e))?;
            return Ok(Quant::Candle(Arc::new(q8)));
        }
        Ok(Quant::Candle(q))
    }

    fn weight(&self, name: &str, q: Quant) -> Result<LinearWeight> {
        Ok(match q {
            Quant::Packed(m) => LinearWeight::Packed(m),
            Quant::Candle(q) => {
                let m = QMatMul::from_arc(q.clone()).map_err(|e| self.tensor_err(name, e))?;
                LinearWeight::Quantized(Arc::new(m), q)
            }
        })
    }

    fn linear(
        &self,
        base: &str,
        out: usize,
        inp: usize,
        bias: bool,
        site: Option<Site>,
    ) -> Result<Linear> {
        let wname = format!("{base}.weight");
        let weight = match self.store.stored(&wname, &[out, inp], self.device)? {
            StoredTensor::Dense(t) => LinearWeight::Dense(t),
            StoredTensor::Quantized(q) => self.weight(&wname, self.quantized(&wname, q)?)?,
        };
        let bias = if bias {
            Some(
                self.store
                    .dense(&format!("{base}.bias"), &[out], self.device)?,
            )
        } else {
            None
        };
        Ok(Linear::new(weight, bias, site, out, inp))
    }
}

impl Decoder {
    /// Reads the weights of `cfg` from `store` (Hugging Face names for safetensors, llama.cpp
    /// names for GGUF), checking every shape.
    pub fn load(
        cfg: ModelConfig,
        store: &WeightStore,
        layout: QuantLayout,
        device: &Device,
    ) -> Result<Self> {
        let naming = if store.is_gguf() {
            Naming::Gguf
        } else {
            Naming::HuggingFace
        };
        let ld = Loader {
            store,
            device,
            layout: layout.effective(device),
        };
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv, ff) = (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size);
        let embed_name = naming.embed();
        let embed = match store.stored(embed_name, &[cfg.vocab_size, d], device)? {
            StoredTensor::Dense(t) => Embedding::Dense(t),
            StoredTensor::Quantized(q) => match ld.quantized(embed_name, q)? {
                Quant::Candle(q) => Embedding::Quantized(q),
                Quant::Packed(m) => Embedding::Packed(m),
            },
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let lin = |kind: SiteKind, out: usize, inp: usize, bias: bool| {
                ld.linear(
                    &naming.linear(i, kind),
                    out,
                    inp,
                    bias,
                    Some(Site { layer: i, kind }),
                )
            };
            layers.push(Layer {
                attn_norm: store.dense(&naming.attn_norm(i), &[d], device)?,
                q: lin(SiteKind::Q, nh * hd, d, cfg.qkv_bias)?,
                k: lin(SiteKind::K, nkv * hd, d, cfg.qkv_bias)?,
                v: lin(SiteKind::V, nkv * hd, d, cfg.qkv_bias)?,
                o: lin(SiteKind::O, d, nh * hd, false)?,
                mlp_norm: store.dense(&naming.mlp_norm(i), &[d], device)?,
                gate: lin(SiteKind::Gate, ff, d, false)?,
                up: lin(SiteKind::Up, ff, d, false)?,
                down: lin(SiteKind::Down, d, ff, false)?,
            });
        }
        let norm = store.dense(naming.norm(), &[d], device)?;
        let head_name = naming.lm_head();
        let tied = match naming {
            // GGUF converters drop `output.weight` when the embeddings are tied.
            Naming::Gguf => !store.contains(head_name),
            Naming::HuggingFace => cfg.tie_word_embeddings,
        };
        let lm_head = if tied {
            let weight = match &embed {
                Embedding::Dense(t) => LinearWeight::Dense(t.clone()),
                Embedding::Quantized(q) => ld.weight(embed_name, Quant::Candle(q.clone()))?,
                Embedding::Packed(m) => LinearWeight::Packed(m.clone()),
            };
            Linear::new(weight, None, None, cfg.vocab_size, d)
        } else {
            ld.linear(
                head_name.trim_end_matches(".weight"),
                cfg.vocab_size,
                d,
                false,
                None,
            )?
        };
        let inv_freq = cfg.rope_inv_freq();
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            tied_head: tied,
            inv_freq,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every linear layer that carries a LoRA site, in layer order.
    pub fn sites(&self) -> impl Iterator<Item = &Linear> {
        self.layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
    }

    /// Bytes of all weights as held in memory.
    pub fn weight_bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let lin = |l: &Linear| l.weight().bytes();
        let embed = self.embed.bytes();
        embed
            + if self.tied_head {
                0
            } else {
                lin(&self.lm_head)
            }
            + self.sites().map(lin).sum::<usize>()
            + self
                .layers
                .iter()
                .map(|l| t(&l.attn_norm) + t(&l.mlp_norm))
                .sum::<usize>()
    }

    /// The same model with every weight dequantized to f32: the slow reference of the quantized
    /// path.
    pub fn dequantized(&self) -> Result<Self> {
        let mut d = self.map_linears(|l| l.dequantized())?;
        match &self.embed {
            Embedding::Quantized(q) => d.embed = Embedding::Dense(q.dequantize(&self.device)?),
            Embedding::Packed(m) => {
                let w = Tensor::from_vec(m.dequantize(), (m.rows(), m.cols()), &self.device)?;
                d.embed = Embedding::Dense(w);
            }
            Embedding::Dense(_) => {}
        }
        d.lm_head = self.lm_head.dequantized()?;
        d.tied_head = false;
        Ok(d)
    }

    /// The same model with every LoRA-site linear replaced by `f(linear)` (for example with an
    /// adapter merged into its weight: the reference of the unmerged path).
    pub fn map_linears(&self, f: impl Fn(&Linear) -> candle_core::Result<Linear>) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    attn_norm: l.attn_norm.clone(),
                    q: f(&l.q)?,
                    k: f(&l.k)?,
                    v: f(&l.v)?,
                    o: f(&l.o)?,
                    mlp_norm: l.mlp_norm.clone(),
                    gate: f(&l.gate)?,
                    up: f(&l.up)?,
                    down: f(&l.down)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            cfg: self.cfg.clone(),
            embed: self.embed.clone(),
            layers,
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            tied_head: self.tied_head,
            inv_freq: self.inv_freq.clone(),
            device: self.device.clone(),
        })
    }

    /// The same model multiplying its quantized weights (few rows) with `kernel`, the LM head
    /// included. The weights are shared, not copied.
    pub fn with_quant_kernel(&self, kernel: QuantKernel) -> Result<Self> {
        let mut d = self.map_linears(|l| Ok(l.with_quant_kernel(kernel)))?;
        d.lm_head = self.lm_head.with_quant_kernel(kernel);
        Ok(d)
    }

    pub fn new_cache(&self) -> SeqCache {
        SeqCache::new(self.cfg.num_layers)
    }

    /// Runs the new tokens of every row through the model, appending to each row's cache.
    ///
    /// `rows[i]` continues `caches[i]`. Returns logits `[rows, vocab]` for [`LogitsAt::Last`] or
    /// `[n_tokens, vocab]` for [`LogitsAt::All`]. `delta` adds the per-row LoRA terms.
    pub fn forward(
        &self,
        rows: &[RowInput<'_>],
        caches: &mut [&mut SeqCache],
        at: LogitsAt,
        delta: &dyn SiteDelta,
    ) -> Result<Tensor> {
        // The whole pass runs on a thread of the pool: each of its ~200 parallel products then
        // hands work to the other threads through the pool's deques, instead of this thread
        // injecting a job and sleeping until a pool thread has run it (two context switches
        // per product, which cost more than a small model's decode step computes).
        if rayon::current_thread_index().is_none() {
            return rayon::scope(|_| self.forward(rows, caches, at, delta));
        }
        let (x, spans) = self.forward_hidden(rows, caches, delta)?;
        let (x, head_rows) = match at {
            LogitsAt::All => (x, spans),
            LogitsAt::Last => {
                let last: Vec<u32> = spans.iter().map(|s| (s.start + s.len - 1) as u32).collect();
                let idx = Tensor::from_vec(last, spans.len(), &self.device)?;
                let one = (0..spans.len()).map(|start| RowSpan { start, len: 1 });
                (x.index_select(&idx, 0)?, one.collect())
            }
        };
        self.head(&x, &head_rows)
    }

    /// Final norm and LM head of hidden states `x` `[n, hidden]` whose rows are spanned by `rows`:
    /// logits `[n, vocab]`. With [`Decoder::forward_hidden`], lets training compute logits only
    /// where a loss needs them.
    pub fn head(&self, x: &Tensor, rows: &[RowSpan]) -> Result<Tensor> {
        let x = self.rms_norm(&x.contiguous()?, &self.norm)?;
        Ok(self.lm_head.forward_rows(&x, rows)?)
    }

    /// RMS norm; the composite (differentiable) form when `x` depends on trainable tensors,
    /// since candle's fused kernel has no backward pass.
    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        let eps = self.cfg.rms_norm_eps as f32;
        if x.track_op() {
            candle_nn::ops::rms_norm_slow(x, w, eps)
        } else {
            candle_nn::ops::rms_norm(x, w, eps)
        }
    }

    /// The decoder layers over the new tokens of every row (see [`Decoder::forward`]): the final
    /// hidden states `[n_tokens, hidden]` before the last norm, and each row's span in them.
    pub fn forward_hidden(
        &self,
        rows: &[RowInput<'_>],
        caches: &mut [&mut SeqCache],
        delta: &dyn SiteDelta,
    ) -> Result<(Tensor, Vec<RowSpan>)> {
        if rows.is_empty() {
            return Err(ModelError::Input(
                "a forward pass needs at least one row".into(),
            ));
        }
        if rows.len() != caches.len() {
            return Err(ModelError::Input(format!(
                "{} rows but {} caches",
                rows.len(),
                caches.len()
            )));
        }
        let mut spans = Vec::with_capacity(rows.len());
        let mut ids = Vec::new();
        for (i, (row, cache)) in rows.iter().zip(caches.iter()).enumerate() {
            if row.tokens.is_empty() {
                return Err(ModelError::Input(format!("row {i} has no tokens")));
            }
            if let Some(&bad) = row
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.cfg.vocab_size)
            {
                return Err(ModelError::Input(format!(
                    "row {i}: token id {bad} is outside the vocabulary of {} tokens",
                    self.cfg.vocab_size
                )));
            }
            let end = cache.len() + row.tokens.len();
            if end > self.cfg.max_position_embeddings {
                return Err(ModelError::Input(format!(
                    "row {i}: {end} positions exceed the context length of {}",
                    self.cfg.max_position_embeddings
                )));
            }
            spans.push(RowSpan {
                start: ids.len(),
                len: row.tokens.len(),
            });
            ids.extend_from_slice(row.tokens);
        }
        let mut x = self.embed.lookup(&ids, &self.device)?;
        // Positions are fixed before the first layer appends to the caches.
        let starts: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let ropes = spans
            .iter()
            .zip(&starts)
            .map(|(s, &pos)| self.rope_tables(pos, s.len))
            .collect::<candle_core::Result<Vec<_>>>()?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.attn_norm)?;
            let [q, k, v] =
                Linear::forward_many([&layer.q, &layer.k, &layer.v], &h, &spans, delta)?;
            // Rows attend independently (each to its own cache): spread them over the threads,
            // as a batch of short rows is otherwise a long serial chain of small ops.
            let one_row = |ri: usize, cache: &mut SeqCache| {
                let span = spans[ri];
                let (cos, sin) = &ropes[ri];
                self.attention(
                    li,
                    starts[ri],
                    &q.narrow(0, span.start, span.len)?,
                    &k.narrow(0, span.start, span.len)?,
                    &v.narrow(0, span.start, span.len)?,
                    cos,
                    sin,
                    cache,
                )
            };
            let mut outs = if spans.len() == 1 {
                vec![one_row(0, caches[0])?]
            } else {
                caches
                    .par_iter_mut()
                    .enumerate()
                    .map(|(ri, cache)| one_row(ri, cache))
                    .collect::<candle_core::Result<Vec<_>>>()?
            };
            let attn = if outs.len() == 1 {
                outs.pop().expect("one row")
            } else {
                Tensor::cat(&outs, 0)?
            };
            x = (x + layer.o.forward(&attn, &spans, delta)?)?;
            let h = self.rms_norm(&x, &layer.mlp_norm)?;
            let [g, u] = Linear::forward_many([&layer.gate, &layer.up], &h, &spans, delta)?;
            let m = (candle_nn::ops::silu(&g)? * u)?;
            x = (x + layer.down.forward(&m, &spans, delta)?)?;
        }
        Ok((x, spans))
    }

    /// Attention read from the cache in place, each query alone
    /// ([`ramole_kernels::attention`]): a token's output does not depend on how many tokens
    /// came with it, which candle's batched matmul and softmax do not promise. `q`
    /// `[heads, t, head_dim]`, `k`, `v` `[kv_heads, pos + t, head_dim]` (views of the cache);
    /// `[t, heads * head_dim]`, or `None` where the tensors are not f32 in CPU memory.
    fn own_attention(
        &self,
        pos: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        use candle_core::{CpuStorage, Storage};
        let q = q.contiguous()?;
        let t = q.dim(1)?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (
            Storage::Cpu(CpuStorage::F32(qd)),
            Storage::Cpu(CpuStorage::F32(kd)),
            Storage::Cpu(CpuStorage::F32(vd)),
            Some((q0, q1)),
        ) = (&*qs, &*ks, &*vs, ql.contiguous_offsets())
        else {
            return Ok(None);
        };
        // Rows of one head must be contiguous; heads may sit `capacity` rows apart.
        let hd = self.cfg.head_dim;
        fn view<'a>(d: &'a [f32], l: &candle_core::Layout, hd: usize) -> Option<KvView<'a>> {
            let st = l.stride();
            (st.len() == 3 && st[2] == 1 && st[1] == hd).then(|| KvView {
                data: d,
                start: l.start_offset(),
                head_stride: st[0],
            })
        }
        let (Some(kv_k), Some(kv_v)) = (view(kd, kl, hd), view(vd, vl, hd)) else {
            return Ok(None);
        };
        let a = Attention {
            heads: self.cfg.num_heads,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            window: self.cfg.sliding_window,
            scale: 1.0 / (self.cfg.head_dim as f32).sqrt(),
        };
        let mut out = vec![0f32; t * a.heads * a.head_dim];
        a.causal(&qd[q0..q1], pos, kv_k, kv_v, &mut out);
        drop((qs, ks, vs));
        Tensor::from_vec(out, (t, a.heads * a.head_dim), &self.device).map(Some)
    }

    /// cos and sin `[t, head_dim / 2]` for positions `pos .. pos + t`.
    fn rope_tables(&self, pos: usize, t: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in pos..pos + t {
            for &f in &self.inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, half), &self.device)?,
            Tensor::from_vec(sin, (t, half), &self.device)?,
        ))
    }

    /// Attention of one row. `q`: `[t, heads * head_dim]`, `k`/`v`: `[t, kv_heads * head_dim]`,
    /// `cos`/`sin`: `[t, head_dim / 2]`, `pos`: the row's first new position. Appends k, v to the row's cache; returns
    /// `[t, heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        pos: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: &mut SeqCache,
    ) -> candle_core::Result<Tensor> {
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let t = q.dim(0)?;
        let rope = |x: &Tensor, heads: usize| -> candle_core::Result<Tensor> {
            let x = x
                .reshape((1, t, heads, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            // candle's fused rope kernels have no backward pass; training takes the composite.
            let x = match (self.cfg.rope_style, x.track_op()) {
                (RopeStyle::Halves, false) => candle_nn::rotary_emb::rope(&x, cos, sin)?,
                (RopeStyle::Halves, true) => candle_nn::rotary_emb::rope_slow(&x, cos, sin)?,
                (RopeStyle::Interleaved, false) => candle_nn::rotary_emb::rope_i(&x, cos, sin)?,
                (RopeStyle::Interleaved, true) => candle_nn::rotary_emb::rope_i_slow(&x, cos, sin)?,
            };
            x.squeeze(0)
        };
        let q = rope(q, nh)?; // [nh, t, hd]
        let k = rope(k, nkv)?; // [nkv, t, hd]
        let v = v.reshape((t, nkv, hd))?.transpose(0, 1)?.contiguous()?;
        let (k_all, v_all) = cache.append(layer, &k, &v)?; // [nkv, T, hd]
        // The cache copies into its buffer, which cuts the graph: a row starting from an empty
        // cache attends to its own k, v (the same numbers), so training gradients reach them.
        let (k_all, v_all) = if pos == 0 { (k, v) } else { (k_all, v_all) };
        let total = pos + t;
        if !q.track_op()
            && let Some(out) = self.own_attention(pos, &q, &k_all, &v_all)?
        {
            return Ok(out);
        }
        let group = nh / nkv;
        // Heads that share a kv head are stacked along the query axis: no repeat of K/V.
        let q = q.reshape((nkv, group * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k_all.t()?)? * scale)?; // [nkv, group * t, T]
        let window = self.cfg.sliding_window.filter(|&w| w < total);
        let scores = if t > 1 || window.is_some() {
            let mask = crate::batch::causal_mask(pos, t, window);
            let mask = Tensor::from_vec(mask, (t, total), &self.device)?;
            scores
                .reshape((nkv, group, t, total))?
                .broadcast_add(&mask)?
                .reshape((nkv, group * t, total))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v_all)?; // [nkv, group * t, hd]
        out.reshape((nh, t, hd))?
            .transpose(0, 1)?
            .reshape((t, nh * hd))
    }
}
