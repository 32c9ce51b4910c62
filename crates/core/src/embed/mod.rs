//! Sentence embeddings: a BERT-family encoder (all-MiniLM-L6-v2 in tests) written on candle ops,
//! mean pooling over the real tokens, L2 normalisation. Batched (padded, with an attention mask)
//! and deterministic. Texts are truncated at 256 tokens (never beyond the model's positions);
//! the tokenizer file's own fixed padding and truncation are replaced.
//!
//! The network is written once, on candle ops ([`bert`]): the reference, the path for large
//! batches (where its big GEMMs pay off), and, with trainable variables, the retriever's
//! fine-tuning. [`packed`] is the fast path for one sequence at a time that a query's latency
//! depends on, tested against the reference.

pub(crate) mod bert;
mod packed;

use std::path::Path;

use bert::{Bert, Ops, Weights};
use candle_core::{D, Tensor};
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

use crate::model::{ModelError, WeightStore};
use packed::{NormParams, PackedEncoder, PackedLayer, Tables};
pub use ramole_kernels::Isa;
pub use ramole_kernels::gemm::Precision as WeightPrecision;
use ramole_kernels::gemm::{PackedMatrix, Precision};

/// Tokens kept per text: reproduces the paper's retrieval figures with MiniLM.
pub const MAX_TOKENS: usize = 256;

/// The largest difference of any component of a packed-path embedding from the f32 reference
/// at `precision`, as the tests hold it (observed: f16 ~2e-4, bf16 ~1.5e-3, int8 ~2e-2).
pub fn packed_tolerance(precision: WeightPrecision) -> f32 {
    match precision {
        WeightPrecision::F32 => 1e-5,
        WeightPrecision::F16 => 5e-4,
        WeightPrecision::Bf16 => 4e-3,
        WeightPrecision::Int8 => 5e-2,
    }
}

/// How [`Embedder::load`] stores the packed path's weights (the query path) on this CPU.
///
/// With AMX tiles, bf16 (weights and activations rounded to bf16, f32 sums): a ~20-token query
/// embeds ~1.5× faster than f16 on AVX-512, and the paper's retrieval benchmark (flan-mixed,
/// 2,395 inputs) moves by at most 2 inputs: cosine top-1/3/5/8 64.05 / 84.97 / 90.06 / 93.82
/// against f32's 64.05 / 84.97 / 90.06 / 93.86, ip 51.11 / 72.82 / 80.88 / 87.06 against
/// 51.19 / 72.90 / 80.79 / 87.10 (`cargo run --release -p ramole-core --example
/// eval_precision`). Elsewhere f16: it scores exactly as f32 and a ~20-token query embeds ~20%
/// faster. Int8 is faster only for very short texts (the kernel widens every weight in every
/// row tile, so at ~20 tokens it is compute-bound, like f16) and costs ~0.2 points of top-1,
/// so it stays opt-in.
pub fn default_precision() -> WeightPrecision {
    if Isa::detect() == Isa::Amx {
        WeightPrecision::Bf16
    } else {
        WeightPrecision::F16
    }
}

