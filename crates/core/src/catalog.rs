//! The catalog: the SQLite database (`catalog.sqlite`, WAL) that is the source of truth for
//! installed adapters, their sample inputs and embeddings, chat sessions, messages and the
//! provenance of every reply. Migrations are append-only; every logical change is one
//! transaction. It knows rows, not tensors: embeddings are `f32` blobs with their embedder id.
//!
//! `meta.index_generation` is bumped by triggers whenever the set of retrievable vectors can have
//! changed (adapters added, removed, enabled, re-verdicted; embeddings written), so the derived
//! usearch index can tell that it is stale.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog {}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("catalog {}: schema version {found} is newer than this ramole understands ({known})", path.display())]
    TooNew {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    #[error("no adapter with id {0:?}")]
    NoAdapter(String),
    #[error("no chat session {0}")]
    NoChat(i64),
    #[error("{0}")]
    Invalid(String),
}

type Result<T, E = CatalogError> = std::result::Result<T, E>;

/// Append-only: never edit a shipped entry, add a new one.
const MIGRATIONS: &[&str] = &[
    // 1: adapters, samples, embeddings, chats, messages, provenance.
    r#"
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (key, value) VALUES ('index_generation', 0);

    CREATE TABLE adapters (
        key INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE CHECK (length(id) BETWEEN 1 AND 96),
        name TEXT NOT NULL CHECK (length(name) > 0),
        source_kind TEXT NOT NULL CHECK (source_kind IN ('hub', 'local')),
        hub_repo TEXT,
        hub_revision TEXT,
        hub_commit TEXT,
        local_path TEXT,
        base_model TEXT,
        architecture TEXT NOT NULL,
        ranks TEXT NOT NULL,
        alpha REAL NOT NULL,
        target_modules TEXT NOT NULL,
        size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
        license TEXT,
        card_summary TEXT,
        compat TEXT NOT NULL CHECK (compat IN ('compatible', 'warning', 'incompatible')),
        compat_reason TEXT NOT NULL DEFAULT '',
        compat_base TEXT NOT NULL,
        enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
        installed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        CHECK ((source_kind = 'hub' AND hub_repo IS NOT NULL)
            OR (source_kind = 'local' AND local_path IS NOT NULL))
    );

    CREATE TABLE samples (
        id INTEGER PRIMARY KEY,
        adapter_key INTEGER NOT NULL REFERENCES adapters(key) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        text TEXT NOT NULL CHECK (length(text) > 0),
        origin TEXT NOT NULL CHECK (origin IN ('samples', 'card', 'dataset', 'probe', 'user')),
        UNIQUE (adapter_key, position)
    );

    CREATE TABLE embeddings (
        adapter_key INTEGER NOT NULL REFERENCES adapters(key) ON DELETE CASCADE,
        embedder TEXT NOT NULL,
        dims INTEGER NOT NULL CHECK (dims > 0),
        samples INTEGER NOT NULL CHECK (samples > 0),
        vector BLOB NOT NULL CHECK (length(vector) = 4 * dims),
        PRIMARY KEY (adapter_key, embedder)
    );

    CREATE TABLE chats (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL,
        system_prompt TEXT,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    );

    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        content TEXT NOT NULL,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    );
    CREATE INDEX messages_by_chat ON messages (chat_id, id);

    CREATE TABLE provenance (
        message_id INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
        plan TEXT NOT NULL CHECK (plan IN ('none', 'selection', 'mixture', 'fusion', 'router')),
        k INTEGER NOT NULL CHECK (k >= 0),
        query TEXT NOT NULL,
        base_model TEXT NOT NULL,
        embedder TEXT,
        scoring TEXT,
        gating TEXT,
        generation TEXT NOT NULL,
        layer_gates TEXT
    );

    CREATE TABLE provenance_adapters (
        message_id INTEGER NOT NULL REFERENCES provenance(message_id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        adapter_key INTEGER REFERENCES adapters(key) ON DELETE SET NULL,
        adapter_id TEXT NOT NULL,
        name TEXT NOT NULL,
        score REAL,
        gate REAL NOT NULL CHECK (gate >= 0),
        PRIMARY KEY (message_id, position)
    );

    CREATE TRIGGER adapters_ins AFTER INSERT ON adapters BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'index_generation'; END;
    CREATE TRIGGER adapters_del AFTER DELETE ON adapters BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'index_generation'; END;
    CREATE TRIGGER adapters_upd AFTER UPDATE OF enabled, compat, compat_base ON adapters BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'index_generation'; END;
    CREATE TRIGGER embeddings_ins AFTER INSERT ON embeddings BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'index_generation'; END;
    CREATE TRIGGER embeddings_upd AFTER UPDATE ON embeddings BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'index_generation'; END;
    CREATE TRIGGER embeddings_del AFTER DELETE ON embeddings BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'index_generation'; END;
    "#,
    // 2: the folder of a Hub adapter inside its repository.
    r#"
    ALTER TABLE adapters ADD COLUMN hub_subfolder TEXT;
    "#,
];

