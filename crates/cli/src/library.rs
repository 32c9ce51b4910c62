//! `ramole init | adapter add, list, show, ... | retrieve | session ... | settings`: the library,
//! retrieval, stored sessions and settings over the state in `$RAMOLE_HOME`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use ramole_core::catalog::SampleOrigin;
use ramole_core::config::{self, SettingsEdit};
use ramole_core::embed::Embedder;
use ramole_core::library;
use ramole_core::transcript::{ExportFormat, Transcript};
use ramole_core::vocab::TopK;
use serde_json::json;

use crate::common::{adapter_json, open, parse_gating};

#[derive(Args)]
pub(crate) struct InitArgs {
    /// The base model: a Hugging Face folder or a .gguf file.
    #[arg(long)]
    base: PathBuf,
    /// The sentence encoder folder (BERT family, e.g. all-MiniLM-L6-v2).
    #[arg(long)]
    embedder: PathBuf,
    /// The base's Hub id (default: read from its config.json or GGUF metadata).
    #[arg(long)]
    base_id: Option<String>,
    /// Adapters retrieved per message (default 3, or as set before).
    #[arg(short, long)]
    k: Option<TopK>,
    /// cosine (default) | ip (the paper's inner product with the raw mean).
    #[arg(long)]
    scoring: Option<String>,
    /// uniform (default) | softmax | softmax:<temperature>.
    #[arg(long)]
    gating: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub(crate) enum AdapterCommand {
    /// Install a local PEFT adapter folder (copied into the data dir).
    Add {
        dir: PathBuf,
        /// JSON lines with `input`/`inputs`: what the adapter is for (default: samples.jsonl
        /// in the folder, else a probe made from its name).
        #[arg(long)]
        samples: Option<PathBuf>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List installed adapters.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One adapter with its samples.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Let retrieval use the adapter again.
    Enable { id: String },
    /// Keep the adapter installed but never retrieve it.
    Disable { id: String },
    /// Delete the adapter's files and records.
    Remove { id: String },
    /// Show an adapter's sample inputs, or replace them (`--set`, origin `user`) and re-embed.
    Samples {
        id: String,
        /// JSON lines with `input`/`inputs`.
        #[arg(long)]
        set: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub(crate) struct RetrieveArgs {
    #[arg(long)]
    text: String,
    #[arg(short, long)]
    k: Option<TopK>,
    /// uniform | softmax | softmax:<temperature> (default: settings).
    #[arg(long)]
    gating: Option<String>,
    /// Adapter ids never to return (repeatable).
    #[arg(long)]
    exclude: Vec<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub(crate) enum SessionCommand {
    /// Chat sessions, most recent first.
    List {
        #[arg(long)]
        json: bool,
    },
    /// A session's messages with the provenance of every reply.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Delete a session and its messages.
    Delete { id: i64 },
    /// Write a session as a JSON or Markdown document (each reply with its plan, adapters and
    /// gates) into a folder.
    Export {
        id: i64,
        /// json | markdown.
        #[arg(long, default_value = "markdown")]
        format: ExportFormat,
        /// The folder to write into (default: the current one).
        #[arg(long, default_value = ".")]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// `ramole settings [--k N] [--plan P] ...`: every value checked as the app's Settings form does.
#[derive(Args)]
pub(crate) struct SettingsArgs {
    /// Adapters retrieved per message.
    #[arg(short, long)]
    k: Option<usize>,
    /// cosine | ip.
    #[arg(long)]
    scoring: Option<String>,
    /// uniform | softmax | softmax:<temperature>.
    #[arg(long)]
    gating: Option<String>,
    /// The app's default plan: auto | selection | mixture | fusion | router | none.
    #[arg(long)]
    plan: Option<String>,
    /// The app's default reply length, temperature and top-p.
    #[arg(long)]
    max_tokens: Option<usize>,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    /// Compute threads of the app (0 = all cores; next start).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    json: bool,
}

pub(crate) fn run_init(a: InitArgs) -> Result<()> {
    let dir = config::data_dir();
    let retrieval = if a.k.is_some() || a.scoring.is_some() || a.gating.is_some() {
        let old = config::Settings::load(&dir)
            .map(|s| s.retrieval)
            .unwrap_or_default();
        Some(config::RetrievalDefaults {
            k: a.k.unwrap_or(old.k),
            scoring: match &a.scoring {
                Some(s) => s.parse().map_err(anyhow::Error::msg)?,
                None => old.scoring,
            },
            gating: parse_gating(&a.gating)?.unwrap_or(old.gating),
        })
    } else {
        None
    };
    let s = library::init(&dir, &a.base, &a.embedder, a.base_id.as_deref(), retrieval)?;
    let (embedder_id, dims) = Embedder::identify(&s.embedder_path)?;
    if a.json {
        println!(
            "{}",
            json!({"data_dir": dir, "base": {"path": s.base_path, "id": s.base_id},
                   "embedder": {"path": s.embedder_path, "id": embedder_id, "dims": dims},
                   "retrieval": s.retrieval})
        );
    } else {
        println!("data dir  {}", dir.display());
        println!("base      {} ({})", s.base_id, s.base_path.display());
        println!("embedder  {embedder_id} ({})", s.embedder_path.display());
    }
    Ok(())
}

pub(crate) fn run_adapter(cmd: AdapterCommand) -> Result<()> {
    let mut lib = open()?;
    match cmd {
        AdapterCommand::Add {
            dir,
            samples,
            name,
            json,
        } => {
            let rec = lib
                .add_local(&dir, samples.as_deref(), name.as_deref())
                .with_context(|| format!("adding {}", dir.display()))?;
            if json {
                println!("{}", adapter_json(&lib, &rec, false)?);
            } else {
                println!("added {} ({})", rec.id, rec.verdict.compat.as_str());
                if !rec.verdict.reason.is_empty() {
                    println!("  {}", rec.verdict.reason);
                }
            }
        }
        AdapterCommand::List { json } => {
            let all = lib.catalog().adapters()?;
            if json {
                let list: Vec<_> = all
                    .iter()
                    .map(|r| adapter_json(&lib, r, false))
                    .collect::<Result<_>>()?;
                println!("{}", json!({ "adapters": list }));
            } else if all.is_empty() {
                println!("no adapters installed");
            } else {
                println!(
                    "{:<28} {:<8} {:<12} {:>6} {:>9}  modules",
                    "id", "enabled", "compat", "ranks", "size"
                );
                for r in all {
                    println!(
                        "{:<28} {:<8} {:<12} {:>6} {:>8}K  {}",
                        r.id,
                        if r.enabled { "yes" } else { "no" },
                        r.verdict.compat.as_str(),
                        r.ranks
                            .iter()
                            .map(|x| x.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                        r.size_bytes / 1024,
                        r.target_modules.join(",")
                    );
                }
            }
        }
        AdapterCommand::Show { id, json } => {
            let rec = lib.catalog().require_adapter(&id)?;
            let v = adapter_json(&lib, &rec, true)?;
            if json {
                println!("{v}");
            } else {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
        AdapterCommand::Enable { id } => {
            lib.set_enabled(&id, true)?;
            println!("enabled {id}");
        }
        AdapterCommand::Disable { id } => {
            lib.set_enabled(&id, false)?;
            println!("disabled {id}");
        }
        AdapterCommand::Remove { id } => {
            lib.remove(&id)?;
            println!("removed {id}");
        }
        AdapterCommand::Samples { id, set, json } => {
            if let Some(file) = set {
                let samples = library::read_samples(&file, SampleOrigin::User)?;
                lib.set_samples(&id, &samples)?;
            }
            let rec = lib.catalog().require_adapter(&id)?;
            let samples = lib.catalog().samples(rec.key)?;
            if json {
                println!("{}", json!({ "id": id, "samples": samples }));
            } else {
                for s in samples {
                    println!("[{}] {}", s.origin.as_str(), s.text);
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn run_retrieve(a: RetrieveArgs) -> Result<()> {
    let lib = open()?;
    let k = a.k.unwrap_or(lib.settings().retrieval.k);
    let gating = parse_gating(&a.gating)?.unwrap_or(lib.settings().retrieval.gating);
    let hits = lib.retrieve(&a.text, k, &a.exclude, gating)?;
    if a.json {
        println!(
            "{}",
            json!({"adapters": hits, "k": k, "gating": gating.to_string(),
                   "scoring": lib.settings().retrieval.scoring, "embedder": lib.embedder_id()})
        );
    } else if hits.is_empty() {
        println!("no retrievable adapters");
    } else {
        for h in hits {
            println!("{:<28} score {:>8.4}  gate {:.4}", h.id, h.score, h.gate);
        }
    }
    Ok(())
}

pub(crate) fn run_session(cmd: SessionCommand) -> Result<()> {
    let mut lib = open()?;
    match cmd {
        SessionCommand::List { json } => {
            let chats = lib.catalog().chats()?;
            if json {
                println!("{}", json!({ "sessions": chats }));
            } else {
                for c in chats {
                    println!("{:>5}  {}  {}", c.id, c.updated_at, c.title);
                }
            }
        }
        SessionCommand::Show { id, json } => {
            let cat = lib.catalog();
            let session = cat.require_chat(id)?;
            let mut messages = Vec::new();
            for m in cat.messages(id)? {
                let prov = cat.provenance(m.id)?;
                let mut v = serde_json::to_value(&m)?;
                if let Some(p) = prov {
                    v["provenance"] = serde_json::to_value(p)?;
                }
                messages.push(v);
            }
            if json {
                println!("{}", json!({"session": session, "messages": messages}));
            } else {
                println!("# {} (session {})", session.title, session.id);
                for m in messages {
                    println!(
                        "\n[{}] {}",
                        m["role"].as_str().unwrap_or(""),
                        m["content"].as_str().unwrap_or("")
                    );
                    if let Some(p) = m.get("provenance") {
                        println!(
                            "  -> plan {} · {}",
                            p["plan"].as_str().unwrap_or(""),
                            p["adapters"]
                        );
                    }
                }
            }
        }
        SessionCommand::Delete { id } => {
            lib.catalog_mut().delete_chat(id)?;
            println!("deleted session {id}");
        }
        SessionCommand::Export {
            id,
            format,
            out,
            json,
        } => {
            let done = Transcript::read(lib.catalog(), id)?.export(format, &out)?;
            if json {
                println!(
                    "{}",
                    json!({"path": done.path, "bytes": done.content.len()})
                );
            } else {
                println!("wrote {}", done.path.display());
            }
        }
    }
    Ok(())
}

pub(crate) fn run_settings(a: SettingsArgs) -> Result<()> {
    let dir = config::data_dir();
    let old = config::Settings::load(&dir)?;
    let edit = SettingsEdit {
        k: a.k,
        scoring: a.scoring,
        gating: a.gating,
        plan: a.plan,
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        threads: a.threads,
        ..SettingsEdit::default()
    };
    let new = old.edited(&edit)?;
    if new != old {
        new.save(&dir)?;
    }
    if a.json {
        println!(
            "{}",
            json!({"retrieval": new.retrieval, "chat": new.chat, "changed": new != old})
        );
    } else {
        let r = &new.retrieval;
        let c = &new.chat;
        println!("k            {}", r.k);
        println!("scoring      {}", r.scoring);
        println!("gating       {}", r.gating);
        println!("plan         {}", c.plan);
        println!("max_tokens   {}", c.max_tokens);
        println!("temperature  {}", c.temperature);
        println!("top_p        {}", c.top_p);
        println!("threads      {}", c.threads);
    }
    Ok(())
}
