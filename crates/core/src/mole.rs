//! Mixture of LoRA experts with fixed gates: the plans `none`, `selection`, `mixture` and
//! `fusion` of DESIGN.md 3a compiled per row, the check of hand-given gates, and the per-row
//! low-rank term the decoder adds at every LoRA site (gathered per mixture, or the paper's union
//! form). No I/O: adapters come in loaded, gates come in as numbers.
//!
//! A row's plan is compiled once per request into its low-rank terms per site:
//! - `mixture`: one term per adapter, `g_j s_j B_j (A_j x)`, summed in the row's order;
//! - `fusion`: one term, `A = sum_j g_j A_j`, `B = sum_j g_j s_j B_j` (parameter averaging; equal
//!   ranks);
//! - `selection`: one adapter, `g s B_1 (A_1 x)`.
//!
//! Every token's term goes through the same loop in the same order whatever its batch, strategy
//! or step (see [`MixDelta`]), so batched rows and prefix-cached prompts give the numbers of the
//! request alone.
//!
//! At [`Precision::Int8`] (the engine's) a mixture's `A` factors of the sites that read one input
//! of a layer are stacked into one Q8_0 matrix ([`SiteDelta::packed_a`]) that a packed base
//! product multiplies in its own pass, with the activations it quantized anyway; the `B` factors
//! are int8 rows added token by token, split over two threads (`Int8Job`). Without a packed
//! base the same numbers come from quantizing the activations here.
//!
//! `router` rows are not compiled here: their gates are computed per token at every site by the
//! RouterLoRA (`router`), and the engine holds either kind of row (`engine::RowMix`).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::Tensor;
use rayon::prelude::*;

use ramole_kernels::Isa;
use ramole_kernels::lowrank::{LowRank, QROWS_BLOCK, QRows};
use ramole_kernels::qmat::{QActs, QMatrix};

use crate::adapter::LoraAdapter;
use crate::batch::RowSpan;
use crate::model::{Site, SiteDelta};
use crate::vocab::Plan;

#[derive(Debug, thiserror::Error)]
pub enum MoleError {
    #[error("plan: {0}")]
    Plan(String),
    #[error("gate: {0}")]
    Gate(String),
    #[error("precision: {0}")]
    Precision(String),
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

/// How a compiled mixture holds its factors. bf16 halves the bytes every decode step streams,
/// int8 quarters them and moves `A x` into the quantized base kernel's own pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Exact: what the parity tests check.
    #[default]
    F32,
    /// f32 arithmetic on bf16 factors.
    Bf16,
    /// `A` stacked per layer input into a Q8_0 matrix multiplied with the base kernel's int8
    /// activations (`qmat`, in the base product's pass where the base is packed), `B` in int8
    /// per 32 values (`QRows`), scales in f32. Sites whose widths are not multiples of 32
    /// keep bf16 factors.
    Int8,
}

impl std::str::FromStr for Precision {
    type Err = MoleError;

    fn from_str(s: &str) -> Result<Self, MoleError> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "int8" => Ok(Precision::Int8),
            _ => Err(MoleError::Precision(format!(
                "LoRA precision {s:?}: expected f32, bf16 or int8"
            ))),
        }
    }
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
            Precision::Bf16 | Precision::Int8 => {
                Values::Bf16(v.into_iter().map(half::bf16::from_f32).collect())
            }
        }
    }

    fn f32(&self) -> Option<&[f32]> {
        match self {
            Values::F32(v) => Some(v),
            Values::Bf16(_) => None,
        }
    }
}

/// One low-rank term, row-major: `a` `[rank, in]`, `b_t` `[rank, out]` (B transposed), applied
/// as `y_t += scale B (A x_t)`. A `mixture`/`selection` row holds one term per adapter (its gate
/// times its LoRA scale in `scale`), a `fusion` row one averaged term (gates folded in, scale 1).
struct SitePair {
    rank: usize,
    inp: usize,
    out: usize,
    scale: f32,
    a: Values,
    b_t: Values,
}

