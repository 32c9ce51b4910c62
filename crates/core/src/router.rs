//! RAMoLE's RouterLoRA (ramole-paper.md 2.4): per-token gates over the adapters retrieved for a
//! request, computed at every LoRA site by a small LoRA-shaped router, plus the record of those
//! gates per layer and token that a reply's provenance keeps. Owns the router's weights and file
//! format; the plan vocabulary stays in `mole`, the training loop in `train::router`.
//!
//! At a site with router factors `A_r` `[r, in]`, `B_r` `[out, r]` and the row's experts
//! `(A_i, s_i B_i)`, for each token `x`:
//! `h_i = A_i x`, `q = A_r x`, `score_i = qᵀ C_i h_i / √r` with `C_i = B_rᵀ s_i B_i`
//! (precomputed when the experts are compiled), `α = softmax(score)`, output `Σ α_i s_i B_i h_i`.
//! The `out`-sized values `v_i = s_i B_i A_i x` are never formed to score them; [`reference`]
//! forms them (the formula as written), and the tests compare the two.
//!
//! Rows of a batch each have their own experts (the paper's mapping matrix): the base runs the
//! batch once, and at each site every row's tokens are routed over that row's experts only — a
//! union of all rows' experts behind a mask would cost every token the whole batch's experts.
//! Experts dropped in training (Random LoRA Dropout) are masked (score `-∞` → gate 0). Gates are
//! f32 and sum to 1 per token and site.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{D, DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::adapter::LoraAdapter;
use crate::model::{ModelConfig, RopeStyle, RowSpan, Site, SiteDelta, SiteKind};

/// Version of the router file layout.
pub const ROUTER_FORMAT: u32 = 1;
/// The largest router rank accepted from a file.
pub const MAX_RANK: usize = 256;
/// Added to the score of an expert a token must not use: its gate becomes exactly 0. Finite, so
/// the arithmetic around it (and its gradient) stays finite.
const MASKED: f32 = -1e30;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("router: {0}")]
    Invalid(String),
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = RouterError> = std::result::Result<T, E>;

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
                        a: Tensor::from_vec(a, (rank, in_f), &Device::Cpu)?,
                        b: Tensor::from_vec(b, (out_f, rank), &Device::Cpu)?,
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
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
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

/// One site's experts side by side.
struct ExpertSite {
    /// `[R, in]`: the experts' `A_i` stacked (`R = Σ r_i`).
    a: Tensor,
    /// `[out, R]`: `s_i B_i` side by side.
    b: Tensor,
    /// `[r_r, R]`: `B_rᵀ s_i B_i` side by side, when compiled for a router.
    c: Option<Tensor>,
    /// The expert (index into the row's adapters) of each block, in order.
    experts: Vec<usize>,
    /// The rank of each block.
    ranks: Vec<usize>,
    /// The same factors as plain rows for the decode loop (compiled for a router only).
    direct: Option<DirectSite>,
}

/// One site's factors as row-major f32 for [`ExpertSite::apply_direct`].
struct DirectSite {
    inp: usize,
    out: usize,
    /// `A_r` `[r, in]`.
    a_r: Vec<f32>,
    /// `[R, in]`.
    a: Vec<f32>,
    /// `(s_i B_i)ᵀ` stacked: `[R, out]`.
    b_t: Vec<f32>,
    /// `[r, R]`.
    c: Vec<f32>,
}

/// Rows up to this many tokens are routed by plain loops (decode steps); longer ones, and
/// training, through candle's ops.
const DIRECT_MAX_TOKENS: usize = 4;

