//! PEFT LoRA adapters: reading `adapter_config.json` + `adapter_model.safetensors`, validating
//! them against the loaded base (every `lora_A`/`lora_B` pair must map to a linear of the decoder
//! with matching shapes), and holding the factors in f32 for the mixture math. Anything we cannot
//! apply exactly (DoRA, `modules_to_save`, embedding LoRA, pickle weights, base-transforming
//! initialisations) is refused with the file and the key named.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;
use serde::Deserialize;

use crate::model::{Decoder, ModelConfig, RopeStyle, Site, SiteKind};

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{}: {message}", file.display())]
    Invalid { file: PathBuf, message: String },
    #[error("{}: cannot read: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: tensor op: {message}", file.display())]
    Tensor { file: PathBuf, message: String },
}

type Result<T, E = AdapterError> = std::result::Result<T, E>;

/// `target_modules`: a list of names, a regex over module paths, or `"all-linear"`.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    Names(Vec<String>),
    Regex(String),
    AllLinear,
}

/// The keys of `adapter_config.json` that change what the adapter computes.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub target_modules: Targets,
    pub layers_to_transform: Option<Vec<usize>>,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub base_model: Option<String>,
}

#[derive(Deserialize)]
struct RawConfig {
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    target_modules: Option<serde_json::Value>,
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, f64>,
    modules_to_save: Option<Vec<String>>,
    init_lora_weights: Option<serde_json::Value>,
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    lora_bias: bool,
    task_type: Option<String>,
}

impl LoraConfig {
    /// Parses and checks `adapter_config.json`.
    pub fn parse(text: &str, file: &Path) -> Result<Self> {
        let bad = |message: String| AdapterError::Invalid {
            file: file.to_path_buf(),
            message,
        };
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        if let Some(t) = &raw.peft_type
            && t != "LORA"
        {
            return Err(bad(format!(
                "peft_type = {t:?}: only LORA adapters are supported"
            )));
        }
        if let Some(t) = raw.task_type.as_deref().filter(|t| *t != "CAUSAL_LM") {
            return Err(bad(format!(
                "task_type = {t:?}: only CAUSAL_LM (text generation) adapters are supported"
            )));
        }
        if raw.use_dora {
            return Err(bad(
                "use_dora = true: DoRA adapters are not supported".into()
            ));
        }
        if let Some(m) = raw.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
            return Err(bad(format!(
                "modules_to_save = {m:?}: adapters that replace whole modules are not supported"
            )));
        }
        if raw.fan_in_fan_out {
            return Err(bad(
                "fan_in_fan_out = true: Conv1D (GPT-2 style) layouts are not supported".into(),
            ));
        }
        if raw.lora_bias {
            return Err(bad("lora_bias = true: LoRA biases are not supported".into()));
        }
        if let Some(serde_json::Value::String(init)) = &raw.init_lora_weights {
            let init = init.to_ascii_lowercase();
            if ["pissa", "olora", "loftq", "corda", "eva"]
                .iter()
                .any(|p| init.starts_with(p))
            {
                return Err(bad(format!(
                    "init_lora_weights = {init:?} changes the base weights; such adapters are not supported"
                )));
            }
        }
        let r = raw.r.unwrap_or(8);
        if r == 0 || r > 4096 {
            return Err(bad(format!("r = {r} must be between 1 and 4096")));
        }
        let lora_alpha = raw.lora_alpha.unwrap_or(8.0);
        if !lora_alpha.is_finite() {
            return Err(bad(format!("lora_alpha = {lora_alpha} must be finite")));
        }
        let target_modules = match raw.target_modules {
            Some(serde_json::Value::String(s)) if s == "all-linear" => Targets::AllLinear,
            Some(serde_json::Value::String(s)) => {
                regex::Regex::new(&s)
                    .map_err(|e| bad(format!("target_modules regex {s:?} does not parse: {e}")))?;
                Targets::Regex(s)
            }
            Some(serde_json::Value::Array(a)) => Targets::Names(
                a.iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| bad(format!("target_modules entry {v} is not a string")))
                    })
                    .collect::<Result<_>>()?,
            ),
            None | Some(serde_json::Value::Null) => Targets::Names(Vec::new()),
            Some(other) => return Err(bad(format!("target_modules = {other} is not understood"))),
        };
        let layers_to_transform = match raw.layers_to_transform {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Number(n)) => Some(vec![n.as_u64().unwrap_or(0) as usize]),
            Some(serde_json::Value::Array(a)) => Some(
                a.iter()
                    .map(|v| {
                        v.as_u64().map(|x| x as usize).ok_or_else(|| {
                            bad(format!(
                                "layers_to_transform entry {v} is not a layer index"
                            ))
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(other) => {
                return Err(bad(format!(
                    "layers_to_transform = {other} is not understood"
                )));
            }
        };
        for (k, &v) in &raw.rank_pattern {
            if v == 0 || v > 4096 {
                return Err(bad(format!(
                    "rank_pattern[{k:?}] = {v} must be between 1 and 4096"
                )));
            }
        }
        Ok(Self {
            r,
            lora_alpha,
            use_rslora: raw.use_rslora,
            target_modules,
            layers_to_transform,
            rank_pattern: raw.rank_pattern,
            alpha_pattern: raw.alpha_pattern,
            base_model: raw.base_model_name_or_path,
        })
    }

    /// Rank and scale of the module at `path` (e.g. `model.layers.0.self_attn.q_proj`), with
    /// rank_pattern / alpha_pattern applied as PEFT matches them (`(.*\.)?key$`).
    pub fn rank_and_scale(&self, path: &str) -> (usize, f64) {
        let r = pattern_value(&self.rank_pattern, path).unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern, path).unwrap_or(self.lora_alpha);
        let scale = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        (r, scale)
    }
}

fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, path: &str) -> Option<T> {
    patterns.iter().find_map(|(key, &v)| {
        let re = regex::Regex::new(&format!(r"^(.*\.)?({key})$")).ok()?;
        re.is_match(path).then_some(v)
    })
}

