//! The Hub token in the system keyring (Secret Service on Linux, the Keychain on macOS, the
//! Credential Manager on Windows), never in a plain file. Where no keyring is available the
//! token is refused with the reason, and the environment (`HF_TOKEN`) still works.

use crate::error::{ApiError, ApiResult};

const SERVICE: &str = "ramole-desktop";
const USER: &str = "huggingface-hub-token";
/// Longest token accepted (Hub tokens are ~40 characters).
const MAX_TOKEN_CHARS: usize = 512;

pub struct TokenStore {
    service: String,
}

impl Default for TokenStore {
    fn default() -> Self {
        Self::new(SERVICE)
    }
}

impl TokenStore {
    /// A store under its own service name (tests use a unique one).
    pub fn new(service: &str) -> Self {
        Self {
            service: service.to_string(),
        }
    }

    fn entry(&self) -> ApiResult<keyring::Entry> {
        keyring::Entry::new(&self.service, USER).map_err(|e| unavailable(&e))
    }

    /// The stored token, if any; a missing keyring reads as no token.
    pub fn get(&self) -> Option<String> {
        self.entry().ok()?.get_password().ok()
    }

    /// Whether a token is stored, and where tokens are kept (or why they cannot be): one
    /// keyring read, as each may start a D-Bus session.
    pub fn status(&self) -> (bool, String) {
        match self.entry().and_then(|e| match e.get_password() {
            Ok(_) => Ok(true),
            Err(keyring::Error::NoEntry) => Ok(false),
            Err(err) => Err(unavailable(&err)),
        }) {
            Ok(set) => (set, "system keyring".into()),
            Err(e) => (false, e.message),
        }
    }

    /// Stores `token` (checked: printable, no spaces, at most 512 characters); `None` or blank
    /// deletes it.
    pub fn set(&self, token: Option<&str>) -> ApiResult<()> {
        let token = token.map(str::trim).filter(|t| !t.is_empty());
        if let Some(t) = token
            && (t.chars().count() > MAX_TOKEN_CHARS || !t.chars().all(|c| c.is_ascii_graphic()))
        {
            return Err(ApiError::invalid(format!(
                "a Hub token is 1..={MAX_TOKEN_CHARS} printable characters without spaces"
            )));
        }
        let entry = self.entry()?;
        match token {
            Some(t) => entry.set_password(t).map_err(|e| unavailable(&e)),
            None => match entry.delete_credential() {
                Ok(()) | Err(keyring::Error::NoEntry) => Ok(()),
                Err(e) => Err(unavailable(&e)),
            },
        }
    }
}

fn unavailable(e: &keyring::Error) -> ApiError {
    ApiError::new(
        crate::error::ErrorCode::Keyring,
        format!(
            "the system keyring is not available ({e}); the token was not stored — start a Secret Service (GNOME Keyring, KeePassXC) or set HF_TOKEN"
        ),
    )
}