impl SitePair {
    /// Adds `scale_t B (A x_t)` to `y_t` for the `n` tokens of `x` `[n, in]`, `y` `[n, out]`;
    /// `scales[t]` is the scale of token `t`.
    fn apply(&self, x: &[f32], scales: &[f32], y: &mut [f32]) {
        let shape = LowRank {
            rank: self.rank,
            inp: self.inp,
            out: self.out,
        };
        match (&self.a, &self.b_t) {
            (Values::F32(a), Values::F32(b)) => shape.apply(a, b, x, Some(scales), y),
            (Values::Bf16(a), Values::Bf16(b)) => shape.apply(a, b, x, Some(scales), y),
            _ => unreachable!("both factors share one precision"),
        }
    }

    fn bytes(&self) -> usize {
        let per = match self.a {
            Values::F32(_) => 4,
            Values::Bf16(_) => 2,
        };
        self.rank * (self.inp + self.out) * per
    }
}

/// The int8 terms of the sites of one layer that read one input (`SiteKind::input`): every
/// term's `A` rows stacked into one Q8_0 matrix, multiplied with the base product's quantized
/// activations in its pass.
struct Int8Pass {
    /// `[Σ rows, in]`.
    a: QMatrix,
    sites: Vec<Int8Site>,
}

/// One site's share of an [`Int8Pass`].
struct Int8Site {
    site: Site,
    /// First row of its terms in the pass's `a`.
    offset: usize,
    /// The terms' `B` transposed, `[rows, out]`, term after term in the row's order.
    b: QRows,
    /// The scale of each row's term (gate times LoRA scale; 1 for fusion).
    scales: Vec<f32>,
}

/// One token's int8 term at one site, over a run of its columns.
struct Int8Job<'a> {
    site: &'a Int8Site,
    /// The token's row of its pass product (`[pass rows]`).
    mid: &'a [f32],
    /// The token's output columns from block `first` on.
    y: &'a mut [f32],
    first: usize,
}

impl Int8Job<'_> {
    fn run(self, isa: Isa) {
        let s = self.site;
        let mid = &self.mid[s.offset..][..s.b.rows()];
        let c: Vec<f32> = mid.iter().zip(&s.scales).map(|(m, sc)| sc * m).collect();
        s.b.add_combination(isa, &c, self.y, self.first);
    }
}

