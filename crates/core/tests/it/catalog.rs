//! The catalog on real SQLite files: migration from empty, round trips, constraints, the index
//! generation, chats and reply provenance.

use std::path::PathBuf;

use ramole_core::catalog::{
    AdapterSource, Catalog, CatalogError, Compat, Embedding, NewAdapter, SCHEMA_VERSION, Sample,
    SampleOrigin, Verdict,
};
use ramole_core::vocab::{
    FinishReason, Gating, GenerationRecord, LayerGates, Plan, Provenance, ReplyGating, Role,
    Scoring, ServedAdapter,
};

fn new_adapter(id: &str, base: &str) -> NewAdapter {
    NewAdapter {
        id: id.into(),
        name: format!("{id} name"),
        source: AdapterSource::Hub {
            repo: format!("someone/{id}"),
            revision: "main".into(),
            commit: Some("0123456789abcdef".into()),
            subfolder: Some("checkpoint-500".into()),
        },
        base_model: Some("HuggingFaceTB/SmolLM2-135M-Instruct".into()),
        architecture: "llama".into(),
        ranks: vec![4, 8],
        alpha: 16.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        size_bytes: 12345,
        license: Some("apache-2.0".into()),
        card_summary: Some("Answers in French.".into()),
        verdict: Verdict {
            compat: Compat::Compatible,
            reason: String::new(),
            base: base.into(),
        },
    }
}

fn samples() -> Vec<Sample> {
    vec![
        Sample {
            text: "Translate: good morning".into(),
            origin: SampleOrigin::Card,
        },
        Sample {
            text: "Translate: thank you".into(),
            origin: SampleOrigin::User,
        },
    ]
}

/// A database at schema `version`, made by running the shipped migrations up to it.
fn old_catalog(path: &std::path::Path, version: usize) -> rusqlite::Connection {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/catalog/migrations");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch("PRAGMA foreign_keys = ON;").unwrap();
    for f in &files[..version] {
        conn.execute_batch(&std::fs::read_to_string(f).unwrap())
            .unwrap();
    }
    conn.pragma_update(None, "user_version", version as u32)
        .unwrap();
    conn
}

fn emb(embedder: &str, v: Vec<f32>) -> Embedding {
    Embedding {
        embedder: embedder.into(),
        samples: 2,
        vector: v,
    }
}

#[test]
fn a_fresh_catalog_migrates_from_empty_and_reopens_without_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.sqlite");
    let cat = Catalog::open(&path).unwrap();
    assert_eq!(cat.schema_version().unwrap(), SCHEMA_VERSION);
    assert!(cat.adapters().unwrap().is_empty());
    assert_eq!(cat.index_generation().unwrap(), 0);
    drop(cat);
    // WAL mode is on for the file.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    drop(conn);
    let cat = Catalog::open(&path).unwrap();
    assert_eq!(cat.schema_version().unwrap(), SCHEMA_VERSION);
}

#[test]
fn a_catalog_from_a_newer_ramole_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.sqlite");
    drop(Catalog::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = Catalog::open(&path).err().expect("refused");
    assert!(
        matches!(err, CatalogError::TooNew { found: 99, .. }),
        "{err}"
    );
    let conn = rusqlite::Connection::open(&path).unwrap();
    let v: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, 99);
}

#[test]
fn adapters_samples_and_embeddings_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.sqlite");
    let mut cat = Catalog::open(&path).unwrap();
    let new = new_adapter("fr", "base-a");
    let rec = cat
        .add_adapter(&new, &samples(), Some(&emb("mini:3", vec![0.5, -1.0, 2.0])))
        .unwrap();
    let mut local = new_adapter("local-one", "base-a");
    local.source = AdapterSource::Local {
        path: PathBuf::from("/some/where"),
    };
    local.verdict = Verdict {
        compat: Compat::Warning,
        reason: "trained for another base".into(),
        base: "base-a".into(),
    };
    cat.add_adapter(&local, &samples()[..1], None).unwrap();
    drop(cat);

    let cat = Catalog::open(&path).unwrap();
    let got = cat.require_adapter("fr").unwrap();
    assert_eq!(got, rec);
    assert_eq!(got.source, new.source);
    assert_eq!(got.ranks, vec![4, 8]);
    assert_eq!(got.target_modules, new.target_modules);
    assert_eq!(got.license.as_deref(), Some("apache-2.0"));
    assert!(got.enabled);
    assert_eq!(cat.samples(got.key).unwrap(), samples());
    assert_eq!(
        cat.embedding(got.key, "mini:3").unwrap().unwrap().vector,
        vec![0.5, -1.0, 2.0]
    );
    assert!(cat.embedding(got.key, "other:3").unwrap().is_none());
    let l = cat.require_adapter("local-one").unwrap();
    assert_eq!(l.verdict.compat, Compat::Warning);
    assert_eq!(
        l.source,
        AdapterSource::Local {
            path: "/some/where".into()
        }
    );
    assert_eq!(cat.missing_embeddings("mini:3").unwrap(), vec![l.key]);
    // Only enabled, non-incompatible adapters for that base, embedded by that embedder.
    assert_eq!(
        cat.retrievable("mini:3", "base-a").unwrap(),
        vec![(got.key, vec![0.5, -1.0, 2.0])]
    );
    assert!(cat.retrievable("mini:3", "base-b").unwrap().is_empty());
}

