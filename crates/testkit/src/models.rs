//! Where the tests' models are: the tiny committed fixtures, and the real SmolLM2 and MiniLM the
//! fetch script unpacks from PyPI (the same starter models the app suggests).

use std::path::{Path, PathBuf};

use ramole_core::config;

/// `tests/fixtures/<name>` of the repository.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// `path`, or a failure naming the script that fetches it.
fn required(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "test model missing: {} — run scripts/fetch-test-models.sh (RAMOLE_TEST_MODELS={})",
        path.display(),
        config::starter_models_dir().display()
    );
    path
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF.
pub fn smollm2() -> PathBuf {
    required(config::starter_base())
}

/// all-MiniLM-L6-v2 (a sentence-transformers folder).
pub fn minilm() -> PathBuf {
    required(config::starter_embedder())
}