/// Where the int8 pass products come from.
enum Mids<'a> {
    /// Computed by the base product's pass ([`SiteDelta::packed_a`]'s order).
    Given(&'a [Vec<f32>]),
    /// To compute from these activations, quantized as the base kernel quantizes them.
    From(&'a [f32]),
}

/// A site with its exact terms, before they are stacked into an [`Int8Pass`].
type SiteTerms = (Site, Vec<SitePair>);

/// Key of a layer's input: (layer, `SiteKind::input`).
fn input_of(site: Site) -> (usize, u8) {
    (site.layer, site.kind.input())
}

/// A row's plan compiled into its low-rank terms per site.
pub struct CompiledMix {
    plan: Plan,
    precision: Precision,
    /// Per site, the terms in the order of `parts` (sum plans) or the one averaged term.
    sites: BTreeMap<Site, Vec<SitePair>>,
    /// At `Precision::Int8`, the int8 terms per layer input (their sites are not in `sites`).
    passes: BTreeMap<(usize, u8), Int8Pass>,
    /// The adapters (gate > 0) it was compiled from, for the union form and provenance.
    parts: Vec<(Arc<LoraAdapter>, f32)>,
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
            Plan::Router => {
                return Err(MoleError::Plan(
                    "router rows are gated by a RouterLoRA (router::RouterMix), not compiled"
                        .into(),
                ));
            }
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
        let live: Vec<(Arc<LoraAdapter>, f32)> = match plan {
            Plan::None => Vec::new(),
            _ => adapters.iter().filter(|(_, g)| *g > 0.0).cloned().collect(),
        };
        let mut by_site: BTreeMap<Site, Vec<(&crate::adapter::LoraFactors, f32)>> = BTreeMap::new();
        for (adapter, gate) in &live {
            for (site, f) in adapter.sites() {
                by_site.entry(*site).or_default().push((f, *gate));
            }
        }
        let mut sites = BTreeMap::new();
        // Int8 terms are built from exact f32 pairs, then stacked per layer input.
        let mut int8: BTreeMap<(usize, u8), Vec<SiteTerms>> = BTreeMap::new();
        for (site, parts) in by_site {
            // Int8 sites are stacked from exact f32 pairs; widths the int8 kernels do not take
            // keep bf16 factors.
            let aligned = parts.iter().all(|(f, _)| {
                f.a.dim(1)
                    .is_ok_and(|i| i.is_multiple_of(ramole_kernels::qmat::GROUP))
                    && f.b_t.dim(1).is_ok_and(|o| o.is_multiple_of(QROWS_BLOCK))
            });
            let held = match precision {
                Precision::Int8 if aligned => Precision::F32,
                Precision::Int8 => Precision::Bf16,
                p => p,
            };
            let pair = |a: Tensor, b_t: Tensor, scale: f32| -> candle_core::Result<SitePair> {
                let (rank, inp) = a.dims2()?;
                Ok(SitePair {
                    rank,
                    inp,
                    out: b_t.dim(1)?,
                    scale,
                    a: Values::new(a.flatten_all()?.to_vec1()?, held),
                    b_t: Values::new(b_t.flatten_all()?.to_vec1()?, held),
                })
            };
            let terms = match plan {
                Plan::Fusion => {
                    let mut a = (&parts[0].0.a * parts[0].1 as f64)?;
                    let mut b = (&parts[0].0.b * (parts[0].1 * parts[0].0.scale) as f64)?;
                    for (f, g) in &parts[1..] {
                        a = (a + (&f.a * *g as f64)?)?;
                        b = (b + (&f.b * (*g * f.scale) as f64)?)?;
                    }
                    vec![pair(a, b.t()?, 1.0)?]
                }
                // Unscaled factors and the gate in `scale`: the very numbers the union form
                // reads from the adapter, so a row's term does not depend on the strategy.
                _ => parts
                    .iter()
                    .map(|(f, g)| pair(f.a.clone(), f.b_t.clone(), g * f.scale))
                    .collect::<candle_core::Result<Vec<_>>>()?,
            };
            if precision == Precision::Int8 && aligned {
                int8.entry(input_of(site)).or_default().push((site, terms));
            } else {
                sites.insert(site, terms);
            }
        }
        let passes = int8
            .into_iter()
            .map(|(key, group)| Ok((key, Self::stack(group)?)))
            .collect::<Result<_, MoleError>>()?;
        Ok(Self {
            plan,
            precision,
            sites,
            passes,
            parts: live,
        })
    }

    /// The int8 pass of one layer input from its sites' exact terms.
    fn stack(group: Vec<SiteTerms>) -> Result<Int8Pass, MoleError> {
        let inp = group[0].1[0].inp;
        let mut a = Vec::new();
        let mut sites = Vec::new();
        let mut offset = 0;
        for (site, terms) in group {
            let rank: usize = terms.iter().map(|p| p.rank).sum();
            let out = terms[0].out;
            let mut b = Vec::with_capacity(rank * out);
            let mut scales = Vec::with_capacity(rank);
            for p in &terms {
                a.extend_from_slice(p.a.f32().expect("held in f32"));
                b.extend_from_slice(p.b_t.f32().expect("held in f32"));
                scales.extend(std::iter::repeat_n(p.scale, p.rank));
            }
            sites.push(Int8Site {
                site,
                offset,
                b: QRows::quantize(&b, rank, out),
                scales,
            });
            offset += rank;
        }
        let a = QMatrix::quantize_q8_0(&a, offset, inp)
            .map_err(|e| MoleError::Plan(format!("int8 factors: {e}")))?;
        Ok(Int8Pass { a, sites })
    }

    /// The output width of `site`, if the mix has a term there.
    fn out_at(&self, site: Site) -> Option<usize> {
        if let Some(p) = self.sites.get(&site).and_then(|t| t.first()) {
            return Some(p.out);
        }
        self.passes
            .get(&input_of(site))?
            .sites
            .iter()
            .find(|s| s.site == site)
            .map(|s| s.b.cols())
    }

    pub fn plan(&self) -> Plan {
        self.plan
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty() && self.passes.is_empty()
    }

    /// The adapters it applies, with their gates.
    pub fn parts(&self) -> &[(Arc<LoraAdapter>, f32)] {
        &self.parts
    }

    /// Bytes a decode step reads from it.
    pub fn bytes(&self) -> usize {
        let int8: usize = self
            .passes
            .values()
            .map(|p| p.a.bytes() + p.sites.iter().map(|s| s.b.bytes()).sum::<usize>())
            .sum();
        int8 + self
            .sites
            .values()
            .flatten()
            .map(SitePair::bytes)
            .sum::<usize>()
    }

    /// Whether the union form may apply its adapters one by one (a sum of gated terms).
    fn is_sum(&self) -> bool {
        matches!(self.plan, Plan::Mixture | Plan::Selection)
    }
}