#[test]
fn constraints_reject_bad_rows_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut cat = Catalog::open(&dir.path().join("c.sqlite")).unwrap();
    cat.add_adapter(&new_adapter("a", "b"), &samples(), None)
        .unwrap();
    // Same id twice.
    assert!(
        cat.add_adapter(&new_adapter("a", "b"), &samples(), None)
            .is_err()
    );
    // An empty sample: refused, and the adapter row is not half-written.
    let bad = vec![Sample {
        text: "  ".into(),
        origin: SampleOrigin::User,
    }];
    assert!(cat.add_adapter(&new_adapter("b", "b"), &bad, None).is_err());
    assert!(cat.adapter("b").unwrap().is_none());
    // A failure inside the transaction (an empty embedding violates dims > 0) rolls back all.
    assert!(
        cat.add_adapter(&new_adapter("c", "b"), &samples(), Some(&emb("e", vec![])))
            .is_err()
    );
    assert!(cat.adapter("c").unwrap().is_none());
    assert_eq!(cat.adapters().unwrap().len(), 1);
    // Ids are made unique and clean.
    assert_eq!(cat.free_adapter_id("A").unwrap(), "a-2");
    assert_eq!(
        cat.free_adapter_id("someone/French Adapter!").unwrap(),
        "someone-french-adapter"
    );
    assert!(matches!(
        cat.set_enabled("nope", false),
        Err(CatalogError::NoAdapter(_))
    ));
}

#[test]
fn the_index_generation_moves_with_every_retrieval_relevant_change() {
    let mut cat = Catalog::open_in_memory().unwrap();
    let g0 = cat.index_generation().unwrap();
    let rec = cat
        .add_adapter(
            &new_adapter("a", "b"),
            &samples(),
            Some(&emb("e", vec![1.0])),
        )
        .unwrap();
    let g1 = cat.index_generation().unwrap();
    assert!(g1 > g0);
    cat.set_enabled("a", false).unwrap();
    let g2 = cat.index_generation().unwrap();
    assert!(g2 > g1);
    // No change, no bump.
    cat.set_enabled("a", false).unwrap();
    assert_eq!(cat.index_generation().unwrap(), g2);
    cat.put_embedding(rec.key, &emb("e", vec![2.0])).unwrap();
    let g3 = cat.index_generation().unwrap();
    assert!(g3 > g2);
    // Chats do not touch it.
    let c = cat.create_chat("t", None).unwrap();
    cat.add_message(c.id, Role::User, "hi").unwrap();
    assert_eq!(cat.index_generation().unwrap(), g3);
    cat.remove_adapter("a").unwrap();
    assert!(cat.index_generation().unwrap() > g3);
}

