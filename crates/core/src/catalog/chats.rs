//! The `chats` and `messages` tables: sessions, their system prompts, and their messages in
//! order; a turn (user message + reply + its provenance) is stored in one transaction.

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;
use ts_rs::TS;

use super::provenance;
use super::{Catalog, CatalogError, Result, sql_err};
use crate::vocab::{Provenance, Role};

#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct ChatSession {
    pub id: i64,
    pub title: String,
    pub system_prompt: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct StoredMessage {
    pub id: i64,
    pub chat_id: i64,
    pub role: Role,
    pub content: String,
    pub created_at: String,
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

impl Catalog {
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

    pub fn add_message(&mut self, chat_id: i64, role: Role, content: &str) -> Result<i64> {
        let path = self.path.clone();
        let wrap = sql_err(&path);
        let tx = self.conn.transaction().map_err(&wrap)?;
        let id = insert_message(&tx, chat_id, role, content).map_err(&wrap)?;
        tx.commit().map_err(&wrap)?;
        Ok(id)
    }

    /// Stores an assistant reply and its provenance in one transaction.
    pub fn add_reply(&mut self, chat_id: i64, content: &str, prov: &Provenance) -> Result<i64> {
        let path = self.path.clone();
        let wrap = sql_err(&path);
        let tx = self.conn.transaction().map_err(&wrap)?;
        let id = insert_reply(&tx, chat_id, content, prov).map_err(&wrap)?;
        tx.commit().map_err(&wrap)?;
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
        let wrap = sql_err(&path);
        let tx = self.conn.transaction().map_err(&wrap)?;
        let chat_id = match chat {
            TurnChat::Existing(id) => {
                let exists: Option<i64> = tx
                    .query_row("SELECT id FROM chats WHERE id = ?1", [id], |r| r.get(0))
                    .optional()
                    .map_err(&wrap)?;
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
                .map_err(&wrap)?;
                tx.last_insert_rowid()
            }
        };
        if let Some(from) = truncate_from {
            tx.execute(
                "DELETE FROM messages WHERE chat_id = ?1 AND id >= ?2",
                params![chat_id, from],
            )
            .map_err(&wrap)?;
        }
        let user_id = match user {
            Some(text) => Some(insert_message(&tx, chat_id, Role::User, text).map_err(&wrap)?),
            None => None,
        };
        let reply_id = insert_reply(&tx, chat_id, reply, prov).map_err(&wrap)?;
        tx.commit().map_err(&wrap)?;
        Ok((chat_id, user_id, reply_id))
    }
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
        role: r
            .get::<_, String>(2)?
            .parse()
            .map_err(|e: crate::vocab::VocabError| {
                rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, e.into())
            })?,
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
    let id = insert_message(tx, chat_id, Role::Assistant, content)?;
    provenance::insert(tx, id, prov)?;
    Ok(id)
}

fn insert_message(
    conn: &Connection,
    chat_id: i64,
    role: Role,
    content: &str,
) -> rusqlite::Result<i64> {
    conn.execute(
        "INSERT INTO messages (chat_id, role, content) VALUES (?1, ?2, ?3)",
        params![chat_id, role.as_str(), content],
    )?;
    let id = conn.last_insert_rowid();
    conn.execute(
        "UPDATE chats SET updated_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') WHERE id = ?1",
        [chat_id],
    )?;
    Ok(id)
}
