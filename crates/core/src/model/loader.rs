//! Loading a whole model from a path: a Hugging Face folder (config.json, safetensors,
//! tokenizer.json, tokenizer_config.json) or a GGUF file (metadata, tensors, tokenizer rebuilt from
//! metadata unless a tokenizer.json sits beside it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::gguf_file::Value;

use super::config::{Arch, ModelConfig, RopeScaling, RopeStyle};
use super::decoder::{Decoder, QuantLayout};
use super::template::ChatTemplate;
use super::tokenizer::TextTokenizer;
use super::weights::WeightStore;
use super::{ModelError, Result, read_optional_json};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub layout: QuantLayout,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            layout: QuantLayout::default(),
            device: crate::device::compute(),
        }
    }
}

pub struct Model {
    pub decoder: Decoder,
    pub tokenizer: TextTokenizer,
    /// `None` when the model ships no chat template.
    pub template: Option<ChatTemplate>,
    pub source: PathBuf,
}

impl Model {
    /// Loads a Hugging Face folder or a `.gguf` file.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        if path.is_dir() {
            Self::load_hf_dir(path, opts)
        } else if path.is_file() {
            Self::load_gguf(path, opts)
        } else {
            Err(ModelError::Io {
                file: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            })
        }
    }

    fn load_hf_dir(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| ModelError::Io {
            file: cfg_path.clone(),
            source,
        })?;
        let cfg = ModelConfig::from_hf_json(&text, &cfg_path)?;
        let tokenizer = TextTokenizer::from_hf_dir(dir, &cfg.eos_token_ids)?;
        let template = hf_chat_template(&dir.join("tokenizer_config.json"))?
            .map(|src| ChatTemplate::new(&src, tokenizer.bos_token(), tokenizer.eos_token()))
            .transpose()?;
        let store = WeightStore::open_safetensors_dir(dir)?;
        let decoder = Decoder::load(cfg, &store, opts.layout, &opts.device)?;
        Ok(Self {
            decoder,
            tokenizer,
            template,
            source: dir.to_path_buf(),
        })
    }

    fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let store = WeightStore::open_gguf(path)?;
        let meta = store.gguf_metadata().expect("a GGUF store has metadata");
        let cfg = gguf_config(meta, &store, path, &opts.device)?;
        let beside = path.parent().map(|p| p.join("tokenizer.json"));
        let tokenizer = match beside {
            Some(tj) if tj.exists() => {
                TextTokenizer::from_hf_dir(path.parent().expect("has parent"), &cfg.eos_token_ids)?
            }
            _ => TextTokenizer::from_gguf(meta, path)?,
        };
        let template = meta
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .map(|src| ChatTemplate::new(src, tokenizer.bos_token(), tokenizer.eos_token()))
            .transpose()?;
        let decoder = Decoder::load(cfg, &store, opts.layout, &opts.device)?;
        Ok(Self {
            decoder,
            tokenizer,
            template,
            source: path.to_path_buf(),
        })
    }

    /// Token ids of a chat: the model's template with the generation prompt, tokenized.
    pub fn chat_prompt(&self, messages: &[super::ChatMessage]) -> Result<Vec<u32>> {
        let template = self.template.as_ref().ok_or_else(|| {
            ModelError::Template(format!(
                "{} ships no chat template; run without --chat",
                self.source.display()
            ))
        })?;
        let text = template.render(messages, true)?;
        self.tokenizer.encode(&text)
    }
}

/// What the catalog needs to know about a base model without loading its weights: its identity
/// (a Hub id where the metadata names one) and the configuration that fixes every linear's shape.
#[derive(Debug, Clone)]
pub struct BaseInfo {
    pub id: String,
    pub config: ModelConfig,
    pub source: PathBuf,
}

/// Reads a base model's configuration and identity (config.json, or GGUF metadata) without its
/// weights. The identity is `_name_or_path` of config.json when it looks like a Hub id, else
/// the GGUF's `general.source.huggingface.repository` / source URL / `organization/<file name
/// without its format suffix>` (when the file is named after the model) / `organization/name`,
/// else the folder or file name.
pub fn inspect_base(path: &Path) -> Result<BaseInfo> {
    let stem = || {
        path.file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| path.display().to_string())
    };
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| ModelError::Io {
            file: cfg_path.clone(),
            source,
        })?;
        let config = ModelConfig::from_hf_json(&text, &cfg_path)?;
        let named = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("_name_or_path")?.as_str().map(str::to_string))
            .filter(|n| looks_like_hub_id(n));
        return Ok(BaseInfo {
            id: named.unwrap_or_else(stem),
            config,
            source: path.to_path_buf(),
        });
    }
    if !path.is_file() {
        return Err(ModelError::Io {
            file: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        });
    }
    let store = WeightStore::open_gguf(path)?;
    let meta = store.gguf_metadata().expect("a GGUF store has metadata");
    let config = gguf_config(meta, &store, path, &crate::device::compute())?;
    let text = |k: &str| {
        meta.get(k)
            .and_then(|v| v.to_string().ok().cloned())
            .filter(|s| !s.trim().is_empty())
    };
    let from_url = |k: &str| {
        text(k).and_then(|u| {
            let id = u.trim_end_matches('/').rsplitn(3, '/').collect::<Vec<_>>();
            (id.len() == 3).then(|| format!("{}/{}", id[1], id[0]))
        })
    };
    // Converters name the file after the repository (`SmolLM2-135M-Instruct.Q4_1.gguf`) while
    // `general.name` may be a training-run label: prefer the file's name when it is the model's.
    let from_file = || {
        let org = text("general.organization")?;
        let basename = text("general.basename")?.to_ascii_lowercase();
        let stem = stem();
        let name = strip_format_suffix(&stem);
        (name.to_ascii_lowercase().contains(&basename) && !name.contains(['/', ' ']))
            .then(|| format!("{org}/{name}"))
    };
    let id = text("general.source.huggingface.repository")
        .filter(|n| looks_like_hub_id(n))
        .or_else(|| from_url("general.source.url").filter(|u| u.contains('/')))
        .or_else(from_file)
        .or_else(
            || match (text("general.organization"), text("general.name")) {
                (Some(org), Some(name)) => Some(format!("{org}/{}", name.replace(' ', "-"))),
                (None, Some(name)) => Some(name.replace(' ', "-")),
                _ => None,
            },
        )
        .unwrap_or_else(stem);
    Ok(BaseInfo {
        id,
        config,
        source: path.to_path_buf(),
    })
}