/// Up to this many texts, [`Embedder::embed`] runs the packed path text by text; larger
/// batches go through candle's batched GEMMs.
const PACKED_MAX_TEXTS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{}: {message}", file.display())]
    Config {
        file: std::path::PathBuf,
        message: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl From<candle_core::Error> for EmbedError {
    fn from(e: candle_core::Error) -> Self {
        EmbedError::Model(ModelError::from(e))
    }
}

type Result<T, E = EmbedError> = std::result::Result<T, E>;

/// The fields of a BERT `config.json` the encoder reads (shared with the trainable copy in
/// `train::retriever`, which must build the same network).
#[derive(serde::Deserialize)]
pub(crate) struct BertConfig {
    pub(crate) model_type: Option<String>,
    pub(crate) hidden_size: usize,
    pub(crate) num_hidden_layers: usize,
    pub(crate) num_attention_heads: usize,
    pub(crate) intermediate_size: usize,
    pub(crate) max_position_embeddings: usize,
    pub(crate) vocab_size: usize,
    #[serde(default = "default_eps")]
    pub(crate) layer_norm_eps: f64,
    #[serde(default = "default_types")]
    pub(crate) type_vocab_size: usize,
    pub(crate) hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-12
}

fn default_types() -> usize {
    2
}

impl bert::Dense {
    /// The weight `[out, in]` and bias packed for the fast path.
    fn packed(&self, precision: Precision) -> candle_core::Result<PackedMatrix> {
        let (n, k) = self.w.dims2()?;
        let w = self.w.flatten_all()?.to_vec1::<f32>()?;
        let b = self.b.to_vec1::<f32>()?;
        Ok(PackedMatrix::from_rows(&w, k, n, k, Some(&b)).with_precision(precision))
    }
}

impl bert::Norm {
    fn params(&self) -> candle_core::Result<NormParams> {
        Ok(NormParams {
            w: self.w.to_vec1()?,
            b: self.b.to_vec1()?,
            eps: self.eps as f32,
        })
    }
}

pub struct Embedder {
    id: String,
    tokenizer: Tokenizer,
    bert: Bert,
    dims: usize,
    packed: PackedEncoder,
}

/// The elements of a contiguous f32 tensor on the CPU, read in place (the embedding tables are
/// shared with the reference path, not copied).
struct TensorView<'a> {
    storage: candle_core::StorageRef<'a>,
    range: std::ops::Range<usize>,
}

impl<'a> TensorView<'a> {
    fn new(t: &'a Tensor) -> candle_core::Result<Self> {
        let (storage, layout) = t.storage_and_layout();
        let start = layout.start_offset();
        let range = start..start + layout.shape().elem_count();
        let ok = layout.is_contiguous()
            && matches!(&*storage, candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) if v.len() >= range.end);
        if !ok {
            return Err(candle_core::Error::Msg(
                "embedding table is not a contiguous f32 CPU tensor".into(),
            ));
        }
        Ok(Self { storage, range })
    }

    fn as_slice(&self) -> &[f32] {
        match &*self.storage {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => &v[self.range.clone()],
            _ => unreachable!("checked in TensorView::new"),
        }
    }
}

/// `config.json` of the encoder in `dir`: its path, text and parsed form.
pub(crate) fn read_config(dir: &Path) -> Result<(std::path::PathBuf, String, BertConfig)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| EmbedError::Config {
        file: cfg_path.clone(),
        message: format!("cannot read: {e}"),
    })?;
    let cfg: BertConfig = serde_json::from_str(&text).map_err(|e| EmbedError::Config {
        file: cfg_path.clone(),
        message: format!("not a valid BERT config.json: {e}"),
    })?;
    Ok((cfg_path, text, cfg))
}

/// The prefix of every tensor name in the encoder's weights: some exports add `bert.`.
pub(crate) fn tensor_prefix(st: &WeightStore) -> &'static str {
    if st.contains("bert.embeddings.word_embeddings.weight") {
        "bert."
    } else {
        ""
    }
}