/// The low-rank factors of one site: `delta = scale * B (A x)`.
#[derive(Clone)]
pub struct LoraFactors {
    /// `[r, in_features]`, contiguous.
    pub a: Tensor,
    /// `[out_features, r]`: a transposed view of `b_t`.
    pub b: Tensor,
    /// `Bᵀ` `[r, out_features]`, contiguous (the same storage as `b`), so a decode loop reads
    /// both factors row by row.
    pub b_t: Tensor,
    pub scale: f32,
}

impl LoraFactors {
    /// `a` `[r, in]`, `b` `[out, r]`.
    pub fn new(a: Tensor, b: Tensor, scale: f32) -> candle_core::Result<Self> {
        let b_t = b.t()?.contiguous()?;
        Ok(Self {
            a: a.contiguous()?,
            b: b_t.t()?,
            b_t,
            scale,
        })
    }

    pub fn rank(&self) -> usize {
        self.a.dim(0).unwrap_or(0)
    }
}

/// A loaded, validated adapter, shared by every request that uses it.
pub struct LoraAdapter {
    pub name: String,
    pub dir: PathBuf,
    pub config: LoraConfig,
    sites: BTreeMap<Site, LoraFactors>,
    /// Linears of the base (7 per layer).
    base_sites: usize,
}

impl LoraAdapter {
    /// Reads the adapter in `dir` and fits it to `base`.
    pub fn load(dir: &Path, base: &Decoder) -> Result<Self> {
        let (config, st_path, bytes) = read_files(dir)?;
        let st = parse_safetensors(&bytes, &st_path)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| dir.display().to_string());
        let sites = fit_tensors(&st, &st_path, &config, base.config(), base.device())?;
        Ok(Self {
            name,
            dir: dir.to_path_buf(),
            config,
            sites,
            base_sites: base.config().num_layers * SiteKind::ALL.len(),
        })
    }

    pub fn factors(&self, site: Site) -> Option<&LoraFactors> {
        self.sites.get(&site)
    }

    pub fn sites(&self) -> impl Iterator<Item = (&Site, &LoraFactors)> {
        self.sites.iter()
    }

    /// (linears this adapter attaches to, linears of the base).
    pub fn coverage(&self) -> (usize, usize) {
        (self.sites.len(), self.base_sites)
    }

    /// The ranks this adapter uses, smallest first.
    pub fn ranks(&self) -> Vec<usize> {
        let mut r: Vec<usize> = self.sites.values().map(LoraFactors::rank).collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    /// Bytes of the factors as held.
    pub fn bytes(&self) -> usize {
        self.sites
            .values()
            .map(|f| (f.a.elem_count() + f.b.elem_count()) * 4)
            .sum()
    }
}

