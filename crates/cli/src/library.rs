//! `ramole init | adapter ... | retrieve | chat | session ... | eval retrieval`: the library,
//! retrieval and chat over the state in `$RAMOLE_HOME`, and retrieval accuracy on the paper's
//! data (split into trained and unseen tasks for a fine-tuned encoder).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use ramole_core::catalog::{AdapterRecord, SampleOrigin};
use ramole_core::chat::{self, ChatRequest, PlanChoice};
use ramole_core::config;
use ramole_core::embed::Embedder;
use ramole_core::engine::{Engine, EngineConfig};
use ramole_core::index::Scoring;
use ramole_core::library::{self, Library};
use ramole_core::model::{LoadOptions, Model};
use ramole_core::mole::Gating;
use ramole_core::retrieve::{self, TaskProfile, TestInput};
use ramole_core::serve::{self, ServeState};
use ramole_core::train::retriever;
use serde_json::json;

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
    k: Option<usize>,
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
    /// Install an adapter from the Hugging Face Hub: `org/name[@revision]`.
    Install {
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
    },
    /// Show an adapter's sample inputs, or replace them (`--set`, origin `user`) and re-embed.
    Samples {
        id: String,
        /// JSON lines with `input`/`inputs`.
        #[arg(long)]
        set: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Train a new LoRA adapter from examples (JSON lines with input and target).
    Train(crate::train::TrainArgs),
    /// Update Hub adapters to the newest commit of their revision (`--check`: only report).
    Update {
        ids: Vec<String>,
        /// Every adapter installed from the Hub.
        #[arg(long)]
        all: bool,
        /// Report newer commits without installing them.
        #[arg(long)]
        check: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub(crate) struct RetrieveArgs {
    #[arg(long)]
    text: String,
    #[arg(short, long)]
    k: Option<usize>,
    /// uniform | softmax | softmax:<temperature> (default: settings).
    #[arg(long)]
    gating: Option<String>,
    /// Adapter ids never to return (repeatable).
    #[arg(long)]
    exclude: Vec<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct ChatArgs {
    /// The user message.
    #[arg(long)]
    text: String,
    #[arg(short, long)]
    k: Option<usize>,
    /// auto | selection | mixture | fusion | router | none (auto: router when the base has one, else mixture).
    #[arg(long, default_value = "auto")]
    plan: String,
    /// uniform | softmax | softmax:<temperature> (default: settings).
    #[arg(long)]
    gating: Option<String>,
    /// Continue this session (default: start a new one).
    #[arg(long)]
    session: Option<i64>,
    /// System prompt of a new session.
    #[arg(long, conflicts_with = "session")]
    system: Option<String>,
    /// Adapter ids never to retrieve (repeatable).
    #[arg(long)]
    exclude: Vec<String>,
    #[command(flatten)]
    sampling: crate::SamplingArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on; anything but loopback exposes the API to the network.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// 0 picks a free port (printed on start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests decoded together in one batch.
    #[arg(long, default_value_t = 8)]
    max_rows: usize,
    /// Requests that may wait beyond the running ones before the server answers 503.
    #[arg(long, default_value_t = 64)]
    queue: usize,
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
}

#[derive(Subcommand)]
pub(crate) enum EvalCommand {
    /// Retrieval accuracy on the paper's data format (flan-mixed): top-k overall and per domain.
    Retrieval(EvalRetrievalArgs),
    /// The paper's mixed-task benchmark on task adapters (Table 1): one plan, IID or OOD.
    Tasks(crate::tasks_eval::EvalTasksArgs),
}

#[derive(Args)]
pub(crate) struct EvalRetrievalArgs {
    /// `profiles-*.json`: one entry per task with its sample inputs.
    #[arg(long)]
    profiles: PathBuf,
    /// `test-*.json`: inputs with their task.
    #[arg(long)]
    test: PathBuf,
    /// Comma-separated k values.
    #[arg(long, default_value = "1,3,5,8")]
    k: String,
    #[arg(long, default_value = "cosine")]
    scoring: String,
    /// Mask each input's own task (the paper's k+1 rule); a hit is then a task of the same domain.
    #[arg(long)]
    ood: bool,
    /// Sentence encoder folder (default: the library's, else the test MiniLM).
    #[arg(long)]
    embedder: Option<PathBuf>,
    /// The tasks an encoder was fine-tuned on (one per line): also report those tasks' inputs
    /// (`trained`) and the other tasks' (`unseen`) apart.
    #[arg(long)]
    tasks: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub(crate) fn open() -> Result<Library> {
    let dir = config::data_dir();
    let lib = Library::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
    for r in &lib.repairs {
        eprintln!("ramole: repaired: {r}");
    }
    Ok(lib)
}

fn parse_gating(g: &Option<String>) -> Result<Option<Gating>> {
    Ok(g.as_deref().map(str::parse).transpose()?)
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

pub(crate) fn adapter_json(
    lib: &Library,
    rec: &AdapterRecord,
    with_samples: bool,
) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(rec)?;
    v["path"] = json!(lib.adapter_dir(&rec.id));
    let samples = lib.catalog().samples(rec.key)?;
    v["sample_count"] = json!(samples.len());
    if with_samples {
        v["samples"] = serde_json::to_value(&samples)?;
    }
    Ok(v)
}

pub(crate) fn run_adapter(cmd: AdapterCommand) -> Result<()> {
    match cmd {
        AdapterCommand::Install {
            repo,
            subfolder,
            name,
            max_bytes,
            json,
        } => return crate::hub::run_install(&repo, subfolder, name, max_bytes, json),
        AdapterCommand::Update {
            ids,
            all,
            check,
            json,
        } => return crate::hub::run_update(ids, all, check, json),
        AdapterCommand::Train(a) => return crate::train::run_train(a),
        _ => {}
    }
    let mut lib = open()?;
    match cmd {
        AdapterCommand::Install { .. }
        | AdapterCommand::Update { .. }
        | AdapterCommand::Train(_) => {
            unreachable!("handled above")
        }
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

pub(crate) fn run_chat(a: ChatArgs) -> Result<()> {
    let mut lib = open()?;
    let plan: PlanChoice = a.plan.parse()?;
    let base = lib.settings().base_path.clone();
    let model = Model::load(&base, &LoadOptions::default())
        .with_context(|| format!("loading {}", base.display()))?;
    let engine = Engine::start(std::sync::Arc::new(model), EngineConfig::default());
    engine.set_router(lib.load_router()?);
    let req = ChatRequest {
        session: a.session,
        text: a.text.clone(),
        k: a.k,
        plan,
        gating: parse_gating(&a.gating)?,
        exclude: a.exclude.clone(),
        system_prompt: a.system.clone(),
        params: a.sampling.params(Vec::new()),
        pinned: Vec::new(),
        action: chat::ChatAction::Send,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let stream = !a.json;
    let mut on_text = |piece: &str| {
        if stream {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    };
    let reply = chat::send(&mut lib, &engine, &req, &mut on_text)?;
    if a.json {
        writeln!(
            out,
            "{}",
            json!({"reply": reply.reply, "session": reply.session, "message": reply.message,
                   "finish_reason": reply.finish_reason, "provenance": reply.provenance,
                   "dropped_messages": reply.dropped_messages})
        )?;
    } else {
        writeln!(out)?;
        let p = &reply.provenance;
        let served: Vec<String> = p
            .adapters
            .iter()
            .map(|s| {
                format!(
                    "{} (gate {:.3}, score {:.3})",
                    s.id,
                    s.gate,
                    s.score.unwrap_or(f32::NAN)
                )
            })
            .collect();
        eprintln!(
            "[session {} · plan {} · {}]",
            reply.session,
            p.plan,
            if served.is_empty() {
                "no adapters".to_string()
            } else {
                served.join(", ")
            }
        );
    }
    Ok(())
}

pub(crate) fn run_serve(a: ServeArgs) -> Result<()> {
    if a.max_rows == 0 || a.max_rows > 64 {
        bail!("--max-rows {} must be between 1 and 64", a.max_rows);
    }
    let lib = open()?;
    let base = lib.settings().base_path.clone();
    let model = Model::load(&base, &LoadOptions::default())
        .with_context(|| format!("loading {}", base.display()))?;
    let engine = Engine::start(
        std::sync::Arc::new(model),
        EngineConfig {
            max_rows: a.max_rows,
            queue: a.queue.max(1),
            ..EngineConfig::default()
        },
    );
    engine.set_router(lib.load_router()?);
    let state = std::sync::Arc::new(ServeState::new(std::sync::Arc::new(engine), lib));
    let addr = std::net::SocketAddr::new(a.host, a.port);
    if !serve::is_loopback(&addr) {
        eprintln!(
            "ramole: warning: listening on {addr} exposes the API (no authentication) to the network"
        );
    }
    let model_id = state.model_id().to_string();
    serve::serve_blocking(addr, state, |bound| {
        // The first line of stdout: scripts and tests read the bound port from it.
        println!("listening on http://{bound}");
        eprintln!("ramole: serving {model_id} at http://{bound}/v1 (Ctrl-C stops)");
        let _ = std::io::stdout().flush();
    })
    .with_context(|| format!("serving on {addr}"))
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
    }
    Ok(())
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not the expected JSON", path.display()))
}

pub(crate) fn run_eval(cmd: EvalCommand) -> Result<()> {
    let a = match cmd {
        EvalCommand::Retrieval(a) => a,
        EvalCommand::Tasks(a) => return crate::tasks_eval::run_eval_tasks(a),
    };
    let ks: Vec<usize> =
        a.k.split(',')
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|k| *k >= 1)
                    .with_context(|| format!("--k {:?}: {s:?} is not a positive integer", a.k))
            })
            .collect::<Result<_>>()?;
    let scoring: Scoring = a.scoring.parse().map_err(anyhow::Error::msg)?;
    let embedder_dir = crate::retriever::embedder_or_default(a.embedder.clone());
    let profiles: Vec<TaskProfile> = read_json(&a.profiles)?;
    let tests: Vec<TestInput> = read_json(&a.test)?;
    let trained = match &a.tasks {
        Some(f) => {
            let tasks = retriever::read_task_list(f)?;
            retriever::check_tasks_known(&tasks, &profiles)?;
            Some(tasks)
        }
        None => None,
    };
    let embedder = Embedder::load(&embedder_dir)
        .with_context(|| format!("loading the embedder {}", embedder_dir.display()))?;
    let t0 = std::time::Instant::now();
    let eval = retrieve::RetrievalEval::prepare(&embedder, &profiles, &tests)?;
    let report = eval.report(&ks, scoring, a.ood);
    // Inputs of the trained tasks and of the others, each ranked against every task.
    let split = trained.as_ref().map(|tasks| {
        let seen: HashSet<&str> = tasks.iter().map(String::as_str).collect();
        let unseen: HashSet<&str> = eval
            .tasks()
            .iter()
            .map(String::as_str)
            .filter(|t| !seen.contains(t))
            .collect();
        (
            (
                seen.len(),
                eval.report_for_tasks(&ks, scoring, a.ood, &seen),
            ),
            (
                unseen.len(),
                eval.report_for_tasks(&ks, scoring, a.ood, &unseen),
            ),
        )
    });
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(((nt, t), (nu, u))) = &split {
            let part = |tasks: usize, r: &retrieve::RetrievalReport| {
                json!({"overall": r.overall, "per_domain": r.per_domain, "n": r.n,
                       "tasks": tasks})
            };
            v["trained"] = part(*nt, t);
            v["unseen"] = part(*nu, u);
        }
        println!("{v}");
    } else {
        let head: Vec<String> = ks
            .iter()
            .map(|k| format!("{:>7}", format!("top{k}")))
            .collect();
        println!(
            "{} inputs, {} tasks, scoring {}, {}{} ({:.0} s)",
            report.n,
            profiles.len(),
            scoring.as_str(),
            embedder.id(),
            if a.ood { ", ood" } else { "" },
            t0.elapsed().as_secs_f64()
        );
        println!("{:<28}{}", "domain", head.join(""));
        // One line: a label and the accuracy at each k.
        let line = |label: &str, row: &std::collections::BTreeMap<String, f64>| {
            let cells: Vec<String> = ks
                .iter()
                .map(|k| format!("{:>7.2}", row[&k.to_string()]))
                .collect();
            println!("{label:<28}{}", cells.join(""));
        };
        for (d, row) in &report.per_domain {
            line(d, row);
        }
        line("overall", &report.overall);
        if let Some(((nt, t), (nu, u))) = &split {
            line(&format!("trained ({nt} tasks, {} in)", t.n), &t.overall);
            line(&format!("unseen ({nu} tasks, {} in)", u.n), &u.overall);
        }
    }
    if report.n == 0 {
        bail!("no test inputs");
    }
    Ok(())
}
