//! Finding adapters for the active base on the Hub, with a compatibility verdict and a cost
//! for each. The verdict uses what the listing says (a diffusion LoRA, no PEFT files), then the
//! adapter's own `adapter_config.json` and the shapes in its safetensors header (fetched with a
//! range request, so nothing large is downloaded): architecture and every adapted module's
//! shape must fit the active base; a differently named base with fitting shapes is a warning.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;
use ts_rs::TS;

use super::client::{HubClient, ModelInfo, SearchQuery, Sort};
use super::{HubError, Result};
use crate::adapter::{self, AdapterSummary};
use crate::catalog::{Compat, Verdict};
use crate::model::ModelConfig;

/// Largest `adapter_config.json` read.
pub(crate) const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest safetensors header read (a header lists names and shapes; 100 MB would be absurd).
const MAX_HEADER_BYTES: u64 = 16 << 20;
/// Members of a base's equivalence class searched (the base, its parents, mirrors).
const MAX_EQUIVALENTS: usize = 12;
/// Repositories checked at once.
const CHECK_WORKERS: usize = 4;

/// What an adapter adds when it serves a request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, TS)]
pub struct AdapterCost {
    /// Parameters of its factors.
    pub params: u64,
    /// Memory while resident (factors in f32).
    pub memory_bytes: u64,
    /// Estimated extra decode time as a fraction of the base's: the bytes it adds per token
    /// over the bytes of the base's weights (decode streams all of them each token).
    pub decode_slowdown: f64,
}

impl AdapterCost {
    pub fn of(params: u64, base_weight_bytes: u64) -> Self {
        let memory_bytes = params * 4;
        Self {
            params,
            memory_bytes,
            decode_slowdown: memory_bytes as f64 / base_weight_bytes.max(1) as f64,
        }
    }
}

/// One search result.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct AdapterHit {
    pub repo: String,
    pub downloads: u64,
    pub likes: u64,
    pub license: Option<String>,
    pub last_modified: Option<String>,
    pub gated: Option<String>,
    /// Bytes of the repository's files, where the Hub said.
    pub size: Option<u64>,
    /// The base the adapter names.
    pub declared_base: Option<String>,
    /// The folder holding the adapter when it is not at the root.
    pub subfolder: Option<String>,
    /// `compatible` or `warning` (installable), `incompatible` (refused).
    pub verdict: Compat,
    pub compatible: bool,
    pub reason: String,
    pub cost: Option<AdapterCost>,
    pub ranks: Vec<usize>,
    pub target_modules: Vec<String>,
}

/// A search for adapters of the active base.
#[derive(Debug, Clone)]
pub struct SearchRequest {
    /// The active base's Hub id.
    pub base_id: String,
    pub query: Option<String>,
    pub sort: Sort,
    pub limit: usize,
    /// Also search adapters trained on the base's mirrors and quantized copies.
    pub equivalents: bool,
}

/// The active base as the verdicts need it.
pub struct BaseTarget<'a> {
    pub id: &'a str,
    pub config: &'a ModelConfig,
    pub weight_bytes: u64,
    /// Ids that name the same weights (mirrors, quantized copies, the original).
    pub equivalents: &'a [String],
}

/// The base's equivalence class on the Hub: itself, the model it is a quantized copy of, and
/// the quantized copies of those (by downloads), at most 12. A base unknown to the Hub is
/// its own class plus the copies that name it.
pub fn equivalent_bases(client: &HubClient, base_id: &str) -> Result<Vec<String>> {
    let mut class = vec![base_id.to_string()];
    // A base unknown to the Hub (a local model) may still have mirrors that name it.
    match client.model_info(base_id, None) {
        Ok(info) => {
            for parent in info.declared_bases() {
                let quantized = info
                    .tags
                    .iter()
                    .any(|t| t == &format!("base_model:quantized:{parent}"));
                let relation = info
                    .card_data
                    .as_ref()
                    .and_then(|c| c.get("base_model_relation"))
                    .and_then(|r| r.as_str());
                if quantized || relation == Some("quantized") {
                    class.push(parent);
                }
            }
        }
        Err(HubError::NotFound { .. }) | Err(HubError::Invalid { .. }) => {}
        Err(e) => return Err(e),
    }
    for member in class.clone() {
        let q = SearchQuery {
            filters: vec![format!("base_model:quantized:{member}")],
            sort: Sort::Downloads,
            limit: MAX_EQUIVALENTS,
            ..Default::default()
        };
        for m in client.list_all(&q, MAX_EQUIVALENTS)? {
            if !class.contains(&m.id) {
                class.push(m.id);
            }
        }
    }
    class.truncate(MAX_EQUIVALENTS);
    Ok(class)
}

