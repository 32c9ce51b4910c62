//! The errors a client sees: an HTTP status and OpenAI's error object
//! `{"error": {"message", "type", "param", "code"}}`, made from the core's typed errors. A bad
//! request names the field (`param`) and, in the message, the value and the limit.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ramole_core::catalog::CatalogError;
use ramole_core::chat::ChatError;
use ramole_core::engine::EngineError;
use ramole_core::library::LibraryError;
use ramole_core::model::ModelError;
use serde_json::{Value, json};

/// An error answered to a client: status and OpenAI's error object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: the request's `param` is wrong.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: Some(param),
            code: None,
        }
    }

    /// 404: something the request names does not exist.
    pub fn not_found(param: Option<&'static str>, code: &'static str, message: String) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            message,
            param,
            code: Some(code),
        }
    }

    /// 500: the server failed.
    pub fn server(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param,
                         "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Busy { .. } => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                message: e.to_string(),
                param: None,
                code: Some("engine_busy"),
            },
            EngineError::Invalid(m) => Self::invalid("messages", m),
            other => Self::server(other.to_string()),
        }
    }
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        match e {
            ChatError::Invalid(m) => Self::invalid("messages", m),
            ChatError::Mole(m) => Self::invalid("ramole", m.to_string()),
            ChatError::Vocab(m) => Self::invalid("ramole", m.to_string()),
            ChatError::Engine(e) => e.into(),
            ChatError::Library(LibraryError::Invalid(m)) => Self::invalid("ramole", m),
            ChatError::Library(LibraryError::Catalog(e @ CatalogError::NoAdapter(_))) => {
                Self::not_found(Some("ramole"), "adapter_not_found", e.to_string())
            }
            ChatError::Model(ModelError::Input(m)) => Self::invalid("messages", m),
            other => Self::server(other.to_string()),
        }
    }
}