/// The schema version a fresh catalog is migrated to.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Where an adapter came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum AdapterSource {
    Hub {
        repo: String,
        revision: String,
        commit: Option<String>,
        /// The adapter's folder inside the repository (`None`: the root).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subfolder: Option<String>,
    },
    Local {
        path: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compat {
    /// Architecture and shapes fit, and the adapter names this base (or none).
    Compatible,
    /// Shapes fit but the adapter was trained for a differently named base.
    Warning,
    /// Something does not fit; never retrieved.
    Incompatible,
}

impl Compat {
    pub fn as_str(self) -> &'static str {
        match self {
            Compat::Compatible => "compatible",
            Compat::Warning => "warning",
            Compat::Incompatible => "incompatible",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "compatible" => Compat::Compatible,
            "warning" => Compat::Warning,
            _ => Compat::Incompatible,
        }
    }
}

/// A compatibility verdict against one base model, with its reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub compat: Compat,
    pub reason: String,
    /// The base model id the verdict was made for.
    pub base: String,
}

/// Where a sample input came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleOrigin {
    /// A samples file (shipped with the adapter or given with `--samples`).
    Samples,
    /// Example prompts of the model card.
    Card,
    /// Rows of the adapter's training dataset.
    Dataset,
    /// Requests made up from the card's description and tags.
    Probe,
    /// Written or edited by the user.
    User,
}

impl SampleOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            SampleOrigin::Samples => "samples",
            SampleOrigin::Card => "card",
            SampleOrigin::Dataset => "dataset",
            SampleOrigin::Probe => "probe",
            SampleOrigin::User => "user",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "samples" => SampleOrigin::Samples,
            "card" => SampleOrigin::Card,
            "dataset" => SampleOrigin::Dataset,
            "probe" => SampleOrigin::Probe,
            _ => SampleOrigin::User,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub text: String,
    pub origin: SampleOrigin,
}

/// An adapter's profile vector under one embedder: the mean of its samples' (unit) embeddings,
/// not re-normalised (the paper's inner-product scoring needs the raw mean).
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    pub embedder: String,
    pub samples: usize,
    pub vector: Vec<f32>,
}

/// What `add_adapter` stores (the key and installed_at are assigned).
#[derive(Debug, Clone)]
pub struct NewAdapter {
    pub id: String,
    pub name: String,
    pub source: AdapterSource,
    pub base_model: Option<String>,
    pub architecture: String,
    pub ranks: Vec<usize>,
    pub alpha: f64,
    pub target_modules: Vec<String>,
    pub size_bytes: u64,
    pub license: Option<String>,
    pub card_summary: Option<String>,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdapterRecord {
    /// The index key (stable, never reused while the row exists).
    pub key: u64,
    pub id: String,
    pub name: String,
    pub source: AdapterSource,
    pub base_model: Option<String>,
    pub architecture: String,
    pub ranks: Vec<usize>,
    pub alpha: f64,
    pub target_modules: Vec<String>,
    pub size_bytes: u64,
    pub license: Option<String>,
    pub card_summary: Option<String>,
    pub verdict: Verdict,
    pub enabled: bool,
    pub installed_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatSession {
    pub id: i64,
    pub title: String,
    pub system_prompt: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredMessage {
    pub id: i64,
    pub chat_id: i64,
    pub role: String,
    pub content: String,
    pub created_at: String,
}

/// One adapter that served a reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedAdapter {
    pub id: String,
    pub name: String,
    /// Retrieval score; `None` when the adapter was given by hand.
    pub score: Option<f32>,
    pub gate: f32,
}

/// Everything needed to explain and replay a reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The plan that ran (`auto` is stored as what it resolved to).
    pub plan: String,
    pub k: usize,
    /// The text retrieval embedded (the latest user message).
    pub query: String,
    pub base_model: String,
    pub embedder: Option<String>,
    pub scoring: Option<String>,
    /// `uniform`, `softmax:<tau>` or `given`.
    pub gating: Option<String>,
    pub adapters: Vec<ServedAdapter>,
    /// Sampling settings, seed, token counts, finish reason: enough to replay.
    pub generation: serde_json::Value,
    /// Per-layer gate summaries (router plans).
    pub layer_gates: Option<serde_json::Value>,
}

/// The session a turn goes to.
#[derive(Debug, Clone, Copy)]
pub enum TurnChat<'a> {
    Existing(i64),
    New {
        title: &'a str,
        system_prompt: Option<&'a str>,
    },
}