/// How a batch computes its rows' LoRA terms (ramole-paper.md section 3). Both give the same
/// numbers; they differ in the bytes a decode step reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Each row computes only its own adapters through its compiled mixture; rows sharing a
    /// mixture are grouped and read it once (Punica's gather).
    Gather,
    /// Every distinct adapter of the batch is read once and applied to each row that uses it
    /// with the row's gate from the mapping matrix (the paper's union form, skipping M's zeros
    /// instead of computing and masking them). Fusion rows keep their averaged pair.
    Union,
}

/// The per-row LoRA terms of one batch: row `i` uses `rows[i]` (`None`: the base model).
pub struct MixDelta {
    rows: Vec<Option<Arc<CompiledMix>>>,
    mapping: crate::batch::Mapping,
    /// The adapters of `mapping.union`, in its order.
    union: Vec<Arc<LoraAdapter>>,
    strategy: Strategy,
    /// Whether any row holds terms outside int8 passes.
    pairs: bool,
}

/// Multiply-adds of LoRA terms below which a step computes them on the calling thread.
const PAR_MIN_WORK: usize = 1 << 14;

/// Identity of a shared value, for grouping.
fn key<T>(a: &Arc<T>) -> usize {
    Arc::as_ptr(a) as *const () as usize
}

impl MixDelta {
    /// The rows' mixtures, computed with the strategy that reads fewer bytes
    /// ([`MixDelta::estimate`]).
    pub fn new(rows: Vec<Option<Arc<CompiledMix>>>) -> Self {
        let mixes: Vec<crate::batch::RowAdapters> = rows
            .iter()
            .map(|m| crate::batch::RowAdapters {
                mix: m.as_ref().map(key),
                adapters: m
                    .as_ref()
                    .filter(|m| m.is_sum())
                    .map(|m| m.parts.iter().map(|(a, g)| (key(a), *g)).collect())
                    .unwrap_or_default(),
            })
            .collect();
        let mapping = crate::batch::Mapping::new(&mixes)
            .expect("compiled mixtures hold checked gates and distinct adapters");
        let mut by_key = std::collections::HashMap::new();
        for m in rows.iter().flatten() {
            for (a, _) in &m.parts {
                by_key.insert(key(a), a.clone());
            }
        }
        let union = mapping.union.iter().map(|k| by_key[k].clone()).collect();
        let pairs = rows.iter().flatten().any(|m| !m.sites.is_empty());
        let mut d = Self {
            rows,
            mapping,
            union,
            strategy: Strategy::Gather,
            pairs,
        };
        let (gather, union) = d.estimate();
        // The union form reads the adapters' own f32 factors: only rows compiled in f32 get
        // the same numbers from it as from their compiled terms.
        let exact = d
            .rows
            .iter()
            .flatten()
            .all(|m| m.precision == Precision::F32);
        if union < gather && exact {
            d.strategy = Strategy::Union;
        }
        d
    }

    /// One row.
    pub fn single(mix: Option<Arc<CompiledMix>>) -> Self {
        Self::new(vec![mix])
    }

