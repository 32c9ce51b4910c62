//! The BERT encoder written once, on candle ops: embeddings, the transformer layers, mean
//! pooling and L2 normalisation. The embedder runs it frozen (the reference forward, and its
//! batched path) with candle's fused layer norm and softmax; the retriever's trainer builds the
//! same network from trainable variables and runs it with plain, differentiable ops.

use std::path::Path;

use candle_core::{D, Device, Tensor, Var};

use super::{BertConfig, EmbedError, Result, mean_pool_unit, read_config, tensor_prefix};
use crate::model::WeightStore;

/// Which ops the forward uses where candle has two kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ops {
    /// Candle's fused layer norm and softmax: faster, no backward pass.
    Fused,
    /// The same functions in plain ops, which autograd follows.
    Differentiable,
}

/// A linear layer `y = x Wᵀ + b`: `w` `[out, in]`, `b` `[out]`.
pub(crate) struct Dense {
    pub(crate) w: Tensor,
    pub(crate) b: Tensor,
}

impl Dense {
    /// `x` `[.., in]` -> `[.., out]` as one GEMM over all rows (a batched matmul would re-pack
    /// the weight for every sequence).
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let (inp, out) = (dims[dims.len() - 1], self.w.dim(0)?);
        let rows = x.elem_count() / inp;
        let mut shape = dims;
        *shape.last_mut().expect("x has dims") = out;
        x.reshape((rows, inp))?
            .matmul(&self.w.t()?)?
            .broadcast_add(&self.b)?
            .reshape(shape)
    }
}

/// LayerNorm over the last dimension: scale `w` and shift `b`, `[h]` each.
pub(crate) struct Norm {
    pub(crate) w: Tensor,
    pub(crate) b: Tensor,
    pub(crate) eps: f64,
}

impl Norm {
    /// `x` `[.., h]` -> `[.., h]`.
    fn forward(&self, x: &Tensor, ops: Ops) -> candle_core::Result<Tensor> {
        match ops {
            Ops::Fused => {
                candle_nn::ops::layer_norm(&x.contiguous()?, &self.w, &self.b, self.eps as f32)
            }
            Ops::Differentiable => {
                let h = x.dim(D::Minus1)? as f64;
                let mean = (x.sum_keepdim(D::Minus1)? / h)?;
                let centered = x.broadcast_sub(&mean)?;
                let var = (centered.sqr()?.sum_keepdim(D::Minus1)? / h)?;
                centered
                    .broadcast_div(&(var + self.eps)?.sqrt()?)?
                    .broadcast_mul(&self.w)?
                    .broadcast_add(&self.b)
            }
        }
    }
}

/// Softmax over the last dimension.
fn softmax_last_dim(x: &Tensor, ops: Ops) -> candle_core::Result<Tensor> {
    match ops {
        Ops::Fused => candle_nn::ops::softmax_last_dim(x),
        Ops::Differentiable => {
            // The subtracted maximum is detached: softmax does not depend on it, so its
            // gradient is zero.
            let max = x.max_keepdim(D::Minus1)?.detach();
            let e = x.broadcast_sub(&max)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
        }
    }
}

/// The query, key and value projections: stacked into one `[3h, h]` product when frozen,
/// apart when each is a trainable variable of its own.
pub(crate) enum Qkv {
    Stacked(Dense),
    Split([Dense; 3]),
}

pub(crate) struct Layer {
    pub(crate) qkv: Qkv,
    pub(crate) attn_out: Dense,
    pub(crate) attn_norm: Norm,
    pub(crate) ffn_in: Dense,
    pub(crate) ffn_out: Dense,
    pub(crate) ffn_norm: Norm,
}

/// Where the loader gets each weight: frozen from the file, or as a new trainable variable.
pub(crate) enum Weights {
    Frozen,
    /// The variables made, each under its tensor name, in load order.
    Trainable(Vec<(String, Var)>),
}

pub(crate) struct Bert {
    /// `[vocab, h]`, `[positions, h]`, `[types, h]`: never trained.
    pub(crate) word: Tensor,
    pub(crate) position: Tensor,
    pub(crate) token_type: Tensor,
    pub(crate) embed_norm: Norm,
    pub(crate) layers: Vec<Layer>,
    pub(crate) heads: usize,
    pub(crate) hidden: usize,
}

/// Reads the encoder's weights, frozen or as trainable variables.
struct Loader<'a> {
    st: &'a WeightStore,
    device: &'a Device,
    weights: &'a mut Weights,
    hidden: usize,
    eps: f64,
}

impl Loader<'_> {
    fn tensor(&mut self, name: String, shape: &[usize]) -> Result<Tensor> {
        let t = self.st.dense(&name, shape, self.device)?;
        Ok(match self.weights {
            Weights::Frozen => t,
            Weights::Trainable(vars) => {
                let v = Var::from_tensor(&t)?;
                let t = v.as_tensor().clone();
                vars.push((name, v));
                t
            }
        })
    }

    fn dense(&mut self, name: &str, out: usize, inp: usize) -> Result<Dense> {
        Ok(Dense {
            w: self.tensor(format!("{name}.weight"), &[out, inp])?,
            b: self.tensor(format!("{name}.bias"), &[out])?,
        })
    }

    fn norm(&mut self, name: &str) -> Result<Norm> {
        let h = self.hidden;
        Ok(Norm {
            w: self.tensor(format!("{name}.weight"), &[h])?,
            b: self.tensor(format!("{name}.bias"), &[h])?,
            eps: self.eps,
        })
    }
}