pub struct Catalog {
    conn: Connection,
    path: PathBuf,
}

impl Catalog {
    /// Opens (creating and migrating when needed) the catalog at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).map_err(|source| CatalogError::Sqlite {
            path: path.to_path_buf(),
            source,
        })?;
        Self::init(conn, path.to_path_buf())
    }

    /// A private in-memory catalog (benchmarks, tests).
    pub fn open_in_memory() -> Result<Self> {
        let conn = Connection::open_in_memory().map_err(|source| CatalogError::Sqlite {
            path: PathBuf::from(":memory:"),
            source,
        })?;
        Self::init(conn, PathBuf::from(":memory:"))
    }

    fn init(conn: Connection, path: PathBuf) -> Result<Self> {
        let mut cat = Self { conn, path };
        let wrap = |p: &Path| {
            let p = p.to_path_buf();
            move |source| CatalogError::Sqlite { path: p, source }
        };
        cat.conn
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(wrap(&cat.path))?;
        cat.conn
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
            )
            .map_err(wrap(&cat.path))?;
        cat.migrate()?;
        Ok(cat)
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> CatalogError + '_ {
        |source| CatalogError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn migrate(&mut self) -> Result<()> {
        let path = self.path.clone();
        let wrap = |source| CatalogError::Sqlite {
            path: path.clone(),
            source,
        };
        let found: u32 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(wrap)?;
        if found > SCHEMA_VERSION {
            return Err(CatalogError::TooNew {
                path,
                found,
                known: SCHEMA_VERSION,
            });
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let tx = self.conn.transaction().map_err(wrap)?;
            tx.execute_batch(step).map_err(wrap)?;
            tx.pragma_update(None, "user_version", (i + 1) as u32)
                .map_err(wrap)?;
            tx.commit().map_err(wrap)?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn schema_version(&self) -> Result<u32> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(self.sql())
    }

    /// Bumped by every change to the retrievable vectors (see the module docs).
    pub fn index_generation(&self) -> Result<u64> {
        self.conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'index_generation'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v as u64)
            .map_err(self.sql())
    }

    /// `base` made into an id not yet taken: lowercase letters, digits and single dashes, with
    /// `-2`, `-3`, ... appended when needed.
    pub fn free_adapter_id(&self, base: &str) -> Result<String> {
        let mut slug = String::new();
        for c in base.chars().flat_map(char::to_lowercase) {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                slug.push(c);
            } else if !slug.ends_with('-') && !slug.is_empty() {
                slug.push('-');
            }
        }
        let mut slug = slug.trim_matches(['-', '.']).to_string();
        slug.truncate(80);
        if slug.is_empty() {
            slug = "adapter".into();
        }
        let taken = |id: &str| -> Result<bool> {
            self.conn
                .query_row("SELECT 1 FROM adapters WHERE id = ?1", [id], |_| Ok(()))
                .optional()
                .map(|o| o.is_some())
                .map_err(self.sql())
        };
        if !taken(&slug)? {
            return Ok(slug);
        }
        for n in 2.. {
            let candidate = format!("{slug}-{n}");
            if !taken(&candidate)? {
                return Ok(candidate);
            }
        }
        unreachable!("some suffix is free")
    }

    /// Stores an adapter with its samples and (optionally) its embedding, in one transaction.
    pub fn add_adapter(
        &mut self,
        new: &NewAdapter,
        samples: &[Sample],
        embedding: Option<&Embedding>,
    ) -> Result<AdapterRecord> {
        let keys = self.add_adapters(&[(new.clone(), samples.to_vec(), embedding.cloned())])?;
        self.adapter_by_key(keys[0])?
            .ok_or_else(|| CatalogError::NoAdapter(new.id.clone()))
    }

    /// Stores many adapters in one transaction (imports, benchmarks); returns their keys.
    pub fn add_adapters(
        &mut self,
        items: &[(NewAdapter, Vec<Sample>, Option<Embedding>)],
    ) -> Result<Vec<u64>> {
        let path = self.path.clone();
        let wrap = |source| CatalogError::Sqlite {
            path: path.clone(),
            source,
        };
        if let Some(s) = items
            .iter()
            .flat_map(|i| &i.1)
            .find(|s| s.text.trim().is_empty())
        {
            return Err(CatalogError::Invalid(format!(
                "sample {:?} is empty",
                s.text
            )));
        }
        let tx = self.conn.transaction().map_err(wrap)?;
        let mut keys = Vec::with_capacity(items.len());
        for (new, samples, embedding) in items {
            let key = insert_adapter(&tx, new).map_err(wrap)?;
            insert_samples(&tx, key, samples).map_err(wrap)?;
            if let Some(e) = embedding {
                upsert_embedding(&tx, key, e).map_err(wrap)?;
            }
            keys.push(key as u64);
        }
        tx.commit().map_err(wrap)?;
        Ok(keys)
    }

    pub fn adapter(&self, id: &str) -> Result<Option<AdapterRecord>> {
        self.conn
            .query_row(
                &format!("SELECT {ADAPTER_COLUMNS} FROM adapters WHERE id = ?1"),
                [id],
                adapter_from_row,
            )
            .optional()
            .map_err(self.sql())
    }

    /// Like [`Catalog::adapter`] but a missing id is an error naming it.
    pub fn require_adapter(&self, id: &str) -> Result<AdapterRecord> {
        self.adapter(id)?
            .ok_or_else(|| CatalogError::NoAdapter(id.to_string()))
    }

    pub fn adapter_by_key(&self, key: u64) -> Result<Option<AdapterRecord>> {
        self.conn
            .query_row(
                &format!("SELECT {ADAPTER_COLUMNS} FROM adapters WHERE key = ?1"),
                [key as i64],
                adapter_from_row,
            )
            .optional()
            .map_err(self.sql())
    }

    /// All adapters, oldest first.
    pub fn adapters(&self) -> Result<Vec<AdapterRecord>> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {ADAPTER_COLUMNS} FROM adapters ORDER BY key"
            ))
            .map_err(self.sql())?;
        stmt.query_map([], adapter_from_row)
            .map_err(self.sql())?
            .collect::<rusqlite::Result<_>>()
            .map_err(self.sql())
    }

    pub fn set_enabled(&mut self, id: &str, enabled: bool) -> Result<AdapterRecord> {
        let n = self
            .conn
            .execute(
                "UPDATE adapters SET enabled = ?2 WHERE id = ?1 AND enabled <> ?2",
                params![id, enabled as i64],
            )
            .map_err(self.sql())?;
        let rec = self.require_adapter(id)?;
        debug_assert!(n <= 1);
        Ok(rec)
    }

    /// Records a new compatibility verdict (for example after the active base changed).
    pub fn set_verdict(&mut self, id: &str, verdict: &Verdict) -> Result<AdapterRecord> {
        self.conn
            .execute(
                "UPDATE adapters SET compat = ?2, compat_reason = ?3, compat_base = ?4 WHERE id = ?1",
                params![id, verdict.compat.as_str(), verdict.reason, verdict.base],
            )
            .map_err(self.sql())?;
        self.require_adapter(id)
    }

    /// Deletes the adapter with its samples and embeddings; replies it served keep its id.
    pub fn remove_adapter(&mut self, id: &str) -> Result<AdapterRecord> {
        let rec = self.require_adapter(id)?;
        self.conn
            .execute("DELETE FROM adapters WHERE key = ?1", [rec.key as i64])
            .map_err(self.sql())?;
        Ok(rec)
    }

    pub fn samples(&self, key: u64) -> Result<Vec<Sample>> {
        let mut stmt = self
            .conn
            .prepare("SELECT text, origin FROM samples WHERE adapter_key = ?1 ORDER BY position")
            .map_err(self.sql())?;
        stmt.query_map([key as i64], |r| {
            Ok(Sample {
                text: r.get(0)?,
                origin: SampleOrigin::parse(&r.get::<_, String>(1)?),
            })
        })
        .map_err(self.sql())?
        .collect::<rusqlite::Result<_>>()
        .map_err(self.sql())
    }

    /// Replaces an adapter's samples and its embedding under `embedding.embedder` in one
    /// transaction (a user edit re-embeds). Embeddings by other embedders are dropped: they no
    /// longer describe these samples.
    pub fn replace_samples(
        &mut self,
        key: u64,
        samples: &[Sample],
        embedding: &Embedding,
    ) -> Result<()> {
        let path = self.path.clone();
        let wrap = |source| CatalogError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(wrap)?;
        replace_samples_in(&tx, key as i64, samples, embedding).map_err(wrap)?;
        tx.commit().map_err(wrap)
    }

    /// Replaces what an installed adapter is (an update to a new commit): every field of
    /// `new` but the id, which stays, and the enabled flag; samples and the profile are
    /// replaced when given. One transaction.
    pub fn update_adapter(
        &mut self,
        id: &str,
        new: &NewAdapter,
        samples: Option<(&[Sample], &Embedding)>,
    ) -> Result<AdapterRecord> {
        let rec = self.require_adapter(id)?;
        let path = self.path.clone();
        let wrap = |source| CatalogError::Sqlite {
            path: path.clone(),
            source,
        };
        let mut values = adapter_values(new);
        values[0] = rusqlite::types::Value::from(id.to_string());
        let tx = self.conn.transaction().map_err(wrap)?;
        // The id (?1) selects the row; every other column takes the new value.
        tx.execute(
            "UPDATE adapters SET name = ?2, source_kind = ?3, hub_repo = ?4, hub_revision = ?5,
                hub_commit = ?6, local_path = ?7, base_model = ?8, architecture = ?9, ranks = ?10,
                alpha = ?11, target_modules = ?12, size_bytes = ?13, license = ?14,
                card_summary = ?15, compat = ?16, compat_reason = ?17, compat_base = ?18,
                hub_subfolder = ?19
             WHERE id = ?1",
            rusqlite::params_from_iter(values),
        )
        .map_err(wrap)?;
        if let Some((samples, embedding)) = samples {
            replace_samples_in(&tx, rec.key as i64, samples, embedding).map_err(wrap)?;
        }
        tx.commit().map_err(wrap)?;
        self.require_adapter(id)
    }

    pub fn put_embedding(&mut self, key: u64, embedding: &Embedding) -> Result<()> {
        upsert_embedding(&self.conn, key as i64, embedding).map_err(self.sql())
    }

    /// Stores many profiles in one transaction (every adapter's, under a new embedder).
    pub fn put_embeddings(&mut self, items: &[(u64, Embedding)]) -> Result<()> {
        let path = self.path.clone();
        let wrap = |source| CatalogError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(wrap)?;
        for (key, e) in items {
            upsert_embedding(&tx, *key as i64, e).map_err(wrap)?;
        }
        tx.commit().map_err(wrap)
    }

    pub fn embedding(&self, key: u64, embedder: &str) -> Result<Option<Embedding>> {
        self.conn
            .query_row(
                "SELECT samples, vector FROM embeddings WHERE adapter_key = ?1 AND embedder = ?2",
                params![key as i64, embedder],
                |r| {
                    Ok(Embedding {
                        embedder: embedder.to_string(),
                        samples: r.get::<_, i64>(0)? as usize,
                        vector: blob_to_vec(&r.get::<_, Vec<u8>>(1)?),
                    })
                },
            )
            .optional()
            .map_err(self.sql())
    }

    /// Keys of adapters with no embedding by `embedder` (to embed after switching embedders).
    pub fn missing_embeddings(&self, embedder: &str) -> Result<Vec<u64>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT key FROM adapters a WHERE NOT EXISTS
                   (SELECT 1 FROM embeddings e WHERE e.adapter_key = a.key AND e.embedder = ?1)
                 ORDER BY key",
            )
            .map_err(self.sql())?;
        stmt.query_map([embedder], |r| r.get::<_, i64>(0).map(|k| k as u64))
            .map_err(self.sql())?
            .collect::<rusqlite::Result<_>>()
            .map_err(self.sql())
    }

    /// `(key, profile vector)` of every adapter retrieval may return for `base`: enabled, judged
    /// compatible (or warning) for that base, and embedded by `embedder`.
    pub fn retrievable(&self, embedder: &str, base: &str) -> Result<Vec<(u64, Vec<f32>)>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT a.key, e.vector FROM adapters a JOIN embeddings e ON e.adapter_key = a.key
                 WHERE a.enabled = 1 AND a.compat <> 'incompatible' AND a.compat_base = ?2
                   AND e.embedder = ?1
                 ORDER BY a.key",
            )
            .map_err(self.sql())?;
        stmt.query_map(params![embedder, base], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                blob_to_vec(&r.get::<_, Vec<u8>>(1)?),
            ))
        })
        .map_err(self.sql())?
        .collect::<rusqlite::Result<_>>()
        .map_err(self.sql())
    }

    // ---- chats -------------------------------------------------------------------------------

    pub fn create_chat(&mut self, title: &str, system_prompt: Option<&str>) -> Result<ChatSession> {
        self.conn
            .execute(
                "INSERT INTO chats (title, system_prompt) VALUES (?1, ?2)",
                params![title, system_prompt],
            )
            .map_err(self.sql())?;
        let id = self.conn.last_insert_rowid();
        self.require_chat(id)
    }

    pub fn chat(&self, id: i64) -> Result<Option<ChatSession>> {
        self.conn
            .query_row(
                "SELECT id, title, system_prompt, created_at, updated_at FROM chats WHERE id = ?1",
                [id],
                chat_from_row,
            )
            .optional()
            .map_err(self.sql())
    }

    pub fn require_chat(&self, id: i64) -> Result<ChatSession> {
        self.chat(id)?.ok_or(CatalogError::NoChat(id))
    }

    /// All sessions, most recently updated first.
    pub fn chats(&self) -> Result<Vec<ChatSession>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, title, system_prompt, created_at, updated_at FROM chats
                 ORDER BY updated_at DESC, id DESC",
            )
            .map_err(self.sql())?;
        stmt.query_map([], chat_from_row)
            .map_err(self.sql())?
            .collect::<rusqlite::Result<_>>()
            .map_err(self.sql())
    }

    pub fn rename_chat(&mut self, id: i64, title: &str) -> Result<ChatSession> {
        self.conn
            .execute(
                "UPDATE chats SET title = ?2 WHERE id = ?1",
                params![id, title],
            )
            .map_err(self.sql())?;
        self.require_chat(id)
    }

    pub fn delete_chat(&mut self, id: i64) -> Result<()> {
        let n = self
            .conn
            .execute("DELETE FROM chats WHERE id = ?1", [id])
            .map_err(self.sql())?;
        if n == 0 {
            return Err(CatalogError::NoChat(id));
        }
        Ok(())
    }

    pub fn messages(&self, chat_id: i64) -> Result<Vec<StoredMessage>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, chat_id, role, content, created_at FROM messages
                 WHERE chat_id = ?1 ORDER BY id",
            )
            .map_err(self.sql())?;
        stmt.query_map([chat_id], message_from_row)
            .map_err(self.sql())?
            .collect::<rusqlite::Result<_>>()
            .map_err(self.sql())
    }

    pub fn add_message(&mut self, chat_id: i64, role: &str, content: &str) -> Result<i64> {
        let path = self.path.clone();
        let wrap = |source| CatalogError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(wrap)?;
        let id = insert_message(&tx, chat_id, role, content).map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        Ok(id)
    }

    /// Stores an assistant reply and its provenance in one transaction.
    pub fn add_reply(&mut self, chat_id: i64, content: &str, prov: &Provenance) -> Result<i64> {
        let path = self.path.clone();
        let wrap = |source| CatalogError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(wrap)?;
        let id = insert_reply(&tx, chat_id, content, prov).map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        Ok(id)
    }

    /// Sets (or, with `None` or blank text, clears) a session's system prompt.
    pub fn set_system_prompt(
        &mut self,
        id: i64,
        system_prompt: Option<&str>,
    ) -> Result<ChatSession> {
        let prompt = system_prompt.filter(|p| !p.trim().is_empty());
        let n = self
            .conn
            .execute(
                "UPDATE chats SET system_prompt = ?2 WHERE id = ?1",
                params![id, prompt],
            )
            .map_err(self.sql())?;
        if n == 0 {
            return Err(CatalogError::NoChat(id));
        }
        self.require_chat(id)
    }

    /// Stores one chat turn in one transaction, so a crash keeps the old history or the new one:
    /// creates the session when it is new, deletes its messages from `truncate_from` on (a
    /// regenerated reply, an edited message and what followed it), adds the user message (if
    /// any) and the reply with its provenance. Returns (session, user message, reply).
    pub fn commit_turn(
        &mut self,
        chat: TurnChat<'_>,
        truncate_from: Option<i64>,
        user: Option<&str>,
        reply: &str,
        prov: &Provenance,
    ) -> Result<(i64, Option<i64>, i64)> {
        let path = self.path.clone();
        let wrap = |source| CatalogError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(wrap)?;
        let chat_id = match chat {
            TurnChat::Existing(id) => {
                let exists: Option<i64> = tx
                    .query_row("SELECT id FROM chats WHERE id = ?1", [id], |r| r.get(0))
                    .optional()
                    .map_err(wrap)?;
                exists.ok_or(CatalogError::NoChat(id))?
            }
            TurnChat::New {
                title,
                system_prompt,
            } => {
                tx.execute(
                    "INSERT INTO chats (title, system_prompt) VALUES (?1, ?2)",
                    params![title, system_prompt],
                )
                .map_err(wrap)?;
                tx.last_insert_rowid()
            }
        };
        if let Some(from) = truncate_from {
            tx.execute(
                "DELETE FROM messages WHERE chat_id = ?1 AND id >= ?2",
                params![chat_id, from],
            )
            .map_err(wrap)?;
        }
        let user_id = match user {
            Some(text) => Some(insert_message(&tx, chat_id, "user", text).map_err(wrap)?),
            None => None,
        };
        let reply_id = insert_reply(&tx, chat_id, reply, prov).map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        Ok((chat_id, user_id, reply_id))
    }

    pub fn provenance(&self, message_id: i64) -> Result<Option<Provenance>> {
        let head = self
            .conn
            .query_row(
                "SELECT plan, k, query, base_model, embedder, scoring, gating, generation,
                    layer_gates FROM provenance WHERE message_id = ?1",
                [message_id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, Option<String>>(6)?,
                        r.get::<_, String>(7)?,
                        r.get::<_, Option<String>>(8)?,
                    ))
                },
            )
            .optional()
            .map_err(self.sql())?;
        let Some((plan, k, query, base_model, embedder, scoring, gating, generation, layer)) = head
        else {
            return Ok(None);
        };
        let mut stmt = self
            .conn
            .prepare(
                "SELECT adapter_id, name, score, gate FROM provenance_adapters
                 WHERE message_id = ?1 ORDER BY position",
            )
            .map_err(self.sql())?;
        let adapters = stmt
            .query_map([message_id], |r| {
                Ok(ServedAdapter {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    score: r.get::<_, Option<f64>>(2)?.map(|s| s as f32),
                    gate: r.get::<_, f64>(3)? as f32,
                })
            })
            .map_err(self.sql())?
            .collect::<rusqlite::Result<_>>()
            .map_err(self.sql())?;
        let json = |s: &str| {
            serde_json::from_str(s)
                .map_err(|e| CatalogError::Invalid(format!("stored provenance JSON: {e}")))
        };
        Ok(Some(Provenance {
            plan,
            k: k as usize,
            query,
            base_model,
            embedder,
            scoring,
            gating,
            adapters,
            generation: json(&generation)?,
            layer_gates: layer.as_deref().map(json).transpose()?,
        }))
    }
}

