//! The RouterLoRA's weights: factors `A_r`, `B_r` at every targeted site, their fresh
//! initialisation, and the file format (safetensors + a JSON config beside it).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{Result, RouterError};
use crate::model::{ModelConfig, RopeStyle, Site, SiteKind};

/// Version of the router file layout.
pub const ROUTER_FORMAT: u32 = 1;
/// The largest router rank accepted from a file.
pub const MAX_RANK: usize = 256;

/// What a router file says about itself (the JSON beside the tensors).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterConfig {
    pub format: u32,
    /// The base model id it was trained on.
    pub base_model: String,
    pub rank: usize,
    pub targets: Vec<SiteKind>,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// How it was trained (settings, tasks, losses); informative only.
    #[serde(default)]
    pub training: serde_json::Value,
}

/// The router factors of one site.
#[derive(Clone)]
pub struct RouterSite {
    /// `A_r` `[r, in]`.
    pub a: Tensor,
    /// `B_r` `[out, r]`, in the decoder's row order.
    pub b: Tensor,
}

/// A RouterLoRA: factors at every targeted site of one base model.
pub struct RouterLora {
    config: RouterConfig,
    sites: BTreeMap<Site, RouterSite>,
}

impl RouterLora {
    /// A fresh router: `A_r` Kaiming-uniform (bound `1/√in`), `B_r ~ N(0, 0.01²)`, so scores start
    /// near 0 and the router near uniform mixture.
    pub fn init(
        model: &ModelConfig,
        base_model: &str,
        targets: &[SiteKind],
        rank: usize,
        seed: u64,
    ) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        check_rank(rank)?;
        if targets.is_empty() {
            return Err(RouterError::Invalid("no target modules".into()));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let device = crate::device::compute();
        let mut sites = BTreeMap::new();
        for layer in 0..model.num_layers {
            for &kind in targets {
                let (out_f, in_f) = model.linear_shape(kind);
                let bound = 1.0 / (in_f as f32).sqrt();
                let a: Vec<f32> = (0..rank * in_f)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let b: Vec<f32> = (0..out_f * rank)
                    .map(|_| {
                        // Box-Muller: N(0, 0.01²).
                        let u1: f32 = rng.random_range(f32::EPSILON..1.0);
                        let u2: f32 = rng.random_range(0.0..1.0);
                        0.01 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                    })
                    .collect();
                sites.insert(
                    Site { layer, kind },
                    RouterSite {
                        a: Tensor::from_vec(a, (rank, in_f), &device)?,
                        b: Tensor::from_vec(b, (out_f, rank), &device)?,
                    },
                );
            }
        }
        Ok(Self {
            config: config_for(model, base_model, targets, rank),
            sites,
        })
    }

    /// A router over the given factors (shapes checked against `model`).
    pub fn from_sites(config: RouterConfig, sites: BTreeMap<Site, RouterSite>) -> Result<Self> {
        Ok(Self { config, sites })
    }

    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    pub fn config_mut(&mut self) -> &mut RouterConfig {
        &mut self.config
    }

    pub fn rank(&self) -> usize {
        self.config.rank
    }

    pub fn site(&self, site: Site) -> Option<&RouterSite> {
        self.sites.get(&site)
    }

    pub fn sites(&self) -> impl Iterator<Item = (&Site, &RouterSite)> {
        self.sites.iter()
    }

    /// Trainable parameters.
    pub fn params(&self) -> usize {
        self.sites
            .values()
            .map(|s| s.a.elem_count() + s.b.elem_count())
            .sum()
    }

    /// The JSON file that goes with the tensors at `path` (same stem, `.json`).
    pub fn json_path(path: &Path) -> PathBuf {
        path.with_extension("json")
    }

    /// Writes the tensors to `path` (safetensors; `B_r` in the Hugging Face row order, as PEFT
    /// stores `lora_B`) and the config beside it, each atomically.
    pub fn save(&self, path: &Path, model: &ModelConfig) -> Result<()> {
        let io = |e: std::io::Error| RouterError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (site, s) in &self.sites {
            let b = s.b.detach();
            let b = match row_heads(model, site.kind) {
                Some(heads) => crate::adapter::unpermute_rows_for_interleaved_rope(&b, heads)?,
                None => b,
            };
            let (ka, kb) = tensor_names(*site);
            tensors.insert(ka, s.a.detach().contiguous()?);
            tensors.insert(kb, b.contiguous()?);
        }
        let bytes = safetensors::tensor::serialize(tensors.iter(), None).map_err(|e| {
            RouterError::File {
                path: path.to_path_buf(),
                message: format!("cannot serialize: {e}"),
            }
        })?;
        crate::files::write_atomic(path, &bytes).map_err(io)?;
        let json = serde_json::to_string_pretty(&self.config).expect("serializable");
        crate::files::write_atomic(&Self::json_path(path), json.as_bytes()).map_err(io)
    }

