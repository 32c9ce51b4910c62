//! Text <-> token ids. From a `tokenizer.json` (with `tokenizer_config.json` for the special
//! tokens), or rebuilt from GGUF metadata (`tokenizer.ggml.*`) when a model ships none, as the
//! SmolLM2 GGUF does. The rebuilt tokenizer is the same byte-level BPE that llama.cpp runs, with
//! the pre-tokenizer its `tokenizer.ggml.pre` names.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::json;
use tokenizers::Tokenizer;

use super::{ModelError, Result, read_optional_json};

/// Texts of tokens that end generation wherever they appear as special tokens: llama.cpp treats
/// the same set as end-of-generation, because chat models end turns with them even when the
/// config names another EOS.
const END_OF_GENERATION: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "</s>",
    "<end_of_turn>",
    "<|end|>",
];

pub struct TextTokenizer {
    inner: Tokenizer,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: BTreeSet<u32>,
    /// Prepend the BOS id when encoding a prompt (as the tokenizer files say).
    add_bos: Option<u32>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from `dir`, with special tokens from `tokenizer_config.json` and
    /// end-of-generation ids from the model config and `generation_config.json`.
    pub fn from_hf_dir(dir: &Path, config_eos: &[u32]) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let source = path.display().to_string();
        if !path.exists() {
            return Err(ModelError::Tokenizer {
                source_name: source,
                message: "tokenizer.json is missing".into(),
            });
        }
        let inner = Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            source_name: source.clone(),
            message: e.to_string(),
        })?;
        let mut bos_token = None;
        let mut eos_token = None;
        let mut add_bos = false;
        let cfg_path = dir.join("tokenizer_config.json");
        if let Some(cfg) = read_optional_json(&cfg_path)? {
            bos_token = token_text(cfg.get("bos_token"));
            eos_token = token_text(cfg.get("eos_token"));
            add_bos = cfg
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
        }
        let mut eos_ids: BTreeSet<u32> = config_eos.iter().copied().collect();
        if let Some(gen_cfg) = read_optional_json(&dir.join("generation_config.json"))? {
            match gen_cfg.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => {
                    eos_ids.extend(n.as_u64().map(|v| v as u32));
                }
                Some(serde_json::Value::Array(a)) => {
                    eos_ids.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32));
                }
                _ => {}
            }
        }
        if let Some(e) = &eos_token {
            eos_ids.extend(inner.token_to_id(e));
        }
        // A post-processor that already adds BOS (Llama 3's TemplateProcessing) must not get a
        // second one.
        let bos_id = bos_token.as_deref().and_then(|b| inner.token_to_id(b));
        let add_bos = match bos_id {
            Some(id) if add_bos && inner.get_post_processor().is_none() => Some(id),
            _ => None,
        };
        let mut t = Self {
            inner,
            source,
            bos_token,
            eos_token,
            eos_ids,
            add_bos,
        };
        t.add_end_of_generation_tokens();
        Ok(t)
    }

    /// Rebuilds the tokenizer of a GGUF file from its `tokenizer.ggml.*` metadata.
    pub fn from_gguf(meta: &HashMap<String, Value>, file: &Path) -> Result<Self> {
        let source = format!("{} (GGUF metadata)", file.display());
        let err = |message: String| ModelError::Tokenizer {
            source_name: source.clone(),
            message,
        };
        let get_str = |k: &str| meta.get(k).and_then(|v| v.to_string().ok().cloned());
        let get_u32 = |k: &str| meta.get(k).and_then(|v| v.to_u32().ok());
        let model = get_str("tokenizer.ggml.model")
            .ok_or_else(|| err("tokenizer.ggml.model is missing".into()))?;
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer.ggml.model = {model:?} cannot be rebuilt (only byte-level BPE, \"gpt2\"); \
                 put the model's tokenizer.json next to the GGUF file"
            )));
        }
        let tokens = string_array(meta, "tokenizer.ggml.tokens").map_err(&err)?;
        let merges = string_array(meta, "tokenizer.ggml.merges").map_err(&err)?;
        let types: Vec<i64> = match meta.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.to_i32().map(i64::from).unwrap_or(1))
                .collect(),
            _ => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(err(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let pre = get_str("tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
        let pre_tokenizer = pre_tokenizer_json(&pre).ok_or_else(|| {
            err(format!(
                "tokenizer.ggml.pre = {pre:?} is not supported (supported: default, gpt2, smollm, \
                 starcoder, refact, llama3, llama-bpe, qwen2)"
            ))
        })?;
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
            vocab.insert(tok.clone(), json!(id));
            // 3 = control, 4 = user-defined: matched as whole tokens before BPE.
            if *ty == 3 || *ty == 4 {
                added.push(json!({
                    "id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": *ty == 3,
                }));
            }
        }
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            }
        });
        let inner: Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e: tokenizers::Error| err(e.to_string()))?;
        let name_of = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let bos_id = get_u32("tokenizer.ggml.bos_token_id");
        let eos_id = get_u32("tokenizer.ggml.eos_token_id");
        let add_bos = meta
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let mut eos_ids: BTreeSet<u32> = eos_id.into_iter().collect();
        eos_ids.extend(get_u32("tokenizer.ggml.eot_token_id"));
        let mut t = Self {
            inner,
            source,
            bos_token: name_of(bos_id),
            eos_token: name_of(eos_id),
            eos_ids,
            add_bos: if add_bos { bos_id } else { None },
        };
        t.add_end_of_generation_tokens();
        Ok(t)
    }

    fn add_end_of_generation_tokens(&mut self) {
        for text in END_OF_GENERATION {
            if let Some(id) = self.inner.token_to_id(text) {
                let special = self
                    .inner
                    .get_added_tokens_decoder()
                    .get(&id)
                    .is_some_and(|t| t.special);
                if special {
                    self.eos_ids.insert(id);
                }
            }
        }
    }

    /// Encodes `text` exactly as the tokenizer files say, special tokens included (so a rendered
    /// chat template keeps `<|im_start|>` as one token); BOS only when they ask for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer {
                source_name: self.source.clone(),
                message: format!("cannot encode: {e}"),
            })?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let Some(b) = self.add_bos
            && enc.get_ids().first() != Some(&b)
        {
            ids.push(b);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer {
                source_name: self.source.clone(),
                message: format!("cannot decode: {e}"),
            })
    }

    /// The text of one token as it would print (special tokens included).
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    pub fn eos_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.eos_ids.iter().copied()
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
}

/// `bos_token`/`eos_token` are a string or an AddedToken object with `content`.
fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn string_array(meta: &HashMap<String, Value>, key: &str) -> Result<Vec<String>, String> {
    match meta.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.to_string()
                    .cloned()
                    .map_err(|_| format!("{key}[{i}] is not a string"))
            })
            .collect(),
        Some(_) => Err(format!("{key} is not an array")),
        None => Err(format!("{key} is missing")),
    }
}

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Hugging Face pre-tokenizer equivalent to llama.cpp's `tokenizer.ggml.pre` name.
fn pre_tokenizer_json(pre: &str) -> Option<serde_json::Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    Some(match pre {
        "default" | "gpt2" => byte_level(true),
        // Digits one by one, then the GPT-2 split (llama.cpp: "\p{N}" then the GPT-2 regex).
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        "llama3" | "llama-bpe" | "llama-v3" => json!({"type": "Sequence", "pretokenizers": [
            split(LLAMA3_REGEX),
            byte_level(false),
        ]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(QWEN2_REGEX),
            byte_level(false),
        ]}),
        _ => return None,
    })
}