const ADAPTER_COLUMNS: &str = "key, id, name, source_kind, hub_repo, hub_revision, hub_commit, \
    local_path, base_model, architecture, ranks, alpha, target_modules, size_bytes, license, \
    card_summary, compat, compat_reason, compat_base, enabled, installed_at, hub_subfolder";

fn adapter_from_row(r: &Row<'_>) -> rusqlite::Result<AdapterRecord> {
    let json_err = |i: usize, e: serde_json::Error| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    };
    let source = match r.get::<_, String>(3)?.as_str() {
        "hub" => AdapterSource::Hub {
            repo: r.get(4)?,
            revision: r
                .get::<_, Option<String>>(5)?
                .unwrap_or_else(|| "main".into()),
            commit: r.get(6)?,
            subfolder: r.get(21)?,
        },
        _ => AdapterSource::Local {
            path: PathBuf::from(r.get::<_, String>(7)?),
        },
    };
    Ok(AdapterRecord {
        key: r.get::<_, i64>(0)? as u64,
        id: r.get(1)?,
        name: r.get(2)?,
        source,
        base_model: r.get(8)?,
        architecture: r.get(9)?,
        ranks: serde_json::from_str(&r.get::<_, String>(10)?).map_err(|e| json_err(10, e))?,
        alpha: r.get(11)?,
        target_modules: serde_json::from_str(&r.get::<_, String>(12)?)
            .map_err(|e| json_err(12, e))?,
        size_bytes: r.get::<_, i64>(13)? as u64,
        license: r.get(14)?,
        card_summary: r.get(15)?,
        verdict: Verdict {
            compat: Compat::parse(&r.get::<_, String>(16)?),
            reason: r.get(17)?,
            base: r.get(18)?,
        },
        enabled: r.get::<_, i64>(19)? != 0,
        installed_at: r.get(20)?,
    })
}