/// What an adapter is, checked against a base configuration without loading its factors: the
/// facts the catalog records and the compatibility check needs.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub config: LoraConfig,
    /// Linears the adapter attaches to.
    pub sites: usize,
    /// Linears of the base (7 per layer).
    pub base_sites: usize,
    /// Ranks in use, smallest first.
    pub ranks: Vec<usize>,
    /// Module names it adapts (`q_proj`, `v_proj`, ...), in decoder order.
    pub modules: Vec<String>,
    /// Parameters of all its factors (Σ r·(in+out) over its sites).
    pub params: u64,
    /// Bytes of the adapter's files.
    pub bytes_on_disk: u64,
}

/// Validates the adapter in `dir` against a base of configuration `cfg`: the same checks as
/// [`LoraAdapter::load`] (config, key names, pairs, layers, ranks, shapes) from the tensor
/// headers, without converting the factors.
pub fn inspect(dir: &Path, cfg: &ModelConfig) -> Result<AdapterSummary> {
    let (config, st_path, bytes) = read_files(dir)?;
    let st = parse_safetensors(&bytes, &st_path)?;
    let cfg_bytes = std::fs::metadata(dir.join("adapter_config.json")).map_or(0, |m| m.len());
    summarize(
        config,
        &shapes_of(&st),
        &st_path,
        cfg,
        bytes.len() as u64 + cfg_bytes,
    )
}

/// [`inspect`] from the parts a remote check has: the config's text and the tensor shapes
/// from the safetensors header (`file` names the source in errors).
pub fn inspect_header(
    config_text: &str,
    shapes: &BTreeMap<String, Vec<usize>>,
    file: &Path,
    cfg: &ModelConfig,
    bytes_on_disk: u64,
) -> Result<AdapterSummary> {
    let config = LoraConfig::parse(config_text, file)?;
    summarize(config, shapes, file, cfg, bytes_on_disk)
}

/// Tensor names and shapes from a safetensors header: the JSON after the 8-byte length.
pub fn header_shapes(header_json: &[u8], file: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    let bad = |message: String| AdapterError::Invalid {
        file: file.to_path_buf(),
        message,
    };
    let v: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header_json)
        .map_err(|e| bad(format!("not a valid safetensors header: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, t) in v {
        if name == "__metadata__" {
            continue;
        }
        let shape: Vec<usize> = t
            .get("shape")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad(format!("{name}: no shape in the header")))?;
        out.insert(name, shape);
    }
    Ok(out)
}

fn shapes_of(st: &SafeTensors<'_>) -> BTreeMap<String, Vec<usize>> {
    st.tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect()
}

/// Parameters of the adapter (sum over sites of r·(in+out)).
fn summarize(
    config: LoraConfig,
    shapes: &BTreeMap<String, Vec<usize>>,
    file: &Path,
    cfg: &ModelConfig,
    bytes_on_disk: u64,
) -> Result<AdapterSummary> {
    let pairs = pair_sites(shapes, file, &config, cfg)?;
    let params = pairs
        .iter()
        .map(|(site, (_, _, r))| {
            let (o, i) = cfg.linear_shape(site.kind);
            r * (o + i)
        })
        .sum::<usize>() as u64;
    let mut ranks: Vec<usize> = pairs.values().map(|p| p.2).collect();
    ranks.sort_unstable();
    ranks.dedup();
    let modules = SiteKind::ALL
        .into_iter()
        .filter(|k| pairs.keys().any(|s| s.kind == *k))
        .map(|k| k.hf_name().to_string())
        .collect();
    Ok(AdapterSummary {
        sites: pairs.len(),
        base_sites: cfg.num_layers * SiteKind::ALL.len(),
        ranks,
        modules,
        params,
        bytes_on_disk,
        config,
    })
}

/// `adapter_config.json` parsed, and the bytes of `adapter_model.safetensors`.
fn read_files(dir: &Path) -> Result<(LoraConfig, PathBuf, Vec<u8>)> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| AdapterError::Io {
        file: cfg_path.clone(),
        source,
    })?;
    let config = LoraConfig::parse(&text, &cfg_path)?;
    let st_path = dir.join("adapter_model.safetensors");
    if !st_path.exists() {
        let bin = dir.join("adapter_model.bin");
        let message = if bin.exists() {
            "only adapter_model.bin (pickle) is present; pickle weights are refused — convert them to adapter_model.safetensors".to_string()
        } else {
            "adapter_model.safetensors is missing".to_string()
        };
        return Err(AdapterError::Invalid {
            file: dir.to_path_buf(),
            message,
        });
    }
    let bytes = std::fs::read(&st_path).map_err(|source| AdapterError::Io {
        file: st_path.clone(),
        source,
    })?;
    Ok((config, st_path, bytes))
}