impl ExpertSite {
    /// The router's term for the tokens of `x` `[t, in]` added into `y` `[t, out]`, with the
    /// gates `[t, n]` appended to `gates`: the same arithmetic as [`route`], one token at a time
    /// in loops that read each factor row once (a decode step would otherwise pay a dozen
    /// tensor dispatches per site, more than the arithmetic at these sizes).
    fn apply_direct(&self, x: &[f32], y: &mut [f32], gates: &mut Vec<f32>) {
        let d = self.direct.as_ref().expect("compiled for a router");
        let (inp, out) = (d.inp, d.out);
        let r = d.a_r.len() / inp;
        let big_r: usize = self.ranks.iter().sum();
        let scale = 1.0 / (r as f32).sqrt();
        let mut h = vec![0f32; big_r];
        let mut q = vec![0f32; r];
        let mut u = vec![0f32; big_r];
        for (xt, yt) in x.chunks_exact(inp).zip(y.chunks_exact_mut(out)) {
            for (j, hj) in h.iter_mut().enumerate() {
                *hj = crate::mole::dot(&d.a[j * inp..(j + 1) * inp], xt);
            }
            for (m, qm) in q.iter_mut().enumerate() {
                *qm = crate::mole::dot(&d.a_r[m * inp..(m + 1) * inp], xt);
            }
            u.iter_mut().for_each(|v| *v = 0.0);
            for (m, &qm) in q.iter().enumerate() {
                for (uj, &c) in u.iter_mut().zip(&d.c[m * big_r..(m + 1) * big_r]) {
                    *uj += qm * c;
                }
            }
            let mut scores = Vec::with_capacity(self.ranks.len());
            let mut at = 0;
            for &rk in &self.ranks {
                let s: f32 = (at..at + rk).map(|j| u[j] * h[j]).sum();
                scores.push(s * scale);
                at += rk;
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f32 = e.iter().sum();
            let mut at = 0;
            for (&rk, ei) in self.ranks.iter().zip(&e) {
                let g = ei / sum;
                gates.push(g);
                let rows = d.b_t[at * out..(at + rk) * out].chunks_exact(out);
                for (&hj, b_row) in h[at..at + rk].iter().zip(rows) {
                    let w = g * hj;
                    for (yo, &b) in yt.iter_mut().zip(b_row) {
                        *yo += w * b;
                    }
                }
                at += rk;
            }
        }
    }
}

/// One request's retrieved adapters prepared for routing (the router's analogue of
/// `mole::CompiledMix`).
pub struct RouterMix {
    adapters: Vec<Arc<LoraAdapter>>,
    sites: BTreeMap<Site, ExpertSite>,
    /// The router the `C_i` were computed with.
    router: Option<Arc<RouterLora>>,
}

impl RouterMix {
    /// Stacks the experts' factors per site. With `router`, also precomputes `C_i = B_rᵀ s_i B_i`
    /// at its sites (inference); without, the delta computes them from the router it is given
    /// at every call (training, where `B_r` changes).
    pub fn new(adapters: &[Arc<LoraAdapter>], router: Option<&Arc<RouterLora>>) -> Result<Self> {
        if adapters.is_empty() {
            return Err(RouterError::Invalid(
                "the router needs at least one adapter".into(),
            ));
        }
        let mut by_site: BTreeMap<Site, Vec<usize>> = BTreeMap::new();
        for (i, adapter) in adapters.iter().enumerate() {
            for (site, _) in adapter.sites() {
                by_site.entry(*site).or_default().push(i);
            }
        }
        let mut sites = BTreeMap::new();
        for (site, experts) in by_site {
            let factors: Vec<_> = experts
                .iter()
                .map(|&i| adapters[i].factors(site).expect("listed above"))
                .collect();
            let a: Vec<&Tensor> = factors.iter().map(|f| &f.a).collect();
            let b: Vec<Tensor> = factors
                .iter()
                .map(|f| &f.b * f.scale as f64)
                .collect::<candle_core::Result<_>>()?;
            let a = Tensor::cat(&a, 0)?.contiguous()?;
            let b = Tensor::cat(&b, 1)?.contiguous()?;
            let rs = router.and_then(|r| r.site(site));
            let c = match rs {
                Some(rs) => Some(rs.b.t()?.matmul(&b)?.contiguous()?),
                None => None,
            };
            let flat =
                |t: &Tensor| -> candle_core::Result<Vec<f32>> { t.flatten_all()?.to_vec1::<f32>() };
            let direct = match (rs, &c) {
                (Some(rs), Some(c)) => Some(DirectSite {
                    inp: a.dim(1)?,
                    out: b.dim(0)?,
                    a_r: flat(&rs.a)?,
                    a: flat(&a)?,
                    b_t: flat(&b.t()?.contiguous()?)?,
                    c: flat(c)?,
                }),
                _ => None,
            };
            sites.insert(
                site,
                ExpertSite {
                    a,
                    b,
                    c,
                    ranks: factors.iter().map(|f| f.rank()).collect(),
                    experts,
                    direct,
                },
            );
        }
        Ok(Self {
            adapters: adapters.to_vec(),
            sites,
            router: router.cloned(),
        })
    }

