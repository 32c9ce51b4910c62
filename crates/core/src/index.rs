//! The adapter index: a usearch index of adapter profile vectors keyed by the catalog's adapter
//! key. It is a projection of the catalog, never the source of truth: the file carries the
//! embedder, dimension, scoring, base model and catalog generation it was built from, plus a
//! checksum, so a missing, corrupt or stale file is detected and rebuilt from the catalog.
//!
//! File layout (`index.usearch`): `RAMOLEIX` magic, u32 LE header length, header JSON, u64 LE
//! payload length, usearch payload, u64 LE FNV-1a of the payload. Written atomically.

use std::path::Path;

use serde::{Deserialize, Serialize};
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::files;

const MAGIC: &[u8; 8] = b"RAMOLEIX";

/// Below this many vectors the search is an exact scan (cheap, and no approximation at all).
const EXACT_BELOW: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index {path}: {message}")]
    Corrupt { path: String, message: String },
    #[error("index {path}: cannot read or write: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("usearch: {0}")]
    Usearch(String),
    #[error("query has {found} dimensions, the index {expected}")]
    Dims { expected: usize, found: usize },
}

type Result<T, E = IndexError> = std::result::Result<T, E>;

/// How a query is scored against an adapter's profile (DESIGN.md 3a).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scoring {
    /// Cosine against the L2-normalised mean of the sample embeddings (our default).
    #[default]
    Cosine,
    /// Inner product with the raw mean (the paper's released code).
    Ip,
}

impl Scoring {
    pub fn as_str(self) -> &'static str {
        match self {
            Scoring::Cosine => "cosine",
            Scoring::Ip => "ip",
        }
    }
}

impl std::str::FromStr for Scoring {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cosine" | "cos" => Ok(Scoring::Cosine),
            "ip" => Ok(Scoring::Ip),
            other => Err(format!("unknown scoring {other:?} (cosine, ip)")),
        }
    }
}

/// What an index was built from; an index whose spec or generation differs is stale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexSpec {
    pub embedder: String,
    pub dims: usize,
    pub scoring: Scoring,
    /// The active base model's id (compatibility decides membership).
    pub base: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Header {
    spec: IndexSpec,
    generation: u64,
    count: usize,
}

pub struct AdapterIndex {
    index: Index,
    spec: IndexSpec,
    generation: u64,
}

fn usearch_err(e: impl std::fmt::Display) -> IndexError {
    IndexError::Usearch(e.to_string())
}

impl AdapterIndex {
    /// An empty index for `spec`.
    pub fn new(spec: IndexSpec, generation: u64) -> Result<Self> {
        let index = Index::new(&options(&spec)).map_err(usearch_err)?;
        Ok(Self {
            index,
            spec,
            generation,
        })
    }

    /// An index holding `rows` (`(key, profile vector)`).
    pub fn build(spec: IndexSpec, generation: u64, rows: &[(u64, Vec<f32>)]) -> Result<Self> {
        let mut idx = Self::new(spec, generation)?;
        idx.index.reserve(rows.len().max(16)).map_err(usearch_err)?;
        for (key, v) in rows {
            idx.upsert(*key, v)?;
        }
        Ok(idx)
    }

    pub fn spec(&self) -> &IndexSpec {
        &self.spec
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Records the catalog generation this index now reflects.
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    pub fn len(&self) -> usize {
        self.index.size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, key: u64) -> bool {
        self.index.contains(key)
    }

    /// Adds or replaces the vector of `key`.
    pub fn upsert(&mut self, key: u64, vector: &[f32]) -> Result<()> {
        self.check_dims(vector)?;
        if self.index.contains(key) {
            self.index.remove(key).map_err(usearch_err)?;
        }
        if self.index.size() + 1 > self.index.capacity() {
            let grow = (self.index.capacity() * 2).max(16);
            self.index.reserve(grow).map_err(usearch_err)?;
        }
        let v = prepare(self.spec.scoring, vector);
        self.index.add(key, &v).map_err(usearch_err)
    }

    pub fn remove(&mut self, key: u64) -> Result<()> {
        if self.index.contains(key) {
            self.index.remove(key).map_err(usearch_err)?;
        }
        Ok(())
    }

    fn check_dims(&self, v: &[f32]) -> Result<()> {
        if v.len() != self.spec.dims {
            return Err(IndexError::Dims {
                expected: self.spec.dims,
                found: v.len(),
            });
        }
        Ok(())
    }

    /// The `k` best `(key, score)` for `query`, best first, skipping keys for which `skip`
    /// says true. Score is cosine similarity or inner product, per the spec's scoring.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        skip: &dyn Fn(u64) -> bool,
    ) -> Result<Vec<(u64, f32)>> {
        self.check_dims(query)?;
        if k == 0 || self.is_empty() {
            return Ok(Vec::new());
        }
        let hits = |m: usearch::ffi::Matches| -> Vec<(u64, f32)> {
            m.keys
                .iter()
                .zip(&m.distances)
                .filter(|(key, _)| !skip(**key))
                .map(|(&key, &d)| (key, 1.0 - d))
                .collect()
        };
        let mut out = if self.len() < EXACT_BELOW {
            // Exact scan; fetch a margin for skipped keys, everything when that was not enough.
            let fetch = (k + 16).min(self.len());
            let mut out = hits(self.index.exact_search(query, fetch).map_err(usearch_err)?);
            if out.len() < k && fetch < self.len() {
                out = hits(
                    self.index
                        .exact_search(query, self.len())
                        .map_err(usearch_err)?,
                );
            }
            out
        } else {
            self.index.change_expansion_search((4 * k).max(64));
            hits(
                self.index
                    .filtered_search(query, k, |key| !skip(key))
                    .map_err(usearch_err)?,
            )
        };
        // Ties broken by key so results are deterministic.
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out.truncate(k);
        Ok(out)
    }

