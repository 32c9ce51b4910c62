//! A stored chat session as one document: its messages, each reply with the provenance that
//! explains it, read from the catalog; exported as JSON or as Markdown (each reply followed by
//! the plan and the adapters and gates that served it) and written atomically into a folder.
//! The app's Export and `ramole session export` both write through here.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;
use ts_rs::TS;

use crate::catalog::{Catalog, CatalogError, ChatSession};
use crate::files;
use crate::vocab::{Provenance, Role, VocabError};

/// One message of a transcript.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct TranscriptMessage {
    pub id: i64,
    pub role: Role,
    pub content: String,
    pub created_at: String,
    /// On replies: which adapters and gates served it.
    pub provenance: Option<Provenance>,
}

/// A session and its messages in order.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct Transcript {
    pub session: ChatSession,
    pub messages: Vec<TranscriptMessage>,
}

/// The document formats of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, TS)]
#[ts(type = "\"json\" | \"markdown\"")]
pub enum ExportFormat {
    Json,
    Markdown,
}

impl ExportFormat {
    /// The file extension.
    pub fn extension(self) -> &'static str {
        match self {
            ExportFormat::Json => "json",
            ExportFormat::Markdown => "md",
        }
    }
}

impl FromStr for ExportFormat {
    type Err = VocabError;
    fn from_str(s: &str) -> Result<Self, VocabError> {
        match s {
            "json" => Ok(ExportFormat::Json),
            "markdown" | "md" => Ok(ExportFormat::Markdown),
            other => Err(VocabError::new(format!(
                "export format {other:?} is not json or markdown"
            ))),
        }
    }
}

/// An export written to disk.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct Exported {
    pub path: PathBuf,
    pub content: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TranscriptError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Transcript {
    /// Session `id` as stored.
    pub fn read(catalog: &Catalog, id: i64) -> Result<Self, CatalogError> {
        let session = catalog.require_chat(id)?;
        let messages = catalog
            .messages(id)?
            .into_iter()
            .map(|m| {
                let provenance = match m.role {
                    Role::Assistant => catalog.provenance(m.id)?,
                    _ => None,
                };
                Ok(TranscriptMessage {
                    id: m.id,
                    role: m.role,
                    content: m.content,
                    created_at: m.created_at,
                    provenance,
                })
            })
            .collect::<Result<_, CatalogError>>()?;
        Ok(Self { session, messages })
    }

    /// The document in `format`.
    pub fn render(&self, format: ExportFormat) -> String {
        match format {
            ExportFormat::Json => {
                serde_json::to_string_pretty(self).expect("a transcript serialises")
            }
            ExportFormat::Markdown => self.markdown(),
        }
    }

    /// Markdown: the title, the system prompt quoted, each message under its author, each reply
    /// followed by its plan and the adapters with their gates.
    fn markdown(&self) -> String {
        let mut out = format!("# {}\n\n", self.session.title);
        if let Some(sys) = self.session.system_prompt.as_deref() {
            out.push_str(&format!("> System: {}\n\n", sys.replace('\n', "\n> ")));
        }
        for m in &self.messages {
            let who = if m.role == Role::User {
                "You"
            } else {
                "Assistant"
            };
            out.push_str(&format!(
                "**{who}** ({})\n\n{}\n\n",
                m.created_at,
                m.content.trim()
            ));
            if let Some(p) = &m.provenance {
                let served: Vec<String> = p
                    .adapters
                    .iter()
                    .map(|a| format!("{} {:.1}%", a.id, a.gate * 100.0))
                    .collect();
                out.push_str(&format!(
                    "_plan {}, {}_\n\n",
                    p.plan,
                    if served.is_empty() {
                        "base model only".to_string()
                    } else {
                        served.join(", ")
                    }
                ));
            }
        }
        out
    }

    /// The file name of an export: `ramole-chat-<id>-<title slug>.<ext>`.
    pub fn file_name(&self, format: ExportFormat) -> String {
        let slug: String = self
            .session
            .title
            .chars()
            .map(|c| if c.is_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        format!(
            "ramole-chat-{}-{}.{}",
            self.session.id,
            slug.trim_matches('-'),
            format.extension()
        )
    }

    /// Writes the document into `dir` (created when missing) atomically.
    pub fn export(&self, format: ExportFormat, dir: &Path) -> Result<Exported, TranscriptError> {
        let content = self.render(format);
        let path = dir.join(self.file_name(format));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TranscriptError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        files::write_atomic(&path, content.as_bytes()).map_err(io(&path))?;
        Ok(Exported { path, content })
    }
}