    /// The router it was compiled for (inference).
    pub fn router(&self) -> Option<&Arc<RouterLora>> {
        self.router.as_ref()
    }

    pub fn adapters(&self) -> &[Arc<LoraAdapter>] {
        &self.adapters
    }

    /// Bytes of the stacked factors.
    pub fn bytes(&self) -> usize {
        self.sites
            .values()
            .map(|s| {
                // The direct copy doubles what the tensors hold.
                let copies = if s.direct.is_some() { 2 } else { 1 };
                4 * copies
                    * (s.a.elem_count()
                        + s.b.elem_count()
                        + s.c.as_ref().map_or(0, Tensor::elem_count))
            })
            .sum()
    }
}

/// The routed low-rank term for `t` tokens over `P` expert columns.
///
/// `x` `[t, in]`, `a_r` `[r, in]`, `a` `[R, in]`, `b` `[out, R]`, `c` `[r, R]`,
/// `group` `[R, P]` (1 where a rank row belongs to expert column `p`), `mask` `[t, P]` (0 or
/// [`MASKED`], added to the scores). Returns the term `[t, out]` and the gates `α` `[t, P]`.
/// Only candle ops, so it trains through autograd as it is.
pub fn route(
    x: &Tensor,
    a_r: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    group: &Tensor,
    mask: Option<&Tensor>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let r = a_r.dim(0)?;
    let h = x.matmul(&a.t()?)?; // [t, R]
    let q = x.matmul(&a_r.t()?)?; // [t, r]
    let scores = ((q.matmul(c)? * &h)?.matmul(group)? / (r as f64).sqrt())?; // [t, P]
    let scores = match mask {
        Some(m) => (scores + m)?,
        None => scores,
    };
    let alpha = candle_nn::ops::softmax(&scores, D::Minus1)?;
    let weighted = (alpha.matmul(&group.t()?)? * h)?; // [t, R]
    Ok((weighted.matmul(&b.t()?)?, alpha))
}

/// One expert as the reference takes it: `A` `[r, in]`, `B` `[out, r]` (row-major) and its scale.
pub struct ExpertRef<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub rank: usize,
    pub scale: f32,
}

/// A router site as the reference takes it: `A_r` `[r, in]` and `B_r` `[out, r]`, row-major.
pub struct RouterRef<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub rank: usize,
}

/// The router formula as written, one token at a time in plain f32 loops: `v_i = s_i B_i A_i x`
/// formed in full, `k_i = B_rᵀ v_i`, `α = softmax(⟨A_r x, k_i⟩ / √r)` over the kept experts,
/// output `Σ α_i v_i`. `x` `[t, inp]`. Returns (`[t, out]`, `[t, n]`).
pub fn reference(
    x: &[f32],
    inp: usize,
    out: usize,
    router: &RouterRef<'_>,
    experts: &[ExpertRef<'_>],
    keep: &[bool],
) -> (Vec<f32>, Vec<f32>) {
    let (a_r, b_r, r) = (router.a, router.b, router.rank);
    let t = x.len() / inp;
    let n = experts.len();
    let mut y = vec![0f32; t * out];
    let mut gates = vec![0f32; t * n];
    for tok in 0..t {
        let xt = &x[tok * inp..(tok + 1) * inp];
        let q: Vec<f32> = (0..r)
            .map(|j| (0..inp).map(|c| a_r[j * inp + c] * xt[c]).sum())
            .collect();
        let values: Vec<Vec<f32>> = experts
            .iter()
            .map(|e| {
                let h: Vec<f32> = (0..e.rank)
                    .map(|j| (0..inp).map(|c| e.a[j * inp + c] * xt[c]).sum())
                    .collect();
                (0..out)
                    .map(|o| e.scale * (0..e.rank).map(|j| e.b[o * e.rank + j] * h[j]).sum::<f32>())
                    .collect()
            })
            .collect();
        let scores: Vec<f32> = values
            .iter()
            .map(|v| {
                let key: Vec<f32> = (0..r)
                    .map(|j| (0..out).map(|o| b_r[o * r + j] * v[o]).sum())
                    .collect();
                q.iter().zip(&key).map(|(a, b)| a * b).sum::<f32>() / (r as f32).sqrt()
            })
            .collect();
        let max = scores
            .iter()
            .zip(keep)
            .filter(|(_, k)| **k)
            .map(|(s, _)| *s)
            .fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = scores
            .iter()
            .zip(keep)
            .map(|(s, k)| if *k { (s - max).exp() } else { 0.0 })
            .collect();
        let sum: f32 = e.iter().sum();
        for i in 0..n {
            let g = e[i] / sum;
            gates[tok * n + i] = g;
            for o in 0..out {
                y[tok * out + o] += g * values[i][o];
            }
        }
    }
    (y, gates)
}

/// One row of a routed batch: its experts and, in training, which of them survive dropout.
#[derive(Clone)]
pub struct RoutedRow {
    pub mix: Arc<RouterMix>,
    /// `keep[i]` for adapter `i` of the mix; `None` keeps all.
    pub keep: Option<Vec<bool>>,
}

/// Gate sums of one row over the sites of each layer and the tokens it fed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowGates {
    /// `[layers × adapters]`: Σ of α over sites and tokens.
    pub sums: Vec<f64>,
    /// `[layers × adapters]`: how many (site, token) gates went into each sum.
    pub counts: Vec<u32>,
}

