//! One request's retrieved adapters stacked per site for routing ([`RouterMix`]), the routed
//! term as candle ops ([`route`], what training differentiates) and as plain loops for decode
//! steps, and the formula as written ([`reference`]) that both are tested against.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{D, Tensor};

use super::{Result, RouterError, RouterLora};
use crate::adapter::LoraAdapter;
use crate::model::Site;

/// One site's experts side by side.
pub(super) struct ExpertSite {
    /// `[R, in]`: the experts' `A_i` stacked (`R = Σ r_i`).
    pub(super) a: Tensor,
    /// `[out, R]`: `s_i B_i` side by side.
    pub(super) b: Tensor,
    /// `[r_r, R]`: `B_rᵀ s_i B_i` side by side, when compiled for a router.
    pub(super) c: Option<Tensor>,
    /// The expert (index into the row's adapters) of each block, in order.
    pub(super) experts: Vec<usize>,
    /// The rank of each block.
    pub(super) ranks: Vec<usize>,
    /// The same factors as plain rows for the decode loop (compiled for a router only).
    pub(super) direct: Option<DirectSite>,
}

/// One site's factors as row-major f32 for [`ExpertSite::apply_direct`].
pub(super) struct DirectSite {
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
pub(super) const DIRECT_MAX_TOKENS: usize = 4;

impl ExpertSite {
    /// The router's term for the tokens of `x` `[t, in]` added into `y` `[t, out]`, with the
    /// gates `[t, n]` appended to `gates`: the same arithmetic as [`route`], one token at a time
    /// in loops that read each factor row once (a decode step would otherwise pay a dozen
    /// tensor dispatches per site, more than the arithmetic at these sizes).
    pub(super) fn apply_direct(&self, x: &[f32], y: &mut [f32], gates: &mut Vec<f32>) {
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
                *hj = ramole_kernels::lowrank::dot(&d.a[j * inp..(j + 1) * inp], xt);
            }
            for (m, qm) in q.iter_mut().enumerate() {
                *qm = ramole_kernels::lowrank::dot(&d.a_r[m * inp..(m + 1) * inp], xt);
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
    pub(super) adapters: Vec<Arc<LoraAdapter>>,
    pub(super) sites: BTreeMap<Site, ExpertSite>,
    /// The router the `C_i` were computed with.
    pub(super) router: Option<Arc<RouterLora>>,
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
