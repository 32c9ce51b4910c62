//! Installing and updating adapters from the Hub, and pulling base models and embedders.
//! Install = check the remote files against the active base (refusing before the weights are
//! fetched) → download into the Hub cache → validate the downloaded files with the engine's
//! rules → collect sample inputs (a samples file, else the card's example prompts, else
//! probes) → embed → catalog + index through [`Library::install`], all or nothing.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::cache::{HubCache, is_commit};
use super::card::{MAX_CARD_BYTES, ModelCard, card_samples};
use super::client::{HubClient, ModelInfo};
use super::compat::{self, BaseTarget, MAX_CONFIG_BYTES, Refusal};
use super::{HubError, Progress, ProgressEvent, Stage, check_repo_path, parse_repo_ref};
use crate::adapter;
use crate::catalog::{AdapterRecord, AdapterSource, NewAdapter, Sample, SampleOrigin};
use crate::library::{self, Library, LibraryError, MAX_SAMPLES_FILE_BYTES};
use crate::retrieve;

type Result<T, E = LibraryError> = std::result::Result<T, E>;

/// `ramole adapter install <repo>[@<revision>] [--subfolder <path>]`.
#[derive(Debug, Clone)]
pub struct InstallRequest {
    pub repo: String,
    pub revision: String,
    pub subfolder: Option<String>,
    pub name: Option<String>,
    /// Largest weights file accepted.
    pub max_bytes: u64,
}

impl InstallRequest {
    /// From `repo[@revision]`.
    pub fn parse(spec: &str) -> Result<Self> {
        let (repo, revision) = parse_repo_ref(spec)?;
        Ok(Self {
            repo,
            revision,
            subfolder: None,
            name: None,
            max_bytes: super::DEFAULT_MAX_FILE_BYTES,
        })
    }
}

/// An adapter's files in the Hub cache.
struct FetchedAdapter {
    /// The snapshot folder holding `adapter_config.json` and the weights.
    dir: PathBuf,
    commit: String,
    folder: Option<String>,
    card: Option<ModelCard>,
    samples_file: Option<PathBuf>,
    license: Option<String>,
}

fn in_folder(folder: &str, file: &str) -> String {
    if folder.is_empty() {
        file.to_string()
    } else {
        format!("{folder}/{file}")
    }
}

