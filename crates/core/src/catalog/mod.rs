//! The catalog: the SQLite database (`catalog.sqlite`, WAL) that is the source of truth for
//! installed adapters, their sample inputs and embeddings, chat sessions, messages and the
//! provenance of every reply. One file per table group (`adapters`, `samples`, `embeddings`,
//! `chats`, `provenance`); migrations are append-only `.sql` files under `migrations/`, each run
//! in one transaction; every logical change is one transaction. It knows rows, not tensors:
//! embeddings are `f32` blobs with their embedder id.
//!
//! `meta.index_generation` is bumped by triggers whenever the set of retrievable vectors can have
//! changed (adapters added, removed, enabled, re-verdicted; embeddings written), so the derived
//! usearch index can tell that it is stale.

mod adapters;
mod chats;
mod embeddings;
mod provenance;
mod samples;

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension};

pub use adapters::{AdapterRecord, AdapterSource, Compat, NewAdapter, Verdict};
pub use chats::{ChatSession, StoredMessage, TurnChat};
pub use embeddings::Embedding;
pub use samples::{Sample, SampleOrigin};

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
    #[error("catalog {}: migration {version} leaves {rows} broken references ({table})", path.display())]
    Migration {
        path: PathBuf,
        version: u32,
        rows: usize,
        table: String,
    },
    #[error("{0}")]
    Invalid(String),
}

type Result<T, E = CatalogError> = std::result::Result<T, E>;

/// Append-only: never edit a shipped file, add a new one. Each runs in one transaction with
/// foreign keys off (so a table can be rebuilt), checked before it commits.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_hub_subfolder.sql"),
    include_str!("migrations/0003_typed_provenance.sql"),
];

/// The schema version a fresh catalog is migrated to.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Maps a SQLite error on the catalog at `path` (for closures that cannot borrow the catalog).
fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> CatalogError + '_ {
    |source| CatalogError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
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
        let wrap = sql_err(&path);
        let found: u32 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(&wrap)?;
        if found > SCHEMA_VERSION {
            return Err(CatalogError::TooNew {
                path: path.clone(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let version = (i + 1) as u32;
            // SQLite ignores this pragma inside a transaction: set it around each step.
            self.conn
                .pragma_update(None, "foreign_keys", false)
                .map_err(&wrap)?;
            let tx = self.conn.transaction().map_err(&wrap)?;
            tx.execute_batch(step).map_err(&wrap)?;
            let broken: Option<String> = tx
                .query_row("PRAGMA foreign_key_check", [], |r| r.get(0))
                .optional()
                .map_err(&wrap)?;
            if let Some(table) = broken {
                let rows = tx
                    .prepare("PRAGMA foreign_key_check")
                    .and_then(|mut s| Ok(s.query_map([], |_| Ok(()))?.count()))
                    .map_err(&wrap)?;
                return Err(CatalogError::Migration {
                    path: path.clone(),
                    version,
                    rows,
                    table,
                });
            }
            tx.pragma_update(None, "user_version", version)
                .map_err(&wrap)?;
            tx.commit().map_err(&wrap)?;
            self.conn
                .pragma_update(None, "foreign_keys", true)
                .map_err(&wrap)?;
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
}

/// `v` as the little-endian bytes of its floats (embeddings are stored as blobs).
fn vec_to_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn blob_to_vec(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
