//! `ramole hub search`, `hub info`, `adapter install | update`, `model pull` end to end: the
//! binary talks to a local server speaking the Hub's API (`HF_ENDPOINT`), downloads into a
//! temporary `HF_HUB_CACHE`, and the installed adapter serves `ramole chat`.

use std::path::Path;
use std::process::{Command, Output};

use ramole_core::model::{LoadOptions, Model};
use ramole_testhub::{Repo, TestHub};
use serde_json::{Value, json};

const BASE: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

struct Env {
    home: tempfile::TempDir,
    hub: TestHub,
}

impl Env {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ramole"));
        c.args(args)
            .env("RAMOLE_HOME", self.home.path().join("data"))
            .env("HF_ENDPOINT", self.hub.url())
            .env("HF_HUB_CACHE", self.home.path().join("hf"))
            .env("HF_HOME", self.home.path().join("hf-home"))
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("RAMOLE_FAIL_POINT");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run ramole")
    }

    fn json(&self, args: &[&str]) -> Value {
        crate::common::json_of(self.run(args), args)
    }

    fn fails(&self, args: &[&str]) -> String {
        crate::common::failure_of(self.run(args), args)
    }
}

fn peft_repo(dir: &Path, id: &str, downloads: u64, widget: &[&str]) -> Repo {
    ramole_testkit::hub::peft_repo(dir, id, BASE, downloads, widget)
}

