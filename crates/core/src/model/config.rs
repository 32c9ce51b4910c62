//! The decoder's hyper-parameters, read from a Hugging Face `config.json` or from GGUF metadata,
//! and validated so that a bad file is refused with the file, the key and the value named.

use std::path::Path;

use serde::Deserialize;

use super::ModelError;

/// Which family the weights come from; they share one decoder and differ in biases, naming and
/// defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
    Mistral,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Mistral => "mistral",
        }
    }
}

/// How rotary embeddings pair the dimensions of a head. Hugging Face checkpoints rotate the two
/// halves of a head (`rotate_half`); llama.cpp's converter permutes the rows of `q`/`k` of
/// Llama-architecture models so that adjacent pairs rotate instead, which GGUF llama files keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    Halves,
    Interleaved,
}

/// Frequency scaling of RoPE.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (all frequencies divided by it).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's piecewise scaling by wavelength.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors stored in a GGUF (`rope_freqs.weight`), llama.cpp's encoding of the
    /// Llama 3 scaling.
    Divisors(Vec<f64>),
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub rope_style: RopeStyle,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q, k and v projections carry a bias (Qwen2).
    pub qkv_bias: bool,
    /// Attend only to the last `w` positions (Mistral v0.1).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// `(out_features, in_features)` of a linear of kind `kind`.
    pub fn linear_shape(&self, kind: super::SiteKind) -> (usize, usize) {
        use super::SiteKind::*;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let (h, i) = (self.hidden_size, self.intermediate_size);
        match kind {
            Q => (q, h),
            K | V => (kv, h),
            O => (h, q),
            Gate | Up => (i, h),
            Down => (h, i),
        }
    }

    /// Inverse frequencies of the rotary embedding, one per pair of head dimensions, with the
    /// configured scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / self.head_dim as f64))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Divisors(d) => base.iter().zip(d).map(|(f, d)| f / d).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// Checks the relations between sizes that the decoder relies on.
    pub(crate) fn validate(&self, file: &Path) -> Result<(), ModelError> {
        let bad = |key: &str, value: String, why: &str| ModelError::Config {
            file: file.to_path_buf(),
            message: format!("{key} = {value}: {why}"),
        };
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(bad(key, "0".into(), "must be at least 1"));
            }
            if v > 1 << 24 {
                return Err(bad(key, v.to_string(), "exceeds the limit 16777216"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(bad(
                "num_key_value_heads",
                self.num_kv_heads.to_string(),
                &format!("must divide num_attention_heads = {}", self.num_heads),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad(
                "head_dim",
                self.head_dim.to_string(),
                "must be even for RoPE",
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(bad(
                "rope_theta",
                self.rope_theta.to_string(),
                "must be positive",
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(bad(
                "rms_norm_eps",
                self.rms_norm_eps.to_string(),
                "must be positive",
            ));
        }
        if let RopeScaling::Divisors(d) = &self.rope_scaling
            && d.len() != self.head_dim / 2
        {
            return Err(bad(
                "rope_freqs.weight",
                format!("{} values", d.len()),
                &format!("expected head_dim / 2 = {}", self.head_dim / 2),
            ));
        }
        Ok(())
    }

    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str, file: &Path) -> Result<Self, ModelError> {
        let raw: HfConfig = serde_json::from_str(text).map_err(|e| ModelError::Config {
            file: file.to_path_buf(),
            message: format!("not a valid config.json: {e}"),
        })?;
        let err = |message: String| ModelError::Config {
            file: file.to_path_buf(),
            message,
        };
        let arch = match raw.model_type.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "mistral" => Arch::Mistral,
            other => {
                return Err(err(format!(
                    "model_type = {other:?} is not supported (supported: llama, qwen2, mistral)"
                )));
            }
        };
        let num_heads = raw.num_attention_heads;
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None => {
                if num_heads == 0 || !raw.hidden_size.is_multiple_of(num_heads) {
                    return Err(err(format!(
                        "hidden_size = {} is not divisible by num_attention_heads = {num_heads}",
                        raw.hidden_size
                    )));
                }
                raw.hidden_size / num_heads
            }
        };
        let rope_scaling = match raw.rope_scaling {
            None => RopeScaling::None,
            Some(s) => {
                let kind = s.rope_type.or(s.kind).unwrap_or_else(|| "default".into());
                let factor = s.factor.unwrap_or(1.0);
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(err(format!(
                        "rope_scaling.factor = {factor} must be positive"
                    )));
                }
                match kind.as_str() {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear { factor },
                    "llama3" => {
                        let low = s.low_freq_factor.unwrap_or(1.0);
                        let high = s.high_freq_factor.unwrap_or(4.0);
                        if high <= low {
                            return Err(err(format!(
                                "rope_scaling: high_freq_factor = {high} must exceed low_freq_factor = {low}"
                            )));
                        }
                        RopeScaling::Llama3 {
                            factor,
                            low_freq_factor: low,
                            high_freq_factor: high,
                            original_max_position_embeddings: s
                                .original_max_position_embeddings
                                .unwrap_or(8192)
                                as f64,
                        }
                    }
                    other => {
                        return Err(err(format!(
                            "rope_scaling type {other:?} is not supported (supported: linear, llama3)"
                        )));
                    }
                }
            }
        };
        let sliding_window = match arch {
            Arch::Mistral => raw.sliding_window,
            Arch::Qwen2 if raw.use_sliding_window == Some(true) => raw.sliding_window,
            _ => None,
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            rope_style: RopeStyle::Halves,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw
                .tie_word_embeddings
                .unwrap_or(matches!(arch, Arch::Qwen2) && raw.hidden_size < 2048),
            qkv_bias: raw.attention_bias.unwrap_or(matches!(arch, Arch::Qwen2)),
            sliding_window,
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw.eos_token_id.map(IdOrIds::into_vec).unwrap_or_default(),
        };
        cfg.validate(file)?;
        Ok(cfg)
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<IdOrIds>,
}

#[derive(Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

/// `eos_token_id` is an integer or a list of integers in Hugging Face configs.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum IdOrIds {
    One(u32),
    Many(Vec<u32>),
}

impl IdOrIds {
    pub(crate) fn into_vec(self) -> Vec<u32> {
        match self {
            IdOrIds::One(i) => vec![i],
            IdOrIds::Many(v) => v,
        }
    }
}
