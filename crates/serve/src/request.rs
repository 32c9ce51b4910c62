//! The request of `POST /v1/chat/completions`: OpenAI's fields we honour, typed
//! ([`ChatCompletionRequest`], deserialized with the path of any bad value kept so the error
//! names the field), then checked against the limits into a [`CompletionRequest`] the handler
//! runs. Fields OpenAI clients send that change nothing here (`user`, `logprobs`, ...) are
//! ignored, as OpenAI-compatible servers do; fields of the `ramole` extension are not.

use std::collections::BTreeMap;

use ramole_core::chat::{self, ChatError, RouteAsk};
use ramole_core::model::{ChatMessage, GenerateParams, Sampling};
use ramole_core::vocab::{Gating, MAX_K, PlanChoice, Role, TopK};
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// Most messages in one request.
pub const MAX_MESSAGES: usize = 512;
/// Most stop strings (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// `max_tokens` when a request gives none.
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// The body as sent.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<MessageIn>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// OpenAI's newer name for `max_tokens`; wins when both are given.
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<u64>,
    #[serde(default)]
    pub seed: Option<Seed>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<u64>,
    /// Our routing extension.
    #[serde(default)]
    pub ramole: Option<RamoleOptions>,
}

/// One message: a role and its text (a string, or text parts).
#[derive(Debug, Clone, Deserialize)]
pub struct MessageIn {
    pub role: RoleIn,
    #[serde(default)]
    pub content: Option<Content>,
}

/// OpenAI's roles; `developer` is its newer name for `system`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleIn {
    System,
    Developer,
    User,
    Assistant,
}

impl From<RoleIn> for Role {
    fn from(r: RoleIn) -> Role {
        match r {
            RoleIn::System | RoleIn::Developer => Role::System,
            RoleIn::User => Role::User,
            RoleIn::Assistant => Role::Assistant,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// A content part; only `{"type": "text", "text": ..}` is supported.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
}

/// A seed as an unsigned or (wrapped to unsigned) signed integer.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum Seed {
    Unsigned(u64),
    Signed(i64),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The `ramole` extension: `{"k", "plan", "gating", "exclude"}` for retrieval, or
/// `{"adapters": [..], "plan"}` to name adapters.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RamoleOptions {
    #[serde(default)]
    pub k: Option<u64>,
    #[serde(default)]
    pub plan: Option<String>,
    #[serde(default)]
    pub gating: Option<String>,
    #[serde(default)]
    pub exclude: Option<Vec<String>>,
    #[serde(default)]
    pub adapters: Option<Vec<AdapterPick>>,
    /// Anything else is refused by name (a typo must not silently change the routing).
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// An adapter named by hand: its id, or `{"id", "gate"}` (gate 1 when absent).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum AdapterPick {
    Id(String),
    Gated {
        id: String,
        #[serde(default)]
        gate: Option<f64>,
    },
}

/// A chat completion request, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// The `model` asked for (echoed back; empty when none was given).
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub stream: bool,
    pub include_usage: bool,
    pub params: GenerateParams,
    pub route: RouteAsk,
}

/// The top-level field a deserialization error is about (`messages[3].role` → `messages`).
fn param_of(path: &serde_path_to_error::Path) -> &'static str {
    let first = path
        .iter()
        .next()
        .map(|s| s.to_string())
        .unwrap_or_default();
    let name = first.split(['[', '.']).next().unwrap_or("");
    [
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "n",
        "ramole",
    ]
    .into_iter()
    .find(|p| *p == name)
    .unwrap_or("body")
}

/// Parses and checks a request body. `ctx` is the model's context length.
pub fn parse_request(body: &[u8], ctx: usize) -> Result<CompletionRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::invalid("body", "the body must be a JSON object"));
    }
    let req: ChatCompletionRequest = serde_path_to_error::deserialize(v).map_err(|e| {
        let inner = e.inner().to_string();
        if inner.starts_with("missing field `messages`") {
            return ApiError::invalid("messages", "messages must be a non-empty array");
        }
        let param = param_of(e.path());
        let message = match param {
            "messages" if e.path().iter().count() <= 1 => {
                format!("messages must be a non-empty array: {inner}")
            }
            _ => format!("{}: {inner}", e.path()),
        };
        ApiError::invalid(param, message)
    })?;
    req.check(ctx)
}