#[test]
fn search_install_chat_update_and_pull_through_the_cli() {
    let (g, m) = (
        ramole_core::config::starter_base(),
        ramole_core::config::starter_embedder(),
    );
    assert!(
        g.exists() && m.exists(),
        "test models missing — run scripts/fetch-test-models.sh"
    );
    let env = Env {
        home: tempfile::tempdir().unwrap(),
        hub: TestHub::start(),
    };
    let src = env.home.path().join("src");
    let model = Model::load(&g, &LoadOptions::default()).unwrap();
    let mk = |name: &str, seed: u64| {
        let d = src.join(name);
        ramole_testkit::write_random_peft(&d, &model.decoder, 4, 8.0, seed).unwrap();
        d
    };
    let french = mk("french", 1);
    env.hub.add_repo(peft_repo(
        &french,
        "alice/smol-french-lora",
        120,
        &[
            "Translate to French: good morning, my friend",
            "Translate the following sentence into French: where is the station?",
        ],
    ));
    env.hub.add_repo(peft_repo(
        &mk("math", 2),
        "bob/smol-math-lora",
        80,
        &["Solve for x: 2x + 3 = 11", "What is 17 times 23?"],
    ));
    env.hub.add_repo(
        Repo::new("carol/sdxl-lora")
            .file("pytorch_lora_weights.safetensors", vec![0u8; 16])
            .meta(|m| {
                m.library_name = Some("diffusers".into());
                m.pipeline_tag = Some("text-to-image".into());
                m.tags = vec!["lora".into()];
                // Mis-tagged as an adapter of our base.
                m.card_data = json!({"base_model": BASE, "base_model_relation": "adapter"});
                m.downloads = 999;
            }),
    );

    env.json(&[
        "init",
        "--base",
        g.to_str().unwrap(),
        "--embedder",
        m.to_str().unwrap(),
        "--base-id",
        BASE,
        "--json",
    ]);
    let found = env.json(&["hub", "search", "--json"]);
    let found = found.as_array().unwrap();
    let repos: Vec<&str> = found.iter().map(|h| h["repo"].as_str().unwrap()).collect();
    assert_eq!(
        repos,
        [
            "carol/sdxl-lora",
            "alice/smol-french-lora",
            "bob/smol-math-lora"
        ]
    );
    for h in found {
        for key in [
            "repo",
            "downloads",
            "likes",
            "license",
            "compatible",
            "reason",
        ] {
            assert!(h.get(key).is_some(), "{key} missing in {h}");
        }
    }
    assert_eq!(found[0]["compatible"], false);
    assert!(found[0]["reason"].as_str().unwrap().contains("diffusion"));
    assert_eq!(found[1]["compatible"], true);
    assert_eq!(found[1]["license"], "mit");
    assert!(found[1]["cost"]["memory_bytes"].as_u64().unwrap() > 0);
    assert!(found[1]["size"].as_u64().unwrap() > found[1]["cost"]["params"].as_u64().unwrap());
    // Free text narrows the search.
    let math = env.json(&["hub", "search", "--query", "math", "--json"]);
    assert_eq!(math.as_array().unwrap().len(), 1);

    let info = env.json(&["hub", "info", "alice/smol-french-lora", "--json"]);
    assert_eq!(info["card"]["example_prompts"].as_array().unwrap().len(), 2);
    assert!(
        info["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["path"] == "adapter_model.safetensors" && f["lfs"] == true)
    );

    assert_eq!(info["adapter"]["verdict"], "compatible");
    assert!(info["adapter"]["cost"]["params"].as_u64().unwrap() > 0);

    let err = env.fails(&["adapter", "install", "carol/sdxl-lora"]);
    assert!(err.contains("diffusion LoRA"), "{err}");
    let err = env.fails(&["adapter", "install", "nobody/missing"]);
    assert!(err.contains("not found"), "{err}");

    let fr = env.json(&["adapter", "install", "alice/smol-french-lora", "--json"]);
    let fr_id = fr["id"].as_str().unwrap().to_string();
    assert_eq!(fr["source"]["repo"], "alice/smol-french-lora");
    assert_eq!(fr["samples"][0]["origin"], "card");
    let ma = env.json(&["adapter", "install", "bob/smol-math-lora", "--json"]);
    let ma_id = ma["id"].as_str().unwrap().to_string();
    let listed = env.json(&["adapter", "list", "--json"]);
    let ids: Vec<&str> = listed["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&fr_id.as_str()) && ids.contains(&ma_id.as_str()));

    let text = "Translate to French: I am happy to see you.";
    let r = env.json(&["retrieve", "--text", text, "-k", "1", "--json"]);
    assert_eq!(r["adapters"][0]["id"], fr_id.as_str());
    let chat = env.json(&[
        "chat",
        "--text",
        text,
        "-k",
        "1",
        "--max-tokens",
        "6",
        "--json",
    ]);
    assert_eq!(chat["provenance"]["adapters"][0]["id"], fr_id.as_str());
    assert!(!chat["reply"].as_str().unwrap().is_empty());

    // Samples can be edited (origin user) and re-embedded.
    let edited = env.home.path().join("edited.jsonl");
    std::fs::write(
        &edited,
        "{\"input\": \"Translate to German: good evening\"}\n",
    )
    .unwrap();
    let s = env.json(&[
        "adapter",
        "samples",
        &fr_id,
        "--set",
        edited.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(s["samples"][0]["origin"], "user");
    assert_eq!(s["samples"].as_array().unwrap().len(), 1);

    // Offline (stored in settings): the Hub is not contacted; installed adapters still work.
    let c = env.json(&["hub", "config", "--offline", "true", "--json"]);
    assert_eq!(c["offline"], true);
    assert_eq!(c["endpoint"], env.hub.url().as_str());
    let err = env.fails(&["hub", "search"]);
    assert!(err.contains("offline"), "{err}");
    let r = env.json(&[
        "retrieve",
        "--text",
        "Solve for y: 3y - 1 = 8",
        "-k",
        "1",
        "--json",
    ]);
    assert_eq!(r["adapters"][0]["id"], ma_id.as_str());
    let c = env.json(&["hub", "config", "--reset", "--json"]);
    assert_eq!(c["offline"], false);
    assert_eq!(c["token"], false);
    // The token file Python's `huggingface-cli login` writes is read.
    std::fs::create_dir_all(env.home.path().join("hf-home")).unwrap();
    std::fs::write(env.home.path().join("hf-home/token"), "hf_abc\n").unwrap();
    assert_eq!(env.json(&["hub", "config", "--json"])["token"], true);
    std::fs::remove_file(env.home.path().join("hf-home/token")).unwrap();

    // A new commit on the Hub: update fetches it; a second update finds nothing new.
    let weights = |id: &str| {
        std::fs::read(
            env.home
                .path()
                .join("data/adapters")
                .join(id)
                .join("adapter_model.safetensors"),
        )
        .unwrap()
    };
    let before = weights(&ma_id);
    let v2 = mk("math-v2", 3);
    let new_commit = env.hub.commit(
        "bob/smol-math-lora",
        vec![(
            "adapter_model.safetensors".into(),
            std::fs::read(v2.join("adapter_model.safetensors")).unwrap(),
        )],
        &[],
    );
    // Killed at each step of the swap: the next start leaves the old or the new adapter,
    // whole, never a mix.
    for point in ["adapter-update:staged", "adapter-update:swapped"] {
        crate::common::kill_at(env.cmd(&["adapter", "update", &ma_id]), point);
        let shown = env.json(&["adapter", "show", &ma_id, "--json"]);
        let commit = shown["source"]["commit"].as_str().unwrap().to_string();
        assert_ne!(commit, new_commit, "{point}: the catalog was not committed");
        assert!(weights(&ma_id) == before, "{point}: the old files are back");
        let dirs: Vec<String> = std::fs::read_dir(env.home.path().join("data/adapters"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(
            dirs.len(),
            2,
            "{point}: no staged or old copies left: {dirs:?}"
        );
    }
    let check = env.json(&["adapter", "update", "--all", "--check", "--json"]);
    let outcomes: Vec<(&str, &str)> = check
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["id"].as_str().unwrap(), o["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(outcomes.len(), 2);
    assert!(outcomes.contains(&(ma_id.as_str(), "available")), "{check}");
    assert!(
        outcomes.contains(&(fr_id.as_str(), "up_to_date")),
        "{check}"
    );
    assert!(weights(&ma_id) == before, "--check changes nothing");
    let up = &env.json(&["adapter", "update", &ma_id, "--json"])[0];
    assert_eq!(up["outcome"], "updated");
    assert_eq!(up["to"], new_commit.as_str());
    let after = weights(&ma_id);
    assert!(before != after);
    let up = &env.json(&["adapter", "update", &ma_id, "--json"])[0];
    assert_eq!(up["outcome"], "up_to_date");

    // Pull an embedder and make it active: adapters are re-embedded, retrieval still works.
    env.hub
        .add_repo(Repo::new("sentence-transformers/all-MiniLM-L6-v2").dir(&m, ""));
    let pulled = env.json(&[
        "model",
        "pull",
        "sentence-transformers/all-MiniLM-L6-v2",
        "--use",
        "embedder",
        "--json",
    ]);
    let path = pulled["pulled"]["path"].as_str().unwrap();
    assert!(
        path.starts_with(env.home.path().join("hf").to_str().unwrap()),
        "{path}"
    );
    let r = env.json(&["retrieve", "--text", text, "-k", "1", "--json"]);
    assert_eq!(r["adapters"][0]["id"], fr_id.as_str());
    assert!(env.run(&["adapter", "remove", &fr_id]).status.success());
    let listed = env.json(&["adapter", "list", "--json"]);
    assert_eq!(listed["adapters"].as_array().unwrap().len(), 1);
}