/// Checks the adapter at `repo@rev` against the active base from its config and header, then
/// downloads its files (pinned to one commit) into the cache. `info` is the repository's info
/// at that revision when the caller already has it.
fn fetch_adapter(
    lib: &Library,
    client: &HubClient,
    cache: &HubCache,
    req: &InstallRequest,
    info: Option<ModelInfo>,
    progress: &dyn Progress,
) -> Result<FetchedAdapter> {
    if let Some(s) = &req.subfolder {
        check_repo_path(s)?;
    }
    if client.offline() {
        return cached_adapter(cache, req);
    }
    let info = match info {
        Some(i) => i,
        None => client.model_info(&req.repo, Some(&req.revision))?,
    };
    let commit = info
        .sha
        .clone()
        .filter(|c| is_commit(c))
        .ok_or_else(|| HubError::Invalid {
            what: format!("model {}", req.repo),
            message: "the Hub's info carries no commit id".into(),
        })?;
    if let Some(why) = compat::listing_refusal(&info) {
        return Err(LibraryError::Invalid(format!("{}: {why}", req.repo)));
    }
    let files: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    for f in &files {
        check_repo_path(f)?;
    }
    let folder = match &req.subfolder {
        Some(s) => {
            let s = s.trim_matches('/').to_string();
            if !files.contains(&in_folder(&s, "adapter_config.json")) {
                return Err(LibraryError::Invalid(format!(
                    "{}@{}: no adapter_config.json in the folder {s:?}",
                    req.repo, req.revision
                )));
            }
            s
        }
        None => compat::adapter_folder(&files).ok_or_else(|| {
            LibraryError::Invalid(format!(
                "{}: {}",
                req.repo,
                compat::missing_adapter_reason(&files)
            ))
        })?,
    };
    let fetch = |file: &str, max: u64| cache.fetch(client, &req.repo, &commit, file, max, progress);
    let config = fetch(&in_folder(&folder, "adapter_config.json"), MAX_CONFIG_BYTES)?;
    let config = std::fs::read(&config.path).map_err(|source| LibraryError::Io {
        path: config.path.clone(),
        source,
    })?;
    let equivalents = [lib.settings().base_id.clone()];
    let target = BaseTarget::active(lib, &equivalents);
    // Refuse before the weights are fetched: tags can be wrong, shapes cannot.
    match compat::check_remote(client, &req.repo, &commit, &folder, &target, Some(&config)) {
        Ok(_) => {}
        Err(Refusal::Adapter(why)) => {
            return Err(LibraryError::Invalid(format!(
                "{}: incompatible with the active base {}: {why}",
                req.repo, target.id
            )));
        }
        Err(Refusal::Hub(e)) => return Err(e.into()),
    }
    let weights = fetch(
        &in_folder(&folder, "adapter_model.safetensors"),
        req.max_bytes,
    )?;
    // Optional files: the nearest card and samples file (the folder's, else the root's).
    let nearest = |name: &str| -> Option<String> {
        [in_folder(&folder, name), name.to_string()]
            .into_iter()
            .find(|f| files.contains(f))
    };
    let card = match nearest("README.md") {
        Some(f) => {
            let got = fetch(&f, MAX_CARD_BYTES)?;
            read_card(&got.path)?
        }
        None => None,
    };
    let samples_file = match nearest("samples.jsonl") {
        Some(f) => Some(fetch(&f, MAX_SAMPLES_FILE_BYTES)?.path),
        None => None,
    };
    if !is_commit(&req.revision) {
        cache.set_ref(&req.repo, &req.revision, &commit)?;
    }
    let dir = weights
        .path
        .parent()
        .expect("a snapshot file has a folder")
        .to_path_buf();
    let license = card
        .as_ref()
        .and_then(ModelCard::license)
        .or(info.license());
    Ok(FetchedAdapter {
        dir,
        commit,
        folder: (!folder.is_empty()).then_some(folder),
        card,
        samples_file,
        license,
    })
}

/// The adapter as a previous download left it in the cache (offline mode).
fn cached_adapter(cache: &HubCache, req: &InstallRequest) -> Result<FetchedAdapter> {
    let offline = || HubError::Offline {
        what: format!("{}@{}", req.repo, req.revision),
    };
    let commit = cache
        .commit_of(&req.repo, &req.revision)
        .ok_or_else(offline)?;
    let snap = cache.snapshot_dir(&req.repo, &commit);
    let folder = req
        .subfolder
        .clone()
        .map(|s| s.trim_matches('/').to_string())
        .unwrap_or_default();
    let dir = if folder.is_empty() {
        snap.clone()
    } else {
        snap.join(&folder)
    };
    if !dir.join("adapter_model.safetensors").exists() {
        return Err(offline().into());
    }
    let nearest = |name: &str| {
        [dir.join(name), snap.join(name)]
            .into_iter()
            .find(|p| p.is_file())
    };
    let card = match nearest("README.md") {
        Some(p) => read_card(&p)?,
        None => None,
    };
    let license = card.as_ref().and_then(ModelCard::license);
    let samples_file = nearest("samples.jsonl");
    Ok(FetchedAdapter {
        dir,
        commit,
        folder: (!folder.is_empty()).then_some(folder),
        samples_file,
        card,
        license,
    })
}