impl RowGates {
    /// Mean gate of each adapter at each layer, `[layers][adapters]` (0 where none was seen).
    pub fn means(&self, adapters: usize) -> Vec<Vec<f32>> {
        self.sums
            .chunks(adapters.max(1))
            .zip(self.counts.chunks(adapters.max(1)))
            .map(|(s, c)| {
                s.iter()
                    .zip(c)
                    .map(|(s, &c)| if c == 0 { 0.0 } else { (s / c as f64) as f32 })
                    .collect()
            })
            .collect()
    }
}

/// The router's term for a batch: rows with [`RoutedRow`]s are routed, other rows get nothing.
/// Optionally records every row's gates.
pub struct RouterDelta<'a> {
    router: &'a RouterLora,
    rows: Vec<Option<RoutedRow>>,
    log: Option<Mutex<Vec<RowGates>>>,
    layers: usize,
}

impl<'a> RouterDelta<'a> {
    pub fn new(router: &'a RouterLora, rows: Vec<Option<RoutedRow>>) -> Self {
        Self {
            router,
            layers: router.config.num_layers,
            rows,
            log: None,
        }
    }

    /// Records gates per row (see [`RouterDelta::take_gates`]).
    pub fn recording(mut self) -> Self {
        self.log = Some(Mutex::new(vec![RowGates::default(); self.rows.len()]));
        self
    }

    /// The gates recorded since the last call, one entry per row (empty for unrouted rows).
    pub fn take_gates(&self) -> Vec<RowGates> {
        match &self.log {
            Some(log) => {
                let mut log = log.lock().expect("gate log");
                let fresh = vec![RowGates::default(); log.len()];
                std::mem::replace(&mut *log, fresh)
            }
            None => Vec::new(),
        }
    }

    /// Records gates given part by part, token by token (`[Σ t_j · n_j]`, as the direct path
    /// writes them).
    fn record_flat(&self, site: Site, parts: &[Part<'_>], gates: &[f32]) {
        let Some(log) = &self.log else {
            return;
        };
        let mut log = log.lock().expect("gate log");
        let mut at = 0;
        for p in parts {
            let n = p.mix.adapters.len();
            let entry = &mut log[p.row];
            if entry.sums.is_empty() {
                entry.sums = vec![0.0; self.layers * n];
                entry.counts = vec![0; self.layers * n];
            }
            let k = p.site.experts.len();
            for row in gates[at..at + p.span.len * k].chunks_exact(k) {
                for (j, &e) in p.site.experts.iter().enumerate() {
                    let i = site.layer * n + e;
                    entry.sums[i] += row[j] as f64;
                    entry.counts[i] += 1;
                }
            }
            at += p.span.len * k;
        }
    }
}

/// A routed row's share of one site.
struct Part<'m> {
    row: usize,
    span: RowSpan,
    mix: &'m RouterMix,
    site: &'m ExpertSite,
    keep: Option<&'m [bool]>,
}