fn chat_from_row(r: &Row<'_>) -> rusqlite::Result<ChatSession> {
    Ok(ChatSession {
        id: r.get(0)?,
        title: r.get(1)?,
        system_prompt: r.get(2)?,
        created_at: r.get(3)?,
        updated_at: r.get(4)?,
    })
}

fn message_from_row(r: &Row<'_>) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        id: r.get(0)?,
        chat_id: r.get(1)?,
        role: r.get(2)?,
        content: r.get(3)?,
        created_at: r.get(4)?,
    })
}

/// Inserts an assistant message and its provenance rows.
fn insert_reply(
    tx: &rusqlite::Transaction<'_>,
    chat_id: i64,
    content: &str,
    prov: &Provenance,
) -> rusqlite::Result<i64> {
    let id = insert_message(tx, chat_id, "assistant", content)?;
    tx.execute(
        "INSERT INTO provenance (message_id, plan, k, query, base_model, embedder, scoring,
            gating, generation, layer_gates)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            id,
            prov.plan,
            prov.k as i64,
            prov.query,
            prov.base_model,
            prov.embedder,
            prov.scoring,
            prov.gating,
            prov.generation.to_string(),
            prov.layer_gates.as_ref().map(|v| v.to_string()),
        ],
    )?;
    for (i, a) in prov.adapters.iter().enumerate() {
        tx.execute(
            "INSERT INTO provenance_adapters (message_id, position, adapter_key, adapter_id,
                name, score, gate)
             VALUES (?1, ?2, (SELECT key FROM adapters WHERE id = ?3), ?3, ?4, ?5, ?6)",
            params![id, i as i64, a.id, a.name, a.score, a.gate],
        )?;
    }
    Ok(id)
}

