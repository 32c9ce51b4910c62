//! LoraRetriever (ramole-paper.md 2.1): adapter profiles from sample embeddings, top-k search
//! with exclusion, the paper's out-of-distribution k+1 masking, gates from scores, and the
//! retrieval-accuracy evaluation on the paper's data format.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, CatalogError, Embedding};
use crate::embed::{EmbedError, Embedder};
use crate::index::{AdapterIndex, IndexError};
use crate::vocab::{Gating, Scoring, VocabError};

#[derive(Debug, thiserror::Error)]
pub enum RetrieveError {
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Gate(#[from] VocabError),
    #[error("{0}")]
    Invalid(String),
}

type Result<T, E = RetrieveError> = std::result::Result<T, E>;

/// The element-wise mean of equal-length vectors (not re-normalised).
pub fn mean(vectors: &[Vec<f32>]) -> Vec<f32> {
    let Some(first) = vectors.first() else {
        return Vec::new();
    };
    let mut acc = vec![0f64; first.len()];
    for v in vectors {
        for (a, x) in acc.iter_mut().zip(v) {
            *a += *x as f64;
        }
    }
    acc.iter()
        .map(|a| (*a / vectors.len() as f64) as f32)
        .collect()
}

/// An adapter's profile: the mean of its samples' unit embeddings (the paper's `E(φ)`).
pub fn profile(embedder: &Embedder, samples: &[&str]) -> Result<Embedding> {
    if samples.is_empty() {
        return Err(RetrieveError::Invalid(
            "an adapter needs at least one sample input to be retrievable".into(),
        ));
    }
    let vectors = embedder.embed(samples)?;
    Ok(Embedding {
        embedder: embedder.id().to_string(),
        samples: samples.len(),
        vector: mean(&vectors),
    })
}

/// Score of a unit query against a raw profile mean.
pub fn score(scoring: Scoring, query: &[f32], profile: &[f32]) -> f32 {
    let dot: f32 = query.iter().zip(profile).map(|(a, b)| a * b).sum();
    match scoring {
        Scoring::Ip => dot,
        Scoring::Cosine => {
            let n = profile.iter().map(|x| x * x).sum::<f32>().sqrt();
            if n > 0.0 { dot / n } else { 0.0 }
        }
    }
}

/// The paper's OOD selection (ramole-paper.md 2.1): from candidates ranked best first (at
/// least k+1 of them when available), drop `own` when it is among the first k+1; otherwise keep
/// the first k. Every query gets exactly k (when there are that many).
pub fn top_k_masking<T: PartialEq + Clone>(ranked: &[T], k: usize, own: Option<&T>) -> Vec<T> {
    let mut out = Vec::with_capacity(k);
    let mut excluded_seen = false;
    for (i, c) in ranked.iter().take(k + 1).enumerate() {
        if i == k && !excluded_seen {
            break;
        }
        if own == Some(c) {
            excluded_seen = true;
            continue;
        }
        out.push(c.clone());
    }
    out
}

/// One retrieved adapter, with its gate in the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Retrieved {
    pub key: u64,
    pub id: String,
    pub name: String,
    pub score: f32,
    pub gate: f32,
}

/// Top-k adapters for an embedded query: searched in the index, then resolved in the catalog
/// (anything no longer enabled or compatible is dropped), gated.
pub fn retrieve(
    catalog: &Catalog,
    index: &AdapterIndex,
    query: &[f32],
    k: usize,
    exclude: &HashSet<u64>,
    gating: Gating,
) -> Result<Vec<Retrieved>> {
    if k == 0 {
        return Ok(Vec::new());
    }
    let base = &index.spec().base;
    let mut hits = Vec::with_capacity(k);
    // Over-fetch a little so a stale entry the catalog rejects does not shorten the answer.
    for (key, score) in index.search(query, k + 4, &|key| exclude.contains(&key))? {
        if hits.len() == k {
            break;
        }
        let Some(rec) = catalog.adapter_by_key(key)? else {
            continue;
        };
        let usable = rec.enabled
            && rec.verdict.compat != crate::catalog::Compat::Incompatible
            && rec.verdict.base == *base;
        if usable {
            hits.push((rec, score));
        }
    }
    let scores: Vec<f32> = hits.iter().map(|h| h.1).collect();
    let gates = gating.gates(&scores)?;
    Ok(hits
        .into_iter()
        .zip(gates)
        .map(|((rec, score), gate)| Retrieved {
            key: rec.key,
            id: rec.id,
            name: rec.name,
            score,
            gate,
        })
        .collect())
}

