//! What the CLI test binaries share: a temporary `$RAMOLE_HOME` initialised with the test
//! models, seeded adapters with samples, reading a run's JSON or its failure, and killing a run
//! at a fail point.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use std::path::{Path, PathBuf};

use ramole_core::model::{LoadOptions, Model};
use serde_json::{Value, json};

/// The one JSON object a successful `ramole args` printed.
pub fn json_of(out: Output, args: &[&str]) -> Value {
    assert!(
        out.status.success(),
        "ramole {args:?}: exit {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The stderr of a run that must fail.
pub fn failure_of(out: Output, args: &[&str]) -> String {
    assert!(!out.status.success(), "ramole {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

/// Runs `cmd` until it announces the fail point `point`, then SIGKILLs it.
pub fn kill_at(mut cmd: Command, point: &str) {
    let mut child = cmd
        .env("RAMOLE_FAIL_POINT", point)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reached = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains(&format!("fail point {point} reached")));
    assert!(reached, "the process ended before fail point {point}");
    child.kill().unwrap(); // SIGKILL
    assert!(!child.wait().unwrap().success());
}

pub struct Home {
    pub dir: tempfile::TempDir,
}

impl Home {
    /// A fresh data dir, initialised with SmolLM2 and MiniLM.
    pub fn init() -> Self {
        let home = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        let g = ramole_core::config::starter_base();
        let m = ramole_core::config::starter_embedder();
        assert!(
            g.exists() && m.exists(),
            "test models missing — run scripts/fetch-test-models.sh"
        );
        let v = home.json(&[
            "init",
            "--base",
            g.to_str().unwrap(),
            "--embedder",
            m.to_str().unwrap(),
            "--json",
        ]);
        assert!(
            v["base"]["id"].as_str().unwrap().contains("HuggingFaceTB"),
            "{v}"
        );
        assert_eq!(v["embedder"]["dims"], 384);
        home
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ramole"));
        c.args(args)
            .env("RAMOLE_HOME", self.path())
            .env_remove("RAMOLE_FAIL_POINT");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run ramole")
    }

    pub fn json(&self, args: &[&str]) -> Value {
        json_of(self.run(args), args)
    }

    pub fn fails(&self, args: &[&str]) -> String {
        failure_of(self.run(args), args)
    }

    pub fn ids(&self) -> Vec<String> {
        self.json(&["adapter", "list", "--json"])["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn retrieved(&self, text: &str, extra: &[&str]) -> Vec<(String, f64, f64)> {
        let mut args = vec!["retrieve", "--text", text, "--json"];
        args.extend_from_slice(extra);
        self.json(&args)["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["id"].as_str().unwrap().to_string(),
                    a["score"].as_f64().unwrap(),
                    a["gate"].as_f64().unwrap(),
                )
            })
            .collect()
    }
}

/// Seeded random rank-4 all-linear adapters for SmolLM2 with a samples file each.
pub struct Adapters {
    pub dir: tempfile::TempDir,
}

pub const FRENCH: &[&str] = &[
    "Translate to French: The weather is nice today.",
    "Translate the following sentence into French: I would like a coffee, please.",
    "How do you say 'where is the train station' in French?",
    "Translate to French: My brother lives in a small village.",
];
pub const SENTIMENT: &[&str] = &[
    "Review: the film was a complete waste of time. Is this review positive or negative?",
    "What is the sentiment of this tweet: I love sunny mornings!",
    "Is the following movie review positive or negative? A moving, beautifully acted story.",
    "Classify the sentiment: the food was cold and the waiter was rude.",
];
pub const MATH: &[&str] = &[
    "Solve for x: 3x + 5 = 20.",
    "What is 17 times 23?",
    "A train travels 60 km in 45 minutes. What is its average speed in km/h?",
    "Compute the derivative of x^3 + 2x.",
];

impl Adapters {
    pub fn make() -> Self {
        let a = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        let model = Model::load(
            &ramole_core::config::starter_base(),
            &LoadOptions::default(),
        )
        .unwrap();
        for (i, (name, samples)) in [("french", FRENCH), ("sentiment", SENTIMENT), ("math", MATH)]
            .into_iter()
            .enumerate()
        {
            let d = a.dir.path().join(name);
            ramole_testkit::write_random_peft(&d, &model.decoder, 4, 8.0, 100 + i as u64).unwrap();
            let lines: String = samples
                .iter()
                .map(|s| format!("{}\n", json!({"input": s, "target": "x"})))
                .collect();
            std::fs::write(a.samples(name), lines).unwrap();
        }
        a
    }

    pub fn dir(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    pub fn samples(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.jsonl"))
    }

    pub fn add(&self, home: &Home, name: &str) -> Value {
        home.json(&[
            "adapter",
            "add",
            &self.dir(name),
            "--samples",
            self.samples(name).to_str().unwrap(),
            "--json",
        ])
    }
}