fn in_range(param: &'static str, x: f64, lo: f64, hi: f64) -> Result<f64, ApiError> {
    if !(lo..=hi).contains(&x) {
        return Err(ApiError::invalid(
            param,
            format!("{param} = {x} must be between {lo} and {hi}"),
        ));
    }
    Ok(x)
}

fn count_in(param: &'static str, x: u64, lo: u64, hi: u64) -> Result<u64, ApiError> {
    if !(lo..=hi).contains(&x) {
        return Err(ApiError::invalid(
            param,
            format!("{param} = {x} must be between {lo} and {hi}"),
        ));
    }
    Ok(x)
}

impl Content {
    /// The text of message `i`.
    fn text(&self, i: usize) -> Result<String, ApiError> {
        match self {
            Content::Text(s) => Ok(s.clone()),
            Content::Parts(parts) => {
                let mut out = String::new();
                for p in parts {
                    match (p.kind.as_deref(), &p.text) {
                        (Some("text"), Some(t)) => out.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                "messages",
                                format!(
                                    "messages[{i}].content: only text parts are supported, got {}",
                                    kind.unwrap_or("a part without a type")
                                ),
                            ));
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

impl ChatCompletionRequest {
    /// Checks every value against its limit; `ctx` is the model's context length.
    pub fn check(self, ctx: usize) -> Result<CompletionRequest, ApiError> {
        if self.messages.is_empty() || self.messages.len() > MAX_MESSAGES {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "messages has {} entries; it needs 1 to {MAX_MESSAGES}",
                    self.messages.len()
                ),
            ));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let role = Role::from(m.role);
            let text = match &m.content {
                Some(c) => c.text(i)?,
                None => String::new(),
            };
            chat::check_message(&text).or_else(|e| match e {
                // An empty assistant turn is harmless history; an empty user turn is not.
                ChatError::Invalid(_) if role != Role::User && text.trim().is_empty() => Ok(()),
                ChatError::Invalid(m) => {
                    Err(ApiError::invalid("messages", format!("messages[{i}]: {m}")))
                }
                other => Err(other.into()),
            })?;
            messages.push(ChatMessage::new(role, text));
        }
        if messages.last().map(|m| m.role) != Some(Role::User) {
            return Err(ApiError::invalid(
                "messages",
                "the last message must be the user's: it is what gets answered (and what retrieval reads)",
            ));
        }
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid(
                "n",
                format!("n = {n}: only 1 choice is supported"),
            ));
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => DEFAULT_MAX_TOKENS.min(ctx - 1),
            Some(v) => count_in("max_tokens", v, 1, ctx as u64 - 1)? as usize,
        };
        let mut sampling = Sampling::default();
        if let Some(t) = self.temperature {
            sampling.temperature = in_range("temperature", t, 0.0, 2.0)? as f32;
        }
        if let Some(p) = self.top_p {
            sampling.top_p = in_range("top_p", p, 0.0, 1.0)? as f32;
            if sampling.top_p == 0.0 {
                return Err(ApiError::invalid("top_p", "top_p must be above 0"));
            }
        }
        if let Some(k) = self.top_k {
            sampling.top_k = count_in("top_k", k, 0, 1 << 20)? as usize;
        }
        if let Some(s) = self.seed {
            sampling.seed = match s {
                Seed::Unsigned(u) => u,
                Seed::Signed(i) => i as u64,
            };
        }
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stop.len() > MAX_STOP {
            return Err(ApiError::invalid(
                "stop",
                format!("{} stop strings; the limit is {MAX_STOP}", stop.len()),
            ));
        }
        let route = self.ramole.unwrap_or_default().route()?;
        Ok(CompletionRequest {
            model: self.model.unwrap_or_default(),
            messages,
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            params: GenerateParams {
                max_tokens,
                sampling,
                stop,
                ignore_eos: false,
            },
            route,
        })
    }
}