// ---- evaluation on the paper's data ------------------------------------------------------------

/// One entry of `profiles-*.json`: a task adapter and its sample inputs.
#[derive(Debug, Clone, Deserialize)]
pub struct TaskProfile {
    pub model_name: String,
    pub sample: Vec<TaskSample>,
    #[serde(default)]
    pub domain: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TaskSample {
    pub inputs: String,
    #[serde(default)]
    pub targets: Option<String>,
}

/// One entry of `test-*.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct TestInput {
    pub inputs: String,
    pub task: String,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub targets: Option<String>,
    #[serde(default)]
    pub metric: Option<String>,
}

/// Top-k accuracy in percent, overall and per domain, keyed by k.
#[derive(Debug, Clone, Serialize)]
pub struct RetrievalReport {
    pub overall: BTreeMap<String, f64>,
    pub per_domain: BTreeMap<String, BTreeMap<String, f64>>,
    pub n: usize,
    pub scoring: Scoring,
    pub ood: bool,
}

/// The embedded side of a retrieval evaluation: one profile per task (the mean of its samples'
/// embeddings) and every test input's embedding. Embedding is the expensive part; reports for
/// any k, scoring and OOD setting are then cheap.
pub struct RetrievalEval {
    tasks: Vec<String>,
    domains: Vec<String>,
    profiles: Vec<Vec<f32>>,
    /// Per test input: its own task's position and its domain.
    tests: Vec<(usize, String)>,
    queries: Vec<Vec<f32>>,
}

impl RetrievalEval {
    /// Embeds the profiles' samples and the test inputs with `embedder`.
    pub fn prepare(
        embedder: &Embedder,
        profiles: &[TaskProfile],
        tests: &[TestInput],
    ) -> Result<Self> {
        if profiles.is_empty() || tests.is_empty() {
            return Err(RetrieveError::Invalid(
                "need at least one profile and one test input".into(),
            ));
        }
        let task_pos: BTreeMap<&str, usize> = profiles
            .iter()
            .enumerate()
            .map(|(i, p)| (p.model_name.as_str(), i))
            .collect();
        if task_pos.len() != profiles.len() {
            return Err(RetrieveError::Invalid(
                "two profiles have the same model_name".into(),
            ));
        }
        if let Some(p) = profiles.iter().find(|p| p.sample.is_empty()) {
            return Err(RetrieveError::Invalid(format!(
                "profile {:?} has no samples",
                p.model_name
            )));
        }
        let domains: Vec<String> = profiles
            .iter()
            .map(|p| p.domain.clone().unwrap_or_else(|| "unknown".into()))
            .collect();
        let mut own = Vec::with_capacity(tests.len());
        for (i, t) in tests.iter().enumerate() {
            let pos = *task_pos.get(t.task.as_str()).ok_or_else(|| {
                RetrieveError::Invalid(format!(
                    "test input {i} is of task {:?}, which has no profile",
                    t.task
                ))
            })?;
            own.push((
                pos,
                t.domain.clone().unwrap_or_else(|| domains[pos].clone()),
            ));
        }
        let sample_texts: Vec<&str> = profiles
            .iter()
            .flat_map(|p| p.sample.iter().map(|s| s.inputs.as_str()))
            .collect();
        let sample_vecs = embedder.embed(&sample_texts)?;
        let mut at = 0;
        let mut profile_vecs = Vec::with_capacity(profiles.len());
        for p in profiles {
            profile_vecs.push(mean(&sample_vecs[at..at + p.sample.len()]));
            at += p.sample.len();
        }
        let test_texts: Vec<&str> = tests.iter().map(|t| t.inputs.as_str()).collect();
        Ok(Self {
            tasks: profiles.iter().map(|p| p.model_name.clone()).collect(),
            domains,
            profiles: profile_vecs,
            tests: own,
            // One at a time, as a live query is embedded (the packed path and its weight
            // precision), so the accuracy is the one retrieval actually has.
            queries: embedder.embed_packed(&test_texts)?,
        })
    }

    pub fn tasks(&self) -> &[String] {
        &self.tasks
    }

    /// The domain of each task, in the order of [`RetrievalEval::tasks`].
    pub fn domains(&self) -> &[String] {
        &self.domains
    }

    /// Test input `i`'s own task (its position in [`RetrievalEval::tasks`]).
    pub fn own_task(&self, i: usize) -> usize {
        self.tests[i].0
    }