fn insert_message(
    conn: &Connection,
    chat_id: i64,
    role: &str,
    content: &str,
) -> rusqlite::Result<i64> {
    conn.execute(
        "INSERT INTO messages (chat_id, role, content) VALUES (?1, ?2, ?3)",
        params![chat_id, role, content],
    )?;
    let id = conn.last_insert_rowid();
    conn.execute(
        "UPDATE chats SET updated_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') WHERE id = ?1",
        [chat_id],
    )?;
    Ok(id)
}

/// The source columns of a new adapter row: kind, hub repo, revision, commit, subfolder,
/// local path.
type SourceColumns = (
    &'static str,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn source_columns(source: &AdapterSource) -> SourceColumns {
    match source {
        AdapterSource::Hub {
            repo,
            revision,
            commit,
            subfolder,
        } => (
            "hub",
            Some(repo.clone()),
            Some(revision.clone()),
            commit.clone(),
            subfolder.clone(),
            None,
        ),
        AdapterSource::Local { path } => (
            "local",
            None,
            None,
            None,
            None,
            Some(path.to_string_lossy().to_string()),
        ),
    }
}

/// The adapters columns of `new`, in the order of [`insert_adapter`]'s `?1..?19`.
fn adapter_values(new: &NewAdapter) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value;
    let (source_kind, hub_repo, hub_revision, hub_commit, hub_subfolder, local_path) =
        source_columns(&new.source);
    vec![
        Value::from(new.id.clone()),
        Value::from(new.name.clone()),
        Value::from(source_kind.to_string()),
        Value::from(hub_repo),
        Value::from(hub_revision),
        Value::from(hub_commit),
        Value::from(local_path),
        Value::from(new.base_model.clone()),
        Value::from(new.architecture.clone()),
        Value::from(serde_json::to_string(&new.ranks).expect("ranks serialise")),
        Value::from(new.alpha),
        Value::from(serde_json::to_string(&new.target_modules).expect("modules serialise")),
        Value::from(new.size_bytes as i64),
        Value::from(new.license.clone()),
        Value::from(new.card_summary.clone()),
        Value::from(new.verdict.compat.as_str().to_string()),
        Value::from(new.verdict.reason.clone()),
        Value::from(new.verdict.base.clone()),
        Value::from(hub_subfolder),
    ]
}

