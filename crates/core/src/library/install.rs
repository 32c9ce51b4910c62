//! Installing and updating adapters from the Hub: a library use-case. Install = the Hub module
//! checks the remote files against the active base (refusing before the weights are fetched) and
//! downloads them into the Hub cache → validate the downloaded files with the engine's rules →
//! collect sample inputs (a samples file, else the card's example prompts, else probes) → embed →
//! catalog + index through [`Library::install`], all or nothing.

use serde::Serialize;
use ts_rs::TS;

use super::{Library, LibraryError};
use crate::adapter;
use crate::catalog::{AdapterRecord, AdapterSource, NewAdapter, Sample, SampleOrigin};
use crate::hub::{
    self, AdapterRef, FetchedAdapter, HubCache, HubClient, HubError, ModelCard, ModelInfo,
    Progress, ProgressEvent, Stage, card_samples,
};
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
        let (repo, revision) = hub::parse_repo_ref(spec)?;
        Ok(Self {
            repo,
            revision,
            subfolder: None,
            name: None,
            max_bytes: hub::DEFAULT_MAX_FILE_BYTES,
        })
    }

    /// From a form's fields (the desktop's Install): blank revision and folder mean none.
    pub fn from_fields(
        repo: &str,
        revision: Option<&str>,
        subfolder: Option<&str>,
    ) -> Result<Self> {
        let spec = match revision.map(str::trim).filter(|r| !r.is_empty()) {
            Some(rev) => format!("{}@{rev}", repo.trim()),
            None => repo.trim().to_string(),
        };
        let mut req = Self::parse(&spec)?;
        req.subfolder = subfolder
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        Ok(req)
    }

    fn adapter_ref(&self) -> AdapterRef {
        AdapterRef {
            repo: self.repo.clone(),
            revision: self.revision.clone(),
            subfolder: self.subfolder.clone(),
            max_bytes: self.max_bytes,
        }
    }
}

/// The id under which the Hub adapter `repo` (in `subfolder`) is installed, if it is: repository
/// names compare without case, as the Hub's do.
pub fn installed_as(
    records: &[AdapterRecord],
    repo: &str,
    subfolder: Option<&str>,
) -> Option<String> {
    records.iter().find_map(|r| match &r.source {
        AdapterSource::Hub {
            repo: installed,
            subfolder: folder,
            ..
        } if installed.eq_ignore_ascii_case(repo) && folder.as_deref() == subfolder => {
            Some(r.id.clone())
        }
        _ => None,
    })
}

/// Samples of a fetched adapter, each with its origin: the repository's samples file, else the
/// card's example prompts, else probes from its description and tags.
fn collect_samples(f: &FetchedAdapter, repo: &str) -> Result<Vec<Sample>> {
    match &f.samples_file {
        Some(p) => super::read_samples(p, SampleOrigin::Samples),
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
    let target = lib.base_target(&equivalents);
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
        verdict: hub::verdict_for(declared.as_deref(), &target),
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
    let equivalents = [lib.settings().base_id.clone()];
    let target = lib.base_target(&equivalents);
    let f = hub::fetch_adapter(client, cache, &req.adapter_ref(), &target, None, progress)?;
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
#[derive(Debug, Clone, Serialize, TS)]
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
        max_bytes: hub::DEFAULT_MAX_FILE_BYTES,
    };
    let equivalents = [lib.settings().base_id.clone()];
    let target = lib.base_target(&equivalents);
    let f = hub::fetch_adapter(
        client,
        cache,
        &req.adapter_ref(),
        &target,
        Some(info),
        progress,
    )?;
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