    /// Writes the index atomically (temp file + fsync + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let header = serde_json::to_vec(&Header {
            spec: self.spec.clone(),
            generation: self.generation,
            count: self.len(),
        })
        .expect("header serialises");
        let mut payload = vec![0u8; self.index.serialized_length()];
        self.index
            .save_to_buffer(&mut payload)
            .map_err(usearch_err)?;
        let mut bytes = Vec::with_capacity(8 + 4 + header.len() + 8 + payload.len() + 8);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&payload);
        bytes.extend_from_slice(&fnv1a(&payload).to_le_bytes());
        crate::config::fail_point("index-save");
        files::write_atomic(path, &bytes).map_err(|source| IndexError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Reads an index saved by [`AdapterIndex::save`]; any damage is `Corrupt`.
    pub fn load(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| IndexError::Io {
            path: shown.clone(),
            source,
        })?;
        let corrupt = |message: &str| IndexError::Corrupt {
            path: shown.clone(),
            message: message.to_string(),
        };
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8]> {
            let s = bytes
                .get(at..at + n)
                .ok_or_else(|| corrupt("the file is truncated"))?;
            at += n;
            Ok(s)
        };
        if take(8)? != MAGIC {
            return Err(corrupt("not a ramole index (bad magic)"));
        }
        let hlen = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
        let header: Header = serde_json::from_slice(take(hlen)?)
            .map_err(|e| corrupt(&format!("header is not valid: {e}")))?;
        let plen = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")) as usize;
        let payload = take(plen)?;
        let sum = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        if fnv1a(payload) != sum {
            return Err(corrupt("checksum mismatch"));
        }
        let index = Index::new(&options(&header.spec)).map_err(usearch_err)?;
        index
            .load_from_buffer(payload)
            .map_err(|e| corrupt(&format!("usearch payload: {e}")))?;
        if index.size() != header.count || index.dimensions() != header.spec.dims {
            return Err(corrupt("payload disagrees with the header"));
        }
        Ok(Self {
            index,
            spec: header.spec,
            generation: header.generation,
        })
    }
}

/// Why an index on disk could not be used as is.
#[derive(Debug, Clone, PartialEq)]
pub enum RebuildReason {
    Missing,
    Corrupt(String),
    OtherSpec,
    Stale { found: u64, expected: u64 },
}

impl std::fmt::Display for RebuildReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RebuildReason::Missing => f.write_str("no index file"),
            RebuildReason::Corrupt(m) => write!(f, "index file is damaged ({m})"),
            RebuildReason::OtherSpec => {
                f.write_str("index was built by another embedder, dimension, scoring or base")
            }
            RebuildReason::Stale { found, expected } => write!(
                f,
                "index reflects catalog generation {found}, the catalog is at {expected}"
            ),
        }
    }
}

/// Opens the index at `path` when it was built for `spec` at catalog `generation`; otherwise
/// builds it from `rows()` and saves it. Returns the reason when it rebuilt.
pub fn open_or_rebuild(
    path: &Path,
    spec: &IndexSpec,
    generation: u64,
    rows: impl FnOnce() -> std::result::Result<Vec<(u64, Vec<f32>)>, String>,
) -> Result<(AdapterIndex, Option<RebuildReason>)> {
    let reason = match AdapterIndex::load(path) {
        Ok(idx) if idx.spec == *spec && idx.generation == generation => return Ok((idx, None)),
        Ok(idx) if idx.spec != *spec => RebuildReason::OtherSpec,
        Ok(idx) => RebuildReason::Stale {
            found: idx.generation,
            expected: generation,
        },
        Err(IndexError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            RebuildReason::Missing
        }
        Err(IndexError::Corrupt { message, .. }) => RebuildReason::Corrupt(message),
        Err(e) => RebuildReason::Corrupt(e.to_string()),
    };
    let rows = rows().map_err(IndexError::Usearch)?;
    let idx = AdapterIndex::build(spec.clone(), generation, &rows)?;
    idx.save(path)?;
    Ok((idx, Some(reason)))
}

fn options(spec: &IndexSpec) -> IndexOptions {
    IndexOptions {
        dimensions: spec.dims,
        metric: match spec.scoring {
            Scoring::Cosine => MetricKind::Cos,
            Scoring::Ip => MetricKind::IP,
        },
        // f32: the default bf16 would perturb scores of near-tied adapters.
        quantization: ScalarKind::F32,
        connectivity: 0,
        expansion_add: 0,
        expansion_search: 0,
        multi: false,
    }
}

/// Cosine indexes hold unit vectors, so stored vectors and scores are the normalised ones.
fn prepare(scoring: Scoring, v: &[f32]) -> Vec<f32> {
    match scoring {
        Scoring::Cosine => crate::retrieve::normalized(v),
        Scoring::Ip => v.to_vec(),
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = files::Fnv1a::default();
    h.update(bytes);
    h.finish()
}
