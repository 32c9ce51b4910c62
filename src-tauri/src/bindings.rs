//! The TypeScript the UI is written against, generated from the Rust types that cross into it:
//! every DTO and event, the error codes, the vocabulary of plans, gates and scoring (ts-rs, which
//! reads the serde attributes, so the TypeScript is what the JSON is), and the constants the UI
//! must not copy by hand (the k limit, the plan choices and their hints, the error codes).
//!
//! The file is committed (`ui/src/lib/api/generated.ts`) so the UI builds without Rust; the test
//! below fails when it is stale, and `scripts/gen-bindings.sh` rewrites it.

use ramole_core::catalog::{AdapterSource, ChatSession, Compat, Sample, SampleOrigin, Verdict};
use ramole_core::chat::{ChatAction, ChatReply, Pin};
use ramole_core::hub::{AdapterCost, ProgressEvent, Pulled, Sort, Stage};
use ramole_core::transcript::{ExportFormat, Exported, Transcript, TranscriptMessage};
use ramole_core::vocab::{
    FinishReason, Gating, GenerationRecord, LayerGates, MAX_K, Plan, PlanChoice, Provenance,
    ReplyGating, Role, Scoring, ServedAdapter, TopK,
};
use ts_rs::{Config, TS};

use crate::dto::*;
use crate::error::{ApiError, ErrorCode};

/// Where the generated file lives, from the repository root.
pub const PATH: &str = "ui/src/lib/api/generated.ts";

/// One exported declaration: its doc comment (as JSDoc) and `export type ...`.
fn decl<T: TS + ?Sized>(cfg: &Config) -> String {
    let mut out = String::new();
    if let Some(docs) = T::docs() {
        out.push_str(&docs);
        if !docs.ends_with('\n') {
            out.push('\n');
        }
    }
    out.push_str("export ");
    out.push_str(&T::decl(cfg));
    out.push('\n');
    out
}

/// A JSON string literal.
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// The whole generated file.
pub fn typescript() -> String {
    let cfg = Config::new().with_large_int("number");
    let decls = [
        // The vocabulary (DESIGN.md 3a).
        decl::<Plan>(&cfg),
        decl::<PlanChoice>(&cfg),
        decl::<Gating>(&cfg),
        decl::<Scoring>(&cfg),
        decl::<Role>(&cfg),
        decl::<FinishReason>(&cfg),
        decl::<ReplyGating>(&cfg),
        decl::<ServedAdapter>(&cfg),
        decl::<GenerationRecord>(&cfg),
        decl::<LayerGates>(&cfg),
        decl::<Provenance>(&cfg),
        // Errors.
        decl::<ErrorCode>(&cfg),
        decl::<ApiError>(&cfg),
        // Status and setup.
        decl::<EngineState>(&cfg),
        decl::<BaseDto>(&cfg),
        decl::<EmbedderDto>(&cfg),
        decl::<Suggested>(&cfg),
        decl::<AppStatus>(&cfg),
        decl::<SetupRequest>(&cfg),
        decl::<Stage>(&cfg),
        decl::<ProgressEvent>(&cfg),
        decl::<PullRequestDto>(&cfg),
        decl::<Pulled>(&cfg),
        // Discover and the library.
        decl::<Compat>(&cfg),
        decl::<Sort>(&cfg),
        decl::<HubSearchRequest>(&cfg),
        decl::<AdapterCost>(&cfg),
        decl::<AdapterHitDto>(&cfg),
        decl::<InstallRequestDto>(&cfg),
        decl::<AdapterSource>(&cfg),
        decl::<Verdict>(&cfg),
        decl::<AdapterDto>(&cfg),
        decl::<SampleOrigin>(&cfg),
        decl::<Sample>(&cfg),
        decl::<AdapterDetail>(&cfg),
        decl::<AddLocalRequest>(&cfg),
        decl::<TrainExample>(&cfg),
        decl::<TrainRequest>(&cfg),
        decl::<TrainProgress>(&cfg),
        // Chat.
        decl::<ChatSession>(&cfg),
        decl::<TranscriptMessage>(&cfg),
        decl::<Transcript>(&cfg),
        decl::<Pin>(&cfg),
        decl::<GenerationParams>(&cfg),
        decl::<ChatAction>(&cfg),
        decl::<SendRequest>(&cfg),
        decl::<ChatReply>(&cfg),
        decl::<ChatEvent>(&cfg),
        decl::<ExportFormat>(&cfg),
        decl::<Exported>(&cfg),
        // Settings.
        decl::<AppSettings>(&cfg),
    ];
    let plans: Vec<String> = PlanChoice::ALL.iter().map(|c| quoted(c.as_str())).collect();
    let hints: Vec<String> = PlanChoice::ALL
        .iter()
        .map(|c| format!("  {}: {},", c.as_str(), quoted(c.hint())))
        .collect();
    let codes: Vec<String> = ErrorCode::ALL.iter().map(|c| quoted(c.as_str())).collect();
    let mut out = String::from(
        "// Generated from the Rust types by src-tauri/src/bindings.rs (ts-rs): do not edit.\n\
         // `scripts/gen-bindings.sh` rewrites it; `cargo test` fails when it is stale.\n\n",
    );
    for d in decls {
        out.push_str(&d);
        out.push('\n');
    }
    out.push_str(&format!(
        "/** The most adapters one message may mix (k). */\nexport const MAX_K = {MAX_K};\n\n\
         /** k when the settings say nothing else (the paper's). */\nexport const DEFAULT_K = {};\n\n\
         /** Every plan choice, in the order menus list them. */\n\
         export const PLAN_CHOICES: PlanChoice[] = [{}];\n\n\
         /** One line per plan choice (DESIGN.md 3a): the tooltips of the plan selects. */\n\
         export const PLAN_HINTS: Record<PlanChoice, string> = {{\n{}\n}};\n\n\
         /** Every error code a command may reject with. */\n\
         export const ERROR_CODES: ErrorCode[] = [{}];\n",
        TopK::DEFAULT,
        plans.join(", "),
        hints.join("\n"),
        codes.join(", "),
    ));
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The committed file must be what the Rust types say. With `RAMOLE_BLESS=1` the test writes
    /// it instead (what `scripts/gen-bindings.sh` runs).
    #[test]
    fn the_committed_typescript_is_generated_from_the_rust_types() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(PATH);
        let want = typescript();
        if std::env::var_os("RAMOLE_BLESS").is_some_and(|v| v == "1") {
            ramole_core::files::write_atomic(&path, want.as_bytes()).unwrap();
            return;
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have != want {
            let line = have
                .lines()
                .zip(want.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| have.lines().count().min(want.lines().count()));
            panic!(
                "{PATH} is stale (first difference at line {}): the Rust types that cross into \
                 the UI changed; run scripts/gen-bindings.sh and commit the file",
                line + 1
            );
        }
    }

    #[test]
    fn the_constants_match_the_rust_ones() {
        let ts = typescript();
        assert!(ts.contains(&format!("export const MAX_K = {MAX_K};")));
        for c in PlanChoice::ALL {
            assert!(ts.contains(&format!("{}: {}", c.as_str(), quoted(c.hint()))));
        }
        assert!(ts.contains("\"not_found\""));
    }
}