impl Embedder {
    /// Loads a sentence-transformers folder (config.json, model.safetensors, tokenizer.json).
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, default_precision())
    }

    /// [`Embedder::load`] with the packed path's weights stored at `precision`. F16 halves the
    /// weight bytes streamed per text and moves embeddings by up to ~2e-4 from the f32
    /// reference (the tests allow 5e-4); Bf16 (activations rounded too: AMX's products) by up to
    /// ~1.5e-3 (the tests allow 4e-3); Int8 (per-output-channel scales, f32 activations)
    /// quarters them and moves embeddings by up to ~2e-2 (cosine to the reference > 0.995).
    /// Only the packed path (few texts: queries) uses them; the candle path (batches:
    /// adapter profiles) stays f32.
    pub fn load_with(dir: &Path, precision: WeightPrecision) -> Result<Self> {
        let (bert, cfg) = Bert::load(dir, &crate::device::compute(), &mut Weights::Frozen)?;
        let max_tokens = MAX_TOKENS.min(cfg.max_position_embeddings);
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
            EmbedError::Tokenizer(format!("{}: {e}", dir.join("tokenizer.json").display()))
        })?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        tokenizer.with_padding(None::<PaddingParams>);
        let (id, _) = Self::identify(dir)?;
        let packed = PackedEncoder {
            layers: bert
                .layers
                .iter()
                .map(|l| -> candle_core::Result<PackedLayer> {
                    let bert::Qkv::Stacked(qkv) = &l.qkv else {
                        unreachable!("a frozen encoder stacks its projections")
                    };
                    Ok(PackedLayer {
                        qkv: qkv.packed(precision)?,
                        attn_out: l.attn_out.packed(precision)?,
                        attn_norm: l.attn_norm.params()?,
                        ffn_in: l.ffn_in.packed(precision)?,
                        ffn_out: l.ffn_out.packed(precision)?,
                        ffn_norm: l.ffn_norm.params()?,
                    })
                })
                .collect::<candle_core::Result<_>>()?,
            embed_norm: bert.embed_norm.params()?,
            heads: bert.heads,
            hidden: bert.hidden,
            isa: Isa::detect(),
        };
        Ok(Self {
            id,
            tokenizer,
            dims: bert.hidden,
            bert,
            packed,
        })
    }

    /// The id [`Embedder::load`] would give the model in `dir`, and its dimension, from the
    /// config and a fingerprint of the weights, without loading them: `<name>:<dims>:<hash>`.
    /// Two folders with different weights get different ids, so embeddings never mix.
    pub fn identify(dir: &Path) -> Result<(String, usize)> {
        let (_, text, cfg) = read_config(dir)?;
        let mut name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "embedder".into());
        // Wheels and snapshots put the weights in a generic folder; the parent names the model.
        if matches!(name.as_str(), "model" | "snapshot" | "main")
            && let Some(parent) = dir.parent().and_then(|p| p.file_name())
        {
            name = parent.to_string_lossy().to_string();
        }
        // A Hub cache snapshot (`models--org--name/snapshots/<commit>`): the repository names it.
        let mut up = dir.ancestors().skip(1).filter_map(|p| p.file_name());
        if let (Some(snapshots), Some(repo)) = (up.next(), up.next())
            && snapshots == "snapshots"
            && let Some(r) = repo.to_string_lossy().strip_prefix("models--")
        {
            name = r.rsplit("--").next().unwrap_or(r).to_string();
        }
        let mut h = crate::files::Fnv1a::default();
        let mut mix = |bytes: &[u8]| h.update(bytes);
        mix(text.as_bytes());
        let weights = dir.join("model.safetensors");
        if let Ok(mut f) = std::fs::File::open(&weights) {
            use std::io::{Read, Seek, SeekFrom};
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            mix(&len.to_le_bytes());
            // 64 KiB every 2 MiB: any retrained weights change these bytes.
            let mut buf = vec![0u8; 64 << 10];
            let mut at = 0u64;
            while at < len {
                if f.seek(SeekFrom::Start(at)).is_err() {
                    break;
                }
                let n = f.read(&mut buf).unwrap_or(0);
                mix(&buf[..n]);
                at += 2 << 20;
            }
        }
        Ok((
            format!("{name}:{}:{:08x}", cfg.hidden_size, h.finish() as u32),
            cfg.hidden_size,
        ))
    }

    /// Identifies the model and its dimension (stored with every embedding).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn dims(&self) -> usize {
        self.dims
    }

    /// The kernels the packed path runs (the fastest this CPU has, unless set).
    pub fn isa(&self) -> Isa {
        self.packed.isa
    }

    /// Runs the packed path on `isa`'s kernels: benchmarks compare them side by side. Refused
    /// when this CPU lacks them.
    pub fn set_isa(&mut self, isa: Isa) -> Result<()> {
        if !Isa::available().contains(&isa) {
            return Err(EmbedError::Unsupported(format!(
                "kernels {isa:?}: this CPU runs only {:?}",
                Isa::available()
            )));
        }
        self.packed.isa = isa;
        Ok(())
    }

    /// Token ids of `text` as the encoder sees them ([CLS] .. [SEP], at most 256).
    pub fn tokens(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// L2-normalised embeddings of `texts`, one `dims`-vector each, in order. A few texts run
    /// one by one on the packed path; more run through candle in batches of similar length.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        if texts.len() <= PACKED_MAX_TEXTS {
            self.embed_packed(texts)
        } else {
            self.embed_reference(texts)
        }
    }

    /// [`Embedder::embed`] on the packed path only (each text alone).
    pub fn embed_packed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let b = &self.bert;
        let views = [&b.word, &b.position, &b.token_type].map(TensorView::new);
        let [word, position, token_type] = views;
        let (word, position, token_type) = (word?, position?, token_type?);
        let tables = Tables {
            word: word.as_slice(),
            position: position.as_slice(),
            token_type: &token_type.as_slice()[..self.dims],
        };
        texts
            .iter()
            .map(|t| Ok(self.packed.embed(&tables, &self.tokens(t)?)))
            .collect()
    }

    /// [`Embedder::embed`] on the candle path only (the reference), in batches of 16.
    pub fn embed_reference(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.tokens(t))
            .collect::<Result<_>>()?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut out = vec![Vec::new(); ids.len()];
        for chunk in order.chunks(16) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
            for (&i, v) in chunk.iter().zip(self.embed_ids(&batch)?) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// Encodes a batch of token sequences: padded to the longest, masked, mean-pooled.
    fn embed_ids(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        Ok(self.bert.forward(batch, Ops::Fused)?.to_vec2()?)
    }
}

