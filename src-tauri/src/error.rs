//! The one error type that crosses into the UI: data, `{code, message}` (DESIGN.md 2), made
//! from the core's typed errors. The code says what the UI can do about it; the message names
//! the value and the limit, as the core wrote it.

use ramole_core::catalog::CatalogError;
use ramole_core::chat::ChatError;
use ramole_core::config::SettingsError;
use ramole_core::engine::EngineError;
use ramole_core::hub::HubError;
use ramole_core::library::LibraryError;
use ramole_core::train::TrainError;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// invalid | not_found | not_ready | busy | hub | offline | cancelled | model | io | internal
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new("invalid", message)
    }

    pub fn not_ready(message: impl Into<String>) -> Self {
        Self::new("not_ready", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new("internal", message)
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

fn hub_code(e: &HubError) -> &'static str {
    match e {
        HubError::Cancelled => "cancelled",
        HubError::Offline { .. } => "offline",
        HubError::NotFound { .. } => "not_found",
        HubError::Invalid { .. } | HubError::TooLarge { .. } => "invalid",
        HubError::Io { .. } => "io",
        _ => "hub",
    }
}

fn catalog_code(e: &CatalogError) -> &'static str {
    match e {
        CatalogError::NoAdapter(_) | CatalogError::NoChat(_) => "not_found",
        CatalogError::Invalid(_) => "invalid",
        _ => "io",
    }
}

fn library_code(e: &LibraryError) -> &'static str {
    match e {
        LibraryError::Catalog(c) => catalog_code(c),
        LibraryError::Hub(h) => hub_code(h),
        LibraryError::Settings(SettingsError::Missing { .. }) => "not_ready",
        LibraryError::Settings(_)
        | LibraryError::Invalid(_)
        | LibraryError::Adapter(_)
        | LibraryError::Router(_) => "invalid",
        LibraryError::Model(_) | LibraryError::Embed(_) => "model",
        LibraryError::Io { .. } | LibraryError::Index(_) => "io",
        LibraryError::Retrieve(_) => "internal",
    }
}

fn engine_code(e: &EngineError) -> &'static str {
    match e {
        EngineError::Busy { .. } => "busy",
        EngineError::Invalid(_) | EngineError::Adapter { .. } => "invalid",
        EngineError::Stopped | EngineError::Model(_) => "model",
    }
}

impl From<LibraryError> for ApiError {
    fn from(e: LibraryError) -> Self {
        Self::new(library_code(&e), e.to_string())
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        Self::new(catalog_code(&e), e.to_string())
    }
}

impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        Self::new(hub_code(&e), e.to_string())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        Self::new(engine_code(&e), e.to_string())
    }
}

impl From<SettingsError> for ApiError {
    fn from(e: SettingsError) -> Self {
        LibraryError::from(e).into()
    }
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        let code = match &e {
            ChatError::Library(l) => library_code(l),
            ChatError::Engine(en) => engine_code(en),
            ChatError::Model(_) => "model",
            ChatError::Mole(_) | ChatError::Invalid(_) => "invalid",
        };
        Self::new(code, e.to_string())
    }
}

impl From<TrainError> for ApiError {
    fn from(e: TrainError) -> Self {
        let code = match &e {
            TrainError::Data { .. } | TrainError::Invalid(_) | TrainError::Adapter(_) => "invalid",
            TrainError::Io { .. } | TrainError::Checkpoint { .. } => "io",
            TrainError::Model(_) | TrainError::Embed(_) => "model",
        };
        Self::new(code, e.to_string())
    }
}

impl From<ramole_core::model::ModelError> for ApiError {
    fn from(e: ramole_core::model::ModelError) -> Self {
        Self::new("model", e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_tell_the_ui_what_happened() {
        let e: ApiError = ChatError::from(CatalogError::NoChat(7)).into();
        assert_eq!(e.code, "not_found");
        assert!(e.message.contains('7'), "{}", e.message);
        let e: ApiError = LibraryError::Hub(HubError::Cancelled).into();
        assert_eq!(e.code, "cancelled");
        let e: ApiError = EngineError::Busy { limit: 64 }.into();
        assert_eq!((e.code, e.message.contains("64")), ("busy", true));
        let json = serde_json::to_value(ApiError::invalid("k = 0 must be within 1..=16")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"code": "invalid", "message": "k = 0 must be within 1..=16"})
        );
    }
}