/// A card that cannot be parsed is treated as no card (the adapter is still usable), but a
/// card that cannot be read is an error.
fn read_card(path: &Path) -> Result<Option<ModelCard>> {
    let bytes = std::fs::read(path).map_err(|source| LibraryError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(ModelCard::parse(&String::from_utf8_lossy(&bytes)).ok())
}

/// Samples of a fetched adapter, each with its origin: the repository's samples file, else the
/// card's example prompts, else probes from its description and tags.
fn collect_samples(f: &FetchedAdapter, repo: &str) -> Result<Vec<Sample>> {
    match &f.samples_file {
        Some(p) => library::read_samples(p, SampleOrigin::Samples),
        None => Ok(card_samples(f.card.as_ref(), repo)),
    }
}

fn describe(
    lib: &Library,
    id: String,
    req: &InstallRequest,
    f: &FetchedAdapter,
    summary: &adapter::AdapterSummary,
) -> NewAdapter {
    let declared = summary.config.base_model.clone().or_else(|| {
        f.card
            .as_ref()
            .and_then(|c| c.base_models().into_iter().next())
    });
    let equivalents = [lib.settings().base_id.clone()];
    let target = BaseTarget::active(lib, &equivalents);
    NewAdapter {
        id,
        name: req
            .name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| {
                let repo_name = req.repo.rsplit('/').next().unwrap_or(&req.repo);
                match &f.folder {
                    Some(folder) => format!("{repo_name}/{folder}"),
                    None => repo_name.to_string(),
                }
            }),
        source: AdapterSource::Hub {
            repo: req.repo.clone(),
            revision: req.revision.clone(),
            commit: Some(f.commit.clone()),
            subfolder: f.folder.clone(),
        },
        verdict: compat::verdict_for(declared.as_deref(), &target),
        base_model: declared,
        architecture: lib.base().config.arch.name().to_string(),
        ranks: summary.ranks.clone(),
        alpha: summary.config.lora_alpha,
        target_modules: summary.modules.clone(),
        size_bytes: summary.bytes_on_disk,
        license: f.license.clone(),
        card_summary: f.card.as_ref().and_then(ModelCard::description),
    }
}

/// Installs the adapter `req` names: it is retrievable when this returns.
pub fn install_adapter(
    lib: &mut Library,
    client: &HubClient,
    cache: &HubCache,
    req: &InstallRequest,
    progress: &dyn Progress,
) -> Result<AdapterRecord> {
    let wanted = req.subfolder.as_deref().map(|s| s.trim_matches('/'));
    for rec in lib.catalog().adapters()? {
        if let AdapterSource::Hub {
            repo, subfolder, ..
        } = &rec.source
            && repo.eq_ignore_ascii_case(&req.repo)
            && (wanted.is_none() || subfolder.as_deref() == wanted)
        {
            return Err(LibraryError::Invalid(format!(
                "{} is already installed as {}; `ramole adapter update {}` fetches a newer commit",
                req.repo, rec.id, rec.id
            )));
        }
    }
    let f = fetch_adapter(lib, client, cache, req, None, progress)?;
    let step = |stage| {
        progress.report(&ProgressEvent {
            stage,
            file: String::new(),
            done: 0,
            total: 0,
        })
    };
    step(Stage::Validate);
    let summary = adapter::inspect(&f.dir, &lib.base().config)?;
    let samples = collect_samples(&f, &req.repo)?;
    step(Stage::Embed);
    let texts: Vec<&str> = samples.iter().map(|s| s.text.as_str()).collect();
    let embedding = retrieve::profile(lib.embedder()?, &texts)?;
    if progress.cancelled() {
        return Err(HubError::Cancelled.into());
    }
    let base_name = match &f.folder {
        Some(folder) => folder.rsplit('/').next().unwrap_or(folder).to_string(),
        None => req.repo.rsplit('/').next().unwrap_or(&req.repo).to_string(),
    };
    let id = lib
        .catalog()
        .free_adapter_id(req.name.as_deref().unwrap_or(&base_name))?;
    let new = describe(lib, id, req, &f, &summary);
    step(Stage::Commit);
    lib.install(&f.dir, &new, &samples, &embedding)
}

/// What `ramole adapter update` found or did.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum UpdateOutcome {
    UpToDate {
        id: String,
        commit: String,
    },
    /// A newer commit exists (from [`check_update`]; nothing was changed).
    Available {
        id: String,
        from: Option<String>,
        to: String,
    },
    Updated {
        id: String,
        from: Option<String>,
        to: String,
        record: Box<AdapterRecord>,
    },
}

/// Where a Hub adapter came from: `(repo, revision, installed commit, subfolder)`.
type HubOrigin = (String, String, Option<String>, Option<String>);

/// The adapter's record and origin; a local adapter has nothing to update from.
fn hub_origin(lib: &Library, id: &str) -> Result<(AdapterRecord, HubOrigin)> {
    let rec = lib.catalog().require_adapter(id)?;
    match rec.source.clone() {
        AdapterSource::Hub {
            repo,
            revision,
            commit,
            subfolder,
        } => Ok((rec, (repo, revision, commit, subfolder))),
        AdapterSource::Local { .. } => Err(LibraryError::Invalid(format!(
            "{id} was added from a local folder: there is no Hub repository to update from"
        ))),
    }
}

