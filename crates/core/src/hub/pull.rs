//! Pulling base models (one GGUF file, or a safetensors model with its config and tokenizer,
//! sharded or not) and sentence encoders into the shared Hub cache.

use std::path::PathBuf;

use serde::Serialize;
use ts_rs::TS;

use super::cache::{HubCache, is_commit};
use super::client::HubClient;
use super::compat::MAX_CONFIG_BYTES;
use super::{HubError, Progress, check_repo_path};

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
#[derive(Debug, Clone, Serialize, TS)]
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