/// The sentence embedding of encoder outputs `x` `[b, t, h]` under `mask` `[b, t]` (1 for real
/// tokens): the mean over real tokens, L2-normalised, `[b, h]`. Candle ops only, so the
/// retriever's training follows it through autograd.
pub(crate) fn mean_pool_unit(x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let m = mask.unsqueeze(2)?; // [b, t, 1]
    let summed = x.broadcast_mul(&m)?.sum(1)?; // [b, h]
    let counts = m.sum(1)?.clamp(1.0, f64::MAX)?; // [b, 1]
    let mean = summed.broadcast_div(&counts)?;
    let norm = mean
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    mean.broadcast_div(&norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel set this CPU has (AVX-512, AVX2, and the portable one a CPU without AVX2
    /// runs) against the candle reference.
    #[test]
    fn every_kernel_set_of_the_packed_path_matches_the_reference() {
        let dir = crate::config::starter_embedder();
        if !dir.join("model.safetensors").exists() {
            panic!(
                "test model missing: {} — run scripts/fetch-test-models.sh",
                dir.display()
            );
        }
        let mut e = Embedder::load_with(&dir, Precision::F32).unwrap();
        let long = "a portable kernel check with some words ".repeat(8);
        let texts = [
            "",
            "hi",
            "Please summarize the article in one sentence.",
            &long,
        ];
        let reference = e.embed_reference(&texts).unwrap();
        for isa in Isa::available() {
            e.set_isa(isa).unwrap();
            for (text, r) in texts.iter().zip(&reference) {
                let p = e.embed_packed(&[text]).unwrap().remove(0);
                let diff = r
                    .iter()
                    .zip(&p)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(diff <= 1e-5, "{isa:?} {text:?}: max |diff| {diff}");
            }
        }
        assert_eq!(*Isa::available().last().unwrap(), Isa::Portable);
    }
}