/// Adapters on the Hub for the base (and, if asked, its equivalents), sorted, each judged
/// against `base`.
pub fn search_adapters(
    client: &HubClient,
    req: &SearchRequest,
    base: &BaseTarget<'_>,
) -> Result<Vec<AdapterHit>> {
    let members = if req.equivalents {
        base.equivalents.to_vec()
    } else {
        vec![req.base_id.clone()]
    };
    let limit = req.limit.clamp(1, 1000);
    let mut found: Vec<ModelInfo> = Vec::new();
    let mut seen = BTreeSet::new();
    for m in &members {
        let q = SearchQuery {
            search: req.query.clone(),
            filters: vec![format!("base_model:adapter:{m}")],
            sort: req.sort,
            limit,
            full: true,
            ..Default::default()
        };
        for info in client.list_all(&q, limit)? {
            if looks_like_lora(&info) && seen.insert(info.id.clone()) {
                found.push(info);
            }
        }
    }
    found.sort_by(|a, b| {
        let key = |m: &ModelInfo| match req.sort {
            Sort::Downloads => (m.downloads, String::new()),
            Sort::Likes => (m.likes, String::new()),
            Sort::Recent => (0, m.last_modified.clone().unwrap_or_default()),
        };
        key(b).cmp(&key(a)).then_with(|| a.id.cmp(&b.id))
    });
    found.truncate(limit);
    let hits: Vec<Mutex<Option<Result<AdapterHit>>>> =
        found.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..CHECK_WORKERS.min(found.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(info) = found.get(i) else { break };
                    let hit = judge_listing(client, info, base);
                    *hits[i].lock().expect("no panics while held") = Some(hit);
                }
            });
        }
    });
    hits.into_iter()
        .map(|h| {
            h.into_inner()
                .expect("no panics")
                .expect("every item judged")
        })
        .collect()
}

/// PEFT repositories, and anything tagged LoRA (so a diffusion LoRA is shown as refused
/// rather than silently missing).
fn looks_like_lora(m: &ModelInfo) -> bool {
    m.library_name.as_deref() == Some("peft")
        || m.tags.iter().any(|t| t == "peft" || t == "lora")
        || m.siblings
            .iter()
            .any(|s| s.rfilename.ends_with("adapter_config.json"))
}

/// Why a repository cannot be a language-model adapter, from the listing alone.
pub(crate) fn listing_refusal(m: &ModelInfo) -> Option<String> {
    let image_tasks = [
        "text-to-image",
        "image-to-image",
        "text-to-video",
        "image-to-video",
    ];
    let diffusion = m.library_name.as_deref() == Some("diffusers")
        || m.pipeline_tag
            .as_deref()
            .is_some_and(|p| image_tasks.contains(&p))
        || m.tags.iter().any(|t| {
            [
                "diffusers",
                "stable-diffusion",
                "stable-diffusion-xl",
                "flux",
                "text-to-image",
            ]
            .contains(&t.as_str())
        });
    if diffusion {
        return Some(format!(
            "diffusion LoRA ({}): an image-model adapter, not a language-model adapter",
            m.pipeline_tag.as_deref().unwrap_or("diffusers")
        ));
    }
    None
}

/// The folder of the adapter in a repository's file list: the root when it has
/// `adapter_config.json`, else the shallowest folder that has one.
pub(crate) fn adapter_folder(files: &[String]) -> Option<String> {
    files
        .iter()
        .filter_map(|f| f.strip_suffix("adapter_config.json"))
        .filter(|p| p.is_empty() || p.ends_with('/'))
        .map(|p| p.trim_end_matches('/').to_string())
        .min_by_key(|p| {
            (
                p.matches('/').count() + usize::from(!p.is_empty()),
                p.clone(),
            )
        })
}

