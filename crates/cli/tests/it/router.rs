//! `ramole router` end to end on the real SmolLM2: a short training run writes a router that
//! `router add` installs for the active base; `chat` with plan `auto` then routes with it and
//! stores per-layer, per-token gates in the reply's provenance; bad input is named and writes
//! nothing; without a router, plan `router` is refused and `auto` mixes.

use crate::common::*;
use serde_json::{Value, json};

fn sum(v: &Value) -> f64 {
    v.as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_f64().unwrap())
        .sum()
}

#[test]
fn train_add_chat_with_router_and_remove() {
    let home = Home::init();
    let adapters = Adapters::make();
    let work = home.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let profiles = work.join("profiles.json");
    let sample = |task: &[&str], target: &str| -> Vec<Value> {
        task.iter()
            .take(2)
            .map(|s| json!({"inputs": s, "targets": target}))
            .collect()
    };
    std::fs::write(
        &profiles,
        json!([
            {"model_name": "french", "domain": "translation", "sample": sample(FRENCH, "Bonjour")},
            {"model_name": "sentiment", "domain": "sentiment", "sample": sample(SENTIMENT, "positive")},
            {"model_name": "math", "domain": "math", "sample": sample(MATH, "42")},
        ])
        .to_string(),
    )
    .unwrap();
    let tasks = work.join("tasks.txt");
    std::fs::write(&tasks, "# two of three\nfrench\nsentiment\n").unwrap();
    let out = work.join("r.safetensors");
    let adapters_dir = adapters.dir.path().to_str().unwrap().to_string();
    let args = |tasks: &str, out: &str| -> Vec<String> {
        [
            "router",
            "train",
            "--adapters",
            &adapters_dir,
            "--profiles",
            profiles.to_str().unwrap(),
            "--tasks",
            tasks,
            "--out",
            out,
            "--steps",
            "2",
            "--batch",
            "2",
            "--k",
            "2",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let a = args(tasks.to_str().unwrap(), out.to_str().unwrap());
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let r = home.json(&a);
    assert_eq!(r["steps"], 2);
    assert!(r["final_loss"].as_f64().unwrap().is_finite());
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("r.json")).unwrap()).unwrap();
    assert_eq!(cfg["base_model"], "HuggingFaceTB/SmolLM2-135M-Instruct");
    assert_eq!(cfg["training"]["tasks"], json!(["french", "sentiment"]));
    assert_eq!(cfg["training"]["examples"], 4);

    // Inputs the adapters never saw (a test-format file), skipping the first of each task.
    let inputs = work.join("inputs.json");
    std::fs::write(
        &inputs,
        json!([
            {"inputs": FRENCH[2], "task": "french", "targets": "Salut"},
            {"inputs": FRENCH[3], "task": "french", "targets": "Merci"},
            {"inputs": SENTIMENT[2], "task": "sentiment", "targets": "negative"},
            {"inputs": SENTIMENT[3], "task": "sentiment", "targets": "positive"},
            {"inputs": MATH[2], "task": "math", "targets": "80"},
        ])
        .to_string(),
    )
    .unwrap();
    let from_inputs = work.join("r2.safetensors");
    let mut c = args(tasks.to_str().unwrap(), from_inputs.to_str().unwrap());
    c.extend(
        [
            "--examples",
            inputs.to_str().unwrap(),
            "--skip-per-task",
            "1",
        ]
        .map(String::from),
    );
    let c: Vec<&str> = c.iter().map(String::as_str).collect();
    home.json(&c);
    let cfg2: Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("r2.json")).unwrap()).unwrap();
    assert_eq!(
        cfg2["training"]["examples"], 2,
        "one input of each training task"
    );

    // An unknown training task is named and nothing is written.
    let bad = work.join("bad.txt");
    std::fs::write(&bad, "french\nklingon\n").unwrap();
    let other = work.join("other.safetensors");
    let b = args(bad.to_str().unwrap(), other.to_str().unwrap());
    let b: Vec<&str> = b.iter().map(String::as_str).collect();
    let e = home.fails(&b);
    assert!(e.contains("\"klingon\""), "{e}");
    assert!(!other.exists());

    for name in ["french", "sentiment", "math"] {
        adapters.add(&home, name);
    }
    // No router yet: `router` is refused, `auto` mixes.
    assert!(home.json(&["router", "show", "--json"])["config"].is_null());
    let e = home.fails(&["chat", "--text", FRENCH[0], "--plan", "router", "--json"]);
    assert!(e.contains("needs a trained router"), "{e}");
    let c = home.json(&["chat", "--text", FRENCH[0], "--max-tokens", "4", "--json"]);
    assert_eq!(c["provenance"]["plan"], "mixture");

    home.run(&["router", "add", out.to_str().unwrap()]);
    let shown = home.json(&["router", "show", "--json"]);
    assert_eq!(shown["config"]["rank"], 8);
    let c = home.json(&[
        "chat",
        "--text",
        FRENCH[1],
        "-k",
        "3",
        "--max-tokens",
        "6",
        "--json",
    ]);
    let p = &c["provenance"];
    assert_eq!(p["plan"], "router", "{p}");
    assert_eq!(p["gating"], "router");
    let served: Vec<&str> = p["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(served.len(), 3);
    let gates: Vec<f64> = p["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["gate"].as_f64().unwrap())
        .collect();
    assert!((gates.iter().sum::<f64>() - 1.0).abs() < 1e-3, "{gates:?}");
    let lg = &p["layer_gates"];
    assert_eq!(lg["layers"], 30);
    assert_eq!(lg["tokens"][0], "<prompt>");
    assert_eq!(lg["adapters"].as_array().unwrap().len(), 3, "{lg}");
    assert_eq!(
        lg["adapters"],
        json!(served),
        "heatmap columns are the served adapters"
    );
    let grid = lg["gates"].as_array().unwrap();
    assert_eq!(grid.len(), 30);
    let columns = lg["tokens"].as_array().unwrap().len();
    assert!(columns >= 2, "prompt and reply columns: {lg}");
    for layer in grid {
        assert_eq!(layer.as_array().unwrap().len(), columns);
        for col in layer.as_array().unwrap() {
            assert!((sum(col) - 1.0).abs() < 0.01, "{col}");
        }
    }
    // What was printed is what was stored.
    let session = c["session"].as_i64().unwrap().to_string();
    let stored = home.json(&["session", "show", &session, "--json"]);
    let last = stored["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["provenance"]["layer_gates"], *lg);
    assert_eq!(last["provenance"]["adapters"], p["adapters"]);

    home.run(&["router", "remove"]);
    let c = home.json(&["chat", "--text", FRENCH[2], "--max-tokens", "4", "--json"]);
    assert_eq!(c["provenance"]["plan"], "mixture");
    assert!(c["provenance"]["layer_gates"].is_null());
}
