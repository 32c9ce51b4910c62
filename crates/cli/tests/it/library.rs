//! The adapter library, retrieval and chat through the `ramole` binary with all state under a
//! temporary `$RAMOLE_HOME`: real SQLite, real usearch, the real MiniLM and SmolLM2.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::{Adapters, FRENCH, Home};
use serde_json::{Value, json};

#[test]
fn adapters_are_added_listed_shown_toggled_removed_and_retrieved() {
    let home = Home::init();
    let ad = Adapters::make();
    let fr = ad.add(&home, "french");
    assert_eq!(fr["id"], "french");
    assert_eq!(fr["verdict"]["compat"], "compatible");
    assert_eq!(fr["ranks"], json!([4]));
    assert_eq!(fr["target_modules"].as_array().unwrap().len(), 7);
    assert_eq!(fr["sample_count"], 4);
    assert_eq!(fr["source"]["kind"], "local");
    assert!(
        Path::new(fr["path"].as_str().unwrap())
            .join("adapter_model.safetensors")
            .exists()
    );
    ad.add(&home, "sentiment");
    // No samples file: a probe from the name stands in, recorded as such.
    let m = home.json(&[
        "adapter",
        "add",
        &ad.dir("math"),
        "--name",
        "Math Solver",
        "--json",
    ]);
    assert_eq!(m["id"], "math-solver");
    let shown = home.json(&["adapter", "show", "math-solver", "--json"]);
    assert_eq!(shown["samples"][0]["origin"], "probe");
    let shown = home.json(&["adapter", "show", "french", "--json"]);
    assert_eq!(shown["samples"][1]["text"], FRENCH[1]);
    assert_eq!(shown["samples"][1]["origin"], "samples");
    assert_eq!(home.ids(), ["french", "sentiment", "math-solver"]);

    // Retrieval picks by meaning; gates are uniform and sum to 1.
    let hits = home.retrieved(
        "Translate into French: the cat sleeps on the sofa.",
        &["-k", "2"],
    );
    assert_eq!(hits[0].0, "french", "{hits:?}");
    assert_eq!(hits.len(), 2);
    assert!(hits[0].1 > hits[1].1);
    assert!(hits.iter().all(|h| (h.2 - 0.5).abs() < 1e-6));
    let hits = home.retrieved(
        "Was this restaurant review positive? Terrible service.",
        &["-k", "1"],
    );
    assert_eq!(hits[0].0, "sentiment");
    // Softmax gates follow the scores.
    let hits = home.retrieved(
        "Translate to French: good night",
        &["-k", "3", "--gating", "softmax:0.05"],
    );
    let sum: f64 = hits.iter().map(|h| h.2).sum();
    assert!((sum - 1.0).abs() < 1e-5 && hits[0].2 > hits[1].2 && hits[1].2 >= hits[2].2);
    // Exclusion.
    let hits = home.retrieved(
        "Translate to French: good night",
        &["-k", "3", "--exclude", "french"],
    );
    assert_eq!(hits.len(), 2);
    assert!(hits.iter().all(|h| h.0 != "french"));

    // A disabled adapter is never retrieved, even when asked for every adapter.
    home.json(&["adapter", "list", "--json"]);
    assert!(home.run(&["adapter", "disable", "french"]).status.success());
    let hits = home.retrieved("Translate to French: good night", &["-k", "3"]);
    assert_eq!(hits.len(), 2);
    assert!(hits.iter().all(|h| h.0 != "french"));
    let listed = home.json(&["adapter", "list", "--json"]);
    assert_eq!(listed["adapters"][0]["enabled"], false);
    assert!(home.run(&["adapter", "enable", "french"]).status.success());
    assert_eq!(
        home.retrieved("Translate to French: good night", &["-k", "1"])[0].0,
        "french"
    );

    // Removal deletes rows, files and the index entry.
    assert!(
        home.run(&["adapter", "remove", "sentiment"])
            .status
            .success()
    );
    assert_eq!(home.ids(), ["french", "math-solver"]);
    assert!(!home.path().join("adapters/sentiment").exists());
    let hits = home.retrieved(
        "Is this review positive or negative? Great film.",
        &["-k", "3"],
    );
    assert!(hits.iter().all(|h| h.0 != "sentiment"));
    assert!(
        home.fails(&["adapter", "show", "sentiment"])
            .contains("\"sentiment\"")
    );

    // Re-initialising with other retrieval defaults and another base identity: adapters are
    // judged again for that base and the index is rebuilt for the new scoring.
    let g = ramole_core::config::starter_base();
    let m = ramole_core::config::starter_embedder();
    let v = home.json(&[
        "init",
        "--base",
        g.to_str().unwrap(),
        "--embedder",
        m.to_str().unwrap(),
        "--base-id",
        "someone/renamed-base",
        "-k",
        "2",
        "--scoring",
        "ip",
        "--json",
    ]);
    assert_eq!(v["base"]["id"], "someone/renamed-base");
    assert_eq!(v["retrieval"]["scoring"], "ip");
    let shown = home.json(&["adapter", "show", "french", "--json"]);
    assert_eq!(shown["verdict"]["base"], "someone/renamed-base");
    let r = home.json(&[
        "retrieve",
        "--text",
        "Translate to French: good night",
        "--json",
    ]);
    assert_eq!(r["scoring"], "ip");
    assert_eq!(r["k"], 2);
    assert_eq!(r["adapters"][0]["id"], "french");
    let err = home.fails(&[
        "init",
        "--base",
        g.to_str().unwrap(),
        "--embedder",
        m.to_str().unwrap(),
        "-k",
        "0",
    ]);
    assert!(err.contains("k = 0"), "{err}");
}