/// `name` without the format suffixes that quantized and converted copies append (`.Q4_1`,
/// `-GGUF`, `-Q4_K_M`, `-AWQ`, `-bnb-4bit`, ...), so a copy can be matched to its original.
pub fn strip_format_suffix(name: &str) -> &str {
    static SUFFIX: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(
            r"(?i)[-_.](gguf|ggml|q\d(_[a-z0-9]+)*|iq\d\w*|f16|fp16|bf16|f32|awq|gptq|int4|int8|bnb-4bit|4bit|8bit|mlx|exl2|onnx)$",
        )
        .expect("valid regex")
    });
    let mut n = name;
    while let Some(m) = SUFFIX.find(n) {
        n = &n[..m.start()];
    }
    n
}

/// `owner/name` with no path separators beyond the one slash.
fn looks_like_hub_id(s: &str) -> bool {
    let mut parts = s.split('/');
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() && !a.starts_with('.'))
}

/// `chat_template` of `tokenizer_config.json`: a string, or a list of named templates of which
/// `default` is used.
fn hf_chat_template(path: &Path) -> Result<Option<String>> {
    let Some(v) = read_optional_json(path)? else {
        return Ok(None);
    };
    Ok(match v.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    })
}

/// The decoder's configuration from GGUF metadata (`<arch>.*` keys).
fn gguf_config(
    meta: &HashMap<String, Value>,
    store: &WeightStore,
    path: &Path,
    device: &Device,
) -> Result<ModelConfig> {
    let err = |message: String| ModelError::Config {
        file: path.to_path_buf(),
        message,
    };
    let arch_name = meta
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .ok_or_else(|| err("general.architecture is missing".into()))?;
    let arch = match arch_name.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(err(format!(
                "general.architecture = {other:?} is not supported (supported: llama, qwen2)"
            )));
        }
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let num = |k: &str| -> Result<Option<u64>> {
        match meta.get(&key(k)) {
            None => Ok(None),
            Some(v) => v
                .to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
                .map(Some)
                .map_err(|_| err(format!("{} is not an integer", key(k)))),
        }
    };
    let float = |k: &str| -> Option<f64> {
        meta.get(&key(k))
            .and_then(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok())
    };
    let need = |k: &str| -> Result<usize> {
        num(k)?
            .map(|v| v as usize)
            .ok_or_else(|| err(format!("{} is missing", key(k))))
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let head_dim = match num("rope.dimension_count")?.or(num("attention.key_length")?) {
        Some(d) => d as usize,
        None if heads > 0 => hidden / heads,
        None => 0,
    };
    let vocab = store
        .shape_of("token_embd.weight")
        .map(|s| s[0])
        .ok_or_else(|| ModelError::MissingTensor {
            file: path.to_path_buf(),
            tensor: "token_embd.weight".into(),
        })?;
    let rope_scaling = if store.contains("rope_freqs.weight") {
        let t = store.dense("rope_freqs.weight", &[head_dim / 2], device)?;
        RopeScaling::Divisors(t.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
    } else {
        match meta
            .get(&key("rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
        {
            Some("linear") => RopeScaling::Linear {
                factor: float("rope.scaling.factor").unwrap_or(1.0),
            },
            None | Some("none") => RopeScaling::None,
            Some(other) => {
                return Err(err(format!(
                    "{} = {other:?} is not supported (supported: linear)",
                    key("rope.scaling.type")
                )));
            }
        }
    };
    let u32_meta = |k: &str| meta.get(k).and_then(|v| v.to_u32().ok());
    let cfg = ModelConfig {
        arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: need("feed_forward_length")?,
        num_layers: need("block_count")?,
        num_heads: heads,
        num_kv_heads: num("attention.head_count_kv")?.map_or(heads, |v| v as usize),
        head_dim,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
        rope_scaling,
        // llama.cpp's converter permutes q/k of llama models for adjacent-pair rotation.
        rope_style: match arch {
            Arch::Llama | Arch::Mistral => RopeStyle::Interleaved,
            Arch::Qwen2 => RopeStyle::Halves,
        },
        max_position_embeddings: num("context_length")?.map_or(4096, |v| v as usize),
        tie_word_embeddings: !store.contains("output.weight"),
        qkv_bias: store.contains("blk.0.attn_q.bias"),
        sliding_window: num("attention.sliding_window")?.map(|v| v as usize),
        bos_token_id: u32_meta("tokenizer.ggml.bos_token_id"),
        eos_token_ids: u32_meta("tokenizer.ggml.eos_token_id")
            .into_iter()
            .collect(),
    };
    cfg.validate(path)?;
    Ok(cfg)
}