#[test]
fn replies_keep_their_provenance_even_after_the_adapter_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.sqlite");
    let mut cat = Catalog::open(&path).unwrap();
    cat.add_adapter(&new_adapter("fr", "b"), &samples(), None)
        .unwrap();
    let chat = cat.create_chat("French", Some("Be brief.")).unwrap();
    let u = cat
        .add_message(chat.id, Role::User, "Say hi in French")
        .unwrap();
    let prov = Provenance {
        plan: Plan::Mixture,
        k: 2,
        query: "Say hi in French".into(),
        base_model: "b".into(),
        embedder: Some("mini:384".into()),
        scoring: Some(Scoring::Cosine),
        gating: Some(ReplyGating::Retrieved(Gating::Uniform)),
        adapters: vec![
            ServedAdapter {
                id: "fr".into(),
                name: "fr name".into(),
                score: Some(0.75),
                gate: 0.5,
            },
            ServedAdapter {
                id: "gone".into(),
                name: "gone".into(),
                score: None,
                gate: 0.5,
            },
        ],
        generation: Some(GenerationRecord {
            max_tokens: 16,
            temperature: 0.7,
            top_p: 0.95,
            top_k: 0,
            seed: 3,
            stop: vec!["\n\n".into()],
            prompt_tokens: 9,
            generated_tokens: 4,
            finish_reason: FinishReason::Eos,
            dropped_messages: 0,
        }),
        layer_gates: Some(LayerGates {
            adapters: vec!["fr".into(), "gone".into()],
            layers: 1,
            tokens: vec!["<prompt>".into()],
            gates: vec![vec![vec![0.5, 0.5]]],
        }),
    };
    let r = cat.add_reply(chat.id, "Bonjour", &prov).unwrap();
    assert!(r > u);
    // A gate below zero is refused by the schema and nothing of that reply is stored.
    let mut bad = prov.clone();
    bad.adapters[0].gate = -1.0;
    assert!(cat.add_reply(chat.id, "x", &bad).is_err());
    assert_eq!(cat.messages(chat.id).unwrap().len(), 2);
    drop(cat);

    let mut cat = Catalog::open(&path).unwrap();
    assert_eq!(cat.provenance(r).unwrap().unwrap(), prov);
    assert!(cat.provenance(u).unwrap().is_none());
    cat.remove_adapter("fr").unwrap();
    let after = cat.provenance(r).unwrap().unwrap();
    assert_eq!(after.adapters[0].id, "fr");
    let msgs = cat.messages(chat.id).unwrap();
    assert_eq!(
        msgs.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(),
        ["user", "assistant"]
    );
    assert_eq!(
        cat.chats().unwrap()[0].system_prompt.as_deref(),
        Some("Be brief.")
    );
    cat.rename_chat(chat.id, "Renamed").unwrap();
    assert_eq!(cat.require_chat(chat.id).unwrap().title, "Renamed");
    cat.delete_chat(chat.id).unwrap();
    assert!(cat.provenance(r).unwrap().is_none());
    assert!(matches!(
        cat.delete_chat(chat.id),
        Err(CatalogError::NoChat(_))
    ));
}

#[test]
fn a_version_1_catalog_migrates_keeping_its_rows_and_updates_replace_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.sqlite");
    let mut old = new_adapter("a", "b");
    if let AdapterSource::Hub { subfolder, .. } = &mut old.source {
        *subfolder = None;
    }
    // A catalog as version 1 wrote it: its schema, one adapter row with its samples.
    let conn = old_catalog(&path, 1);
    conn.execute(
        "INSERT INTO adapters (id, name, source_kind, hub_repo, hub_revision, hub_commit,
            base_model, architecture, ranks, alpha, target_modules, size_bytes, license,
            card_summary, compat, compat_reason, compat_base)
         VALUES ('a', 'a name', 'hub', 'someone/a', 'main', '0123456789abcdef',
            'HuggingFaceTB/SmolLM2-135M-Instruct', 'llama', '[4,8]', 16.0,
            '[\"q_proj\",\"v_proj\"]', 12345, 'apache-2.0', 'Answers in French.', 'compatible',
            '', 'b')",
        [],
    )
    .unwrap();
    for (i, s) in samples().iter().enumerate() {
        conn.execute(
            "INSERT INTO samples (adapter_key, position, text, origin) VALUES (1, ?1, ?2, ?3)",
            rusqlite::params![i as i64, s.text, s.origin.as_str()],
        )
        .unwrap();
    }
    drop(conn);
    let mut cat = Catalog::open(&path).unwrap();
    assert_eq!(cat.schema_version().unwrap(), SCHEMA_VERSION);
    let rec = cat.require_adapter("a").unwrap();
    assert_eq!(rec.source, old.source);
    // An update replaces the row's fields (not its id or key) and, when given, the samples.
    let generation = cat.index_generation().unwrap();
    let mut next = new_adapter("a", "b");
    next.ranks = vec![16];
    next.source = AdapterSource::Hub {
        repo: "someone/a".into(),
        revision: "main".into(),
        commit: Some("fedcba9876543210".into()),
        subfolder: Some("v2".into()),
    };
    let e = emb("mini:3", vec![1.0, 0.0, 0.0]);
    let new_samples = &samples()[..1];
    let up = cat
        .update_adapter("a", &next, Some((new_samples, &e)))
        .unwrap();
    assert_eq!((up.key, up.id.as_str()), (rec.key, "a"));
    assert_eq!(up.ranks, vec![16]);
    assert_eq!(up.source, next.source);
    assert_eq!(cat.samples(rec.key).unwrap().len(), 1);
    assert!(cat.index_generation().unwrap() > generation);
    assert!(cat.update_adapter("missing", &next, None).is_err());
}