    /// Reads a router written by [`RouterLora::save`] for the base `model`: every shape, the
    /// layer count and the targets are checked, and values must be finite.
    pub fn load(path: &Path, model: &ModelConfig) -> Result<Self> {
        let json_path = Self::json_path(path);
        let bad = |p: &Path, message: String| RouterError::File {
            path: p.to_path_buf(),
            message,
        };
        let text =
            std::fs::read_to_string(&json_path).map_err(|e| bad(&json_path, e.to_string()))?;
        let config: RouterConfig = serde_json::from_str(&text)
            .map_err(|e| bad(&json_path, format!("not a router config: {e}")))?;
        if config.format != ROUTER_FORMAT {
            return Err(bad(
                &json_path,
                format!(
                    "format {} is not the supported {ROUTER_FORMAT}",
                    config.format
                ),
            ));
        }
        check_rank(config.rank).map_err(|e| bad(&json_path, e.to_string()))?;
        let expect = [
            ("num_layers", config.num_layers, model.num_layers),
            ("hidden_size", config.hidden_size, model.hidden_size),
            (
                "intermediate_size",
                config.intermediate_size,
                model.intermediate_size,
            ),
        ];
        for (name, got, want) in expect {
            if got != want {
                return Err(bad(
                    &json_path,
                    format!("{name} {got} does not match the base model's {want}"),
                ));
            }
        }
        if config.targets.is_empty() {
            return Err(bad(&json_path, "no target modules".into()));
        }
        let bytes = std::fs::read(path).map_err(|e| bad(path, e.to_string()))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &crate::device::compute())
            .map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
        let mut sites = BTreeMap::new();
        for layer in 0..config.num_layers {
            for &kind in &config.targets {
                let site = Site { layer, kind };
                let (out_f, in_f) = model.linear_shape(kind);
                let (ka, kb) = tensor_names(site);
                let get = |key: &str, shape: (usize, usize)| -> Result<Tensor> {
                    let t = tensors
                        .get(key)
                        .ok_or_else(|| bad(path, format!("missing tensor {key}")))?;
                    if t.dims() != [shape.0, shape.1] {
                        return Err(bad(
                            path,
                            format!("{key} has shape {:?}, expected {shape:?}", t.dims()),
                        ));
                    }
                    let t = t.to_dtype(DType::F32)?;
                    let finite = t
                        .flatten_all()?
                        .to_vec1::<f32>()?
                        .iter()
                        .all(|v| v.is_finite());
                    if !finite {
                        return Err(bad(path, format!("{key} holds a non-finite value")));
                    }
                    Ok(t)
                };
                let a = get(&ka, (config.rank, in_f))?;
                let b = get(&kb, (out_f, config.rank))?;
                let b = match row_heads(model, kind) {
                    Some(heads) => crate::adapter::permute_rows_for_interleaved_rope(&b, heads)?,
                    None => b,
                };
                sites.insert(site, RouterSite { a, b });
            }
        }
        Ok(Self { config, sites })
    }
}

fn check_rank(rank: usize) -> Result<()> {
    if rank == 0 || rank > MAX_RANK {
        return Err(RouterError::Invalid(format!(
            "rank {rank} is outside 1..={MAX_RANK}"
        )));
    }
    Ok(())
}

/// The config of a router of `rank` on `targets` for `model`.
pub fn config_for(
    model: &ModelConfig,
    base_model: &str,
    targets: &[SiteKind],
    rank: usize,
) -> RouterConfig {
    RouterConfig {
        format: ROUTER_FORMAT,
        base_model: base_model.to_string(),
        rank,
        targets: targets.to_vec(),
        num_layers: model.num_layers,
        hidden_size: model.hidden_size,
        intermediate_size: model.intermediate_size,
        training: serde_json::Value::Null,
    }
}

fn tensor_names(site: Site) -> (String, String) {
    let p = site.hf_path();
    (
        format!("{p}.router_A.weight"),
        format!("{p}.router_B.weight"),
    )
}

/// Heads whose rows a GGUF llama base interleaves (q and k), when it does.
fn row_heads(model: &ModelConfig, kind: SiteKind) -> Option<usize> {
    match (model.rope_style, kind) {
        (RopeStyle::Interleaved, SiteKind::Q) => Some(model.num_heads),
        (RopeStyle::Interleaved, SiteKind::K) => Some(model.num_kv_heads),
        _ => None,
    }
}
