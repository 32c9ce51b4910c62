//! Fetching an adapter's files from the Hub into the shared cache, judged against the active
//! base before the weights are downloaded (its config and safetensors header are read with range
//! requests; tags can be wrong, shapes cannot), and from the cache alone when offline.

use std::path::{Path, PathBuf};

use super::cache::{HubCache, is_commit};
use super::card::{MAX_CARD_BYTES, ModelCard};
use super::client::{HubClient, ModelInfo};
use super::compat::{self, BaseTarget, MAX_CONFIG_BYTES, Refusal};
use super::{HubError, Progress, Result, check_repo_path};

/// Largest samples file fetched with an adapter.
pub const MAX_SAMPLES_FILE_BYTES: u64 = 16 << 20;

/// An adapter on the Hub: `repo@revision`, optionally in a folder of the repository.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterRef {
    pub repo: String,
    pub revision: String,
    pub subfolder: Option<String>,
    /// Largest weights file accepted.
    pub max_bytes: u64,
}

/// An adapter's files in the Hub cache.
pub struct FetchedAdapter {
    /// The snapshot folder holding `adapter_config.json` and the weights.
    pub dir: PathBuf,
    pub commit: String,
    /// The adapter's folder inside the repository (`None`: the root).
    pub folder: Option<String>,
    pub card: Option<ModelCard>,
    pub samples_file: Option<PathBuf>,
    pub license: Option<String>,
}

fn in_folder(folder: &str, file: &str) -> String {
    if folder.is_empty() {
        file.to_string()
    } else {
        format!("{folder}/{file}")
    }
}

/// Checks the adapter `req` names against `target` (the active base) from its config and
/// header, then downloads its files (pinned to one commit) into the cache. `info` is the
/// repository's info at that revision when the caller already has it.
pub fn fetch_adapter(
    client: &HubClient,
    cache: &HubCache,
    req: &AdapterRef,
    target: &BaseTarget<'_>,
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
    let refused = |message: String| HubError::Invalid {
        what: req.repo.clone(),
        message,
    };
    if let Some(why) = compat::listing_refusal(&info) {
        return Err(refused(why.to_string()));
    }
    let files: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    for f in &files {
        check_repo_path(f)?;
    }
    let folder = match &req.subfolder {
        Some(s) => {
            let s = s.trim_matches('/').to_string();
            if !files.contains(&in_folder(&s, "adapter_config.json")) {
                return Err(HubError::Invalid {
                    what: format!("{}@{}", req.repo, req.revision),
                    message: format!("no adapter_config.json in the folder {s:?}"),
                });
            }
            s
        }
        None => compat::adapter_folder(&files)
            .ok_or_else(|| refused(compat::missing_adapter_reason(&files)))?,
    };
    let fetch = |file: &str, max: u64| cache.fetch(client, &req.repo, &commit, file, max, progress);
    let config = fetch(&in_folder(&folder, "adapter_config.json"), MAX_CONFIG_BYTES)?;
    let config = std::fs::read(&config.path).map_err(|source| HubError::Io {
        path: config.path.clone(),
        source,
    })?;
    // Refuse before the weights are fetched: tags can be wrong, shapes cannot.
    match compat::check_remote(client, &req.repo, &commit, &folder, target, Some(&config)) {
        Ok(_) => {}
        Err(Refusal::Adapter(why)) => {
            return Err(refused(format!(
                "incompatible with the active base {}: {why}",
                target.id
            )));
        }
        Err(Refusal::Hub(e)) => return Err(e),
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
fn cached_adapter(cache: &HubCache, req: &AdapterRef) -> Result<FetchedAdapter> {
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
        return Err(offline());
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
    let bytes = std::fs::read(path).map_err(|source| HubError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(ModelCard::parse(&String::from_utf8_lossy(&bytes)).ok())
}