impl Bert {
    /// The encoder in `dir` (config.json + safetensors) on `device`, its weights as `weights`
    /// says (a trainable load fills the variables in); its config comes along.
    pub(crate) fn load(
        dir: &Path,
        device: &Device,
        weights: &mut Weights,
    ) -> Result<(Self, BertConfig)> {
        let (cfg_path, _, cfg) = read_config(dir)?;
        let bad = |message: String| EmbedError::Config {
            file: cfg_path.clone(),
            message,
        };
        if let Some(t) = cfg.model_type.as_deref().filter(|t| *t != "bert") {
            return Err(bad(format!(
                "model_type = {t:?}: only bert encoders are supported"
            )));
        }
        if let Some(a) = cfg.hidden_act.as_deref().filter(|a| *a != "gelu") {
            return Err(bad(format!("hidden_act = {a:?}: only gelu is supported")));
        }
        let (h, ff, heads) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
        );
        if heads == 0 || !h.is_multiple_of(heads) {
            return Err(bad(format!(
                "hidden_size = {h} is not divisible by num_attention_heads = {heads}"
            )));
        }
        let st = WeightStore::open_safetensors_dir(dir)?;
        let p = tensor_prefix(&st);
        let frozen = matches!(weights, Weights::Frozen);
        let mut ld = Loader {
            st: &st,
            device,
            weights,
            hidden: h,
            eps: cfg.layer_norm_eps,
        };
        let embed_norm = ld.norm(&format!("{p}embeddings.LayerNorm"))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = format!("{p}encoder.layer.{i}");
            let q = ld.dense(&format!("{l}.attention.self.query"), h, h)?;
            let k = ld.dense(&format!("{l}.attention.self.key"), h, h)?;
            let v = ld.dense(&format!("{l}.attention.self.value"), h, h)?;
            let qkv = if frozen {
                Qkv::Stacked(Dense {
                    w: Tensor::cat(&[&q.w, &k.w, &v.w], 0)?,
                    b: Tensor::cat(&[&q.b, &k.b, &v.b], 0)?,
                })
            } else {
                Qkv::Split([q, k, v])
            };
            layers.push(Layer {
                qkv,
                attn_out: ld.dense(&format!("{l}.attention.output.dense"), h, h)?,
                attn_norm: ld.norm(&format!("{l}.attention.output.LayerNorm"))?,
                ffn_in: ld.dense(&format!("{l}.intermediate.dense"), ff, h)?,
                ffn_out: ld.dense(&format!("{l}.output.dense"), h, ff)?,
                ffn_norm: ld.norm(&format!("{l}.output.LayerNorm"))?,
            });
        }
        let table = |name: &str, rows: usize| -> Result<Tensor> {
            Ok(st.dense(&format!("{p}embeddings.{name}.weight"), &[rows, h], device)?)
        };
        let bert = Bert {
            word: table("word_embeddings", cfg.vocab_size)?,
            position: table("position_embeddings", cfg.max_position_embeddings)?,
            token_type: table("token_type_embeddings", cfg.type_vocab_size)?,
            embed_norm,
            layers,
            heads,
            hidden: h,
        };
        Ok((bert, cfg))
    }

    /// Unit embeddings of a batch of token sequences, `[batch, hidden]`: padded to the longest,
    /// masked, mean-pooled over the real tokens, L2-normalised. With [`Ops::Differentiable`]
    /// the result is differentiable with respect to every variable.
    pub(crate) fn forward(&self, batch: &[&[u32]], ops: Ops) -> candle_core::Result<Tensor> {
        let device = self.word.device();
        let (b, h) = (batch.len(), self.hidden);
        let t = batch.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut flat = vec![0u32; b * t];
        let mut mask = vec![0f32; b * t];
        for (r, s) in batch.iter().enumerate() {
            flat[r * t..r * t + s.len()].copy_from_slice(s);
            mask[r * t..r * t + s.len()].fill(1.0);
        }
        let ids = Tensor::from_vec(flat, b * t, device)?;
        let mask = Tensor::from_vec(mask, (b, t), device)?;
        let x = self
            .word
            .index_select(&ids, 0)?
            .reshape((b, t, h))?
            .broadcast_add(&self.position.narrow(0, 0, t)?)?
            .broadcast_add(&self.token_type.narrow(0, 0, 1)?)?;
        let mut x = self.embed_norm.forward(&x, ops)?;
        // Padded keys get a large negative bias (not -inf: an all-pad row must stay finite).
        let bias = ((mask.clone() - 1.0)? * 1e9)?.reshape((b, 1, 1, t))?;
        let hd = h / self.heads;
        let scale = 1.0 / (hd as f64).sqrt();
        // [b, t, h] -> [b, heads, t, hd]
        let split = |y: Tensor| -> candle_core::Result<Tensor> {
            y.reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        for l in &self.layers {
            let (q, k, v) = match &l.qkv {
                Qkv::Stacked(qkv) => {
                    let qkv = qkv.forward(&x)?;
                    (
                        qkv.narrow(2, 0, h)?,
                        qkv.narrow(2, h, h)?,
                        qkv.narrow(2, 2 * h, h)?,
                    )
                }
                Qkv::Split([q, k, v]) => (q.forward(&x)?, k.forward(&x)?, v.forward(&x)?),
            };
            let (q, k, v) = (split(q)?, split(k)?, split(v)?);
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?; // [b, heads, t, t]
            let a = softmax_last_dim(&scores, ops)?
                .matmul(&v)? // [b, heads, t, hd]
                .transpose(1, 2)?
                .reshape((b, t, h))?;
            let y = l.attn_norm.forward(&(l.attn_out.forward(&a)? + &x)?, ops)?;
            let f = l.ffn_out.forward(&l.ffn_in.forward(&y)?.gelu_erf()?)?;
            x = l.ffn_norm.forward(&(f + &y)?, ops)?;
        }
        mean_pool_unit(&x, &mask)
    }
}
