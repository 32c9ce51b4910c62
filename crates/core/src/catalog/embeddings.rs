//! The `embeddings` table: each adapter's profile vector under each embedder that made one.

use rusqlite::{Connection, OptionalExtension, params};

use super::{Catalog, Result, blob_to_vec, sql_err, vec_to_blob};

/// An adapter's profile vector under one embedder: the mean of its samples' (unit) embeddings,
/// not re-normalised (the paper's inner-product scoring needs the raw mean).
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    pub embedder: String,
    pub samples: usize,
    pub vector: Vec<f32>,
}

impl Catalog {
    pub fn put_embedding(&mut self, key: u64, embedding: &Embedding) -> Result<()> {
        upsert_embedding(&self.conn, key as i64, embedding).map_err(self.sql())
    }

    /// Stores many profiles in one transaction (every adapter's, under a new embedder).
    pub fn put_embeddings(&mut self, items: &[(u64, Embedding)]) -> Result<()> {
        let path = self.path.clone();
        let wrap = sql_err(&path);
        let tx = self.conn.transaction().map_err(&wrap)?;
        for (key, e) in items {
            upsert_embedding(&tx, *key as i64, e).map_err(&wrap)?;
        }
        tx.commit().map_err(&wrap)
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
}

pub(super) fn upsert_embedding(conn: &Connection, key: i64, e: &Embedding) -> rusqlite::Result<()> {
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
