//! Data transfer objects of the desktop commands, mirrored by `ui/src/lib/api/types.ts`
//! (snake_case, as the CLI's JSON and the stored provenance). Requests are validated when they
//! become core requests; every bad value is named with its limit.

use std::path::PathBuf;

use ramole_core::catalog::{AdapterRecord, Provenance, Sample};
use ramole_core::chat::{ChatAction, ChatReply, PlanChoice};
use ramole_core::model::{GenerateParams, Sampling};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};

#[derive(Debug, Clone, Serialize)]
pub struct BaseDto {
    pub id: String,
    pub path: PathBuf,
    pub architecture: String,
    pub context: usize,
    pub weight_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EmbedderDto {
    pub id: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Suggested {
    pub base_path: Option<PathBuf>,
    pub embedder_path: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineState {
    Idle,
    Loading,
    Ready,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct AppStatus {
    pub ready: bool,
    pub engine: EngineState,
    pub engine_error: Option<String>,
    pub home: PathBuf,
    pub base: Option<BaseDto>,
    pub embedder: Option<EmbedderDto>,
    pub adapters: usize,
    /// A RouterLoRA is installed for the base (plan `router` works; `auto` picks it).
    pub router: bool,
    pub suggested: Suggested,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SetupRequest {
    pub base_path: PathBuf,
    pub embedder_path: PathBuf,
    pub base_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PullRequestDto {
    pub repo: String,
    pub revision: Option<String>,
    pub file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HubSearchRequest {
    pub query: Option<String>,
    pub sort: String,
    pub limit: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdapterHitDto {
    #[serde(flatten)]
    pub hit: ramole_core::hub::AdapterHit,
    pub installed_as: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InstallRequestDto {
    pub repo: String,
    pub revision: Option<String>,
    pub subfolder: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdapterDto {
    #[serde(flatten)]
    pub record: AdapterRecord,
    pub samples: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdapterDetail {
    #[serde(flatten)]
    pub adapter: AdapterDto,
    pub sample_list: Vec<Sample>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AddLocalRequest {
    pub path: PathBuf,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TrainExample {
    pub input: String,
    pub target: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TrainRequest {
    pub name: String,
    pub examples_path: Option<PathBuf>,
    pub examples: Option<Vec<TrainExample>>,
    pub steps: usize,
    pub rank: usize,
    pub alpha: f64,
    pub lr: f64,
    pub batch: usize,
    pub template: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainProgress {
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
    pub tokens_per_s: f64,
    pub eta_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MessageDto {
    pub id: i64,
    pub role: String,
    pub content: String,
    pub created_at: String,
    pub provenance: Option<Provenance>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatDetail {
    pub session: ramole_core::catalog::ChatSession,
    pub messages: Vec<MessageDto>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GenerationParams {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SendRequest {
    pub session: Option<i64>,
    pub stream_id: String,
    pub action: ChatAction,
    #[serde(default)]
    pub text: String,
    pub plan: String,
    pub k: Option<usize>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub pinned: Vec<ramole_core::chat::Pin>,
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
            .map_err(|e: ramole_core::mole::MoleError| ApiError::invalid(e.to_string()))?;
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
            k: self.k,
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

/// Events of one `chat_send`, in order: routing, started, text*, done.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ChatEvent {
    Routing {
        provenance: Provenance,
    },
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppSettings {
    pub data_dir: PathBuf,
    pub data_dir_next: Option<PathBuf>,
    pub hub_endpoint: Option<String>,
    pub hub_offline: bool,
    pub threads: usize,
    pub k: usize,
    pub scoring: String,
    pub gating: String,
    pub plan: String,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub token_set: bool,
    pub token_store: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportResult {
    pub path: PathBuf,
    pub content: String,
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
        assert_eq!(c.plan, PlanChoice::Plan(ramole_core::mole::Plan::Fusion));
        assert_eq!((c.k, c.params.sampling.seed), (Some(2), 5));
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