    /// Every task ranked for test input `i`, best first, with its score (ties by task order).
    pub fn ranked(&self, i: usize, scoring: Scoring) -> Vec<(usize, f32)> {
        let q = &self.queries[i];
        let mut ranked: Vec<(usize, f32)> = self
            .profiles
            .iter()
            .enumerate()
            .map(|(t, p)| (t, score(scoring, q, p)))
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked
    }

    /// The paper's retrieval accuracy: every test input ranks all tasks; a hit at k when its
    /// own task is among the top k. With `ood`, the own task is masked by [`top_k_masking`] and
    /// a hit is a task of the same domain (the own task can never be retrieved).
    pub fn report(&self, ks: &[usize], scoring: Scoring, ood: bool) -> RetrievalReport {
        self.report_where(ks, scoring, ood, |_| true)
    }

    /// [`RetrievalEval::report`] over the test inputs whose own task is in `tasks` (by name);
    /// every task is still a candidate. Splits seen from unseen tasks after fine-tuning.
    pub fn report_for_tasks(
        &self,
        ks: &[usize],
        scoring: Scoring,
        ood: bool,
        tasks: &HashSet<&str>,
    ) -> RetrievalReport {
        self.report_where(ks, scoring, ood, |own| {
            tasks.contains(self.tasks[own].as_str())
        })
    }

    /// The report over the test inputs whose own task (its position) `include` accepts.
    fn report_where(
        &self,
        ks: &[usize],
        scoring: Scoring,
        ood: bool,
        include: impl Fn(usize) -> bool,
    ) -> RetrievalReport {
        let max_k = ks.iter().copied().max().unwrap_or(1);
        let mut hits: BTreeMap<usize, (usize, BTreeMap<String, usize>)> = BTreeMap::new();
        let mut per_domain_n: BTreeMap<String, usize> = BTreeMap::new();
        let mut n = 0;
        for (i, (own, domain)) in self.tests.iter().enumerate() {
            if !include(*own) {
                continue;
            }
            n += 1;
            *per_domain_n.entry(domain.clone()).or_default() += 1;
            let order: Vec<usize> = self.ranked(i, scoring).iter().map(|r| r.0).collect();
            for &k in ks {
                let hit = if ood {
                    top_k_masking(&order[..order.len().min(max_k + 1)], k, Some(own))
                        .iter()
                        .any(|&c| self.domains[c] == self.domains[*own])
                } else {
                    order.iter().take(k).any(|c| c == own)
                };
                let e = hits.entry(k).or_default();
                if hit {
                    e.0 += 1;
                    *e.1.entry(domain.clone()).or_default() += 1;
                }
            }
        }
        let pct = |h: usize, n: usize| {
            if n == 0 {
                0.0
            } else {
                (10000.0 * h as f64 / n as f64).round() / 100.0
            }
        };
        let mut overall = BTreeMap::new();
        let mut per_domain: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
        for &k in ks {
            let (h, by_domain) = hits.get(&k).cloned().unwrap_or_default();
            overall.insert(k.to_string(), pct(h, n));
            for (d, n) in &per_domain_n {
                per_domain.entry(d.clone()).or_default().insert(
                    k.to_string(),
                    pct(by_domain.get(d).copied().unwrap_or(0), *n),
                );
            }
        }
        RetrievalReport {
            overall,
            per_domain,
            n,
            scoring,
            ood,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::normalized;

    #[test]
    fn masking_follows_the_papers_k_plus_1_rule() {
        // Own task first: dropped, the (k+1)-th comes in.
        assert_eq!(top_k_masking(&[7, 1, 2, 3], 3, Some(&7)), vec![1, 2, 3]);
        // Own task in the middle.
        assert_eq!(top_k_masking(&[1, 7, 2, 3], 3, Some(&7)), vec![1, 2, 3]);
        // Own task not in the top k+1: the first k.
        assert_eq!(top_k_masking(&[1, 2, 3, 4, 7], 3, Some(&7)), vec![1, 2, 3]);
        // Own task exactly at k+1: the first k.
        assert_eq!(top_k_masking(&[1, 2, 3, 7], 3, Some(&7)), vec![1, 2, 3]);
        // No masking.
        assert_eq!(top_k_masking(&[1, 2, 3, 4], 2, None), vec![1, 2]);
    }

    #[test]
    fn cosine_ignores_profile_length_and_ip_does_not() {
        let q = [1.0, 0.0];
        let short = [0.5, 0.5];
        let long = [2.0, 3.0];
        assert!(score(Scoring::Ip, &q, &long) > score(Scoring::Ip, &q, &short));
        assert!(score(Scoring::Cosine, &q, &long) < score(Scoring::Cosine, &q, &short));
        let n = normalized(&long);
        assert!((n.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