/// The repository's info at the newest commit of `revision`.
fn newest(client: &HubClient, repo: &str, revision: &str) -> Result<ModelInfo> {
    if client.offline() {
        return Err(HubError::Offline {
            what: format!("the newest commit of {repo}@{revision}"),
        }
        .into());
    }
    Ok(client.model_info(repo, Some(revision))?)
}

/// The newest commit of a Hub adapter's revision, and whether it differs from the installed
/// one: `UpToDate` or `Available`. Nothing changes.
pub fn check_update(lib: &Library, client: &HubClient, id: &str) -> Result<UpdateOutcome> {
    let (_, (repo, revision, commit, _)) = hub_origin(lib, id)?;
    let latest = newest(client, &repo, &revision)?.sha.unwrap_or_default();
    Ok(if commit.as_deref() == Some(latest.as_str()) {
        UpdateOutcome::UpToDate {
            id: id.to_string(),
            commit: latest,
        }
    } else {
        UpdateOutcome::Available {
            id: id.to_string(),
            from: commit,
            to: latest,
        }
    })
}

/// Updates a Hub adapter to the newest commit of its revision: the new files are checked,
/// downloaded and validated before anything installed changes, then files and catalog row
/// are swapped (a crash leaves the old or the new adapter). Samples the user edited are kept;
/// the others are collected again from the new commit.
pub fn update_adapter(
    lib: &mut Library,
    client: &HubClient,
    cache: &HubCache,
    id: &str,
    progress: &dyn Progress,
) -> Result<UpdateOutcome> {
    let (rec, (repo, revision, commit, subfolder)) = hub_origin(lib, id)?;
    let info = newest(client, &repo, &revision)?;
    let latest = info.sha.clone().unwrap_or_default();
    if commit.as_deref() == Some(latest.as_str()) {
        return Ok(UpdateOutcome::UpToDate {
            id: rec.id,
            commit: latest,
        });
    }
    let req = InstallRequest {
        repo: repo.clone(),
        revision,
        subfolder,
        name: Some(rec.name.clone()),
        max_bytes: super::DEFAULT_MAX_FILE_BYTES,
    };
    let f = fetch_adapter(lib, client, cache, &req, Some(info), progress)?;
    let summary = adapter::inspect(&f.dir, &lib.base().config)?;
    let old_samples = lib.catalog().samples(rec.key)?;
    let user_edited =
        !old_samples.is_empty() && old_samples.iter().all(|s| s.origin == SampleOrigin::User);
    let samples = if user_edited {
        None
    } else {
        let samples = collect_samples(&f, &repo)?;
        let texts: Vec<&str> = samples.iter().map(|s| s.text.as_str()).collect();
        let embedding = retrieve::profile(lib.embedder()?, &texts)?;
        Some((samples, embedding))
    };
    let new = describe(lib, rec.id.clone(), &req, &f, &summary);
    let record = lib.replace_files(
        &f.dir,
        &new,
        samples.as_ref().map(|(s, e)| (s.as_slice(), e)),
    )?;
    Ok(UpdateOutcome::Updated {
        id: rec.id,
        from: commit,
        to: f.commit,
        record: Box::new(record),
    })
}

/// `ramole model pull <repo>[@rev] [--file <name.gguf>]`.
#[derive(Debug, Clone)]
pub struct PullRequest {
    pub repo: String,
    pub revision: String,
    /// A GGUF file of the repository; `None` pulls the safetensors model (or embedder).
    pub file: Option<String>,
    pub max_bytes: u64,
}

/// A model in the cache.
#[derive(Debug, Clone, Serialize)]
pub struct Pulled {
    pub repo: String,
    pub commit: String,
    /// The GGUF file, or the snapshot folder of a safetensors model.
    pub path: PathBuf,
    pub files: Vec<String>,
    pub bytes: u64,
}

/// Files a safetensors model or sentence encoder needs besides its weights (those present are
/// fetched).
const MODEL_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
];