fn insert_adapter(conn: &Connection, new: &NewAdapter) -> rusqlite::Result<i64> {
    conn.execute(
        "INSERT INTO adapters (id, name, source_kind, hub_repo, hub_revision, hub_commit,
            local_path, base_model, architecture, ranks, alpha, target_modules, size_bytes,
            license, card_summary, compat, compat_reason, compat_base, hub_subfolder)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
        rusqlite::params_from_iter(adapter_values(new)),
    )?;
    Ok(conn.last_insert_rowid())
}

/// Replaces an adapter's samples and its embeddings (under every embedder) by `samples` and
/// their profile.
fn replace_samples_in(
    conn: &Connection,
    key: i64,
    samples: &[Sample],
    embedding: &Embedding,
) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM samples WHERE adapter_key = ?1", [key])?;
    conn.execute("DELETE FROM embeddings WHERE adapter_key = ?1", [key])?;
    insert_samples(conn, key, samples)?;
    upsert_embedding(conn, key, embedding)
}

fn insert_samples(conn: &Connection, key: i64, samples: &[Sample]) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(
        "INSERT INTO samples (adapter_key, position, text, origin) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for (i, s) in samples.iter().enumerate() {
        stmt.execute(params![key, i as i64, s.text, s.origin.as_str()])?;
    }
    Ok(())
}

fn upsert_embedding(conn: &Connection, key: i64, e: &Embedding) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO embeddings (adapter_key, embedder, dims, samples, vector)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (adapter_key, embedder) DO UPDATE SET
            dims = excluded.dims, samples = excluded.samples, vector = excluded.vector",
        params![
            key,
            e.embedder,
            e.vector.len() as i64,
            e.samples as i64,
            vec_to_blob(&e.vector)
        ],
    )?;
    Ok(())
}

fn vec_to_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn blob_to_vec(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
