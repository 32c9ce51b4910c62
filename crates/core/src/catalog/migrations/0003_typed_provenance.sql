-- 3: typed reply provenance. The generation record, a JSON object until now, becomes columns;
-- scoring, gating, the finish reason and the layer gates are checked like the plan. The table
-- is rebuilt (SQLite cannot add CHECKs to a table): the migration runs with foreign keys off,
-- so provenance_adapters keeps its rows, and is checked before it commits.
--
-- Old rows keep every value they have. A value an old record lacks or holds in a form this
-- version cannot read becomes NULL (a reply then has no generation record), except top_k,
-- stop and dropped_messages, which older versions did not write: 0, [] and 0.
CREATE TABLE provenance_typed (
    message_id INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    plan TEXT NOT NULL CHECK (plan IN ('none', 'selection', 'mixture', 'fusion', 'router')),
    k INTEGER NOT NULL CHECK (k >= 0),
    query TEXT NOT NULL,
    base_model TEXT NOT NULL,
    embedder TEXT,
    scoring TEXT CHECK (scoring IN ('cosine', 'ip')),
    gating TEXT CHECK (gating IN ('uniform', 'given', 'selection', 'router')
        OR gating GLOB 'softmax:*'),
    max_tokens INTEGER CHECK (max_tokens >= 0),
    temperature REAL,
    top_p REAL,
    top_k INTEGER CHECK (top_k >= 0),
    -- A u64 as decimal text: SQLite's integers are signed 64-bit.
    seed TEXT CHECK (seed GLOB '[0-9]*' AND seed NOT GLOB '*[^0-9]*'),
    stop TEXT CHECK (stop IS NULL OR json_valid(stop)),
    prompt_tokens INTEGER CHECK (prompt_tokens >= 0),
    generated_tokens INTEGER CHECK (generated_tokens >= 0),
    finish_reason TEXT CHECK (finish_reason IN ('eos', 'stop', 'length', 'cancelled')),
    dropped_messages INTEGER CHECK (dropped_messages >= 0),
    layer_gates TEXT CHECK (layer_gates IS NULL OR json_valid(layer_gates))
);

INSERT INTO provenance_typed (message_id, plan, k, query, base_model, embedder, scoring, gating,
    max_tokens, temperature, top_p, top_k, seed, stop, prompt_tokens, generated_tokens,
    finish_reason, dropped_messages, layer_gates)
SELECT message_id, plan, k, query, base_model, embedder,
    CASE WHEN scoring IN ('cosine', 'ip') THEN scoring END,
    CASE WHEN gating IN ('uniform', 'given', 'selection', 'router') OR gating GLOB 'softmax:*'
        THEN gating END,
    CASE WHEN json_type(g, '$.max_tokens') = 'integer' THEN g ->> '$.max_tokens' END,
    CASE WHEN json_type(g, '$.temperature') IN ('integer', 'real')
        THEN g ->> '$.temperature' END,
    CASE WHEN json_type(g, '$.top_p') IN ('integer', 'real') THEN g ->> '$.top_p' END,
    CASE WHEN json_type(g, '$.top_k') = 'integer' THEN g ->> '$.top_k' ELSE 0 END,
    -- `->` keeps the number's own text: `->>` would turn a seed above 2^63 into a real.
    CASE WHEN json_type(g, '$.seed') = 'integer' AND (g -> '$.seed') NOT GLOB '-*'
        THEN g -> '$.seed' END,
    CASE WHEN json_type(g, '$.stop') = 'array' THEN g -> '$.stop' ELSE '[]' END,
    CASE WHEN json_type(g, '$.prompt_tokens') = 'integer' THEN g ->> '$.prompt_tokens' END,
    CASE WHEN json_type(g, '$.generated_tokens') = 'integer'
        THEN g ->> '$.generated_tokens' END,
    CASE WHEN g ->> '$.finish_reason' IN ('eos', 'stop', 'length', 'cancelled')
        THEN g ->> '$.finish_reason' END,
    CASE WHEN json_type(g, '$.dropped_messages') = 'integer'
        THEN g ->> '$.dropped_messages' ELSE 0 END,
    CASE WHEN json_valid(layer_gates) THEN layer_gates END
FROM (SELECT *, CASE WHEN json_valid(generation) THEN generation ELSE '{}' END AS g
      FROM provenance);

DROP TABLE provenance;
ALTER TABLE provenance_typed RENAME TO provenance;
