//! The router's term for a whole batch ([`RouterDelta`], a `SiteDelta`): each row routed over
//! its own experts, optionally recording every row's gates; and Random LoRA Dropout.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use super::RouterLora;
use super::mix::{DIRECT_MAX_TOKENS, ExpertSite, RouterMix, route};
use crate::batch::RowSpan;
use crate::model::{Site, SiteDelta};

/// Added to the score of an expert a token must not use: its gate becomes exactly 0. Finite, so
/// the arithmetic around it (and its gradient) stays finite.
const MASKED: f32 = -1e30;

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
            layers: router.config().num_layers,
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
}