/// Downloads a base model (one GGUF file, or a safetensors model with its config and
/// tokenizer, sharded or not) or an embedder into the cache.
pub fn pull_model(
    client: &HubClient,
    cache: &HubCache,
    req: &PullRequest,
    progress: &dyn Progress,
) -> std::result::Result<Pulled, HubError> {
    let invalid = |message: String| HubError::Invalid {
        what: format!("{}@{}", req.repo, req.revision),
        message,
    };
    if client.offline() {
        let commit =
            cache
                .commit_of(&req.repo, &req.revision)
                .ok_or_else(|| HubError::Offline {
                    what: format!("{}@{}", req.repo, req.revision),
                })?;
        let snap = cache.snapshot_dir(&req.repo, &commit);
        let path = match &req.file {
            Some(f) => snap.join(f),
            None => snap.clone(),
        };
        let probe = if req.file.is_some() {
            path.clone()
        } else {
            snap.join("config.json")
        };
        if !probe.exists() {
            return Err(HubError::Offline {
                what: probe.display().to_string(),
            });
        }
        return Ok(Pulled {
            repo: req.repo.clone(),
            commit,
            path,
            files: Vec::new(),
            bytes: 0,
        });
    }
    let info = client.model_info(&req.repo, Some(&req.revision))?;
    let commit = info
        .sha
        .clone()
        .filter(|c| is_commit(c))
        .ok_or_else(|| invalid("the Hub's info carries no commit id".into()))?;
    let files: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let ggufs: Vec<&String> = files.iter().filter(|f| f.ends_with(".gguf")).collect();
    let mut wanted: Vec<String> = Vec::new();
    match &req.file {
        Some(f) => {
            check_repo_path(f)?;
            if !f.ends_with(".gguf") {
                return Err(invalid(format!(
                    "--file {f}: only .gguf files are pulled alone"
                )));
            }
            if !files.contains(f) {
                return Err(HubError::NotFound {
                    what: format!("{f} in {}@{}", req.repo, req.revision),
                    url: client.endpoint().to_string(),
                });
            }
            wanted.push(f.clone());
        }
        None => {
            if !files.iter().any(|f| f == "config.json") {
                return Err(invalid(if ggufs.is_empty() {
                    "no config.json: not a transformers model".into()
                } else {
                    format!(
                        "a GGUF repository: choose a file with --file ({})",
                        ggufs
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }));
            }
            wanted.extend(
                MODEL_FILES
                    .iter()
                    .filter(|f| files.iter().any(|x| x == *f))
                    .map(|f| f.to_string()),
            );
            if files.iter().any(|f| f == "model.safetensors") {
                wanted.push("model.safetensors".into());
            } else if files.iter().any(|f| f == "model.safetensors.index.json") {
                let idx = cache.fetch(
                    client,
                    &req.repo,
                    &commit,
                    "model.safetensors.index.json",
                    MAX_CONFIG_BYTES * 16,
                    progress,
                )?;
                let text = std::fs::read_to_string(&idx.path).map_err(|source| HubError::Io {
                    path: idx.path.clone(),
                    source,
                })?;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| invalid(format!("model.safetensors.index.json: {e}")))?;
                let mut shards: Vec<String> = v
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .ok_or_else(|| {
                        invalid("model.safetensors.index.json has no weight_map".into())
                    })?
                    .values()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect();
                shards.sort();
                shards.dedup();
                for s in &shards {
                    check_repo_path(s)?;
                }
                wanted.push("model.safetensors.index.json".into());
                wanted.extend(shards);
            } else if files.iter().any(|f| f.ends_with(".bin")) {
                return Err(invalid(
                    "only pickle weights (*.bin): refused; a safetensors or GGUF copy is needed"
                        .into(),
                ));
            } else {
                return Err(invalid("no model.safetensors in the repository".into()));
            }
        }
    }
    let mut bytes = 0;
    let mut last = None;
    for f in &wanted {
        let got = cache.fetch(client, &req.repo, &commit, f, req.max_bytes, progress)?;
        bytes += got.size;
        last = Some(got.path);
    }
    if !is_commit(&req.revision) {
        cache.set_ref(&req.repo, &req.revision, &commit)?;
    }
    let path = match &req.file {
        Some(_) => last.expect("one file fetched"),
        None => cache.snapshot_dir(&req.repo, &commit),
    };
    Ok(Pulled {
        repo: req.repo.clone(),
        commit,
        path,
        files: wanted,
        bytes,
    })
}
