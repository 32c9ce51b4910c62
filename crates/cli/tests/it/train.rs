//! `ramole adapter train` end to end: a short real run writes a PEFT adapter the library
//! installs with its training inputs as samples; bad data is refused naming the line; and
//! `ramole eval tasks` names the task whose adapter is missing.

use crate::common::*;

#[test]
fn train_then_install_and_bad_input_is_named() {
    let home = Home::init();
    let dir = home.path().join("work");
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("shout.jsonl");
    std::fs::write(
        &data,
        "{\"input\": \"good morning\", \"target\": \"GOOD MORNING\"}\n\
         {\"inputs\": \"see you soon\", \"targets\": \"SEE YOU SOON\"}\n\
         {\"input\": \"thank you\", \"target\": \"THANK YOU\"}\n",
    )
    .unwrap();
    let out = dir.join("shout");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let args = [
        "adapter",
        "train",
        "--data",
        d,
        "--out",
        o,
        "--steps",
        "2",
        "--batch",
        "2",
        "--rank",
        "4",
        "--targets",
        "q_proj,v_proj",
        "--json",
    ];
    let r = home.json(&args);
    assert_eq!(r["steps"], 2);
    assert_eq!(r["examples"], 3);
    assert!(r["final_loss"].as_f64().unwrap().is_finite());
    assert_eq!(
        r["config"]["targets"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["r"], 4);
    assert_eq!(
        cfg["base_model_name_or_path"],
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    );
    // The same folder again is refused rather than overwritten.
    let e = home.fails(&args);
    assert!(e.contains("already holds an adapter"), "{e}");

    let added = home.json(&["adapter", "add", o, "--json"]);
    let id = added["id"].as_str().unwrap().to_string();
    let shown = home.json(&["adapter", "show", &id, "--json"]);
    let samples = shown["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 3, "{shown}");
    assert!(shown.to_string().contains("see you soon"));

    std::fs::write(
        &data,
        "{\"input\": \"a\", \"target\": \"A\"}\n{\"input\": \"b\", \"output\": \"B\"}\n",
    )
    .unwrap();
    let other = dir.join("other");
    let e = home.fails(&[
        "adapter",
        "train",
        "--data",
        d,
        "--out",
        other.to_str().unwrap(),
    ]);
    assert!(
        e.contains("shout.jsonl: line 2") && e.contains("\"target\""),
        "{e}"
    );
    assert!(!other.exists(), "nothing written for bad data");

    // eval tasks: one of the two tasks has no adapter folder.
    let profiles = dir.join("profiles.json");
    let tests = dir.join("test.json");
    std::fs::write(
        &profiles,
        r#"[{"model_name": "shout", "sample": [{"inputs": "hello"}]},
            {"model_name": "whisper", "sample": [{"inputs": "quiet please"}]}]"#,
    )
    .unwrap();
    std::fs::write(
        &tests,
        r#"[{"inputs": "hi", "targets": "HI", "task": "shout", "domain": "x", "metric": "em"}]"#,
    )
    .unwrap();
    let e = home.fails(&[
        "eval",
        "tasks",
        "--profiles",
        profiles.to_str().unwrap(),
        "--test",
        tests.to_str().unwrap(),
        "--adapters",
        dir.to_str().unwrap(),
        "--plan",
        "mixture",
    ]);
    assert!(e.contains("whisper") && e.contains("1 of 2 tasks"), "{e}");
}