    /// The same rows computed with `strategy`.
    pub fn with_strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Bytes of adapter factors one decode step reads under (gather, union).
    pub fn estimate(&self) -> (usize, usize) {
        let mut gather = 0;
        let mut fused = 0;
        for g in &self.mapping.groups {
            let m = self.rows[g.rows[0]]
                .as_ref()
                .expect("grouped rows have a mix");
            gather += m.bytes();
            if !m.is_sum() {
                fused += m.bytes();
            }
        }
        // The union reads the rows' compiled copies: adapters' f32 bytes at that precision.
        let per = match self.rows.iter().flatten().next().map(|m| m.precision) {
            Some(Precision::Bf16) => 2,
            Some(Precision::Int8) => 1,
            _ => 4,
        };
        let union = fused + self.union.iter().map(|a| a.bytes()).sum::<usize>() / 4 * per;
        (gather, union)
    }

    /// The output width of `site`, if any row has a term there.
    fn site_out(&self, site: Site) -> Option<usize> {
        self.rows.iter().flatten().find_map(|m| m.out_at(site))
    }

    /// The groups of rows whose mixture holds an int8 pass for `key`, with it, in the order of
    /// `mapping.groups` (the order of [`SiteDelta::packed_a`]'s matrices).
    fn int8_groups(
        &self,
        key: (usize, u8),
    ) -> impl Iterator<Item = (&crate::batch::Group, &Int8Pass)> {
        self.mapping.groups.iter().filter_map(move |g| {
            let m = self.rows[g.rows[0]].as_ref()?;
            Some((g, m.passes.get(&key)?))
        })
    }

    /// Adds the int8 terms at `sites` (sites of one layer input) into `ys[i]` (`[n, out_i]`).
    /// Each token's term runs in one fixed order, so how tokens and columns are split between
    /// threads, steps or rows changes no bit.
    fn add_int8(&self, sites: &[Site], spans: &[RowSpan], mids: Mids<'_>, ys: &mut [&mut [f32]]) {
        let Some(&first) = sites.first() else {
            return;
        };
        let key = input_of(first);
        if self.int8_groups(key).next().is_none() {
            return;
        }
        let isa = Isa::detect();
        let n = spans.iter().map(|s| s.start + s.len).max().unwrap_or(0);
        let computed: Vec<Vec<f32>>;
        let mids: &[Vec<f32>] = match mids {
            Mids::Given(m) => m,
            Mids::From(xs) => {
                let k = xs.len() / n.max(1);
                let acts = QActs::quantize(&xs[..n * k], n, k);
                computed = self
                    .int8_groups(key)
                    .map(|(_, pass)| {
                        let mut o = vec![0f32; n * pass.a.rows()];
                        pass.a.matmul(isa, &acts, &mut o);
                        o
                    })
                    .collect();
                &computed
            }
        };
        let mut jobs: Vec<Int8Job<'_>> = Vec::new();
        let mut work = 0;
        for (&site, y) in sites.iter().zip(ys.iter_mut()) {
            let Some(out) = self.site_out(site) else {
                continue;
            };
            let mut tokens: Vec<Option<&mut [f32]>> = y.chunks_mut(out).map(Some).collect();
            for ((g, pass), mid) in self.int8_groups(key).zip(mids) {
                let Some(s8) = pass.sites.iter().find(|s| s.site == site) else {
                    continue;
                };
                let rows = pass.a.rows();
                for &i in &g.rows {
                    let sp = spans[i];
                    for t in sp.start..sp.start + sp.len {
                        let y = tokens[t].take().expect("a token belongs to one row");
                        let mid = &mid[t * rows..(t + 1) * rows];
                        work += s8.b.rows() * out;
                        // Two column halves: a decode step's term is split over two threads.
                        let half = out.div_ceil(QROWS_BLOCK) / 2;
                        let (l, r) = y.split_at_mut(half * QROWS_BLOCK);
                        for (y, first) in [(l, 0), (r, half)] {
                            if !y.is_empty() {
                                jobs.push(Int8Job {
                                    site: s8,
                                    mid,
                                    y,
                                    first,
                                });
                            }
                        }
                    }
                }
            }
        }
        // A pool hand-off costs a few microseconds: worth it from about 32K values.
        if work < PAR_MIN_WORK * 2 {
            jobs.into_iter().for_each(|j| j.run(isa));
        } else {
            jobs.into_par_iter().for_each(|j| j.run(isa));
        }
    }