/// The verdict and cost of the adapter in the repository `info` describes (from a listing
/// with files, or the info endpoint).
pub fn judge_listing(
    client: &HubClient,
    info: &ModelInfo,
    base: &BaseTarget<'_>,
) -> Result<AdapterHit> {
    let declared = info.declared_bases().into_iter().next();
    let mut hit = AdapterHit {
        repo: info.id.clone(),
        downloads: info.downloads,
        likes: info.likes,
        license: info.license(),
        last_modified: info.last_modified.clone(),
        gated: info.gated.clone(),
        size: info.total_size(),
        declared_base: declared.clone(),
        subfolder: None,
        verdict: Compat::Incompatible,
        compatible: false,
        reason: String::new(),
        cost: None,
        ranks: Vec::new(),
        target_modules: Vec::new(),
    };
    if let Some(why) = listing_refusal(info) {
        hit.reason = why;
        return Ok(hit);
    }
    let files: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let rev = info.sha.clone().unwrap_or_else(|| "main".into());
    let folder = match adapter_folder(&files) {
        Some(f) => f,
        None if !files.is_empty() => {
            hit.reason = missing_adapter_reason(&files);
            return Ok(hit);
        }
        // The listing carried no file list: assume the root and let the fetch decide.
        None => String::new(),
    };
    hit.subfolder = (!folder.is_empty()).then(|| folder.clone());
    match check_remote(client, &info.id, &rev, &folder, base, None) {
        Ok((summary, verdict)) => {
            hit.cost = Some(AdapterCost::of(summary.params, base.weight_bytes));
            // Listings rarely carry file sizes; the adapter's own files are what installs.
            hit.size = hit.size.or(Some(summary.bytes_on_disk));
            hit.ranks = summary.ranks;
            hit.target_modules = summary.modules;
            hit.declared_base = summary.config.base_model.or(hit.declared_base);
            hit.compatible = verdict.compat != Compat::Incompatible;
            hit.verdict = verdict.compat;
            hit.reason = verdict.reason;
        }
        Err(Refusal::Adapter(reason)) => {
            hit.reason = match &declared {
                Some(d) if !same_base(d, base) && !reason.starts_with("trained for") => {
                    format!("trained for {d}, active base is {}: {reason}", base.id)
                }
                _ => reason,
            };
        }
        Err(Refusal::Hub(HubError::Gated { .. })) => {
            hit.reason = "gated: a token with access is needed to check its files".into();
            hit.verdict = Compat::Warning;
            hit.compatible = true;
        }
        Err(Refusal::Hub(e)) => return Err(e),
    }
    Ok(hit)
}

pub(crate) fn missing_adapter_reason(files: &[String]) -> String {
    if files.iter().any(|f| f.ends_with(".gguf")) {
        "GGUF LoRA only: a PEFT adapter (adapter_config.json + adapter_model.safetensors) is needed"
            .into()
    } else {
        "no adapter_config.json: not a PEFT adapter".into()
    }
}

pub(crate) enum Refusal {
    /// The adapter does not fit (the message says why).
    Adapter(String),
    Hub(HubError),
}

impl From<HubError> for Refusal {
    fn from(e: HubError) -> Self {
        Refusal::Hub(e)
    }
}

fn same_base(declared: &str, base: &BaseTarget<'_>) -> bool {
    base.equivalents
        .iter()
        .chain(std::iter::once(&base.id.to_string()))
        .any(|e| e.eq_ignore_ascii_case(declared))
        || name_verdict(Some(declared), base.id).compat == Compat::Compatible
}