fn parse_safetensors<'a>(bytes: &'a [u8], file: &Path) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| AdapterError::Invalid {
        file: file.to_path_buf(),
        message: format!("not a valid safetensors file (truncated or corrupt): {e}"),
    })
}

/// Parsed tensor key: layer, site kind, and whether it is `lora_A`.
fn parse_key(key: &str) -> std::result::Result<(usize, SiteKind, bool), String> {
    if key.contains("lora_embedding_") {
        return Err("embedding LoRA is not supported".into());
    }
    if key.contains("lora_magnitude_vector") {
        return Err("DoRA magnitude vectors are not supported".into());
    }
    let rest = key
        .strip_prefix("base_model.model.")
        .ok_or("not a PEFT LoRA key (expected base_model.model.<module>.lora_A/B.weight)")?;
    let (module, is_a) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, true)
    } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
        (m, false)
    } else if rest.ends_with(".lora_B.bias") {
        return Err("LoRA biases are not supported".into());
    } else {
        return Err("not a lora_A / lora_B weight; only LoRA factors are supported".into());
    };
    let parts: Vec<&str> = module.split('.').collect();
    // model.layers.<i>.<self_attn|mlp>.<proj>: accepted when it is exactly a site's path.
    let parsed = match parts.as_slice() {
        ["model", "layers", i, _, proj] => i.parse::<usize>().ok().and_then(|layer| {
            let kind = SiteKind::ALL.into_iter().find(|k| k.hf_name() == *proj)?;
            let site = Site { layer, kind };
            (site.hf_path() == module).then_some((layer, kind))
        }),
        _ => None,
    };
    let (layer, kind) = parsed.ok_or_else(|| {
        format!(
            "module {module:?} is not a linear layer of a Llama-family decoder (an adapter for another architecture?)"
        )
    })?;
    Ok((layer, kind, is_a))
}

/// The `lora_A` / `lora_B` key pair of every site the adapter attaches to, checked against the
/// base's layers and linear shapes (from the tensor headers; no data is read). Returns each site
/// with its keys and rank.
fn pair_sites(
    shapes: &BTreeMap<String, Vec<usize>>,
    file: &Path,
    config: &LoraConfig,
    cfg: &ModelConfig,
) -> Result<BTreeMap<Site, (String, String, usize)>> {
    let bad = |message: String| AdapterError::Invalid {
        file: file.to_path_buf(),
        message,
    };
    let mut pairs: BTreeMap<Site, (Option<String>, Option<String>)> = BTreeMap::new();
    let layers = cfg.num_layers;
    for key in shapes.keys() {
        let (layer, kind, is_a) = parse_key(key).map_err(|m| bad(format!("{key}: {m}")))?;
        if layer >= layers {
            return Err(bad(format!(
                "{key}: layer {layer} does not exist (the base has {layers} layers)"
            )));
        }
        let slot = pairs.entry(Site { layer, kind }).or_default();
        if is_a {
            slot.0 = Some(key.clone());
        } else {
            slot.1 = Some(key.clone());
        }
    }
    let mut out = BTreeMap::new();
    for (site, (a_key, b_key)) in pairs {
        let (a_key, b_key) = match (a_key, b_key) {
            (Some(a), Some(b)) => (a, b),
            (Some(k), None) | (None, Some(k)) => {
                return Err(bad(format!("{k}: its lora_A / lora_B partner is missing")));
            }
            (None, None) => unreachable!("an entry exists only with a key"),
        };
        let path = site.hf_path();
        let (rank, _) = config.rank_and_scale(&path);
        let (out_f, in_f) = cfg.linear_shape(site.kind);
        let shape2 = |key: &str| -> Result<(usize, usize)> {
            match shapes[key].as_slice() {
                [a, b] => Ok((*a, *b)),
                other => Err(bad(format!(
                    "{key}: expected a matrix, found shape {other:?}"
                ))),
            }
        };
        let (ra, ia) = shape2(&a_key)?;
        let (ob, rb) = shape2(&b_key)?;
        if ra != rank || rb != rank {
            return Err(bad(format!(
                "{a_key}: the config says rank {rank} for {path} but the tensors have rank {ra} (lora_A) and {rb} (lora_B)"
            )));
        }
        if ia != in_f || ob != out_f {
            return Err(bad(format!(
                "{a_key}: shapes lora_A [{ra}, {ia}] and lora_B [{ob}, {rb}] do not fit the base's {path} ({out_f} x {in_f})"
            )));
        }
        out.insert(site, (a_key, b_key, rank));
    }
    if out.is_empty() {
        return Err(bad(
            "the adapter attaches to none of the base's linear layers".into(),
        ));
    }
    Ok(out)
}

