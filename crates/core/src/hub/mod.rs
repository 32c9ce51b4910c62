//! The Hugging Face Hub: a small typed client of the HTTP API (listing and search, model info,
//! file trees, resolve with ranges), downloads into the cache Python tools share (resumable,
//! verified against the LFS sha256 or the git blob id, size-limited), model cards, and
//! compatibility verdicts for adapters found there, and fetching an adapter's or a model's files
//! into that cache. It talks HTTP and judges; installing an adapter is a library use-case
//! (`library::install`). No HTTP library type leaves this module.

mod cache;
mod card;
mod client;
mod compat;
mod fetch;
mod pull;

use std::path::PathBuf;
use ts_rs::TS;

pub use cache::{Fetched, HubCache};
pub use card::{MAX_CARD_BYTES, ModelCard, card_samples};
pub use client::{
    FileMeta, HubClient, LfsInfo, ModelInfo, ModelPage, RetryPolicy, SearchQuery, Sibling, Sort,
    TreeEntry,
};
pub use compat::{
    AdapterCost, AdapterHit, BaseTarget, SearchRequest, equivalent_bases, judge_listing,
    name_verdict, search_adapters, verdict_for,
};
pub use fetch::{AdapterRef, FetchedAdapter, MAX_SAMPLES_FILE_BYTES, fetch_adapter};
pub use pull::{PullRequest, Pulled, pull_model};

/// Largest file the client downloads unless told otherwise (adapters are small; base models
/// pass their own limit).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 2 << 30;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{url}: {message}")]
    Transport { url: String, message: String },
    #[error("{what} not found on the Hub ({url})")]
    NotFound { what: String, url: String },
    #[error(
        "{repo} is gated: its files need a token of an account that accepted its terms (set HF_TOKEN or log in with `huggingface-cli login`)"
    )]
    Gated { repo: String },
    #[error("the Hub refused the token ({message}); check HF_TOKEN")]
    Unauthorized { message: String },
    #[error(
        "{url}: rate limited by the Hub (HTTP 429) after {attempts} attempts{}; try again later or set HF_TOKEN for a higher limit",
        retry_after.map(|s| format!(", it asks to wait {s} s")).unwrap_or_default()
    )]
    RateLimited {
        url: String,
        attempts: usize,
        retry_after: Option<u64>,
    },
    #[error("{url}: HTTP {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    #[error("{file}: {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { file: String, size: u64, limit: u64 },
    #[error(
        "{file}: checksum mismatch: expected {expected}, got {actual}; the download was discarded"
    )]
    Integrity {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("offline (HF_HUB_OFFLINE): {what} is not in the Hub cache")]
    Offline { what: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T, E = HubError> = std::result::Result<T, E>;

/// What a long operation is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, TS)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Download,
    Validate,
    Embed,
    Commit,
}

/// One progress report: for downloads, bytes done of total for the current file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, TS)]
pub struct ProgressEvent {
    pub stage: Stage,
    /// The file being downloaded (repository path), empty for other stages.
    pub file: String,
    pub done: u64,
    pub total: u64,
}

/// Receives progress and may ask to stop: the UI's Cancel, a CLI's Ctrl-C.
pub trait Progress: Sync {
    fn report(&self, event: &ProgressEvent);
    fn cancelled(&self) -> bool {
        false
    }
}

/// No reporting, never cancelled.
pub struct Silent;

impl Progress for Silent {
    fn report(&self, _: &ProgressEvent) {}
}

/// Splits `repo[@revision]`; the revision defaults to `main`.
pub fn parse_repo_ref(spec: &str) -> Result<(String, String)> {
    let (repo, rev) = match spec.split_once('@') {
        Some((r, v)) => (r, v),
        None => (spec, "main"),
    };
    check_repo_id(repo)?;
    if rev.is_empty() || rev.contains("..") || rev.chars().any(char::is_whitespace) {
        return Err(HubError::Invalid {
            what: spec.into(),
            message: format!("revision {rev:?} is not a branch, tag or commit"),
        });
    }
    Ok((repo.to_string(), rev.to_string()))
}

/// A repository id is `name` or `org/name` of letters, digits, `-`, `_`, `.` (no `..`).
pub fn check_repo_id(repo: &str) -> Result<()> {
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.contains("..")
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let parts: Vec<&str> = repo.split('/').collect();
    if (parts.len() == 1 || parts.len() == 2) && parts.iter().all(|p| ok_part(p)) {
        Ok(())
    } else {
        Err(HubError::Invalid {
            what: repo.into(),
            message: "not a repository id (expected `org/name` of letters, digits, `-`, `_`, `.`)"
                .into(),
        })
    }
}

/// A file path inside a repository must stay inside it: relative, no `..`, no empty parts, no
/// backslashes or control characters.
pub fn check_repo_path(path: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(HubError::Invalid {
            what: path.into(),
            message: format!("refused file name: {why}"),
        })
    };
    if path.is_empty() || path.len() > 1024 {
        return bad("empty or longer than 1024 bytes");
    }
    if path.starts_with('/') || path.contains('\\') || path.contains(':') {
        return bad("absolute paths and drive or backslash separators are not allowed");
    }
    if path.chars().any(char::is_control) {
        return bad("control characters");
    }
    for part in path.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return bad("`..`, `.` and empty path segments are not allowed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_refs_and_paths_are_checked() {
        assert_eq!(
            parse_repo_ref("org/name@dev").unwrap(),
            ("org/name".into(), "dev".into())
        );
        assert_eq!(parse_repo_ref("gpt2").unwrap().1, "main");
        for bad in [
            "",
            "a/b/c",
            "../x",
            "org/..",
            "org/na me",
            "org/x@",
            "org/x@a b",
        ] {
            assert!(parse_repo_ref(bad).is_err(), "{bad}");
        }
        for ok in ["adapter_config.json", "sub/dir/a.safetensors", "a..b.json"] {
            check_repo_path(ok).unwrap();
        }
        for bad in [
            "../x",
            "/etc/passwd",
            "a/../../b",
            "a//b",
            "a\\b",
            "C:x",
            "./a",
            "",
        ] {
            assert!(check_repo_path(bad).is_err(), "{bad}");
        }
    }
}
