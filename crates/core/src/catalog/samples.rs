//! The `samples` table: each adapter's sample inputs, in order, with where they came from.

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use ts_rs::TS;

use super::embeddings::upsert_embedding;
use super::{Catalog, Embedding, Result, sql_err};

/// Where a sample input came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS)]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
pub struct Sample {
    pub text: String,
    pub origin: SampleOrigin,
}

impl Catalog {
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
        let wrap = sql_err(&path);
        let tx = self.conn.transaction().map_err(&wrap)?;
        replace_samples_in(&tx, key as i64, samples, embedding).map_err(&wrap)?;
        tx.commit().map_err(&wrap)
    }
}

/// Replaces an adapter's samples and its embeddings (under every embedder) by `samples` and
/// their profile.
pub(super) fn replace_samples_in(
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

pub(super) fn insert_samples(
    conn: &Connection,
    key: i64,
    samples: &[Sample],
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(
        "INSERT INTO samples (adapter_key, position, text, origin) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for (i, s) in samples.iter().enumerate() {
        stmt.execute(params![key, i as i64, s.text, s.origin.as_str()])?;
    }
    Ok(())
}