    /// Each row's term is `sum_j scale_j B_j (A_j x_t)` over its terms in its own order, every
    /// token through the same loop whatever the number of tokens. The strategy only groups the
    /// reads; the arithmetic of a token is fixed by its row's mixture alone, so a row's numbers
    /// do not depend on its neighbours in the batch or on how its prompt was split into steps
    /// (a last-bit difference would otherwise flip the base kernel's int8 rounding of the next
    /// activation, and then a greedy token).
    ///
    /// Adds the terms into `y` `[n, out]` (the int8 ones too where `int8`); `false` where `x` is
    /// not f32 in CPU memory (the caller then takes the reference).
    fn add_fast(
        &self,
        site: Site,
        x: &Tensor,
        spans: &[RowSpan],
        int8: bool,
        y: &mut [f32],
    ) -> candle_core::Result<bool> {
        let union_here: Vec<(usize, &crate::adapter::LoraFactors)> = match self.strategy {
            Strategy::Gather => Vec::new(),
            Strategy::Union => self
                .union
                .iter()
                .enumerate()
                .filter_map(|(j, a)| a.factors(site).map(|f| (j, f)))
                .collect(),
        };
        let Some(out) = self.site_out(site) else {
            return Ok(true);
        };
        let inp = x.dim(1)?;
        let n = x.dim(0)?;
        if y.len() != n * out {
            candle_core::bail!("a LoRA term into {} values, {n} x {out} needed", y.len());
        }
        let x = x.contiguous()?;
        let Some(xr) = Raw::of(&x) else {
            return Ok(false);
        };
        let xs = xr.slice();
        if int8 {
            self.add_int8(&[site], spans, Mids::From(xs), &mut [&mut *y]);
        }
        // Work items: each reads one term's factors (a group's compiled term, or one union
        // adapter) for the tokens of the rows it serves, each row with its scale; `slots[i]`
        // lists (position in row i's sum, item).
        let mut items: Vec<(&SitePair, Vec<(usize, f32)>)> = Vec::new();
        let mut slots: Vec<Vec<(usize, usize)>> = vec![Vec::new(); spans.len()];
        for g in &self.mapping.groups {
            let m = self.rows[g.rows[0]]
                .as_ref()
                .expect("grouped rows have a mix");
            if self.strategy == Strategy::Union && m.is_sum() {
                continue;
            }
            for (pos, p) in m.sites.get(&site).into_iter().flatten().enumerate() {
                for &i in &g.rows {
                    slots[i].push((pos, items.len()));
                }
                items.push((p, g.rows.iter().map(|&i| (i, p.scale)).collect()));
            }
        }
        for (j, f) in &union_here {
            let adapter = &self.union[*j];
            let mut rows = Vec::new();
            let mut factors = None;
            for (i, slot) in slots.iter_mut().enumerate() {
                let g = self.mapping.mapping[i][*j];
                if g <= 0.0 {
                    continue;
                }
                let m = self.rows[i].as_ref().expect("a row with a gate has a mix");
                // The position among the row's terms at this site: its parts that have one.
                let pos = m
                    .parts
                    .iter()
                    .filter(|(a, _)| a.factors(site).is_some())
                    .position(|(a, _)| Arc::ptr_eq(a, adapter))
                    .expect("a union adapter with a gate is one of the row's parts");
                // Every row holds this adapter's factors unscaled in one precision: read the
                // first row's copy for all of them, each with its own gate.
                factors.get_or_insert(&m.sites[&site][pos]);
                slot.push((pos, items.len()));
                rows.push((i, g * f.scale));
            }
            if let Some(p) = factors {
                items.push((p, rows));
            }
        }
        if items.is_empty() {
            return Ok(true);
        }
        let term = |it: usize| {
            let (p, rows) = &items[it];
            let mut xg = Vec::new();
            let mut scales = Vec::new();
            for &(i, s) in rows {
                let sp = spans[i];
                xg.extend_from_slice(&xs[sp.start * inp..(sp.start + sp.len) * inp]);
                scales.extend(std::iter::repeat_n(s, sp.len));
            }
            let mut y = vec![0f32; scales.len() * out];
            p.apply(&xg, &scales, &mut y);
            y
        };
        // A decode step's terms are a few microseconds each: handing them to the pool costs
        // more than computing them here.
        let work: usize = items
            .iter()
            .map(|(p, rows)| {
                rows.iter().map(|&(i, _)| spans[i].len).sum::<usize>() * p.rank * (inp + out)
            })
            .sum();
        let terms: Vec<Vec<f32>> = if work < PAR_MIN_WORK {
            (0..items.len()).map(term).collect()
        } else {
            (0..items.len()).into_par_iter().map(term).collect()
        };
        // Where each row's tokens sit in each item's output.
        let mut at: Vec<Vec<usize>> = Vec::with_capacity(items.len());
        for (_, rows) in &items {
            let mut o = 0;
            let mut offs = vec![usize::MAX; spans.len()];
            for &(i, _) in rows {
                offs[i] = o;
                o += spans[i].len * out;
            }
            at.push(offs);
        }
        for (i, slot) in slots.iter_mut().enumerate() {
            slot.sort_unstable();
            let s = spans[i];
            let dst = &mut y[s.start * out..(s.start + s.len) * out];
            for &(_, it) in slot.iter() {
                let o = at[it][i];
                for (d, v) in dst.iter_mut().zip(&terms[it][o..o + s.len * out]) {
                    *d += v;
                }
            }
        }
        Ok(true)
    }