impl SiteDelta for RouterDelta<'_> {
    fn delta(
        &self,
        site: Site,
        x: &Tensor,
        rows: &[RowSpan],
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(rs) = self.router.site(site) else {
            return Ok(None);
        };
        let parts: Vec<Part<'_>> = self
            .rows
            .iter()
            .zip(rows)
            .enumerate()
            .filter_map(|(row, (r, span))| {
                let r = r.as_ref()?;
                let es = r.mix.sites.get(&site)?;
                (span.len > 0).then_some(Part {
                    row,
                    span: *span,
                    mix: &r.mix,
                    site: es,
                    keep: r.keep.as_deref(),
                })
            })
            .collect();
        if parts.is_empty() {
            return Ok(None);
        }
        let n_tokens = x.dim(0)?;
        let out_f = rs.b.dim(0)?;
        let is_direct = |p: &Part<'_>| {
            p.site.direct.is_some() && p.keep.is_none() && p.span.len <= DIRECT_MAX_TOKENS
        };
        // Decode steps: every row by plain loops into one buffer.
        if parts.iter().all(is_direct) {
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            let inp = xv.len() / n_tokens.max(1);
            let mut y = vec![0f32; n_tokens * out_f];
            let mut all_gates = Vec::new();
            for p in &parts {
                let (s0, s1) = (p.span.start, p.span.start + p.span.len);
                p.site.apply_direct(
                    &xv[s0 * inp..s1 * inp],
                    &mut y[s0 * out_f..s1 * out_f],
                    &mut all_gates,
                );
            }
            self.record_flat(site, &parts, &all_gates);
            return Ok(Some(Tensor::from_vec(y, (n_tokens, out_f), x.device())?));
        }
        // Otherwise each row is routed over its own experts only (the paper's mapping matrix
        // without paying every token the whole batch's experts): short rows by loops, longer
        // ones (prefill, training) through candle's ops, which autograd follows.
        let mut pieces = Vec::with_capacity(2 * parts.len() + 1);
        let mut gates = Vec::new();
        let mut at = 0;
        let mut xv: Option<Vec<f32>> = None;
        for p in &parts {
            if p.span.start > at {
                pieces.push(Tensor::zeros(
                    (p.span.start - at, out_f),
                    DType::F32,
                    x.device(),
                )?);
            }
            if is_direct(p) {
                if xv.is_none() {
                    xv = Some(x.flatten_all()?.to_vec1::<f32>()?);
                }
                let xv = xv.as_deref().expect("set above");
                let inp = xv.len() / n_tokens.max(1);
                let mut y = vec![0f32; p.span.len * out_f];
                let (s0, s1) = (p.span.start, p.span.start + p.span.len);
                p.site
                    .apply_direct(&xv[s0 * inp..s1 * inp], &mut y, &mut gates);
                pieces.push(Tensor::from_vec(y, (p.span.len, out_f), x.device())?);
            } else {
                let xs = x.narrow(0, p.span.start, p.span.len)?;
                let c = match &p.site.c {
                    Some(c) => c.clone(),
                    None => rs.b.t()?.matmul(&p.site.b)?,
                };
                let group = group_matrix(p.site, x.device())?;
                let mask = p.keep.map(|_| mask_matrix(p, x.device())).transpose()?;
                let (out, alpha) =
                    route(&xs, &rs.a, &p.site.a, &p.site.b, &c, &group, mask.as_ref())?;
                if self.log.is_some() {
                    gates.extend(alpha.detach().flatten_all()?.to_vec1::<f32>()?);
                }
                pieces.push(out);
            }
            at = p.span.start + p.span.len;
        }
        if n_tokens > at {
            pieces.push(Tensor::zeros(
                (n_tokens - at, out_f),
                DType::F32,
                x.device(),
            )?);
        }
        self.record_flat(site, &parts, &gates);
        if pieces.len() == 1 {
            return Ok(pieces.pop());
        }
        Ok(Some(Tensor::cat(&pieces, 0)?))
    }
}

/// `[R, n]`: 1 where rank row `i` of the stacked experts belongs to expert (column) `j`.
fn group_matrix(site: &ExpertSite, device: &Device) -> candle_core::Result<Tensor> {
    let rows: usize = site.ranks.iter().sum();
    let cols = site.ranks.len();
    let mut g = vec![0f32; rows * cols];
    let mut row = 0;
    for (col, &r) in site.ranks.iter().enumerate() {
        for i in row..row + r {
            g[i * cols + col] = 1.0;
        }
        row += r;
    }
    Tensor::from_vec(g, (rows, cols), device)
}

