//! The `adapters` table: installed adapters, where they came from, what they are and their
//! compatibility verdict against the active base.

use std::path::PathBuf;

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};
use ts_rs::TS;

use super::embeddings::upsert_embedding;
use super::samples::{Sample, insert_samples, replace_samples_in};
use super::{Catalog, CatalogError, Embedding, Result, sql_err};

/// Where an adapter came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS)]
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

    pub(super) fn parse(s: &str) -> Self {
        match s {
            "compatible" => Compat::Compatible,
            "warning" => Compat::Warning,
            _ => Compat::Incompatible,
        }
    }
}

/// A compatibility verdict against one base model, with its reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
pub struct Verdict {
    pub compat: Compat,
    pub reason: String,
    /// The base model id the verdict was made for.
    pub base: String,
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

#[derive(Debug, Clone, PartialEq, Serialize, TS)]
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

impl Catalog {
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
        let wrap = sql_err(&path);
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
        let tx = self.conn.transaction().map_err(&wrap)?;
        let mut keys = Vec::with_capacity(items.len());
        for (new, samples, embedding) in items {
            let key = insert_adapter(&tx, new).map_err(&wrap)?;
            insert_samples(&tx, key, samples).map_err(&wrap)?;
            if let Some(e) = embedding {
                upsert_embedding(&tx, key, e).map_err(&wrap)?;
            }
            keys.push(key as u64);
        }
        tx.commit().map_err(&wrap)?;
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
        let wrap = sql_err(&path);
        let mut values = adapter_values(new);
        values[0] = rusqlite::types::Value::from(id.to_string());
        let tx = self.conn.transaction().map_err(&wrap)?;
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
        .map_err(&wrap)?;
        if let Some((samples, embedding)) = samples {
            replace_samples_in(&tx, rec.key as i64, samples, embedding).map_err(&wrap)?;
        }
        tx.commit().map_err(&wrap)?;
        self.require_adapter(id)
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
