//! The rules of ARCHITECTURE.md checked over the sources of every crate: no module imports one
//! that imports it back (between a crate's top-level modules, and between the files of one
//! module folder), the ground-floor modules import nothing above them, every SIMD routine lives
//! in ramole-kernels, the core has no async runtime or GUI, and one place chooses the device.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The source without its `#[cfg(test)]` modules (tests may reach anywhere) and comments.
fn production_code(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        // Skip the item the attribute is on: up to its matching closing brace.
        match after.find('{') {
            Some(open) if after[..open].contains("mod ") => {
                let mut depth = 0;
                let mut end = after.len();
                for (i, c) in after[open..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = open + i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                rest = &after[end..];
            }
            _ => {
                out.push_str("#[cfg(test)]");
                rest = &after["#[cfg(test)]".len()..];
            }
        }
    }
    out.push_str(rest);
    out.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifiers that follow `prefix` (`crate::`, `super::`) in `code`.
fn paths_after<'a>(code: &'a str, prefix: &str) -> Vec<&'a str> {
    code.match_indices(prefix)
        .filter(|(i, _)| {
            // `crate::` inside another identifier (`ramole_crate::`) does not count.
            *i == 0 || !code[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_')
        })
        .map(|(i, _)| {
            let rest = &code[i + prefix.len()..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// A module's name from its file: `src/engine/worker.rs` -> ["engine", "worker"],
/// `src/engine/mod.rs` -> ["engine"]; `lib.rs` / `main.rs` -> [].
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// Edges `from -> to` between sibling modules: top-level modules of the crate (through
/// `crate::x`), and files of one folder (through `super::x` naming a sibling module).
fn edges(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let files = rust_files(src);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_path(src, f)).collect();
    let mut out: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for f in &files {
        let m = module_path(src, f);
        if m.is_empty() {
            continue;
        }
        let code = production_code(&std::fs::read_to_string(f).unwrap());
        let entry = out.entry(m.clone()).or_default();
        for name in paths_after(&code, "crate::") {
            let to = vec![name.to_string()];
            if modules.contains(&to) && to[0] != m[0] {
                entry.insert(to);
            }
        }
        // `super::x` from a file of folder `a/` (not its mod.rs) names `a/x` when that exists.
        let is_folder_root = f.file_name().is_some_and(|n| n == "mod.rs");
        if m.len() >= 2 && !is_folder_root {
            for name in paths_after(&code, "super::") {
                let mut to = m[..m.len() - 1].to_vec();
                to.push(name.to_string());
                if modules.contains(&to) && to != m {
                    entry.insert(to);
                }
            }
        }
    }
    out
}

/// The cycles among `edges` (each as its modules), found by Tarjan's algorithm.
fn cycles(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<String>> {
    let nodes: Vec<&Vec<String>> = edges.keys().collect();
    let id: BTreeMap<&Vec<String>, usize> =
        nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let adj: Vec<Vec<usize>> = nodes
        .iter()
        .map(|n| {
            edges[*n]
                .iter()
                .filter_map(|t| id.get(t).copied())
                .collect()
        })
        .collect();
    struct T {
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        found: Vec<Vec<usize>>,
    }
    fn visit(v: usize, adj: &[Vec<usize>], t: &mut T) {
        t.index[v] = Some(t.next);
        t.low[v] = t.next;
        t.next += 1;
        t.stack.push(v);
        t.on[v] = true;
        for &w in &adj[v] {
            match t.index[w] {
                None => {
                    visit(w, adj, t);
                    t.low[v] = t.low[v].min(t.low[w]);
                }
                Some(i) if t.on[w] => t.low[v] = t.low[v].min(i),
                _ => {}
            }
        }
        if Some(t.low[v]) == t.index[v] {
            let mut scc = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on[w] = false;
                scc.push(w);
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                t.found.push(scc);
            }
        }
    }
    let n = nodes.len();
    let mut t = T {
        index: vec![None; n],
        low: vec![0; n],
        on: vec![false; n],
        stack: Vec::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in 0..n {
        if t.index[v].is_none() {
            visit(v, &adj, &mut t);
        }
    }
    t.found
        .into_iter()
        .map(|scc| scc.iter().map(|&i| nodes[i].join("::")).collect())
        .collect()
}

const CRATES: [&str; 7] = [
    "crates/kernels/src",
    "crates/core/src",
    "crates/serve/src",
    "crates/cli/src",
    "crates/testkit/src",
    "crates/testhub/src",
    "src-tauri/src",
];

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let mut found = Vec::new();
    for c in CRATES {
        for cycle in cycles(&edges(&repo().join(c))) {
            found.push(format!("{c}: {}", cycle.join(" <-> ")));
        }
    }
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

#[test]
fn the_checker_finds_a_cycle_when_there_is_one() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("lib.rs"), "mod a;\nmod b;\nmod c;\n").unwrap();
    std::fs::write(src.join("a/mod.rs"), "mod x;\nmod y;\nuse crate::b::B;\n").unwrap();
    std::fs::write(src.join("a/x.rs"), "use super::y::Y;\n").unwrap();
    std::fs::write(src.join("a/y.rs"), "use super::x::X;\n").unwrap();
    std::fs::write(src.join("b.rs"), "fn f() { crate::a::g() }\n").unwrap();
    std::fs::write(
        src.join("c.rs"),
        "use crate::b::B;\n#[cfg(test)]\nmod tests { use crate::a::A; }\n",
    )
    .unwrap();
    let mut got: Vec<Vec<String>> = cycles(&edges(src))
        .into_iter()
        .map(|mut c| {
            c.sort();
            c
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            vec!["a".to_string(), "b".to_string()],
            vec!["a::x".into(), "a::y".into()]
        ]
    );
}

/// Files of `dir` whose production code contains any of `needles`.
fn offenders(dir: &str, needles: &[&str]) -> Vec<String> {
    let root = repo();
    rust_files(&root.join(dir))
        .into_iter()
        .filter(|f| {
            let code = production_code(&std::fs::read_to_string(f).unwrap());
            needles.iter().any(|n| code.contains(n))
        })
        .map(|f| f.strip_prefix(&root).unwrap().display().to_string())
        .collect()
}

#[test]
fn every_simd_routine_lives_in_the_kernels_crate() {
    let simd = [
        "target_feature",
        "is_x86_feature_detected",
        "std::arch",
        "core::arch",
        "asm!",
    ];
    for dir in CRATES.iter().filter(|c| !c.starts_with("crates/kernels")) {
        assert_eq!(offenders(dir, &simd), Vec::<String>::new(), "SIMD in {dir}");
    }
}

/// The layers of ramole-core, bottom first, as ARCHITECTURE.md's table gives them.
const LAYERS: [&[&str]; 6] = [
    &["vocab", "batch", "device", "files", "metrics"],
    &["config", "model"],
    &["adapter", "catalog", "embed", "index"],
    &["mole", "router", "retrieve", "hub"],
    &["engine", "library", "transcript", "train"],
    &["chat", "tasks"],
];

#[test]
fn the_layers_import_only_what_is_below_them() {
    let src = repo().join("crates/core/src");
    let g = edges(&src);
    let layer_of = |m: &str| LAYERS.iter().position(|l| l.contains(&m));
    let mut wrong = Vec::new();
    for (from, to) in &g {
        if from.len() != 1 {
            continue;
        }
        let Some(lf) = layer_of(&from[0]) else {
            wrong.push(format!("{} has no layer in ARCHITECTURE.md", from[0]));
            continue;
        };
        for t in to {
            match layer_of(&t[0]) {
                Some(lt) if lt < lf => {}
                _ => wrong.push(format!("{} (layer {lf}) imports {}", from[0], t[0])),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The core is headless and synchronous.
    assert_eq!(
        offenders("crates/core/src", &["tauri", "axum", "tokio"]),
        Vec::<String>::new()
    );
}

#[test]
fn one_place_chooses_the_device() {
    let mut found = Vec::new();
    for dir in [
        "crates/core/src",
        "crates/serve/src",
        "crates/cli/src",
        "src-tauri/src",
    ] {
        found.extend(offenders(dir, &["Device::Cpu"]));
    }
    // The device module, and the CPU custom op that works on host memory by definition.
    found
        .retain(|f| !f.ends_with("core/src/device.rs") && !f.ends_with("core/src/model/linear.rs"));
    assert_eq!(found, Vec::<String>::new());
}