/// `[t, n]`: 0 where the row's tokens may use an expert (not dropped), [`MASKED`] elsewhere.
fn mask_matrix(part: &Part<'_>, device: &Device) -> candle_core::Result<Tensor> {
    let open: Vec<bool> = part
        .site
        .experts
        .iter()
        .map(|&e| part.keep.is_none_or(|k| k[e]))
        .collect();
    // A row whose surviving experts all lack this site keeps them all here rather than
    // leaving a token with nothing to attend to.
    let any = open.iter().any(|&o| o);
    let row: Vec<f32> = open
        .iter()
        .map(|&o| if o || !any { 0.0 } else { MASKED })
        .collect();
    let t = part.span.len;
    Tensor::from_vec(row.repeat(t), (t, open.len()), device)
}

/// Which candidates survive Random LoRA Dropout (ramole-paper.md 2.4): each is dropped with
/// probability `p`, but at least `min(2, n)` survive (a random subset tops them up).
pub fn dropout_keep(n: usize, p: f64, rng: &mut impl rand::Rng) -> Vec<bool> {
    use rand::seq::SliceRandom;
    let mut keep: Vec<bool> = (0..n)
        .map(|_| !rng.random_bool(p.clamp(0.0, 1.0)))
        .collect();
    let need = n.min(2);
    let alive = keep.iter().filter(|&&k| k).count();
    if alive < need {
        let mut dropped: Vec<usize> = (0..n).filter(|&i| !keep[i]).collect();
        dropped.shuffle(rng);
        for &i in dropped.iter().take(need - alive) {
            keep[i] = true;
        }
    }
    keep
}

/// Columns of a [`LayerGates`] summary: the prompt and up to this many minus one reply columns.
pub const MAX_GATE_COLUMNS: usize = 32;

/// A reply's router gates as it runs: per layer and adapter, summed over the prompt, and the
/// means of every reply token fed back through the model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GateTrace {
    pub adapters: usize,
    pub layers: usize,
    /// Sums over the prompt's tokens and each layer's sites.
    pub prompt: RowGates,
    /// Each fed reply token: its text and `[layer][adapter]` mean gates.
    pub tokens: Vec<(String, Vec<Vec<f32>>)>,
}

impl GateTrace {
    pub fn new(layers: usize, adapters: usize) -> Self {
        Self {
            adapters,
            layers,
            prompt: RowGates {
                sums: vec![0.0; layers * adapters],
                counts: vec![0; layers * adapters],
            },
            tokens: Vec::new(),
        }
    }

    /// Adds a prompt chunk's gates.
    pub fn add_prompt(&mut self, g: &RowGates) {
        for (s, v) in self.prompt.sums.iter_mut().zip(&g.sums) {
            *s += v;
        }
        for (c, v) in self.prompt.counts.iter_mut().zip(&g.counts) {
            *c += v;
        }
    }

    /// Adds the gates of one fed reply token.
    pub fn push_token(&mut self, text: String, g: &RowGates) {
        if g.sums.is_empty() {
            return;
        }
        self.tokens.push((text, g.means(self.adapters)));
    }

    /// Each adapter's mean gate over layers and reply tokens (over the prompt when no reply
    /// token was fed): what the gate bars show for a router reply.
    pub fn mean(&self) -> Vec<f32> {
        let n = self.adapters.max(1);
        let mut acc = vec![0f64; self.adapters];
        let mut count = 0usize;
        if self.tokens.is_empty() {
            for layer in self.prompt.means(n) {
                acc.iter_mut()
                    .zip(&layer)
                    .for_each(|(a, g)| *a += *g as f64);
                count += 1;
            }
        } else {
            for (_, layers) in &self.tokens {
                for layer in layers {
                    acc.iter_mut().zip(layer).for_each(|(a, g)| *a += *g as f64);
                    count += 1;
                }
            }
        }
        acc.iter()
            .map(|a| (a / count.max(1) as f64) as f32)
            .collect()
    }