impl RamoleOptions {
    /// How the request routes: adapters named by hand, else retrieval.
    fn route(self) -> Result<RouteAsk, ApiError> {
        if let Some(key) = self.unknown.keys().next() {
            return Err(ApiError::invalid(
                "ramole",
                format!("ramole.{key} is not an option (k, plan, gating, exclude, adapters)"),
            ));
        }
        let plan = self
            .plan
            .map(|s| {
                s.parse::<PlanChoice>()
                    .map_err(|e| ApiError::invalid("ramole", format!("ramole.plan: {e}")))
            })
            .transpose()?;
        if let Some(list) = self.adapters {
            let mut adapters = Vec::with_capacity(list.len());
            for pick in list {
                adapters.push(match pick {
                    AdapterPick::Id(id) => (id, 1.0),
                    AdapterPick::Gated { id, gate } => {
                        let gate = match gate {
                            None => 1.0,
                            Some(g) => in_range("ramole", g, 0.0, 100.0)? as f32,
                        };
                        (id, gate)
                    }
                });
            }
            return Ok(RouteAsk::Given {
                adapters,
                plan: plan.and_then(PlanChoice::plan),
            });
        }
        let k = self
            .k
            .map(|k| {
                count_in("ramole", k, 1, MAX_K as u64).and_then(|k| {
                    TopK::new(k as usize).map_err(|e| ApiError::invalid("ramole", e.to_string()))
                })
            })
            .transpose()?;
        let gating = self
            .gating
            .map(|s| {
                s.parse::<Gating>()
                    .map_err(|e| ApiError::invalid("ramole", format!("ramole.gating: {e}")))
            })
            .transpose()?;
        Ok(RouteAsk::Retrieve {
            k,
            plan: plan.unwrap_or(PlanChoice::Auto),
            gating,
            exclude: self.exclude.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use ramole_core::vocab::Plan;

    use super::*;

    fn parse(body: &str) -> Result<CompletionRequest, ApiError> {
        parse_request(body.as_bytes(), 2048)
    }

    #[test]
    fn a_full_request_parses() {
        let r = parse(
            r#"{"model": "m", "stream": true, "max_tokens": 20, "temperature": 0.5, "top_p": 0.9,
                "seed": 7, "stop": ["\n\n"], "stream_options": {"include_usage": true},
                "messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                "ramole": {"k": 2, "plan": "fusion", "gating": "softmax:0.2", "exclude": ["x"]}}"#,
        )
        .unwrap();
        assert!(r.stream && r.include_usage);
        assert_eq!(r.params.max_tokens, 20);
        assert_eq!(r.params.sampling.seed, 7);
        assert_eq!(r.messages[1].content, "Hi");
        assert_eq!(
            r.route,
            RouteAsk::Retrieve {
                k: Some(TopK::new(2).unwrap()),
                plan: PlanChoice::Plan(Plan::Fusion),
                gating: Some(Gating::Softmax { temperature: 0.2 }),
                exclude: vec!["x".into()],
            }
        );
        let r = parse(
            r#"{"messages": [{"role": "user", "content": "Hi"}],
                "ramole": {"adapters": [{"id": "a", "gate": 0.3}, "b"], "plan": "mixture"}}"#,
        )
        .unwrap();
        assert_eq!(
            r.route,
            RouteAsk::Given {
                adapters: vec![("a".into(), 0.3), ("b".into(), 1.0)],
                plan: Some(Plan::Mixture),
            }
        );
        assert_eq!(r.params.max_tokens, DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn bad_requests_name_the_field_and_the_limit() {
        let cases = [
            ("{", "body", "not valid JSON"),
            ("[]", "body", "JSON object"),
            (r#"{"messages": []}"#, "messages", "1 to 512"),
            (
                r#"{"messages": [{"role": "robot", "content": "x"}]}"#,
                "messages",
                "robot",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}"#,
                "messages",
                "last message",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "  "}]}"#,
                "messages",
                "empty",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}"#,
                "max_tokens",
                "between 1 and 2047",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "temperature": 3}"#,
                "temperature",
                "between 0 and 2",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "n": 2}"#,
                "n",
                "only 1",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}"#,
                "stop",
                "limit is 4",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "ramole": {"plan": "magic"}}"#,
                "ramole",
                "magic",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "ramole": {"k": 0}}"#,
                "ramole",
                "between 1",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "ramole": {"topk": 3}}"#,
                "ramole",
                "ramole.topk",
            ),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
                "messages",
                "only text parts",
            ),
        ];
        for (body, param, needle) in cases {
            let e = parse(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param, Some(param), "{body}: {e:?}");
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
    }
}
