//! The `ramole` binary as a user runs it: JSON shapes, streaming, exit codes and error text.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn ramole(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ramole"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run ramole")
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn smollm2() -> String {
    let p = ramole_core::config::starter_base();
    assert!(
        p.exists(),
        "test model missing: {} — run scripts/fetch-test-models.sh",
        p.display()
    );
    p.display().to_string()
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(text.trim().lines().count(), 1, "one JSON object: {text}");
    serde_json::from_str(text.trim()).unwrap()
}

#[test]
fn generate_json_reports_text_tokens_and_timings() {
    let g = smollm2();
    let v = json_of(&ramole(&[
        "generate",
        "--base",
        &g,
        "--prompt",
        "Once upon a time, there was a little",
        "--max-tokens",
        "6",
        "--json",
    ]));
    assert!(v["text"].as_str().unwrap().starts_with(" girl"), "{v}");
    assert_eq!(v["tokens"]["prompt"], 9);
    assert_eq!(v["tokens"]["generated"], 6);
    assert_eq!(v["finish_reason"], "length");
    assert!(v["timings"]["prefill_tok_s"].as_f64().unwrap() > 0.0);
    assert!(v["timings"]["decode_tok_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn chat_streams_the_reply_without_the_end_token() {
    let g = smollm2();
    let out = ramole(&[
        "generate",
        "--base",
        &g,
        "--chat",
        "--prompt",
        "Say hello.",
        "--max-tokens",
        "80",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.trim().is_empty());
    assert!(
        !text.contains("<|im_end|>") && !text.contains("<|im_start|>"),
        "{text}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Eos"));
}

#[test]
fn seeded_sampling_is_reproducible() {
    let g = smollm2();
    let args = [
        "generate",
        "--base",
        &g,
        "--prompt",
        "The weather today is",
        "--max-tokens",
        "12",
        "--temperature",
        "0.9",
        "--top-p",
        "0.95",
        "--seed",
        "11",
        "--json",
    ];
    let a = json_of(&ramole(&args));
    let b = json_of(&ramole(&args));
    assert_eq!(a["text"], b["text"]);
}

#[test]
fn logits_are_sorted_and_match_the_fixture() {
    let dir = fixture("tiny-qwen2");
    let v = json_of(&ramole(&[
        "logits",
        "--base",
        &dir,
        "--prompt",
        "The fox jumps 123 times.",
        "--top",
        "5",
        "--json",
    ]));
    let top = v["top"].as_array().unwrap();
    assert_eq!(top.len(), 5);
    let logits: Vec<f64> = top.iter().map(|t| t["logit"].as_f64().unwrap()).collect();
    assert!(logits.windows(2).all(|w| w[0] >= w[1]), "{logits:?}");
    // The numpy oracle's last row for this text.
    let exp: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&dir).join("expected.json")).unwrap(),
    )
    .unwrap();
    let case = &exp["cases"][1];
    assert_eq!(v["prompt_ids"], case["ids"]);
    let last = case["logits"].as_array().unwrap().last().unwrap();
    for t in top {
        let id = t["id"].as_u64().unwrap() as usize;
        let want = last[id].as_f64().unwrap();
        assert!((t["logit"].as_f64().unwrap() - want).abs() < 1e-4);
        assert!(t["token"].is_string());
    }
}

fn failure(args: &[&str]) -> String {
    let out = ramole(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !err.contains("panicked") && !err.contains("stack backtrace"),
        "{err}"
    );
    err
}

#[test]
fn errors_go_to_stderr_with_a_nonzero_exit() {
    let err = failure(&[
        "generate",
        "--base",
        "/no/such/model.gguf",
        "--prompt",
        "hi",
    ]);
    assert!(
        err.starts_with("error: ") && err.contains("/no/such/model.gguf"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "not json").unwrap();
    let base = dir.path().display().to_string();
    let err = failure(&["logits", "--base", &base, "--prompt", "hi", "--json"]);
    assert!(
        err.contains("config.json") && err.contains("not a valid config.json"),
        "{err}"
    );

    let tiny = fixture("tiny-qwen2");
    let err = failure(&[
        "generate", "--base", &tiny, "--prompt", "hi", "--top-p", "0",
    ]);
    assert!(err.contains("top_p = 0"), "{err}");
    let err = failure(&[
        "generate",
        "--base",
        &tiny,
        "--prompt",
        "hi",
        "--max-tokens",
        "0",
    ]);
    assert!(err.contains("--max-tokens 0"), "{err}");
}

fn lora(name: &str) -> String {
    fixture(&format!("lora/{name}"))
}

#[test]
fn adapters_and_gates_on_the_command_line_match_the_oracle() {
    let base = fixture("tiny-llama");
    let (a1, a2, a3) = (lora("all-linear-r4"), lora("rslora-r8"), lora("qv-r4"));
    let v = json_of(&ramole(&[
        "logits",
        "--base",
        &base,
        "--prompt",
        "Once upon a time, there was a little",
        "--adapter",
        &format!("{a1}=0.5"),
        "--adapter",
        &format!("{a2}=0.3"),
        "--adapter",
        &format!("{a3}=0.2"),
        "--plan",
        "mixture",
        "--top",
        "3",
        "--json",
    ]));
    let oracle: Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(&lora("expected.json"))).unwrap())
            .unwrap();
    let want = &oracle["last_logits"]["mixture"][0];
    for t in v["top"].as_array().unwrap() {
        let id = t["id"].as_u64().unwrap() as usize;
        assert!((t["logit"].as_f64().unwrap() - want[id].as_f64().unwrap()).abs() < 1e-4);
    }

    let g = json_of(&ramole(&[
        "generate",
        "--base",
        &base,
        "--prompt",
        "The fox",
        "--adapter",
        &a3,
        "--max-tokens",
        "3",
        "--json",
    ]));
    assert_eq!(g["plan"], "mixture");
    let used = g["adapters"].as_array().unwrap();
    assert_eq!(used.len(), 1);
    assert_eq!(used[0]["name"], "qv-r4");
    assert_eq!(used[0]["gate"], 1.0);
    assert_eq!(used[0]["coverage"]["attached"], 4);
}

#[test]
fn adapter_mistakes_are_clear_errors() {
    let base = fixture("tiny-llama");
    let err = failure(&[
        "logits",
        "--base",
        &base,
        "--prompt",
        "hi",
        "--adapter",
        &lora("qv-r4"),
        "--adapter",
        &lora("rslora-r8"),
        "--plan",
        "fusion",
    ]);
    assert!(err.contains("fusion") && err.contains("rank"), "{err}");
    let err = failure(&[
        "logits",
        "--base",
        &base,
        "--prompt",
        "hi",
        "--adapter",
        &format!("{}=-2", lora("qv-r4")),
    ]);
    assert!(err.contains("gate 0 = -2"), "{err}");
    let err = failure(&[
        "logits",
        "--base",
        &base,
        "--prompt",
        "hi",
        "--adapter",
        "/no/adapter",
    ]);
    assert!(err.contains("/no/adapter/adapter_config.json"), "{err}");
    let err = failure(&[
        "logits",
        "--base",
        &base,
        "--prompt",
        "hi",
        "--plan",
        "selection",
    ]);
    assert!(err.contains("needs at least one --adapter"), "{err}");
    let err = failure(&[
        "logits", "--base", &base, "--prompt", "hi", "--plan", "blend",
    ]);
    assert!(err.contains("unknown plan \"blend\""), "{err}");
}
