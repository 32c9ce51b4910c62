//! The adapter index: a usearch index of adapter profile vectors keyed by the catalog's adapter
//! key. It is a projection of the catalog, never the source of truth: the file carries the
//! embedder, dimension, scoring, base model and catalog generation it was built from, plus a
//! checksum, so a missing, corrupt or stale file is detected and rebuilt from the catalog.
//!
//! File layout (`index.usearch`): `RAMOLEIX` magic, u32 LE header length, header JSON, u64 LE
//! payload length, usearch payload, u64 LE FNV-1a of the payload. Written atomically.
//!
//! Searching: up to [`FLAT_MAX`] vectors a query is an exact scan of an f16 copy of the vectors
//! kept beside the usearch index ([`flat`]), rescored in f32, so exact and well under a
//! millisecond at 10k adapters; above that the usearch HNSW graph answers (approximate, but its
//! cost grows only logarithmically).

use std::path::Path;

use serde::{Deserialize, Serialize};
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::files;
use crate::vocab::Scoring;

const MAGIC: &[u8; 8] = b"RAMOLEIX";

/// Up to this many vectors a search is the exact flat scan; above it, the HNSW graph. An f16
/// scan streams `2 × dims` bytes a vector (15 KiB.. per 20 adapters at 384 dims): at 20k
/// adapters that is ~15 MiB and about the HNSW's latency (performance-notes 4.4).
pub const FLAT_MAX: usize = 20_000;

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

