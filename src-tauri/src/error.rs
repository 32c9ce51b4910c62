//! The one error type that crosses into the UI: data, `{code, message}` (DESIGN.md 2), made
//! from the core's typed errors. The code says what the UI can do about it ([`ErrorCode`], whose
//! TypeScript the UI gets generated); the message names the value and the limit, as the core
//! wrote it.

use ramole_core::catalog::CatalogError;
use ramole_core::chat::ChatError;
use ramole_core::config::SettingsError;
use ramole_core::engine::EngineError;
use ramole_core::hub::HubError;
use ramole_core::library::LibraryError;
use ramole_core::train::TrainError;
use ramole_core::transcript::TranscriptError;
use serde::Serialize;
use ts_rs::TS;

/// What went wrong, as far as the UI can act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, TS)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A value the user gave is out of range or malformed (the message names it).
    Invalid,
    /// An adapter, session or message that does not exist (any more).
    NotFound,
    /// No base model is set up yet, or it is still loading.
    NotReady,
    /// The engine's queue is full; retry later.
    Busy,
    /// The Hub answered with an error.
    Hub,
    /// Offline mode and the thing is not in the cache.
    Offline,
    /// The user cancelled.
    Cancelled,
    /// The model failed to load or run.
    Model,
    /// The disk or the catalog failed.
    Io,
    /// The system keyring is unavailable or refused.
    Keyring,
    /// A bug: the app's fault.
    Internal,
}

impl ErrorCode {
    /// Every code, in declaration order (the UI's list is generated from this one).
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::Invalid,
        ErrorCode::NotFound,
        ErrorCode::NotReady,
        ErrorCode::Busy,
        ErrorCode::Hub,
        ErrorCode::Offline,
        ErrorCode::Cancelled,
        ErrorCode::Model,
        ErrorCode::Io,
        ErrorCode::Keyring,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Invalid => "invalid",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NotReady => "not_ready",
            ErrorCode::Busy => "busy",
            ErrorCode::Hub => "hub",
            ErrorCode::Offline => "offline",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Model => "model",
            ErrorCode::Io => "io",
            ErrorCode::Keyring => "keyring",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Every failed command rejects with this (never a bare string).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, TS, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Invalid, message)
    }

    pub fn not_ready(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotReady, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

fn hub_code(e: &HubError) -> ErrorCode {
    match e {
        HubError::Cancelled => ErrorCode::Cancelled,
        HubError::Offline { .. } => ErrorCode::Offline,
        HubError::NotFound { .. } => ErrorCode::NotFound,
        HubError::Invalid { .. } | HubError::TooLarge { .. } => ErrorCode::Invalid,
        HubError::Io { .. } => ErrorCode::Io,
        _ => ErrorCode::Hub,
    }
}

fn catalog_code(e: &CatalogError) -> ErrorCode {
    match e {
        CatalogError::NoAdapter(_) | CatalogError::NoChat(_) => ErrorCode::NotFound,
        CatalogError::Invalid(_) => ErrorCode::Invalid,
        _ => ErrorCode::Io,
    }
}

fn settings_code(e: &SettingsError) -> ErrorCode {
    match e {
        SettingsError::Missing { .. } => ErrorCode::NotReady,
        SettingsError::Io { .. } => ErrorCode::Io,
        SettingsError::Invalid { .. } | SettingsError::Edit(_) => ErrorCode::Invalid,
    }
}

fn library_code(e: &LibraryError) -> ErrorCode {
    match e {
        LibraryError::Catalog(c) => catalog_code(c),
        LibraryError::Hub(h) => hub_code(h),
        LibraryError::Settings(s) => settings_code(s),
        LibraryError::Invalid(_) | LibraryError::Adapter(_) | LibraryError::Router(_) => {
            ErrorCode::Invalid
        }
        LibraryError::Model(_) | LibraryError::Embed(_) => ErrorCode::Model,
        LibraryError::Io { .. } | LibraryError::Index(_) => ErrorCode::Io,
        LibraryError::Retrieve(_) => ErrorCode::Internal,
    }
}

fn engine_code(e: &EngineError) -> ErrorCode {
    match e {
        EngineError::Busy { .. } => ErrorCode::Busy,
        EngineError::Invalid(_) | EngineError::Adapter { .. } => ErrorCode::Invalid,
        EngineError::Stopped | EngineError::Model(_) => ErrorCode::Model,
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
        Self::new(settings_code(&e), e.to_string())
    }
}

impl From<TranscriptError> for ApiError {
    fn from(e: TranscriptError) -> Self {
        match e {
            TranscriptError::Catalog(c) => c.into(),
            TranscriptError::Io { .. } => Self::new(ErrorCode::Io, e.to_string()),
        }
    }
}

impl From<ramole_core::vocab::VocabError> for ApiError {
    fn from(e: ramole_core::vocab::VocabError) -> Self {
        Self::invalid(e.to_string())
    }
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        let code = match &e {
            ChatError::Library(l) => library_code(l),
            ChatError::Engine(en) => engine_code(en),
            ChatError::Model(_) => ErrorCode::Model,
            ChatError::Mole(_) | ChatError::Vocab(_) | ChatError::Invalid(_) => ErrorCode::Invalid,
        };
        Self::new(code, e.to_string())
    }
}

impl From<TrainError> for ApiError {
    fn from(e: TrainError) -> Self {
        let code = match &e {
            TrainError::Data { .. } | TrainError::Invalid(_) | TrainError::Adapter(_) => {
                ErrorCode::Invalid
            }
            TrainError::Io { .. } | TrainError::Checkpoint { .. } => ErrorCode::Io,
            TrainError::Model(_) | TrainError::Embed(_) => ErrorCode::Model,
        };
        Self::new(code, e.to_string())
    }
}

impl From<ramole_core::model::ModelError> for ApiError {
    fn from(e: ramole_core::model::ModelError) -> Self {
        Self::new(ErrorCode::Model, e.to_string())
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
        assert_eq!((e.code, e.message.contains("64")), (ErrorCode::Busy, true));
        let json = serde_json::to_value(ApiError::invalid("k = 0 must be within 1..=16")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"code": "invalid", "message": "k = 0 must be within 1..=16"})
        );
        for code in ErrorCode::ALL {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }
}
