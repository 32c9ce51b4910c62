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

use candle_core::Tensor;

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

/// One low-rank pair, pre-transposed for `x A^T B^T`: `a_t` `[in, R]`, `b_t` `[R, out]`.
struct SitePair {
    a_t: Tensor,
    b_t: Tensor,
}

/// A row's plan compiled into one low-rank pair per site.
pub struct CompiledMix {
    plan: Plan,
    sites: BTreeMap<Site, SitePair>,
}

impl CompiledMix {
    /// Compiles `adapters` with their gates under `plan`. Adapters with gate 0 drop out.
    pub fn new(plan: Plan, adapters: &[(Arc<LoraAdapter>, f32)]) -> Result<Self, MoleError> {
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
            sites.insert(
                site,
                SitePair {
                    a_t: a.t()?.contiguous()?,
                    b_t: b.t()?.contiguous()?,
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

impl SiteDelta for MixDelta {
    fn delta(
        &self,
        site: Site,
        x: &Tensor,
        rows: &[RowSpan],
    ) -> candle_core::Result<Option<Tensor>> {
        let pair = |i: usize| {
            self.rows
                .get(i)
                .and_then(|m| m.as_ref())
                .and_then(|m| m.sites.get(&site))
        };
        let Some(out) = (0..rows.len()).find_map(pair).map(|p| p.b_t.dim(1)) else {
            return Ok(None);
        };
        let out = out?;
        let mut parts = Vec::with_capacity(rows.len());
        for (i, span) in rows.iter().enumerate() {
            match pair(i) {
                Some(p) => {
                    let xr = x.narrow(0, span.start, span.len)?;
                    parts.push(xr.matmul(&p.a_t)?.matmul(&p.b_t)?);
                }
                None => parts.push(Tensor::zeros((span.len, out), x.dtype(), x.device())?),
            }
        }
        if parts.len() == 1 {
            return Ok(parts.pop());
        }
        Tensor::cat(&parts, 0).map(Some)
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
