-- 1: adapters, samples, embeddings, chats, messages, provenance.
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
