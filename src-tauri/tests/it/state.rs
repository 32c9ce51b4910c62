//! The desktop app's state without a window, on the real SmolLM2 + MiniLM and two local
//! adapters: chat events in order, the stored turn for send / edit / regenerate / compare,
//! pinned gates, Stop, settings validation, export, and the `{code, message}` errors.

use std::path::Path;
use std::sync::Arc;

use ramole_core::catalog::Catalog;
use ramole_core::config;
use ramole_core::library::{self, Library};
use ramole_core::model::{LoadOptions, Model};
use ramole_desktop::dto::{ChatEvent, SendRequest, Suggested};
use ramole_desktop::state::AppState;
use ramole_desktop::token::TokenStore;
use serde_json::json;

fn request(v: serde_json::Value) -> SendRequest {
    let mut base = json!({
        "session": null, "stream_id": "s", "action": {"kind": "send"}, "text": "",
        "plan": "mixture", "k": 2, "exclude": [], "pinned": [], "system_prompt": null,
        "params": {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "seed": 1}
    });
    for (k, val) in v.as_object().unwrap() {
        base[k] = val.clone();
    }
    serde_json::from_value(base).unwrap()
}

fn setup(dir: &Path) -> Arc<AppState> {
    let (gguf, minilm) = (config::starter_base(), config::starter_embedder());
    assert!(
        gguf.is_file() && minilm.is_dir(),
        "test models missing — run scripts/fetch-test-models.sh"
    );
    let data = dir.join("data");
    library::init(&data, &gguf, &minilm, None, None).unwrap();
    let model = Model::load(&gguf, &LoadOptions::default()).unwrap();
    let mut lib = Library::open(&data).unwrap();
    for (name, seed, sample) in [
        ("french", 1, "Translate to French: good morning"),
        ("math", 2, "What is 17 times 23?"),
    ] {
        let src = dir.join(name);
        ramole_testkit::write_random_peft(&src, &model.decoder, 4, 8.0, seed).unwrap();
        std::fs::write(
            src.join("samples.jsonl"),
            json!({"input": sample}).to_string(),
        )
        .unwrap();
        lib.add_local(&src, None, Some(name)).unwrap();
    }
    drop(lib);
    AppState::new(
        data,
        Suggested::default(),
        TokenStore::new("ramole-desktop-test"),
    )
}

fn catalog(state: &AppState) -> Catalog {
    Catalog::open(&state.home().join("catalog.sqlite")).unwrap()
}