    /// The paper's union form with candle ops (ramole-paper.md section 3): for every adapter of
    /// the batch, `V = s (X Aᵀ) Bᵀ` over all tokens, weighted by the mapping matrix column of
    /// each token's row and summed; fusion rows get `((M B)(M A)) x` from their own gates.
    fn reference_delta(
        &self,
        site: Site,
        x: &Tensor,
        spans: &[RowSpan],
    ) -> candle_core::Result<Option<Tensor>> {
        let n = x.dim(0)?;
        let mut y: Option<Tensor> = None;
        let mut add = |t: Tensor| -> candle_core::Result<()> {
            y = Some(match y.take() {
                Some(y) => (y + t)?,
                None => t,
            });
            Ok(())
        };
        for (j, adapter) in self.union.iter().enumerate() {
            let Some(f) = adapter.factors(site) else {
                continue;
            };
            let v = (x.matmul(&f.a.t()?)?.matmul(&f.b.t()?)? * f.scale as f64)?;
            let mut m = Vec::with_capacity(n);
            for (i, s) in spans.iter().enumerate() {
                m.extend(std::iter::repeat_n(self.mapping.mapping[i][j], s.len));
            }
            add(v.broadcast_mul(&Tensor::from_vec(m, (n, 1), x.device())?)?)?;
        }
        for (i, s) in spans.iter().enumerate() {
            let Some(mix) = self.rows[i].as_ref().filter(|m| m.plan == Plan::Fusion) else {
                continue;
            };
            let mut fa: Option<Tensor> = None;
            let mut fb: Option<Tensor> = None;
            for (adapter, g) in &mix.parts {
                let Some(f) = adapter.factors(site) else {
                    continue;
                };
                let a = (&f.a * *g as f64)?;
                let b = (&f.b * (*g * f.scale) as f64)?;
                fa = Some(match fa {
                    Some(t) => (t + a)?,
                    None => a,
                });
                fb = Some(match fb {
                    Some(t) => (t + b)?,
                    None => b,
                });
            }
            if let (Some(fa), Some(fb)) = (fa, fb) {
                let part = x
                    .narrow(0, s.start, s.len)?
                    .matmul(&fa.t()?)?
                    .matmul(&fb.t()?)?;
                let out = part.dim(1)?;
                let full = Tensor::cat(
                    &[
                        Tensor::zeros((s.start, out), x.dtype(), x.device())?,
                        part,
                        Tensor::zeros((n - s.start - s.len, out), x.dtype(), x.device())?,
                    ],
                    0,
                )?;
                add(full)?;
            }
        }
        Ok(y)
    }

    /// The paper's union form computed densely with candle: the slow reference of both
    /// strategies.
    pub fn reference(&self) -> MixReference<'_> {
        MixReference(self)
    }
}

/// Read access to the f32 values of a contiguous CPU tensor, without a copy.
struct Raw<G> {
    guard: G,
    start: usize,
    end: usize,
}

