//! The `provenance` and `provenance_adapters` tables: for every stored reply, the plan that ran,
//! what retrieval saw, the adapters with their scores and gates, the generation record and (plan
//! `router`) the per-layer gates, typed column by column (migration 3).

use rusqlite::{OptionalExtension, Row, Transaction, params};

use super::{Catalog, CatalogError, Result};
use crate::vocab::{
    FinishReason, GenerationRecord, LayerGates, Plan, Provenance, ReplyGating, Scoring,
    ServedAdapter,
};

const COLUMNS: &str = "plan, k, query, base_model, embedder, scoring, gating, max_tokens, \
    temperature, top_p, top_k, seed, stop, prompt_tokens, generated_tokens, finish_reason, \
    dropped_messages, layer_gates";

impl Catalog {
    /// The provenance of reply `message_id`; `None` for a message that has none (a user's).
    pub fn provenance(&self, message_id: i64) -> Result<Option<Provenance>> {
        let head = self
            .conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM provenance WHERE message_id = ?1"),
                [message_id],
                |r| Ok(read_row(r)),
            )
            .optional()
            .map_err(self.sql())?;
        let Some(head) = head else {
            return Ok(None);
        };
        let mut prov = head.map_err(|m| {
            CatalogError::Invalid(format!("stored provenance of message {message_id}: {m}"))
        })?;
        let mut stmt = self
            .conn
            .prepare(
                "SELECT adapter_id, name, score, gate FROM provenance_adapters
                 WHERE message_id = ?1 ORDER BY position",
            )
            .map_err(self.sql())?;
        prov.adapters = stmt
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
        Ok(Some(prov))
    }
}

/// A provenance row (adapters empty), or what in it this version cannot read.
fn read_row(r: &Row<'_>) -> std::result::Result<Provenance, String> {
    let text = |i: usize| -> std::result::Result<Option<String>, String> {
        r.get::<_, Option<String>>(i).map_err(|e| e.to_string())
    };
    let int = |i: usize| -> std::result::Result<Option<i64>, String> {
        r.get::<_, Option<i64>>(i).map_err(|e| e.to_string())
    };
    let real = |i: usize| -> std::result::Result<Option<f64>, String> {
        r.get::<_, Option<f64>>(i).map_err(|e| e.to_string())
    };
    let word = |i: usize, what: &str| -> std::result::Result<Option<String>, String> {
        text(i).map_err(|e| format!("{what}: {e}"))
    };
    let parse = |e: crate::vocab::VocabError| e.to_string();
    let plan: Plan = word(0, "plan")?
        .unwrap_or_default()
        .parse()
        .map_err(parse)?;
    let scoring = word(5, "scoring")?
        .map(|s| s.parse::<Scoring>())
        .transpose()
        .map_err(parse)?;
    let gating = word(6, "gating")?
        .map(|s| s.parse::<ReplyGating>())
        .transpose()
        .map_err(parse)?;
    let count = |v: Option<i64>| v.map(|v| v.max(0) as usize);
    let generation = match (
        count(int(7)?),
        real(8)?,
        real(9)?,
        text(11)?,
        count(int(13)?),
        count(int(14)?),
        text(15)?,
    ) {
        (
            Some(max_tokens),
            Some(temperature),
            Some(top_p),
            Some(seed),
            Some(prompt_tokens),
            Some(generated_tokens),
            Some(finish),
        ) => Some(GenerationRecord {
            max_tokens,
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k: count(int(10)?).unwrap_or(0),
            seed: seed
                .parse()
                .map_err(|_| format!("seed {seed:?} is not a u64"))?,
            stop: match text(12)? {
                Some(s) => serde_json::from_str(&s).map_err(|e| format!("stop: {e}"))?,
                None => Vec::new(),
            },
            prompt_tokens,
            generated_tokens,
            finish_reason: finish.parse::<FinishReason>().map_err(parse)?,
            dropped_messages: count(int(16)?).unwrap_or(0),
        }),
        _ => None,
    };
    let layer_gates = match text(17)? {
        Some(s) => {
            let lg: LayerGates =
                serde_json::from_str(&s).map_err(|e| format!("layer gates: {e}"))?;
            lg.check().map_err(parse)?;
            Some(lg)
        }
        None => None,
    };
    Ok(Provenance {
        plan,
        k: count(int(1)?).unwrap_or(0),
        query: text(2)?.unwrap_or_default(),
        base_model: text(3)?.unwrap_or_default(),
        embedder: text(4)?,
        scoring,
        gating,
        adapters: Vec::new(),
        generation,
        layer_gates,
    })
}

/// Inserts the provenance rows of reply `id`.
pub(super) fn insert(tx: &Transaction<'_>, id: i64, prov: &Provenance) -> rusqlite::Result<()> {
    let g = prov.generation.as_ref();
    tx.execute(
        &format!(
            "INSERT INTO provenance (message_id, {COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                     ?18, ?19)"
        ),
        params![
            id,
            prov.plan.as_str(),
            prov.k as i64,
            prov.query,
            prov.base_model,
            prov.embedder,
            prov.scoring.map(Scoring::as_str),
            prov.gating.map(|g| g.to_string()),
            g.map(|g| g.max_tokens as i64),
            g.map(|g| g.temperature as f64),
            g.map(|g| g.top_p as f64),
            g.map(|g| g.top_k as i64),
            g.map(|g| g.seed.to_string()),
            g.map(|g| serde_json::to_string(&g.stop).expect("strings serialise")),
            g.map(|g| g.prompt_tokens as i64),
            g.map(|g| g.generated_tokens as i64),
            g.map(|g| g.finish_reason.as_str()),
            g.map(|g| g.dropped_messages as i64),
            prov.layer_gates
                .as_ref()
                .map(|l| serde_json::to_string(l).expect("gates serialise")),
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
    Ok(())
}