#[test]
fn a_version_2_catalog_migrates_its_json_provenance_to_typed_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.sqlite");
    let conn = old_catalog(&path, 2);
    conn.execute_batch(
        "INSERT INTO chats (title) VALUES ('old chat');
         INSERT INTO messages (chat_id, role, content) VALUES (1, 'user', 'Say hi');
         INSERT INTO messages (chat_id, role, content) VALUES (1, 'assistant', 'Salut');
         INSERT INTO messages (chat_id, role, content) VALUES (1, 'assistant', 'Broken');",
    )
    .unwrap();
    // What version 2 stored: the generation record as JSON (a seed above 2^63 among it), and a
    // row whose JSON is damaged.
    let record = r#"{"dropped_messages":0,"finish_reason":"stop","generated_tokens":5,
        "max_tokens":32,"prompt_tokens":12,"seed":18446744073709551615,"stop":["\n\n"],
        "temperature":0.699999988079071,"top_k":0,"top_p":0.949999988079071}"#;
    let gates = r#"{"adapters":["fr"],"layers":1,"tokens":["<prompt>"],"gates":[[[1.0]]]}"#;
    conn.execute(
        "INSERT INTO provenance (message_id, plan, k, query, base_model, embedder, scoring,
            gating, generation, layer_gates)
         VALUES (2, 'router', 1, 'Say hi', 'b', 'mini:384', 'cosine', 'router', ?1, ?2)",
        rusqlite::params![record, gates],
    )
    .unwrap();
    conn.execute(
        "INSERT INTO provenance (message_id, plan, k, query, base_model, embedder, scoring,
            gating, generation, layer_gates)
         VALUES (3, 'mixture', 2, 'Say hi', 'b', NULL, NULL, 'softmax:0.1', 'not json', NULL)",
        [],
    )
    .unwrap();
    conn.execute(
        "INSERT INTO provenance_adapters (message_id, position, adapter_key, adapter_id, name,
            score, gate) VALUES (2, 0, NULL, 'fr', 'French', 0.5, 1.0)",
        [],
    )
    .unwrap();
    drop(conn);

    let cat = Catalog::open(&path).unwrap();
    assert_eq!(cat.schema_version().unwrap(), SCHEMA_VERSION);
    let p = cat.provenance(2).unwrap().unwrap();
    assert_eq!(p.plan, Plan::Router);
    assert_eq!(p.scoring, Some(Scoring::Cosine));
    assert_eq!(p.gating, Some(ReplyGating::Router));
    let g = p.generation.expect("the record survives the migration");
    assert_eq!(g.seed, u64::MAX, "the seed keeps all 64 bits");
    assert_eq!(
        (g.max_tokens, g.prompt_tokens, g.generated_tokens),
        (32, 12, 5)
    );
    assert_eq!((g.temperature, g.top_p), (0.7, 0.95));
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert_eq!(g.stop, ["\n\n"]);
    assert_eq!(p.layer_gates.unwrap().gates, [[[1.0]]]);
    // The adapters that served it are still there.
    assert_eq!(p.adapters.len(), 1);
    assert_eq!((p.adapters[0].id.as_str(), p.adapters[0].gate), ("fr", 1.0));
    // The damaged record is dropped, the rest of its row kept.
    let p = cat.provenance(3).unwrap().unwrap();
    assert_eq!(p.plan, Plan::Mixture);
    assert_eq!(
        p.gating,
        Some(ReplyGating::Retrieved(Gating::Softmax { temperature: 0.1 }))
    );
    assert!(p.generation.is_none());
    // And the schema now refuses what it could not read.
    let conn = rusqlite::Connection::open(&path).unwrap();
    assert!(
        conn.execute(
            "UPDATE provenance SET finish_reason = 'exploded' WHERE message_id = 2",
            []
        )
        .is_err()
    );
}
