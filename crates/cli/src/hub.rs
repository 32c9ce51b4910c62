//! `ramole hub search | info`, `ramole adapter install | update`, `ramole model pull`: the Hub
//! over the library in `$RAMOLE_HOME`, with a progress bar on a terminal.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use ramole_core::config::{self, Settings};
use ramole_core::hub::{self, ModelCard, PullRequest, SearchRequest, Sort};
use ramole_core::library::{self, InstallRequest, UpdateOutcome};
use serde_json::json;

use crate::common::{TerminalProgress, adapter_json, client_for, open};

#[derive(Subcommand)]
pub(crate) enum HubCommand {
    /// Adapters on the Hub for a base model, each with a compatibility verdict and its cost.
    Search {
        /// The base model's Hub id (default: the active base).
        #[arg(long)]
        base: Option<String>,
        /// Free text matched against repository names.
        #[arg(long)]
        query: Option<String>,
        /// downloads | likes | recent.
        #[arg(long, default_value = "downloads")]
        sort: String,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Only adapters tagged with this exact base (not its mirrors and quantized copies).
        #[arg(long)]
        exact: bool,
        #[arg(long)]
        json: bool,
    },
    /// A repository: its info, files and card (and, for an adapter, the verdict).
    Info {
        /// `org/name[@revision]`.
        repo: String,
        #[arg(long)]
        json: bool,
    },
    /// The Hub endpoint, cache and offline mode in effect; the options store overrides of the
    /// environment (HF_ENDPOINT, HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE) in settings.json.
    Config {
        #[arg(long)]
        endpoint: Option<String>,
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        #[arg(long)]
        offline: Option<bool>,
        /// Drop the stored overrides: the environment decides again.
        #[arg(long)]
        reset: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum ModelCommand {
    /// Download a base model (safetensors, or one GGUF file with --file) or an embedder into
    /// the Hub cache.
    Pull {
        /// `org/name[@revision]`.
        repo: String,
        /// A .gguf file of the repository.
        #[arg(long)]
        file: Option<String>,
        /// Make it the active `base` or `embedder` (adapters are re-checked for a new base).
        #[arg(long = "use", value_parser = ["base", "embedder"])]
        use_as: Option<String>,
        /// Refuse files larger than this many bytes.
        #[arg(long, default_value_t = 64 << 30)]
        max_bytes: u64,
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run_hub(cmd: HubCommand) -> Result<()> {
    match cmd {
        HubCommand::Search {
            base,
            query,
            sort,
            limit,
            exact,
            json,
        } => {
            let lib = open()?;
            let (client, _) = client_for(Some(lib.settings()));
            let base_id = base.unwrap_or_else(|| lib.settings().base_id.clone());
            let sort: Sort = sort.parse().map_err(anyhow::Error::msg)?;
            if limit == 0 || limit > 1000 {
                bail!("--limit {limit} must be within 1..=1000");
            }
            let equivalents = if exact {
                vec![base_id.clone()]
            } else {
                hub::equivalent_bases(&client, &base_id)?
            };
            let target = hub::BaseTarget {
                id: &base_id,
                ..lib.base_target(&equivalents)
            };
            let req = SearchRequest {
                base_id: base_id.clone(),
                query,
                sort,
                limit,
                equivalents: !exact,
            };
            let hits = hub::search_adapters(&client, &req, &target)?;
            if json {
                println!("{}", serde_json::to_string(&hits)?);
                return Ok(());
            }
            if hits.is_empty() {
                println!("no adapters found for {base_id}");
            }
            for h in &hits {
                let cost = h
                    .cost
                    .map(|c| {
                        format!(
                            "{:.1} MB, +{:.1}% decode",
                            c.memory_bytes as f64 / 1e6,
                            c.decode_slowdown * 100.0
                        )
                    })
                    .unwrap_or_default();
                println!(
                    "{:<48} {:>8} dl {:>5} likes  {:<12} {:<12} {cost}",
                    h.repo,
                    h.downloads,
                    h.likes,
                    h.license.as_deref().unwrap_or("-"),
                    h.verdict.as_str()
                );
                if !h.reason.is_empty() {
                    println!("    {}", h.reason);
                }
            }
        }
        HubCommand::Config {
            endpoint,
            cache_dir,
            offline,
            reset,
            json,
        } => {
            let dir = config::data_dir();
            let mut s = Settings::load(&dir)?;
            if reset {
                s.hub = config::HubOverrides::default();
            }
            if let Some(e) = endpoint {
                if !(e.starts_with("https://") || e.starts_with("http://")) {
                    bail!("--endpoint {e:?} must be an http(s) URL");
                }
                s.hub.endpoint = Some(e);
            }
            if let Some(c) = cache_dir {
                s.hub.cache_dir = Some(std::path::absolute(&c)?);
            }
            if let Some(o) = offline {
                s.hub.offline = Some(o);
            }
            s.save(&dir)?;
            let c = config::hub_config(&s.hub);
            if json {
                println!(
                    "{}",
                    json!({"endpoint": c.endpoint, "cache_dir": c.cache_dir,
                           "offline": c.offline, "token": c.token.is_some(),
                           "overrides": s.hub})
                );
            } else {
                println!("endpoint  {}", c.endpoint);
                println!("cache     {}", c.cache_dir.display());
                println!("offline   {}", c.offline);
                println!(
                    "token     {}",
                    if c.token.is_some() { "set" } else { "not set" }
                );
            }
        }
        HubCommand::Info { repo, json } => {
            let lib = open().ok();
            let settings = Settings::load(&config::data_dir()).ok();
            let (client, _) = client_for(settings.as_ref());
            let (repo, rev) = hub::parse_repo_ref(&repo)?;
            let info = client.model_info(&repo, Some(&rev))?;
            // For an adapter, its verdict against the active base.
            let adapter = match &lib {
                Some(lib)
                    if info
                        .siblings
                        .iter()
                        .any(|s| s.rfilename.ends_with("adapter_config.json")) =>
                {
                    let ids = [lib.settings().base_id.clone()];
                    let target = lib.base_target(&ids);
                    Some(hub::judge_listing(&client, &info, &target)?)
                }
                _ => None,
            };
            let tree = client.tree(&repo, &rev, None, true)?;
            // A card that does not parse is reported, not fatal: the repository is still there.
            let (card, card_error) = if info.siblings.iter().any(|s| s.rfilename == "README.md") {
                let bytes = client.get_small(&repo, &rev, "README.md", hub::MAX_CARD_BYTES)?;
                match ModelCard::parse(&String::from_utf8_lossy(&bytes)) {
                    Ok(c) => (Some(c), None),
                    Err(e) => (None, Some(format!("README.md: {e}"))),
                }
            } else {
                (None, None)
            };
            let v = json!({
                "repo": info.id, "commit": info.sha, "downloads": info.downloads,
                "likes": info.likes, "license": card.as_ref().and_then(ModelCard::license).or(info.license()),
                "gated": info.gated, "last_modified": info.last_modified,
                "library_name": info.library_name, "pipeline_tag": info.pipeline_tag,
                "tags": info.tags, "size": info.total_size(),
                "files": tree.iter().filter(|e| e.kind == "file").map(|e| json!({
                    "path": e.path, "size": e.size, "lfs": e.lfs.is_some()})).collect::<Vec<_>>(),
                "card": card.as_ref().map(|c| json!({
                    "meta": c.meta, "description": c.description(),
                    "base_model": c.base_models(), "datasets": c.datasets(), "tags": c.tags(),
                    "example_prompts": c.example_prompts()})),
                "card_error": card_error,
                "adapter": adapter,
            });
            if json {
                println!("{v}");
            } else {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
    }
    Ok(())
}

/// `ramole adapter install <org/name[@revision]>`.
#[derive(Args)]
pub(crate) struct InstallArgs {
    repo: String,
    /// The folder of the adapter inside the repository (default: found from the files).
    #[arg(long)]
    subfolder: Option<String>,
    #[arg(long)]
    name: Option<String>,
    /// Refuse weights larger than this many bytes.
    #[arg(long, default_value_t = ramole_core::hub::DEFAULT_MAX_FILE_BYTES)]
    max_bytes: u64,
    #[arg(long)]
    json: bool,
}

/// `ramole adapter update <id>... | --all [--check]`.
#[derive(Args)]
pub(crate) struct UpdateArgs {
    ids: Vec<String>,
    /// Every adapter installed from the Hub.
    #[arg(long)]
    all: bool,
    /// Report newer commits without installing them.
    #[arg(long)]
    check: bool,
    #[arg(long)]
    json: bool,
}

pub(crate) fn run_install(a: InstallArgs) -> Result<()> {
    let mut lib = open()?;
    let (client, cache) = client_for(Some(lib.settings()));
    let mut req = InstallRequest::parse(&a.repo)?;
    req.subfolder = a.subfolder;
    req.name = a.name;
    req.max_bytes = a.max_bytes;
    let progress = TerminalProgress::new(!a.json);
    let rec = library::install_adapter(&mut lib, &client, &cache, &req, &progress);
    progress.finish();
    let rec = rec.with_context(|| format!("installing {}", a.repo))?;
    if a.json {
        println!("{}", adapter_json(&lib, &rec, true)?);
    } else {
        println!("installed {} ({})", rec.id, rec.verdict.compat.as_str());
        if !rec.verdict.reason.is_empty() {
            println!("  {}", rec.verdict.reason);
        }
    }
    Ok(())
}

/// `adapter update <id>... | --all [--check]`: one outcome per adapter (a JSON list).
pub(crate) fn run_update(a: UpdateArgs) -> Result<()> {
    let UpdateArgs {
        ids,
        all,
        check,
        json,
    } = a;
    let mut lib = open()?;
    let (client, cache) = client_for(Some(lib.settings()));
    let ids: Vec<String> = if all {
        lib.catalog()
            .adapters()?
            .into_iter()
            .filter(|r| matches!(r.source, ramole_core::catalog::AdapterSource::Hub { .. }))
            .map(|r| r.id)
            .collect()
    } else if ids.is_empty() {
        bail!("name the adapters to update, or pass --all");
    } else {
        ids
    };
    let mut outcomes = Vec::new();
    for id in &ids {
        let out = if check {
            library::check_update(&lib, &client, id)
        } else {
            let progress = TerminalProgress::new(!json);
            let out = library::update_adapter(&mut lib, &client, &cache, id, &progress);
            progress.finish();
            out
        };
        let out = out.with_context(|| format!("updating {id}"))?;
        if !json {
            match &out {
                UpdateOutcome::UpToDate { id, commit } => {
                    println!("{id} is up to date ({commit})")
                }
                UpdateOutcome::Available { id, from, to } => println!(
                    "{id}: a newer commit is available: {} -> {to}",
                    from.as_deref().unwrap_or("unknown")
                ),
                UpdateOutcome::Updated { id, from, to, .. } => println!(
                    "updated {id}: {} -> {to}",
                    from.as_deref().unwrap_or("unknown")
                ),
            }
        }
        outcomes.push(out);
    }
    if json {
        println!("{}", serde_json::to_string(&outcomes)?);
    }
    Ok(())
}

pub(crate) fn run_model(cmd: ModelCommand) -> Result<()> {
    let ModelCommand::Pull {
        repo,
        file,
        use_as,
        max_bytes,
        json,
    } = cmd;
    let dir = config::data_dir();
    let settings = Settings::load(&dir).ok();
    let (client, cache) = client_for(settings.as_ref());
    let (repo, revision) = hub::parse_repo_ref(&repo)?;
    let req = PullRequest {
        repo: repo.clone(),
        revision,
        file,
        max_bytes,
    };
    let progress = TerminalProgress::new(!json);
    let pulled = hub::pull_model(&client, &cache, &req, &progress);
    progress.finish();
    let pulled = pulled.with_context(|| format!("pulling {repo}"))?;
    if let Some(role) = use_as.as_deref() {
        let Some(s) = settings else {
            bail!("--use needs an initialised library: run `ramole init` first");
        };
        let (base, embedder, base_id): (PathBuf, PathBuf, Option<&str>) = match role {
            "base" => (
                pulled.path.clone(),
                s.embedder_path.clone(),
                Some(repo.as_str()),
            ),
            _ => (
                s.base_path.clone(),
                pulled.path.clone(),
                Some(s.base_id.as_str()),
            ),
        };
        library::init(&dir, &base, &embedder, base_id, None)?;
    }
    if json {
        println!("{}", json!({"pulled": pulled, "active": use_as}));
    } else {
        println!(
            "{} @ {} -> {} ({} files, {} bytes)",
            pulled.repo,
            pulled.commit,
            pulled.path.display(),
            pulled.files.len(),
            pulled.bytes
        );
        if let Some(role) = use_as {
            println!("active {role} is now {}", pulled.repo);
        }
    }
    Ok(())
}