impl<G: std::ops::Deref<Target = candle_core::Storage>> Raw<G> {
    fn slice(&self) -> &[f32] {
        match &*self.guard {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => &v[self.start..self.end],
            _ => unreachable!("checked in Raw::of"),
        }
    }
}

impl Raw<()> {
    /// `None` for tensors that are not contiguous f32 in CPU memory.
    fn of(
        t: &Tensor,
    ) -> Option<Raw<impl std::ops::Deref<Target = candle_core::Storage> + Sync + '_>> {
        let (guard, layout) = t.storage_and_layout();
        let (start, end) = layout.contiguous_offsets()?;
        matches!(
            &*guard,
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(_))
        )
        .then_some(Raw { guard, start, end })
    }
}

impl SiteDelta for MixDelta {
    fn delta(
        &self,
        site: Site,
        x: &Tensor,
        rows: &[RowSpan],
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(out) = self.site_out(site) else {
            return Ok(None);
        };
        let n = x.dim(0)?;
        let mut y = vec![0f32; n * out];
        if self.add_fast(site, x, rows, true, &mut y)? {
            Tensor::from_vec(y, (n, out), x.device()).map(Some)
        } else {
            self.reference_delta(site, x, rows)
        }
    }

    fn add_into(
        &self,
        site: Site,
        x: &Tensor,
        rows: &[RowSpan],
        y: &mut [f32],
    ) -> candle_core::Result<()> {
        if !self.add_fast(site, x, rows, true, y)?
            && let Some(d) = self.reference_delta(site, x, rows)?
        {
            crate::model::add_tensor(y, &d)?;
        }
        Ok(())
    }

    fn packed_a(&self, sites: &[Site]) -> Vec<&QMatrix> {
        let Some(&first) = sites.first() else {
            return Vec::new();
        };
        let key = input_of(first);
        if sites.iter().any(|&s| input_of(s) != key) {
            return Vec::new();
        }
        self.int8_groups(key).map(|(_, pass)| &pass.a).collect()
    }

    fn add_packed(
        &self,
        sites: &[Site],
        x: &Tensor,
        a_out: &[Vec<f32>],
        rows: &[RowSpan],
        ys: &mut [&mut [f32]],
    ) -> candle_core::Result<()> {
        let given = !a_out.is_empty();
        if given {
            self.add_int8(sites, rows, Mids::Given(a_out), ys);
            if !self.pairs {
                return Ok(());
            }
        }
        for (&site, y) in sites.iter().zip(ys.iter_mut()) {
            if !self.add_fast(site, x, rows, !given, y)?
                && let Some(d) = self.reference_delta(site, x, rows)?
            {
                crate::model::add_tensor(y, &d)?;
            }
        }
        Ok(())
    }
}

/// [`MixDelta`] computed by its slow reference.
pub struct MixReference<'a>(&'a MixDelta);

impl SiteDelta for MixReference<'_> {
    fn delta(
        &self,
        site: Site,
        x: &Tensor,
        rows: &[RowSpan],
    ) -> candle_core::Result<Option<Tensor>> {
        self.0.reference_delta(site, x, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_hand_gates_are_refused() {
        assert!(check_gates(&[0.0, 1.0, 0.3]).is_ok());
        let e = check_gates(&[0.5, -0.1]).unwrap_err().to_string();
        assert!(e.contains("gate 1 = -0.1"), "{e}");
        assert!(check_gates(&[f32::INFINITY]).is_err());
    }

    #[test]
    fn precision_names_parse_and_others_are_refused_by_name() {
        for (n, p) in [
            ("f32", Precision::F32),
            ("bf16", Precision::Bf16),
            ("int8", Precision::Int8),
        ] {
            assert_eq!(n.parse::<Precision>().unwrap(), p);
        }
        let e = "int4".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("\"int4\"") && e.contains("int8"), "{e}");
    }

    #[test]
    fn plan_names_round_trip() {
        for p in [
            Plan::None,
            Plan::Selection,
            Plan::Mixture,
            Plan::Fusion,
            Plan::Router,
        ] {
            assert_eq!(p.as_str().parse::<Plan>().unwrap(), p);
        }
        assert!("router2".parse::<Plan>().is_err());
    }
}