#[test]
fn chat_turns_stream_store_and_explain_themselves() {
    let tmp = tempfile::tempdir().unwrap();
    let st = setup(tmp.path());

    // Send: routing first (before any text), then started, text pieces, done.
    let mut events = Vec::new();
    let reply = st
        .send(
            request(json!({"text": "Translate to French: good night"})),
            &mut |e| events.push(e),
        )
        .unwrap();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e {
            ChatEvent::Routing { .. } => "routing",
            ChatEvent::Started { .. } => "started",
            ChatEvent::Text { .. } => "text",
            ChatEvent::Done { .. } => "done",
        })
        .collect();
    assert_eq!(&kinds[..2], ["routing", "started"]);
    assert_eq!(kinds.last(), Some(&"done"));
    assert!(
        kinds.iter().filter(|k| **k == "text").count() >= 2,
        "{kinds:?}"
    );
    let streamed: String = events
        .iter()
        .filter_map(|e| match e {
            ChatEvent::Text { delta } => Some(delta.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(streamed, reply.reply);
    let ChatEvent::Routing { provenance } = &events[0] else {
        unreachable!()
    };
    assert_eq!(provenance.adapters, reply.provenance.adapters);
    assert_eq!(reply.provenance.adapters[0].id, "french");
    let gates: f32 = reply.provenance.adapters.iter().map(|a| a.gate).sum();
    assert!((gates - 1.0).abs() < 1e-6);
    let session = reply.session;
    let stored = catalog(&st)
        .provenance(reply.message.unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(stored, reply.provenance);

    // A second message, then edit the first: everything after it is replaced.
    let second = st
        .send(
            request(json!({"session": session, "text": "What is 17 times 23?"})),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(second.provenance.adapters[0].id, "math");
    let first_user = reply.user_message.unwrap();
    let edited = st
        .send(
            request(
                json!({"session": session, "text": "Translate to French: thank you",
                           "action": {"kind": "edit", "message_id": first_user}}),
            ),
            &mut |_| {},
        )
        .unwrap();
    let msgs = catalog(&st).messages(session).unwrap();
    let contents: Vec<(&str, &str)> = msgs
        .iter()
        .map(|m| (m.role.as_str(), m.content.as_str()))
        .collect();
    assert_eq!(contents.len(), 2, "{contents:?}");
    assert_eq!(contents[0], ("user", "Translate to French: thank you"));
    assert_eq!(msgs[1].id, edited.message.unwrap());

    // Regenerate answers the same user message again and replaces the reply (greedy: same text,
    // one reply stored).
    let again = st
        .send(
            request(json!({"session": session, "action": {"kind": "regenerate"}})),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(again.reply, edited.reply);
    assert_eq!(again.user_message, None);
    assert_eq!(catalog(&st).messages(session).unwrap().len(), 2);
    assert_eq!(again.provenance.query, "Translate to French: thank you");

    // Compare with plan none: the base alone answers, nothing is stored.
    let user_id = catalog(&st).messages(session).unwrap()[0].id;
    let cmp = st
        .send(
            request(json!({"session": session, "plan": "none",
                           "action": {"kind": "compare", "message_id": user_id}})),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!((cmp.message, cmp.provenance.plan.as_str()), (None, "none"));
    assert!(cmp.provenance.adapters.is_empty());
    assert_eq!(catalog(&st).messages(session).unwrap().len(), 2);

    // Pinned adapters with slider gates: renormalised to sum 1, stored as given.
    let pinned = st
        .send(
            request(json!({"session": session, "text": "Hello",
                           "pinned": [{"id": "math", "gate": 3.0}, {"id": "french", "gate": 1.0}]})),
            &mut |_| {},
        )
        .unwrap();
    let p = &pinned.provenance;
    assert_eq!(p.gating.map(|g| g.to_string()).as_deref(), Some("given"));
    assert_eq!(
        p.adapters
            .iter()
            .map(|a| (a.id.as_str(), a.gate, a.score))
            .collect::<Vec<_>>(),
        [("math", 0.75, None), ("french", 0.25, None)]
    );

    // Errors are data with a code that names what happened.
    let e = st
        .send(request(json!({"session": 999, "text": "hi"})), &mut |_| {})
        .unwrap_err();
    assert_eq!(e.code, "not_found", "{e:?}");
    let e = st
        .send(
            request(json!({"text": "hi", "plan": "router9"})),
            &mut |_| {},
        )
        .unwrap_err();
    assert_eq!(e.code, "invalid");
    let e = st
        .send(
            request(json!({"session": session, "action": {"kind": "edit", "message_id": pinned.message.unwrap()}, "text": "x"})),
            &mut |_| {},
        )
        .unwrap_err();
    assert!(e.message.contains("is a reply"), "{e:?}");
    let e = st
        .send(
            request(json!({"text": "hi", "pinned": [{"id": "math", "gate": 0.0}]})),
            &mut |_| {},
        )
        .unwrap_err();
    assert!(e.message.contains("all 0"), "{e:?}");

    // Export: Markdown names the adapters and gates of each reply; JSON round-trips.
    let out = tmp.path().join("exports");
    let md = st.export_chat(session, "markdown", &out).unwrap();
    assert!(md.content.contains("math 75.0%"), "{}", md.content);
    assert_eq!(std::fs::read_to_string(&md.path).unwrap(), md.content);
    let js = st.export_chat(session, "json", &out).unwrap();
    let v: serde_json::Value = serde_json::from_str(&js.content).unwrap();
    assert_eq!(v["messages"].as_array().unwrap().len(), 4);
    assert_eq!(
        st.export_chat(session, "pdf", &out).unwrap_err().code,
        "invalid"
    );
}

#[test]
fn stop_keeps_the_partial_reply_and_settings_are_validated() {
    let tmp = tempfile::tempdir().unwrap();
    let st = setup(tmp.path());

    // Stop: cancel the stream after the first piece; the partial reply is stored as cancelled.
    let st2 = st.clone();
    let mut pieces = 0;
    let reply = st
        .send(
            request(json!({"stream_id": "stop-me", "text": "Tell me a long story about a dragon.",
                           "params": {"max_tokens": 400, "temperature": 0.0, "top_p": 1.0, "seed": 1}})),
            &mut |e| {
                if let ChatEvent::Text { .. } = e {
                    pieces += 1;
                    if pieces == 1 {
                        assert!(st2.cancel("stop-me"));
                    }
                }
            },
        )
        .unwrap();
    assert_eq!(
        serde_json::to_value(reply.finish_reason).unwrap(),
        "cancelled"
    );
    let generated = reply
        .provenance
        .generation
        .as_ref()
        .unwrap()
        .generated_tokens;
    assert!(generated < 50, "{generated} tokens after Stop");
    let msgs = catalog(&st).messages(reply.session).unwrap();
    assert_eq!(msgs[1].content, reply.reply);
    assert!(!st.cancel("stop-me"), "the task ended with the reply");

    // Settings: bad values are named and nothing is written; good ones round-trip.
    let mut s = st.settings().unwrap();
    let before = std::fs::read(st.home().join("settings.json")).unwrap();
    for (field, value, needle) in [
        ("k", json!(0), "k = 0"),
        ("temperature", json!(9.0), "temperature = 9"),
        ("hub_endpoint", json!("ftp://x"), "http"),
        ("gating", json!("softmax:-1"), "softmax"),
        ("plan", json!("routerx"), "routerx"),
    ] {
        let mut v = serde_json::to_value(&s).unwrap();
        v[field] = value;
        let e = st
            .set_settings(serde_json::from_value(v).unwrap())
            .unwrap_err();
        assert!(e.message.contains(needle), "{field}: {e:?}");
        assert_eq!(
            std::fs::read(st.home().join("settings.json")).unwrap(),
            before
        );
    }
    s.k = 4;
    s.max_tokens = 64;
    s.gating = "softmax:0.5".into();
    s.hub_endpoint = Some("http://127.0.0.1:9/".into());
    let saved = st.set_settings(s).unwrap();
    assert_eq!((saved.k, saved.max_tokens), (4, 64));
    assert_eq!(saved.hub_endpoint.as_deref(), Some("http://127.0.0.1:9"));
    assert_eq!(saved.gating, "softmax:0.5");
    let on_disk = config::Settings::load(st.home()).unwrap();
    assert_eq!(
        (on_disk.retrieval.k.get(), on_disk.chat.max_tokens),
        (4, 64)
    );

    // A token that is not a token is refused before the keyring is asked.
    let e = st.set_token(Some("has spaces in it")).unwrap_err();
    assert_eq!(e.code, "invalid");
    assert!(st.status().ready);
}

#[test]
fn training_from_inline_examples_reports_progress_and_installs_the_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let st = setup(tmp.path());
    let examples: Vec<serde_json::Value> = ["red apple", "blue sky", "green leaf", "old tree"]
        .iter()
        .map(|t| json!({"input": format!("Shout: {t}"), "target": t.to_uppercase()}))
        .collect();
    let req = |name: &str, examples: serde_json::Value| {
        serde_json::from_value(json!({
            "name": name, "examples_path": null, "examples": examples, "steps": 2, "rank": 4,
            "alpha": 8.0, "lr": 0.001, "batch": 2, "template": "alpaca"
        }))
        .unwrap()
    };
    // Bad requests are named before any work.
    let e = st
        .train(req("../escape", json!(examples)), "t0", &mut |_| {})
        .unwrap_err();
    assert!(e.message.contains("adapter name"), "{e:?}");
    let e = st
        .train(
            req("shout", json!([{"input": "x", "target": ""}])),
            "t1",
            &mut |_| {},
        )
        .unwrap_err();
    assert_eq!(e.code, "invalid", "{e:?}");
    assert!(e.message.contains("line 1"), "{e:?}");

    let mut progress = Vec::new();
    let rec = st
        .train(req("shout", json!(examples)), "t2", &mut |p| {
            progress.push(p)
        })
        .unwrap();
    assert_eq!(
        progress
            .iter()
            .map(|p| (p.step, p.steps))
            .collect::<Vec<_>>(),
        [(1, 2), (2, 2)]
    );
    assert!(
        progress
            .iter()
            .all(|p| p.loss.is_finite() && p.tokens_per_s > 0.0)
    );
    assert_eq!(rec.record.name, "shout");
    assert_eq!(rec.record.ranks, [4]);
    // Its training inputs became its retrieval samples.
    let detail = st.adapter(&rec.record.id).unwrap();
    assert!(
        detail
            .sample_list
            .iter()
            .any(|s| s.text.contains("Shout: red apple")),
        "{:?}",
        detail.sample_list
    );
    // The same name again is refused rather than overwritten.
    let e = st
        .train(req("shout", json!(examples)), "t3", &mut |_| {})
        .unwrap_err();
    assert!(e.message.contains("already holds"), "{e:?}");
}