    /// The summary a reply's provenance keeps: the prompt column and at most
    /// [`MAX_GATE_COLUMNS`]` - 1` reply columns (consecutive tokens share a column when there are
    /// more), gates rounded to 3 decimals. `ids` name the adapters in order.
    pub fn summary(&self, ids: &[String]) -> LayerGates {
        // In f64, so the JSON holds 0.41, not the f32's 0.4099999964237213.
        let round = |v: f32| (v as f64 * 1000.0).round() / 1000.0;
        let mut tokens = vec!["<prompt>".to_string()];
        // gates[layer][column][adapter]
        let mut gates: Vec<Vec<Vec<f64>>> = self
            .prompt
            .means(self.adapters)
            .into_iter()
            .map(|l| vec![l.into_iter().map(round).collect()])
            .collect();
        let per = self.tokens.len().div_ceil(MAX_GATE_COLUMNS - 1).max(1);
        for chunk in self.tokens.chunks(per) {
            tokens.push(chunk.iter().map(|(t, _)| t.as_str()).collect());
            for (layer, column) in gates.iter_mut().enumerate() {
                let mean: Vec<f32> = (0..self.adapters)
                    .map(|a| {
                        chunk.iter().map(|(_, g)| g[layer][a]).sum::<f32>() / chunk.len() as f32
                    })
                    .collect();
                column.push(mean.into_iter().map(round).collect());
            }
        }
        LayerGates {
            adapters: ids.to_vec(),
            layers: self.layers,
            tokens,
            gates,
        }
    }
}

/// The per-layer, per-token gates stored with a router reply (`Provenance.layer_gates`):
/// `gates[layer][column][adapter]` is the mean gate over the layer's LoRA sites and the
/// column's tokens; column 0 is the prompt (`"<prompt>"`), the others the reply's tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerGates {
    pub adapters: Vec<String>,
    pub layers: usize,
    pub tokens: Vec<String>,
    pub gates: Vec<Vec<Vec<f64>>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn dropout_keeps_at_least_two_and_drops_about_p() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut dropped = 0;
        for _ in 0..2000 {
            let k = dropout_keep(5, 0.5, &mut rng);
            assert!(k.iter().filter(|&&x| x).count() >= 2);
            dropped += k.iter().filter(|&&x| !x).count();
        }
        // 5 × 0.5 = 2.5 expected, a little less because at least 2 survive.
        let mean = dropped as f64 / 2000.0;
        assert!((2.0..2.5).contains(&mean), "{mean}");
        assert_eq!(dropout_keep(1, 0.9, &mut rng), [true]);
        assert_eq!(dropout_keep(2, 0.99, &mut rng), [true, true]);
        assert_eq!(dropout_keep(3, 0.0, &mut rng), [true, true, true]);
    }

    fn gates(layers: usize, per_layer: &[f64]) -> RowGates {
        RowGates {
            sums: (0..layers)
                .flat_map(|_| per_layer.iter().copied())
                .collect(),
            counts: vec![1; layers * per_layer.len()],
        }
    }

    #[test]
    fn a_long_reply_is_summarised_in_at_most_32_columns() {
        let mut t = GateTrace::new(2, 2);
        t.add_prompt(&gates(2, &[0.5, 0.5]));
        t.add_prompt(&gates(2, &[0.7, 0.3]));
        for i in 0..70 {
            let a = if i < 35 { 0.9 } else { 0.1 };
            t.push_token(format!("t{i} "), &gates(2, &[a, 1.0 - a]));
        }
        let s = t.summary(&["x".into(), "y".into()]);
        assert_eq!(s.tokens.len(), 1 + 70usize.div_ceil(3));
        assert!(s.tokens.len() <= MAX_GATE_COLUMNS);
        assert_eq!(s.tokens[0], "<prompt>");
        assert_eq!(s.tokens[1], "t0 t1 t2 ");
        // The prompt column is the mean over its chunks; reply columns the mean of their tokens.
        assert_eq!(s.gates[0][0], [0.6, 0.4]);
        assert_eq!(s.gates[1][1], [0.9, 0.1]);
        // Tokens 33..35 straddle the change: (0.9 + 0.9 + 0.1) / 3.
        assert_eq!(s.gates[0][12], [0.633, 0.367]);
        assert_eq!(t.mean(), [0.5, 0.5]);
        // Rounded in f64: the JSON holds 0.633, not an f32's long tail.
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            json.contains("0.633") && !json.contains("0.63299"),
            "{json}"
        );
    }
}