/// `v / |v|` (a zero vector stays zero).
pub fn normalized(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter().map(|x| x / n).collect()
    } else {
        v.to_vec()
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
    /// The same vectors for the exact scan (always in step with `index`).
    flat: flat::FlatVectors,
    /// Up to this many vectors a search is the exact scan ([`FLAT_MAX`] unless changed).
    exact_limit: usize,
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
            flat: flat::FlatVectors::new(spec.dims),
            exact_limit: FLAT_MAX,
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

    /// Searches indexes of up to `limit` vectors by the exact scan, larger ones by the HNSW
    /// graph (tests and benchmarks use it to reach the HNSW with few vectors).
    pub fn set_exact_limit(&mut self, limit: usize) {
        self.exact_limit = limit;
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
        self.index.add(key, &v).map_err(usearch_err)?;
        self.flat.upsert(key, &v);
        Ok(())
    }

    pub fn remove(&mut self, key: u64) -> Result<()> {
        if self.index.contains(key) {
            self.index.remove(key).map_err(usearch_err)?;
        }
        self.flat.remove(key);
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
    /// says true. Score is cosine similarity or inner product, per the spec's scoring. Exact
    /// up to [`FLAT_MAX`] vectors (see [`AdapterIndex::set_exact_limit`]), the HNSW's
    /// approximation above.
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
        if self.len() <= self.exact_limit {
            let q = prepare(self.spec.scoring, query);
            return Ok(self.flat.search(&q, k, skip, &|key, buf: &mut Vec<f32>| {
                buf.resize(self.spec.dims, 0.0);
                matches!(self.index.get(key, buf), Ok(n) if n > 0)
            }));
        }
        self.index.change_expansion_search((4 * k).max(64));
        let mut out = hits(
            self.index
                .filtered_search(query, k, |key| !skip(key))
                .map_err(usearch_err)?,
            skip,
        );
        sort_hits(&mut out);
        out.truncate(k);
        Ok(out)
    }

    /// [`AdapterIndex::search`] by usearch's own exact scan, whatever the size: the slow
    /// reference the flat scan and the HNSW are checked against.
    pub fn search_reference(
        &self,
        query: &[f32],
        k: usize,
        skip: &dyn Fn(u64) -> bool,
    ) -> Result<Vec<(u64, f32)>> {
        self.check_dims(query)?;
        if k == 0 || self.is_empty() {
            return Ok(Vec::new());
        }
        let all = self
            .index
            .exact_search(query, self.len())
            .map_err(usearch_err)?;
        let mut out = hits(all, skip);
        sort_hits(&mut out);
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
        let flat = flat::FlatVectors::from_index(&index, header.spec.dims)
            .map_err(|e| corrupt(&format!("usearch payload: {e}")))?;
        Ok(Self {
            index,
            flat,
            exact_limit: FLAT_MAX,
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
        Scoring::Cosine => normalized(v),
        Scoring::Ip => v.to_vec(),
    }
}

/// usearch matches as `(key, score)`, without the skipped keys.
fn hits(m: usearch::ffi::Matches, skip: &dyn Fn(u64) -> bool) -> Vec<(u64, f32)> {
    m.keys
        .iter()
        .zip(&m.distances)
        .filter(|(key, _)| !skip(**key))
        .map(|(&key, &d)| (key, 1.0 - d))
        .collect()
}

/// Best first; ties broken by key so results are deterministic.
fn sort_hits(hits: &mut [(u64, f32)]) {
    hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = files::Fnv1a::default();
    h.update(bytes);
    h.finish()
}

mod flat {
    //! The exact scan: every vector as IEEE f16 in one contiguous block (half the bytes of the
    //! usearch copy, so half the memory traffic), scored against the f32 query in one pass.
    //! f16 rounding moves a score by at most [`f16_error`]; every vector whose rounded score
    //! comes within twice that of the k-th best is rescored from usearch's f32 vector, so the
    //! answer is the exact top k.

    use std::collections::HashMap;

    /// Relative error of a dot product with f16-rounded weights: the rounding (2⁻¹¹ ≈ 4.9e-4
    /// of each element) plus f32 accumulation over a few hundred terms, with a 2× margin.
    const REL_ERROR: f32 = 1e-3;
    /// Scans of at least this many elements are split over threads (below, waking a thread
    /// costs more than it saves: ~1 MiB of f16).
    const PARALLEL_MIN_ELEMS: usize = 1 << 19;
    /// Largest magnitude kept as f16; a vector with a larger element is always rescored.
    const F16_MAX: f32 = 65_000.0;

    /// The bound on `|rounded score − score|` for a query of norm `q_norm` against vectors of
    /// norm at most `max_norm` (Cauchy–Schwarz over the per-element rounding; the additive term
    /// covers f16 subnormals).
    pub(super) fn f16_error(q_norm: f32, max_norm: f32) -> f32 {
        REL_ERROR * q_norm * (max_norm + 1e-3)
    }

    pub(super) struct FlatVectors {
        dims: usize,
        keys: Vec<u64>,
        /// `keys.len() × dims` f16 bits, row `i` the vector of `keys[i]`.
        rows: Vec<u16>,
        /// Rows with an element beyond f16's range: never approximated, always rescored.
        wide: Vec<bool>,
        slot: HashMap<u64, usize>,
        /// An upper bound on every row's norm (only grows; reset when emptied).
        max_norm: f32,
    }

    impl FlatVectors {
        pub fn new(dims: usize) -> Self {
            Self {
                dims,
                keys: Vec::new(),
                rows: Vec::new(),
                wide: Vec::new(),
                slot: HashMap::new(),
                max_norm: 0.0,
            }
        }

        /// The vectors of a loaded usearch index. usearch has no key listing, so its exact
        /// scan over everything names the keys; then each vector is read back.
        pub fn from_index(index: &usearch::Index, dims: usize) -> Result<Self, String> {
            let mut flat = Self::new(dims);
            let n = index.size();
            if n == 0 {
                return Ok(flat);
            }
            let all = index
                .exact_search(&vec![1.0f32; dims], n)
                .map_err(|e| e.to_string())?;
            let mut v = vec![0f32; dims];
            for &key in &all.keys {
                match index.get(key, &mut v) {
                    Ok(1) => flat.upsert(key, &v),
                    _ => return Err(format!("cannot read back the vector of key {key}")),
                }
            }
            if flat.keys.len() != n {
                return Err(format!(
                    "{} distinct keys listed for {n} vectors",
                    flat.keys.len()
                ));
            }
            Ok(flat)
        }

        pub fn upsert(&mut self, key: u64, v: &[f32]) {
            debug_assert_eq!(v.len(), self.dims);
            let i = *self.slot.entry(key).or_insert_with(|| {
                self.keys.push(key);
                self.rows.resize(self.keys.len() * self.dims, 0);
                self.wide.push(false);
                self.keys.len() - 1
            });
            let row = &mut self.rows[i * self.dims..(i + 1) * self.dims];
            for (h, &x) in row.iter_mut().zip(v) {
                *h = half::f16::from_f32(x).to_bits();
            }
            self.wide[i] = v.iter().any(|x| x.abs().is_nan() || x.abs() > F16_MAX);
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            self.max_norm = self.max_norm.max(norm);
        }

        pub fn remove(&mut self, key: u64) {
            let Some(i) = self.slot.remove(&key) else {
                return;
            };
            let last = self.keys.len() - 1;
            if i != last {
                // The last row takes the removed one's place.
                let moved = self.keys[last];
                self.keys[i] = moved;
                self.wide[i] = self.wide[last];
                self.rows
                    .copy_within(last * self.dims..(last + 1) * self.dims, i * self.dims);
                self.slot.insert(moved, i);
            }
            self.keys.pop();
            self.wide.pop();
            self.rows.truncate(last * self.dims);
            if self.keys.is_empty() {
                self.max_norm = 0.0;
            }
        }

        /// The exact top `k` of `q` (already prepared for the scoring: unit for cosine), best
        /// first, ties by key. `exact(key, buf)` fills `buf` with the f32 vector of `key`.
        pub fn search(
            &self,
            q: &[f32],
            k: usize,
            skip: &dyn Fn(u64) -> bool,
            exact: &dyn Fn(u64, &mut Vec<f32>) -> bool,
        ) -> Vec<(u64, f32)> {
            let n = self.keys.len();
            let mut approx = vec![0f32; n];
            self.scan(q, &mut approx);
            // The k-th best rounded score among rows not skipped (`best` is sorted, best first).
            let mut best: Vec<f32> = Vec::with_capacity(k + 1);
            for (i, &s) in approx.iter().enumerate() {
                if self.wide[i] || (best.len() == k && s <= best[k - 1]) || skip(self.keys[i]) {
                    continue;
                }
                let at = best.partition_point(|&b| b >= s);
                best.insert(at, s);
                best.truncate(k);
            }
            let q_norm = q.iter().map(|x| x * x).sum::<f32>().sqrt();
            let cut = if best.len() == k {
                best[k - 1] - 2.0 * f16_error(q_norm, self.max_norm)
            } else {
                f32::NEG_INFINITY
            };
            let mut out = Vec::with_capacity(k + 8);
            let mut buf = Vec::with_capacity(self.dims);
            for (i, &s) in approx.iter().enumerate() {
                // NaN (a NaN query) is never a candidate, as it is never a usearch match.
                let candidate = self.wide[i] || s >= cut;
                if !candidate || skip(self.keys[i]) || !exact(self.keys[i], &mut buf) {
                    continue;
                }
                out.push((self.keys[i], ramole_kernels::lowrank::dot(q, &buf)));
            }
            super::sort_hits(&mut out);
            out.truncate(k);
            out
        }

        /// `out[i]` = the query against row `i` (f16 rows, f32 products and sums). Large
        /// scans are split over the rayon pool: one core alone cannot pull the rows from
        /// memory as fast as two.
        fn scan(&self, q: &[f32], out: &mut [f32]) {
            use rayon::prelude::*;
            let d = self.dims.max(1);
            let threads = rayon::current_num_threads();
            if threads > 1 && out.len() * d >= PARALLEL_MIN_ELEMS {
                let chunk = out.len().div_ceil(threads);
                out.par_chunks_mut(chunk)
                    .zip(self.rows.par_chunks(chunk * d))
                    .for_each(|(o, rows)| self.scan_rows(q, rows, o));
            } else {
                self.scan_rows(q, &self.rows, out);
            }
        }

        fn scan_rows(&self, q: &[f32], rows: &[u16], out: &mut [f32]) {
            ramole_kernels::scan::f16_rows(ramole_kernels::Isa::detect(), q, rows, out);
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn remove_moves_the_last_row_into_the_gap() {
            let mut f = FlatVectors::new(2);
            for k in 0..4u64 {
                f.upsert(k, &[k as f32, 1.0]);
            }
            f.remove(1);
            f.remove(7);
            assert_eq!(f.keys, vec![0, 3, 2]);
            let mut s = vec![0f32; 3];
            f.scan(&[1.0, 0.0], &mut s);
            assert_eq!(s, vec![0.0, 3.0, 2.0]);
            f.upsert(3, &[5.0, 0.0]);
            f.scan(&[1.0, 0.0], &mut s);
            assert_eq!(s, vec![0.0, 5.0, 2.0]);
            for k in [0, 2, 3] {
                f.remove(k);
            }
            assert!(f.keys.is_empty() && f.rows.is_empty() && f.max_norm == 0.0);
        }
    }
}