/// The adapter's factors per site, on `device` (the base's: factors live where the base
/// computes).
fn fit_tensors(
    st: &SafeTensors<'_>,
    file: &Path,
    config: &LoraConfig,
    cfg: &ModelConfig,
    device: &Device,
) -> Result<BTreeMap<Site, LoraFactors>> {
    let bad = |message: String| AdapterError::Invalid {
        file: file.to_path_buf(),
        message,
    };
    let mut out = BTreeMap::new();
    for (site, (a_key, b_key, _)) in pair_sites(&shapes_of(st), file, config, cfg)? {
        let (_, scale) = config.rank_and_scale(&site.hf_path());
        let a = read_f32(st, &a_key, file, device)?;
        let b = read_f32(st, &b_key, file, device)?;
        // llama.cpp's converter permutes the rows of q/k in llama GGUFs; B's rows follow.
        let b = if cfg.rope_style == RopeStyle::Interleaved
            && matches!(site.kind, SiteKind::Q | SiteKind::K)
        {
            let heads = if site.kind == SiteKind::Q {
                cfg.num_heads
            } else {
                cfg.num_kv_heads
            };
            permute_rows_for_interleaved_rope(&b, heads)
                .map_err(|e| bad(format!("{b_key}: {e}")))?
        } else {
            b
        };
        out.insert(
            site,
            LoraFactors::new(a, b, scale as f32).map_err(|e| bad(e.to_string()))?,
        );
    }
    Ok(out)
}

/// Within each head, interleaves the two halves of the rows (`[out, r]`, `out = heads * hd`).
pub(crate) fn permute_rows_for_interleaved_rope(
    b: &Tensor,
    heads: usize,
) -> candle_core::Result<Tensor> {
    let (out, r) = b.dims2()?;
    b.reshape((heads, 2, out / heads / 2, r))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, r))
}

/// The inverse of [`permute_rows_for_interleaved_rope`]: factors trained on a GGUF llama base
/// back to the Hugging Face row order PEFT files use.
pub(crate) fn unpermute_rows_for_interleaved_rope(
    b: &Tensor,
    heads: usize,
) -> candle_core::Result<Tensor> {
    let (out, r) = b.dims2()?;
    b.reshape((heads, out / heads / 2, 2, r))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, r))
}

fn read_f32(st: &SafeTensors<'_>, key: &str, file: &Path, device: &Device) -> Result<Tensor> {
    let view = st.tensor(key).map_err(|e| AdapterError::Invalid {
        file: file.to_path_buf(),
        message: format!("{key}: {e}"),
    })?;
    let dtype = match view.dtype() {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        other => {
            return Err(AdapterError::Invalid {
                file: file.to_path_buf(),
                message: format!("{key}: dtype {other:?} is not supported (f32, f16, bf16)"),
            });
        }
    };
    Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)
        .and_then(|t| t.to_dtype(DType::F32))
        .map_err(|e| AdapterError::Tensor {
            file: file.to_path_buf(),
            message: format!("{key}: {e}"),
        })
}

/// The folder of each task's adapter: `<dir>/<task>`, checked to hold an adapter (the layout
/// `scripts/train-flan-adapters.sh` writes for the mixed-task benchmark).
pub fn task_dirs(dir: &Path, tasks: &[String]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::with_capacity(tasks.len());
    let mut missing = Vec::new();
    for t in tasks {
        let d = dir.join(t);
        if !d.join("adapter_config.json").is_file() {
            missing.push(t.as_str());
        }
        out.push(d);
    }
    if !missing.is_empty() {
        return Err(AdapterError::Invalid {
            file: dir.to_path_buf(),
            message: format!(
                "no adapter for {} of {} tasks ({}{}); scripts/train-flan-adapters.sh makes them",
                missing.len(),
                tasks.len(),
                missing[..missing.len().min(5)].join(", "),
                if missing.len() > 5 { ", ..." } else { "" }
            ),
        });
    }
    Ok(out)
}