/// The verdict for the adapter in `folder` of `repo@rev` from its config and safetensors
/// header, fetched without downloading the weights.
pub(crate) fn check_remote(
    client: &HubClient,
    repo: &str,
    rev: &str,
    folder: &str,
    base: &BaseTarget<'_>,
    config: Option<&[u8]>,
) -> std::result::Result<(AdapterSummary, Verdict), Refusal> {
    let join = |f: &str| {
        if folder.is_empty() {
            f.to_string()
        } else {
            format!("{folder}/{f}")
        }
    };
    let cfg_file = join("adapter_config.json");
    let st_file = join("adapter_model.safetensors");
    let label = Path::new(repo).join(&cfg_file);
    let cfg_text = match config {
        Some(bytes) => bytes.to_vec(),
        None => client.get_small(repo, rev, &cfg_file, MAX_CONFIG_BYTES)?,
    };
    let cfg_text = String::from_utf8(cfg_text)
        .map_err(|_| Refusal::Adapter(format!("{}: not UTF-8 text", label.display())))?;
    let meta = match client.file_meta(repo, rev, &st_file) {
        Ok(m) => m,
        Err(HubError::NotFound { .. }) => {
            let bin = client
                .file_meta(repo, rev, &join("adapter_model.bin"))
                .is_ok();
            return Err(Refusal::Adapter(if bin {
                "only adapter_model.bin (pickle) is present; pickle weights are refused".into()
            } else {
                "adapter_model.safetensors is missing".into()
            }));
        }
        Err(e) => return Err(e.into()),
    };
    let st_label = Path::new(repo).join(&st_file);
    let what = st_label.display().to_string();
    let len_bytes = client.get_range(&meta.url, 0, 7, &what)?;
    let n = u64::from_le_bytes(
        len_bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                Refusal::Adapter(format!("{what}: shorter than a safetensors header"))
            })?,
    );
    if n == 0 || n > MAX_HEADER_BYTES || n + 8 > meta.size {
        return Err(Refusal::Adapter(format!(
            "{what}: header length {n} is not valid for a {}-byte file (limit {MAX_HEADER_BYTES})",
            meta.size
        )));
    }
    let header = client.get_range(&meta.url, 8, 8 + n - 1, &what)?;
    let shapes =
        adapter::header_shapes(&header, &st_label).map_err(|e| Refusal::Adapter(e.to_string()))?;
    let summary = adapter::inspect_header(
        &cfg_text,
        &shapes,
        &st_label,
        base.config,
        meta.size + cfg_text.len() as u64,
    )
    .map_err(|e| {
        // Say which base the adapter was made for when that explains the misfit.
        let declared = adapter::LoraConfig::parse(&cfg_text, &label)
            .ok()
            .and_then(|c| c.base_model)
            .filter(|d| !same_base(d, base));
        Refusal::Adapter(match declared {
            Some(d) => format!("trained for {d}, active base is {}: {e}", base.id),
            None => e.to_string(),
        })
    })?;
    let verdict = verdict_for(summary.config.base_model.as_deref(), base);
    Ok((summary, verdict))
}

/// Shapes fit: compatible when the adapter names the base (or an equivalent, or nothing),
/// else a warning.
pub fn verdict_for(declared: Option<&str>, base: &BaseTarget<'_>) -> Verdict {
    match declared {
        Some(d) if same_base(d, base) => Verdict {
            compat: Compat::Compatible,
            reason: String::new(),
            base: base.id.to_string(),
        },
        _ => name_verdict(declared, base.id),
    }
}

/// Shapes fit; the name decides between compatible and a warning. Names are compared without
/// the organisation and without format suffixes (`-GGUF`, `-Q4_K_M`, `-AWQ`, ...), so a
/// quantized copy counts as its original but an instruct model does not count as its base.
pub fn name_verdict(declared: Option<&str>, base: &str) -> Verdict {
    let norm = |s: &str| {
        let last = s.trim_end_matches('/').rsplit('/').next().unwrap_or(s);
        crate::model::strip_format_suffix(last).to_ascii_lowercase()
    };
    match declared.filter(|d| !d.trim().is_empty()) {
        Some(d) if norm(d) != norm(base) => Verdict {
            compat: Compat::Warning,
            reason: format!(
                "trained for {d}, active base is {base}; the shapes fit, quality may differ"
            ),
            base: base.to_string(),
        },
        _ => Verdict {
            compat: Compat::Compatible,
            reason: String::new(),
            base: base.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_folder_prefers_the_root_then_the_shallowest() {
        let f = |v: &[&str]| adapter_folder(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            f(&["README.md", "adapter_config.json"]).as_deref(),
            Some("")
        );
        assert_eq!(
            f(&[
                "a/b/adapter_config.json",
                "checkpoint-500/adapter_config.json"
            ])
            .as_deref(),
            Some("checkpoint-500")
        );
        assert_eq!(f(&["my_adapter_config.json"]), None);
        assert_eq!(f(&["x.gguf"]), None);
        assert_eq!(
            missing_adapter_reason(&["x.gguf".into()]),
            "GGUF LoRA only: a PEFT adapter (adapter_config.json + adapter_model.safetensors) is needed"
        );
    }

    #[test]
    fn cost_is_bytes_over_base_bytes() {
        let c = AdapterCost::of(1_000_000, 100_000_000);
        assert_eq!(c.memory_bytes, 4_000_000);
        assert!((c.decode_slowdown - 0.04).abs() < 1e-12);
    }
}