#[test]
fn bad_adapters_and_sample_files_are_refused_and_leave_nothing() {
    let home = Home::init();
    let ad = Adapters::make();
    ad.add(&home, "french");
    // An adapter for another model (the tiny Llama fixture): shapes do not fit SmolLM2.
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lora/qv-r4");
    let err = home.fails(&["adapter", "add", tiny.to_str().unwrap()]);
    assert!(
        err.contains("do not fit") || err.contains("does not exist"),
        "{err}"
    );
    // Not an adapter at all.
    let empty = tempfile::tempdir().unwrap();
    let err = home.fails(&["adapter", "add", empty.path().to_str().unwrap()]);
    assert!(err.contains("adapter_config.json"), "{err}");
    // A samples file with a bad line: the line is named.
    let bad = ad.dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"input\": \"fine\"}\n{\"text\": \"no input field\"}\n",
    )
    .unwrap();
    let err = home.fails(&[
        "adapter",
        "add",
        &ad.dir("sentiment"),
        "--samples",
        bad.to_str().unwrap(),
    ]);
    assert!(err.contains("line 2") && err.contains("input"), "{err}");
    std::fs::write(&bad, "not json\n").unwrap();
    let err = home.fails(&[
        "adapter",
        "add",
        &ad.dir("sentiment"),
        "--samples",
        bad.to_str().unwrap(),
    ]);
    assert!(err.contains("line 1"), "{err}");
    // Nothing was added, no folder was left behind.
    assert_eq!(home.ids(), ["french"]);
    let folders: Vec<_> = std::fs::read_dir(home.path().join("adapters"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(folders, ["french"]);
    assert!(home.fails(&["retrieve", "--text", "  "]).contains("empty"));
    assert!(
        home.fails(&["retrieve", "--text", "x", "-k", "99"])
            .contains("limit")
    );
    assert!(
        home.fails(&["retrieve", "--text", "x", "--exclude", "nope"])
            .contains("\"nope\"")
    );
    assert!(
        home.fails(&["retrieve", "--text", "x", "--gating", "softmax:-1"])
            .contains("temperature")
    );
    // Without init: a clear instruction.
    let other = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ramole"))
        .args(["adapter", "list"])
        .env("RAMOLE_HOME", other.path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("ramole init"));
}

/// Runs `ramole adapter add` until it reaches `point`, then SIGKILLs it.
fn kill_at(home: &Home, ad: &Adapters, name: &str, point: &str) {
    let cmd = home.cmd(&[
        "adapter",
        "add",
        &ad.dir(name),
        "--samples",
        ad.samples(name).to_str().unwrap(),
    ]);
    crate::common::kill_at(cmd, point);
}

fn integrity_ok(home: &Home) {
    let conn = rusqlite::Connection::open(home.path().join("catalog.sqlite")).unwrap();
    let r: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(r, "ok");
    let fk: Option<i64> = conn
        .query_row("PRAGMA foreign_key_check", [], |r| r.get(0))
        .ok();
    assert_eq!(fk, None, "dangling foreign keys");
}

#[test]
fn a_kill_in_the_middle_of_adapter_add_leaves_a_consistent_catalog_and_a_rebuilt_index() {
    let home = Home::init();
    let ad = Adapters::make();
    ad.add(&home, "math");

    // Killed after copying the files, before the catalog commit: the adapter does not exist,
    // its folder is swept at the next start.
    kill_at(&home, &ad, "french", "adapter-add:copied");
    integrity_ok(&home);
    assert!(home.path().join("adapters/french").exists());
    let out = home.run(&["adapter", "list", "--json"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("removed unfinished adapter folder"),
        "{stderr}"
    );
    assert_eq!(home.ids(), ["math"]);
    assert!(!home.path().join("adapters/french").exists());

    // Killed after the commit, before the index was saved: the adapter exists and the stale
    // index is rebuilt at the next start, so retrieval sees it.
    kill_at(&home, &ad, "french", "adapter-add:committed");
    integrity_ok(&home);
    let out = home.run(&[
        "retrieve",
        "--text",
        "Translate to French: hello",
        "-k",
        "1",
        "--json",
    ]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("index rebuilt"), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["adapters"][0]["id"], "french");
    assert_eq!(home.ids(), ["math", "french"]);

    // Killed inside the index save (before the atomic rename): same repair.
    kill_at(&home, &ad, "sentiment", "index-save");
    integrity_ok(&home);
    let out = home.run(&[
        "retrieve",
        "--text",
        "Is this review positive? Loved it.",
        "-k",
        "1",
        "--json",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("index rebuilt"));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["adapters"][0]["id"], "sentiment");
    // The repair is done once: the next start loads the saved index.
    let out = home.run(&["retrieve", "--text", "hello", "--json"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("index rebuilt"));

    // A damaged index file is rebuilt too.
    std::fs::write(home.path().join("index.usearch"), b"garbage").unwrap();
    let out = home.run(&["retrieve", "--text", "What is 2 + 2?", "-k", "1", "--json"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["adapters"][0]["id"], "math");
}

#[test]
fn chat_answers_with_retrieved_adapters_and_stores_the_provenance_it_printed() {
    let home = Home::init();
    let ad = Adapters::make();
    ad.add(&home, "french");
    ad.add(&home, "sentiment");
    let text = "Translate to French: I am happy to see you.";
    let v = home.json(&[
        "chat",
        "--text",
        text,
        "-k",
        "2",
        "--max-tokens",
        "8",
        "--json",
    ]);
    let prov = &v["provenance"];
    assert_eq!(prov["plan"], "mixture");
    assert_eq!(prov["k"], 2);
    assert_eq!(prov["query"], text);
    let served: Vec<&str> = prov["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(served, ["french", "sentiment"]);
    assert!(
        prov["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["gate"] == 0.5)
    );
    let reply = v["reply"].as_str().unwrap().to_string();
    assert!(!reply.is_empty());
    let session = v["session"].as_i64().unwrap();

    // The reply is what the base with exactly those adapters and gates generates.
    let inst = |id: &str| home.path().join("adapters").join(id).display().to_string();
    let g = home.json(&[
        "generate",
        "--base",
        ramole_core::config::starter_base().to_str().unwrap(),
        "--chat",
        "--prompt",
        text,
        "--adapter",
        &format!("{}=0.5", inst("french")),
        "--adapter",
        &format!("{}=0.5", inst("sentiment")),
        "--max-tokens",
        "8",
        "--json",
    ]);
    assert_eq!(g["text"].as_str().unwrap(), reply);

    // What the catalog stored is what was printed.
    let shown = home.json(&["session", "show", &session.to_string(), "--json"]);
    let msgs = shown["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(msgs[1]["content"].as_str().unwrap(), reply);
    assert_eq!(msgs[1]["provenance"], *prov);
    assert_eq!(msgs[1]["id"], v["message"]);

    // Second turn in the same session, with french disabled: retrieval runs again and never
    // returns it; the history makes the prompt longer.
    assert!(home.run(&["adapter", "disable", "french"]).status.success());
    let v2 = home.json(&[
        "chat",
        "--text",
        "And in Spanish?",
        "--session",
        &session.to_string(),
        "-k",
        "2",
        "--max-tokens",
        "4",
        "--json",
    ]);
    assert_eq!(v2["session"], session);
    let served2: Vec<&str> = v2["provenance"]["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(served2, ["sentiment"]);
    assert!(
        v2["provenance"]["generation"]["prompt_tokens"]
            .as_u64()
            .unwrap()
            > prov["generation"]["prompt_tokens"].as_u64().unwrap()
    );
    let shown = home.json(&["session", "show", &session.to_string(), "--json"]);
    assert_eq!(shown["messages"].as_array().unwrap().len(), 4);
    assert_eq!(shown["messages"][3]["provenance"], v2["provenance"]);

    // Selection: the top-1 adapter at full strength. None: no adapters.
    let sel = home.json(&[
        "chat",
        "--text",
        "Review: awful. Positive or negative?",
        "--plan",
        "selection",
        "--max-tokens",
        "2",
        "--json",
    ]);
    assert_eq!(sel["provenance"]["plan"], "selection");
    assert_eq!(sel["provenance"]["adapters"][0]["id"], "sentiment");
    assert_eq!(sel["provenance"]["adapters"][0]["gate"], 1.0);
    let none = home.json(&[
        "chat",
        "--text",
        "Hello!",
        "--plan",
        "none",
        "--max-tokens",
        "2",
        "--json",
    ]);
    assert_eq!(none["provenance"]["plan"], "none");
    assert_eq!(none["provenance"]["adapters"], json!([]));
    let sessions = home.json(&["session", "list", "--json"]);
    assert_eq!(sessions["sessions"].as_array().unwrap().len(), 3);
    // Bad requests change nothing.
    assert!(
        home.fails(&["chat", "--text", "hi", "--session", "999"])
            .contains("999")
    );
    assert!(
        home.fails(&["chat", "--text", "hi", "--plan", "magic"])
            .contains("magic")
    );
    assert_eq!(
        home.json(&["session", "list", "--json"])["sessions"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn eval_retrieval_prints_the_papers_table_shape() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/flan-mixed");
    let profiles: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(fx.join("profiles-48.json")).unwrap())
            .unwrap();
    let tests: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(fx.join("test-2395.json")).unwrap()).unwrap();
    // Six tasks of different domains, four test inputs each.
    let chosen = [
        "sst2",
        "wmt16_translate_deen",
        "squad_v1",
        "copa",
        "glue_mrpc",
        "e2e_nlg",
    ];
    let p: Vec<&Value> = profiles
        .iter()
        .filter(|p| chosen.contains(&p["model_name"].as_str().unwrap()))
        .collect();
    let mut t = Vec::new();
    for c in chosen {
        t.extend(tests.iter().filter(|x| x["task"] == c).take(4));
    }
    let dir = tempfile::tempdir().unwrap();
    let (pf, tf) = (dir.path().join("p.json"), dir.path().join("t.json"));
    std::fs::write(&pf, serde_json::to_string(&p).unwrap()).unwrap();
    std::fs::write(&tf, serde_json::to_string(&t).unwrap()).unwrap();
    let m = ramole_core::config::starter_embedder();
    let run = |extra: &[&str]| -> Output {
        let mut args = vec![
            "eval",
            "retrieval",
            "--profiles",
            pf.to_str().unwrap(),
            "--test",
            tf.to_str().unwrap(),
            "--embedder",
            m.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_ramole"))
            .args(&args)
            .output()
            .unwrap()
    };
    let out = run(&["--k", "1,6", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["n"], 24);
    let top1 = v["overall"]["1"].as_f64().unwrap();
    assert!(top1 > 50.0 && top1 <= 100.0, "{v}");
    // Six tasks: the own task is always among the top 6.
    assert_eq!(v["overall"]["6"], 100.0);
    assert_eq!(v["per_domain"].as_object().unwrap().len(), 6);
    assert_eq!(v["per_domain"]["sentiment"]["6"], 100.0);
    // OOD: no other task shares a domain here, so nothing counts as a hit.
    let out = run(&["--k", "1,3", "--ood", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["overall"]["3"], 0.0, "{v}");
    // The table.
    let out = run(&["--k", "1,3"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("top1") && table.contains("overall") && table.contains("sentiment"));
    // Mistakes.
    let err = String::from_utf8(run(&["--k", "0"]).stderr).unwrap();
    assert!(err.contains("\"0\""), "{err}");
    let err = String::from_utf8(run(&["--scoring", "l2"]).stderr).unwrap();
    assert!(err.contains("l2"), "{err}");
}
