//! Mixture of LoRA experts: the plans of DESIGN.md 3a (`none`, `selection`, `mixture`,
//! `fusion`), gate rules, and the per-row low-rank term the decoder adds at every LoRA site.
//! No I/O: adapters come in loaded, gates come in as numbers.
//!
//! A row's plan is compiled once per request into one low-rank pair per site:
//! - `mixture`: `A = [A_1; ...; A_k]` (ranks stacked), `B = [g_1 s_1 B_1, ..., g_k s_k B_k]`, so
//!   `B (A x) = sum_j g_j s_j B_j (A_j x)` exactly, whatever the ranks;
//! - `fusion`: `A = sum_j g_j A_j`, `B = sum_j g_j s_j B_j` (parameter averaging; equal ranks);
//! - `selection`: one adapter, `B = g s B_1`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::adapter::LoraAdapter;
use crate::model::{RowSpan, Site, SiteDelta};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    None,
    Selection,
    Mixture,
    Fusion,
}

impl Plan {
    pub fn as_str(self) -> &'static str {
        match self {
            Plan::None => "none",
            Plan::Selection => "selection",
            Plan::Mixture => "mixture",
            Plan::Fusion => "fusion",
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Plan {
    type Err = MoleError;
    fn from_str(s: &str) -> Result<Self, MoleError> {
        Ok(match s {
            "none" => Plan::None,
            "selection" => Plan::Selection,
            "mixture" => Plan::Mixture,
            "fusion" => Plan::Fusion,
            other => {
                return Err(MoleError::Plan(format!(
                    "unknown plan {other:?} (none, selection, mixture, fusion)"
                )));
            }
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MoleError {
    #[error("plan: {0}")]
    Plan(String),
    #[error("gate: {0}")]
    Gate(String),
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Checks gates given by hand: finite and non-negative (they are used as given).
pub fn check_gates(gates: &[f32]) -> Result<(), MoleError> {
    for (i, &g) in gates.iter().enumerate() {
        if !g.is_finite() || g < 0.0 {
            return Err(MoleError::Gate(format!(
                "gate {i} = {g} must be finite and non-negative"
            )));
        }
        if g > 100.0 {
            return Err(MoleError::Gate(format!(
                "gate {i} = {g} exceeds the limit 100"
            )));
        }
    }
    Ok(())
}

/// `1/k` each (the paper's uniform mixture).
pub fn uniform_gates(k: usize) -> Vec<f32> {
    vec![1.0 / k.max(1) as f32; k]
}

/// `softmax(score / tau)`: finite, non-negative, summing to 1.
pub fn softmax_gates(scores: &[f32], tau: f32) -> Result<Vec<f32>, MoleError> {
    if !(tau.is_finite() && tau > 0.0) {
        return Err(MoleError::Gate(format!(
            "temperature {tau} must be positive"
        )));
    }
    if let Some(s) = scores.iter().find(|s| !s.is_finite()) {
        return Err(MoleError::Gate(format!("score {s} is not finite")));
    }
    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = scores.iter().map(|s| ((s - max) / tau).exp()).collect();
    let sum: f32 = e.iter().sum();
    Ok(e.iter().map(|v| v / sum).collect())
}

/// How retrieval scores become gates (DESIGN.md 3a): finite, non-negative, summing to 1.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Gating {
    /// `1/k` each (the paper).
    #[default]
    Uniform,
    /// `softmax(score / temperature)`.
    Softmax { temperature: f32 },
}

impl Gating {
    /// Gates for adapters retrieved with `scores` (best first).
    pub fn gates(self, scores: &[f32]) -> Result<Vec<f32>, MoleError> {
        match self {
            Gating::Uniform => Ok(uniform_gates(scores.len())),
            Gating::Softmax { temperature } => softmax_gates(scores, temperature),
        }
    }
}

impl fmt::Display for Gating {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Gating::Uniform => f.write_str("uniform"),
            Gating::Softmax { temperature } => write!(f, "softmax:{temperature}"),
        }
    }
}

impl FromStr for Gating {
    type Err = MoleError;
    /// `uniform`, `softmax` (temperature 0.1) or `softmax:<temperature>`.
    fn from_str(s: &str) -> Result<Self, MoleError> {
        let bad = || {
            MoleError::Gate(format!(
                "unknown gating {s:?} (uniform, softmax, softmax:<temperature>)"
            ))
        };
        match s.split_once(':') {
            None if s == "uniform" => Ok(Gating::Uniform),
            None if s == "softmax" => Ok(Gating::Softmax { temperature: 0.1 }),
            Some(("softmax", t)) => {
                let temperature: f32 = t.parse().map_err(|_| bad())?;
                if !(temperature.is_finite() && temperature > 0.0) {
                    return Err(MoleError::Gate(format!(
                        "softmax temperature {t} must be a positive number"
                    )));
                }
                Ok(Gating::Softmax { temperature })
            }
            _ => Err(bad()),
        }
    }
}

impl serde::Serialize for Gating {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Gating {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How a compiled mixture holds its factors. The math always runs in f32; bf16 halves the bytes
/// that every decode step streams (adapter bytes dominate LoRA's cost on a quantized base).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Exact: what the parity tests check.
    #[default]
    F32,
    Bf16,
}

/// Factor values as stored.
enum Values {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
}

impl Values {
    fn new(v: Vec<f32>, p: Precision) -> Self {
        match p {
            Precision::F32 => Values::F32(v),
            Precision::Bf16 => Values::Bf16(v.into_iter().map(half::bf16::from_f32).collect()),
        }
    }

    /// As an f32 tensor of `shape` (one copy).
    fn tensor(&self, shape: (usize, usize), device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Values::F32(v) => Tensor::from_slice(v, shape, device),
            Values::Bf16(v) => {
                Tensor::from_vec(v.iter().map(|x| x.to_f32()).collect(), shape, device)
            }
        }
    }
}

trait Elem: Copy {
    fn f32(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl Elem for half::bf16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

/// One low-rank pair, row-major: `a` `[rank, in]`, `b_t` `[rank, out]` (B transposed, gates and
/// scales folded in), so both loops below read contiguous rows.
struct SitePair {
    rank: usize,
    inp: usize,
    out: usize,
    a: Values,
    b_t: Values,
}

/// Rows up to this many tokens take the direct loop (decode); longer ones the GEMM.
const DIRECT_MAX_TOKENS: usize = 4;

impl SitePair {
    /// `x` `[n, in]` -> `[n, out]` through candle's GEMM (the reference, and prefill).
    fn apply_gemm(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let a = self.a.tensor((self.rank, self.inp), x.device())?;
        let b_t = self.b_t.tensor((self.rank, self.out), x.device())?;
        x.matmul(&a.t()?)?.matmul(&b_t)
    }

    /// The same for a few tokens, as two plain loops: a decode step would otherwise pay two
    /// GEMM dispatches per site, which cost more than the arithmetic at these sizes.
    fn apply_direct(&self, x: &[f32], n: usize, y: &mut [f32]) {
        match (&self.a, &self.b_t) {
            (Values::F32(a), Values::F32(b)) => self.direct_dispatch(a, b, x, n, y),
            (Values::Bf16(a), Values::Bf16(b)) => self.direct_dispatch(a, b, x, n, y),
            _ => unreachable!("both factors share one precision"),
        }
    }

    /// Runs the loops compiled for AVX2+FMA when the CPU has them (the portable build targets
    /// SSE2 only, which halves the vector width and has no FMA).
    fn direct_dispatch<T: Elem>(&self, a: &[T], b_t: &[T], x: &[f32], n: usize, y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected at run time.
            unsafe { self.direct_avx2(a, b_t, x, n, y) };
            return;
        }
        self.direct(a, b_t, x, n, y)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn direct_avx2<T: Elem>(&self, a: &[T], b_t: &[T], x: &[f32], n: usize, y: &mut [f32]) {
        self.direct(a, b_t, x, n, y)
    }

    #[inline(always)]
    fn direct<T: Elem>(&self, a: &[T], b_t: &[T], x: &[f32], n: usize, y: &mut [f32]) {
        let mut t = vec![0f32; self.rank];
        for i in 0..n {
            let xi = &x[i * self.inp..(i + 1) * self.inp];
            for (r, tr) in t.iter_mut().enumerate() {
                *tr = dot(&a[r * self.inp..(r + 1) * self.inp], xi);
            }
            let yi = &mut y[i * self.out..(i + 1) * self.out];
            for (r, &tr) in t.iter().enumerate() {
                let row = &b_t[r * self.out..(r + 1) * self.out];
                for (yo, &b) in yi.iter_mut().zip(row) {
                    *yo += tr * b.f32();
                }
            }
        }
    }
}

/// Dot product with 8 independent partial sums, which LLVM vectorises.
#[inline(always)]
fn dot<T: Elem>(a: &[T], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x.f32() * y)
        .sum();
    for (xa, xb) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += xa[k].f32() * xb[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A row's plan compiled into one low-rank pair per site.
pub struct CompiledMix {
    plan: Plan,
    sites: BTreeMap<Site, SitePair>,
}

impl CompiledMix {
    /// Compiles `adapters` with their gates under `plan`, exact (f32). Adapters with gate 0 drop
    /// out.
    pub fn new(plan: Plan, adapters: &[(Arc<LoraAdapter>, f32)]) -> Result<Self, MoleError> {
        Self::with_precision(plan, adapters, Precision::F32)
    }

    /// The same, holding the compiled factors in `precision`.
    pub fn with_precision(
        plan: Plan,
        adapters: &[(Arc<LoraAdapter>, f32)],
        precision: Precision,
    ) -> Result<Self, MoleError> {
        let gates: Vec<f32> = adapters.iter().map(|(_, g)| *g).collect();
        check_gates(&gates)?;
        match plan {
            Plan::Selection if adapters.len() != 1 => {
                return Err(MoleError::Plan(format!(
                    "selection uses exactly one adapter, {} given",
                    adapters.len()
                )));
            }
            Plan::Fusion => {
                let ranks: Vec<(String, Vec<usize>)> = adapters
                    .iter()
                    .map(|(a, _)| (a.name.clone(), a.ranks()))
                    .collect();
                let first = ranks.first().map(|r| r.1.clone());
                if ranks
                    .iter()
                    .any(|(_, r)| r.len() != 1 || Some(r) != first.as_ref())
                {
                    let list: Vec<String> =
                        ranks.iter().map(|(n, r)| format!("{n}: {r:?}")).collect();
                    return Err(MoleError::Plan(format!(
                        "fusion averages parameters and needs one rank shared by all adapters; ranks are {}",
                        list.join(", ")
                    )));
                }
            }
            _ => {}
        }
        let live: Vec<&(Arc<LoraAdapter>, f32)> = match plan {
            Plan::None => Vec::new(),
            _ => adapters.iter().filter(|(_, g)| *g > 0.0).collect(),
        };
        let mut by_site: BTreeMap<Site, Vec<(&crate::adapter::LoraFactors, f32)>> = BTreeMap::new();
        for (adapter, gate) in &live {
            for (site, f) in adapter.sites() {
                by_site.entry(*site).or_default().push((f, *gate));
            }
        }
        let mut sites = BTreeMap::new();
        for (site, parts) in by_site {
            let (a, b) = match plan {
                Plan::Fusion => {
                    let mut a = (&parts[0].0.a * parts[0].1 as f64)?;
                    let mut b = (&parts[0].0.b * (parts[0].1 * parts[0].0.scale) as f64)?;
                    for (f, g) in &parts[1..] {
                        a = (a + (&f.a * *g as f64)?)?;
                        b = (b + (&f.b * (*g * f.scale) as f64)?)?;
                    }
                    (a, b)
                }
                _ => {
                    let a: Vec<&Tensor> = parts.iter().map(|(f, _)| &f.a).collect();
                    let b: Vec<Tensor> = parts
                        .iter()
                        .map(|(f, g)| &f.b * (*g * f.scale) as f64)
                        .collect::<candle_core::Result<_>>()?;
                    (Tensor::cat(&a, 0)?, Tensor::cat(&b, 1)?)
                }
            };
            let (rank, inp) = a.dims2()?;
            let out = b.dim(0)?;
            sites.insert(
                site,
                SitePair {
                    rank,
                    inp,
                    out,
                    a: Values::new(a.flatten_all()?.to_vec1()?, precision),
                    b_t: Values::new(b.t()?.flatten_all()?.to_vec1()?, precision),
                },
            );
        }
        Ok(Self { plan, sites })
    }

    pub fn plan(&self) -> Plan {
        self.plan
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }
}

/// The per-row LoRA terms of one batch: row `i` uses `rows[i]` (`None`: the base model).
pub struct MixDelta {
    pub rows: Vec<Option<Arc<CompiledMix>>>,
}

impl MixDelta {
    /// The delta of `site`, with `direct` choosing the loop for short rows (the fast path) or
    /// the GEMM for every row (its reference).
    fn delta_with(
        &self,
        site: Site,
        x: &Tensor,
        rows: &[RowSpan],
        direct: bool,
    ) -> candle_core::Result<Option<Tensor>> {
        let pair = |i: usize| {
            self.rows
                .get(i)
                .and_then(|m| m.as_ref())
                .and_then(|m| m.sites.get(&site))
        };
        let Some(out) = (0..rows.len()).find_map(pair).map(|p| p.out) else {
            return Ok(None);
        };
        let mut parts = Vec::with_capacity(rows.len());
        for (i, span) in rows.iter().enumerate() {
            let xr = x.narrow(0, span.start, span.len)?;
            match pair(i) {
                Some(p) if direct && span.len <= DIRECT_MAX_TOKENS => {
                    let xs: Vec<f32> = xr.flatten_all()?.to_vec1()?;
                    let mut y = vec![0f32; span.len * out];
                    p.apply_direct(&xs, span.len, &mut y);
                    parts.push(Tensor::from_vec(y, (span.len, out), x.device())?);
                }
                Some(p) => parts.push(p.apply_gemm(&xr)?),
                None => parts.push(Tensor::zeros((span.len, out), x.dtype(), x.device())?),
            }
        }
        if parts.len() == 1 {
            return Ok(parts.pop());
        }
        Tensor::cat(&parts, 0).map(Some)
    }

    /// Every row through the GEMM: the slow reference of the direct decode loop.
    pub fn reference(&self) -> MixReference<'_> {
        MixReference(self)
    }
}

impl SiteDelta for MixDelta {
    fn delta(
        &self,
        site: Site,
        x: &Tensor,
        rows: &[RowSpan],
    ) -> candle_core::Result<Option<Tensor>> {
        self.delta_with(site, x, rows, true)
    }
}

/// [`MixDelta`] computed with the GEMM for every row.
pub struct MixReference<'a>(&'a MixDelta);

impl SiteDelta for MixReference<'_> {
    fn delta(
        &self,
        site: Site,
        x: &Tensor,
        rows: &[RowSpan],
    ) -> candle_core::Result<Option<Tensor>> {
        self.0.delta_with(site, x, rows, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_from_scores_are_a_distribution() {
        let g = softmax_gates(&[0.9, 0.5, 0.1], 0.1).unwrap();
        assert!((g.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(g.windows(2).all(|w| w[0] > w[1]));
        assert!(g.iter().all(|&x| x.is_finite() && x >= 0.0));
        assert_eq!(uniform_gates(4), vec![0.25; 4]);
        assert!(softmax_gates(&[1.0], 0.0).is_err());
        assert!(softmax_gates(&[f32::NAN], 1.0).is_err());
    }

    #[test]
    fn bad_hand_gates_are_refused() {
        assert!(check_gates(&[0.0, 1.0, 0.3]).is_ok());
        let e = check_gates(&[0.5, -0.1]).unwrap_err().to_string();
        assert!(e.contains("gate 1 = -0.1"), "{e}");
        assert!(check_gates(&[f32::INFINITY]).is_err());
    }

    #[test]
    fn plan_names_round_trip() {
        for p in [Plan::None, Plan::Selection, Plan::Mixture, Plan::Fusion] {
            assert_eq!(p.as_str().parse::<Plan>().unwrap(), p);
        }
        assert!("router2".parse::<Plan>().is_err());
    }
}
