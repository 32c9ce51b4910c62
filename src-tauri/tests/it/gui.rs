//! The real desktop app under Xvfb, driven through Debian's WebKitWebDriver: a temporary data
//! folder set up with SmolLM2 + MiniLM and one local adapter, and the tests' local Hub server
//! with an adapter to find. Search and install from Discover, see it in the Library, chat and
//! watch the reply stream, check the routing panel against the stored provenance, regenerate,
//! answer with the plan `router` and check its layer × token heatmap against the stored
//! per-layer gates, remove the adapter. Screenshots are kept in `target/gui-shots/` (look at them).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ramole_core::catalog::{Catalog, SampleOrigin};
use ramole_core::config;
use ramole_core::library::{self, Library};
use ramole_core::model::{LoadOptions, Model, SiteKind};
use ramole_core::router::{RouterLora, RouterSite};
use ramole_testhub::{Repo, TestHub};
use ramole_testkit::gui::{Display, Driver, Element, Session, require_tools};
use serde_json::json;

const BASE: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
const LONG: Duration = Duration::from_secs(240);
const SHORT: Duration = Duration::from_secs(30);

fn shots_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("gui-shots")
}

/// The Hub repository of a French adapter: popular, with `widget` prompts for retrieval.
fn peft_repo(dir: &Path, id: &str, widget: &[&str]) -> Repo {
    ramole_testkit::hub::peft_repo(dir, id, BASE, 1234, widget)
}

fn by_testid(s: &Session, id: &str) -> Result<Element, String> {
    s.wait_element(&format!("[data-testid=\"{id}\"]"), SHORT)
}

/// The last chat reply: (element reference, message id, streaming flag, text).
type ReplyState = (String, Option<String>, bool, String);

fn last_reply(s: &Session) -> Result<Option<ReplyState>, String> {
    let replies = s.find_all("[data-testid=\"chat-reply\"]")?;
    let Some(r) = replies.last() else {
        return Ok(None);
    };
    Ok(Some((
        r.reference().to_string(),
        s.attr(r, "data-message-id")?,
        s.attr(r, "data-streaming")?.as_deref() == Some("true"),
        s.text(r)?,
    )))
}

/// Waits for a reply other than the element `previous` to finish (a regenerated reply may
/// reuse the old one's message id, so the DOM node tells them apart); returns its message id
/// and whether text was seen while it streamed.
fn wait_reply_done(s: &Session, previous: Option<&str>) -> Result<(String, String, bool), String> {
    let mut partial_seen = false;
    let (element, id) = s.wait_for("the reply to finish", LONG, |s| {
        let Some((element, id, streaming, text)) = last_reply(s)? else {
            return Ok(None);
        };
        if Some(element.as_str()) == previous {
            return Ok(None);
        }
        if streaming && !text.trim().is_empty() {
            partial_seen = true;
        }
        Ok(match id {
            Some(id) if !streaming => Some((element, id)),
            _ => None,
        })
    })?;
    Ok((element, id, partial_seen))
}

/// (adapter, gate) of each gate row of the last routing panel.
fn gate_rows(s: &Session) -> Result<Vec<(String, f64)>, String> {
    if s.find_all("[data-testid=\"routing-panel\"]")?.is_empty() {
        return Err("no routing panel".into());
    }
    let rows = s.execute(
        "const ps = document.querySelectorAll('[data-testid=\"routing-panel\"]');
         const p = ps[ps.length - 1];
         return [...p.querySelectorAll('[data-testid=\"gate-row\"]')]
           .map(r => [r.getAttribute('data-adapter'), Number(r.getAttribute('data-gate'))]);",
        vec![],
    )?;
    Ok(rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_str().unwrap().to_string(), r[1].as_f64().unwrap()))
        .collect())
}

fn shot(display: &Display, name: &str) {
    let path = shots_dir().join(format!("{name}.png"));
    display.screenshot(&path).unwrap();
    eprintln!("screenshot: {}", path.display());
}

#[test]
fn discover_install_chat_route_regenerate_remove_in_the_real_window() {
    require_tools().unwrap();
    let (gguf, minilm) = (config::starter_base(), config::starter_embedder());
    assert!(
        gguf.is_file() && minilm.is_dir(),
        "test models missing ({}, {}) — run scripts/fetch-test-models.sh",
        gguf.display(),
        minilm.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let hub = TestHub::start();

    // Two random adapters of SmolLM2's shapes: one installed locally, one on the Hub.
    let model = Model::load(&gguf, &LoadOptions::default()).unwrap();
    let src = tmp.path().join("src");
    for (name, seed) in [("math", 11), ("french", 12)] {
        ramole_testkit::write_random_peft(&src.join(name), &model.decoder, 4, 8.0, seed).unwrap();
    }
    // A router for the base (seeded; B_r scaled up so its gates clearly vary by layer and token).
    let init = RouterLora::init(model.decoder.config(), BASE, &SiteKind::ALL, 8, 5).unwrap();
    let sites = init
        .sites()
        .map(|(site, r)| {
            let b = (&r.b * 300.0).unwrap();
            (*site, RouterSite { a: r.a.clone(), b })
        })
        .collect();
    let router_file = tmp.path().join("router.safetensors");
    RouterLora::from_sites(init.config().clone(), sites)
        .unwrap()
        .save(&router_file, model.decoder.config())
        .unwrap();
    drop(model);
    hub.add_repo(peft_repo(
        &src.join("french"),
        "alice/smol-french-lora",
        &[
            "Translate to French: good morning, my friend",
            "Translate the following sentence into French: where is the station?",
        ],
    ));
    library::init(&data, &gguf, &minilm, Some(BASE), None).unwrap();
    let mut settings = config::Settings::load(&data).unwrap();
    settings.hub.endpoint = Some(hub.url());
    settings.chat.max_tokens = 96;
    settings.chat.temperature = 0.0;
    settings.save(&data).unwrap();
    {
        let samples = tmp.path().join("math.jsonl");
        std::fs::write(
            &samples,
            "{\"input\": \"Solve for x: 3x + 5 = 20.\"}\n{\"input\": \"What is 17 times 23?\"}\n",
        )
        .unwrap();
        let mut lib = Library::open(&data).unwrap();
        lib.add_router(&router_file, false).unwrap();
        let rec = lib
            .add_local(&src.join("math"), Some(&samples), Some("math"))
            .unwrap();
        assert_eq!(
            lib.catalog().samples(rec.key).unwrap()[0].origin,
            SampleOrigin::Samples
        );
    }

    let display = Display::start(1600, 1000).unwrap();
    let logs = shots_dir();
    std::fs::create_dir_all(&logs).unwrap();
    let driver = Driver::start(
        &display,
        &[
            ("RAMOLE_HOME", data.as_path()),
            ("HF_HUB_CACHE", &tmp.path().join("hf")),
            ("HF_HOME", &tmp.path().join("hf-home")),
            ("XDG_CONFIG_HOME", &tmp.path().join("config")),
            ("XDG_DATA_HOME", &tmp.path().join("xdg-data")),
        ],
        &logs.join("webkitwebdriver.log"),
    )
    .unwrap();
    let s = driver
        .session(Path::new(env!("CARGO_BIN_EXE_ramole-desktop")))
        .unwrap();
    let result = drive(&s, &display, &data);
    if result.is_err() {
        shot(&display, "failure");
    }
    let _ = s.close();
    result.unwrap();
}

fn drive(s: &Session, display: &Display, data: &Path) -> Result<(), String> {
    s.set_window_size(1600, 1000)?;
    // The model loads in the background; the chat input appears when it is ready.
    by_testid(s, "nav-chat")?;
    s.wait_for("the model to load", LONG, |s| {
        Ok((s.find_all("[data-testid=\"engine-loading\"]")?.is_empty()
            && !s.find_all("[data-testid=\"chat-input\"]")?.is_empty())
        .then_some(()))
    })?;

    // Discover: search, install with one click.
    s.click(&by_testid(s, "nav-discover")?)?;
    let search = by_testid(s, "discover-search")?;
    s.type_text(&search, "french")?;
    s.click(&by_testid(s, "discover-go")?)?;
    let card = "[data-testid=\"discover-result\"][data-repo=\"alice/smol-french-lora\"]";
    s.wait_element(card, SHORT)?;
    let results = s.find_all("[data-testid=\"discover-result\"]")?;
    if results.len() != 1 {
        return Err(format!(
            "expected 1 result for 'french', got {}",
            results.len()
        ));
    }
    shot(display, "1-discover");
    let install = s.wait_element(&format!("{card} [data-testid=\"install-button\"]"), SHORT)?;
    s.click(&install)?;
    s.wait_for("the install to finish", LONG, |s| {
        let b = s.find_all(&format!("{card} [data-testid=\"install-button\"]"))?;
        Ok(match b.first() {
            Some(b) if s.text(b)?.contains("Installed") => Some(()),
            _ => None,
        })
    })?;
    shot(display, "2-installed");

    // Library: the new adapter is there, with the local one.
    s.click(&by_testid(s, "nav-library")?)?;
    let ids = s.wait_for("two library items", SHORT, |s| {
        let items = s.find_all("[data-testid=\"library-item\"]")?;
        let ids: Vec<String> = items
            .iter()
            .filter_map(|i| s.attr(i, "data-adapter-id").ok().flatten())
            .collect();
        Ok((ids.len() == 2).then_some(ids))
    })?;
    let french = ids
        .iter()
        .find(|i| i.contains("french"))
        .ok_or_else(|| format!("no french adapter in the library: {ids:?}"))?
        .clone();
    shot(display, "3-library");

    // Chat: mixture of k = 2, the reply streams in.
    s.click(&by_testid(s, "nav-chat")?)?;
    let k = by_testid(s, "k-input")?;
    s.clear(&k)?;
    s.type_text(&k, "2")?;
    s.execute(
        "const sel = document.querySelector('[data-testid=\"plan-select\"]');
         sel.value = 'mixture'; sel.dispatchEvent(new Event('change', {bubbles: true}));",
        vec![],
    )?;
    let input = by_testid(s, "chat-input")?;
    s.type_text(&input, "Translate to French: good morning, my friend")?;
    s.click(&by_testid(s, "chat-send")?)?;
    let (first_element, first_id, partial_seen) = wait_reply_done(s, None)?;
    if !partial_seen {
        return Err("no partial text was seen while the reply streamed".into());
    }
    shot(display, "4-chat-reply");

    // The routing panel: gates sum to 1 and equal the stored provenance.
    let rows = gate_rows(s)?;
    check_routing(&rows, data, &first_id, &french, "mixture")?;

    // Regenerate: a new reply replaces the old one in the catalog.
    s.click(&by_testid(s, "regenerate")?)?;
    let (second_element, second_id, _) = wait_reply_done(s, Some(&first_element))?;
    let rows = gate_rows(s)?;
    check_routing(&rows, data, &second_id, &french, "mixture")?;
    let catalog = Catalog::open(&data.join("catalog.sqlite")).map_err(|e| e.to_string())?;
    let chats = catalog.chats().map_err(|e| e.to_string())?;
    let msgs = catalog.messages(chats[0].id).map_err(|e| e.to_string())?;
    let roles: Vec<&str> = msgs.iter().map(|m| m.role.as_str()).collect();
    if roles != ["user", "assistant"] || msgs[1].id.to_string() != second_id {
        return Err(format!(
            "after regenerate the session should be [user, reply {second_id}], got {:?}",
            msgs.iter().map(|m| (&m.role, m.id)).collect::<Vec<_>>()
        ));
    }
    drop(catalog);
    shot(display, "5-regenerated");

    // The plan router: gates per layer and token, shown as a heatmap equal to the stored ones.
    s.execute(
        "const sel = document.querySelector('[data-testid=\"plan-select\"]');
         sel.value = 'router'; sel.dispatchEvent(new Event('change', {bubbles: true}));",
        vec![],
    )?;
    std::thread::sleep(Duration::from_millis(200));
    if !s.find_all("[data-testid=\"router-hint\"]")?.is_empty() {
        return Err("the 'needs a trained router' hint shows although the base has one".into());
    }
    let input = by_testid(s, "chat-input")?;
    s.type_text(&input, "Translate to French: where is the station?")?;
    s.click(&by_testid(s, "chat-send")?)?;
    let (_, router_id, _) = wait_reply_done(s, Some(&second_element))?;
    let rows = gate_rows(s)?;
    check_routing(&rows, data, &router_id, &french, "router")?;
    check_heatmap(s, data, &router_id)?;
    shot(display, "5b-router-heatmap");

    // Remove the adapter from the Library.
    s.click(&by_testid(s, "nav-library")?)?;
    let item = format!("[data-testid=\"library-item\"][data-adapter-id=\"{french}\"]");
    let remove = s.wait_element(&format!("{item} [data-testid=\"adapter-remove\"]"), SHORT)?;
    s.click(&remove)?;
    confirm(s)?;
    s.wait_for("the adapter to leave the library", SHORT, |s| {
        Ok(s.find_all(&item)?.is_empty().then_some(()))
    })?;
    let lib = Library::open(data).map_err(|e| e.to_string())?;
    if lib
        .catalog()
        .adapter(&french)
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Err(format!("{french} is still in the catalog"));
    }
    shot(display, "6-removed");

    // Both layouts stay usable.
    for (w, h) in [(1024, 700), (1600, 1000)] {
        s.set_window_size(w, h)?;
        for screen in ["chat", "discover", "library", "settings"] {
            s.click(&by_testid(s, &format!("nav-{screen}"))?)?;
            std::thread::sleep(Duration::from_millis(400));
            shot(display, &format!("layout-{w}x{h}-{screen}"));
        }
    }
    Ok(())
}

/// Accepts the confirmation the UI asks for before removing.
fn confirm(s: &Session) -> Result<(), String> {
    let in_app = s.find_all("[data-testid=\"confirm-yes\"]")?;
    match in_app.first() {
        Some(b) => s.click(b),
        None => Err("no confirmation button (data-testid=confirm-yes) appeared".into()),
    }
}

fn check_routing(
    rows: &[(String, f64)],
    data: &Path,
    message_id: &str,
    french: &str,
    plan: &str,
) -> Result<(), String> {
    let sum: f64 = rows.iter().map(|r| r.1).sum();
    if rows.len() != 2 || (sum - 1.0).abs() > 1e-5 {
        return Err(format!(
            "the routing panel should show 2 gates summing to 1, got {rows:?} (sum {sum})"
        ));
    }
    if !rows.iter().any(|r| r.0 == french) {
        return Err(format!(
            "{french} did not serve the French request: {rows:?}"
        ));
    }
    let id: i64 = message_id
        .parse()
        .map_err(|_| format!("bad message id {message_id:?}"))?;
    let catalog = Catalog::open(&data.join("catalog.sqlite")).map_err(|e| e.to_string())?;
    let prov = catalog
        .provenance(id)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no provenance stored for message {id}"))?;
    let stored: Vec<(String, f64)> = prov
        .adapters
        .iter()
        .map(|a| (a.id.clone(), a.gate as f64))
        .collect();
    if prov.plan.as_str() != plan || stored.len() != rows.len() {
        return Err(format!(
            "stored provenance {} {stored:?} differs from the panel {rows:?}",
            prov.plan
        ));
    }
    for ((a, g), (b, h)) in rows.iter().zip(&stored) {
        if a != b || (g - h).abs() > 1e-6 {
            return Err(format!(
                "panel {rows:?} differs from the stored provenance {stored:?}"
            ));
        }
    }
    Ok(())
}

/// The last reply's heatmap: one cell per layer and token column, each showing the selected
/// adapter's gate as stored in the reply's `layer_gates`; then the same after picking another
/// adapter.
fn check_heatmap(s: &Session, data: &Path, message_id: &str) -> Result<(), String> {
    let id: i64 = message_id
        .parse()
        .map_err(|_| format!("bad message id {message_id:?}"))?;
    let catalog = Catalog::open(&data.join("catalog.sqlite")).map_err(|e| e.to_string())?;
    let prov = catalog
        .provenance(id)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no provenance stored for message {id}"))?;
    let lg = prov
        .layer_gates
        .ok_or("a router reply stored no layer_gates")?;
    let (adapters, gates) = (lg.adapters, lg.gates);
    let read = |s: &Session| -> Result<serde_json::Value, String> {
        s.execute(
            "const hs = document.querySelectorAll('[data-testid=\"gate-heatmap\"]');
             const h = hs[hs.length - 1];
             if (!h) return null;
             return {layers: Number(h.getAttribute('data-layers')),
                     tokens: Number(h.getAttribute('data-tokens')),
                     adapter: h.getAttribute('data-adapter'),
                     cells: [...h.querySelectorAll('[data-testid=\"heatmap-cell\"]')].map(c =>
                       [Number(c.getAttribute('data-layer')), Number(c.getAttribute('data-token')),
                        Number(c.getAttribute('data-gate'))])};",
            vec![],
        )
    };
    let check = |v: &serde_json::Value| -> Result<String, String> {
        if v.is_null() {
            return Err("no gate heatmap under the router reply".into());
        }
        let (layers, tokens) = (gates.len(), gates[0].len());
        if v["layers"] != layers || v["tokens"] != tokens {
            return Err(format!(
                "heatmap {}×{}, stored {layers}×{tokens}",
                v["layers"], v["tokens"]
            ));
        }
        let adapter = v["adapter"].as_str().unwrap_or_default().to_string();
        let a = adapters
            .iter()
            .position(|x| *x == adapter)
            .ok_or_else(|| format!("heatmap shows {adapter:?}, not one of {adapters:?}"))?;
        let cells = v["cells"].as_array().unwrap();
        if cells.len() != layers * tokens {
            return Err(format!("{} cells for {layers}×{tokens}", cells.len()));
        }
        for c in cells {
            let (l, t, g) = (
                c[0].as_u64().unwrap() as usize,
                c[1].as_u64().unwrap() as usize,
                c[2].as_f64().unwrap(),
            );
            if (gates[l][t][a] - g).abs() > 1e-9 {
                return Err(format!(
                    "cell layer {l} token {t} shows {g}, stored {}",
                    gates[l][t][a]
                ));
            }
        }
        Ok(adapter)
    };
    let shown = check(&read(s)?)?;
    // Pick another adapter: the cells follow.
    let other = adapters
        .iter()
        .find(|a| **a != shown)
        .ok_or("the router reply has one adapter")?;
    let button = s.wait_element(
        &format!("[data-testid=\"heatmap-adapter\"][data-adapter=\"{other}\"]"),
        SHORT,
    )?;
    s.click(&button)?;
    std::thread::sleep(Duration::from_millis(300));
    let now = check(&read(s)?)?;
    if now != *other {
        return Err(format!("picked {other}, heatmap shows {now}"));
    }
    Ok(())
}

/// Calls a command the way the UI does and returns `{ok, value}` or `{ok: false, failure}`.
fn invoke(s: &Session, cmd: &str, args: serde_json::Value) -> Result<serde_json::Value, String> {
    s.execute_async(
        "const done = arguments[arguments.length - 1];
         window.__TAURI_INTERNALS__.invoke(arguments[0], arguments[1])
           .then(v => done({ok: true, value: v}), e => done({ok: false, failure: e}));",
        vec![json!(cmd), args],
    )
}

#[test]
fn first_run_sets_up_the_models_and_only_the_apps_commands_are_allowed() {
    require_tools().unwrap();
    let (gguf, minilm) = (config::starter_base(), config::starter_embedder());
    assert!(
        gguf.is_file() && minilm.is_dir(),
        "test models missing — run scripts/fetch-test-models.sh"
    );
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let display = Display::start(1024, 700).unwrap();
    let driver = Driver::start(
        &display,
        &[
            ("RAMOLE_HOME", data.as_path()),
            ("XDG_CONFIG_HOME", &tmp.path().join("config")),
            ("HF_HUB_OFFLINE", Path::new("1")),
        ],
        &tmp.path().join("webkitwebdriver.log"),
    )
    .unwrap();
    let s = driver
        .session(Path::new(env!("CARGO_BIN_EXE_ramole-desktop")))
        .unwrap();
    let result = (|| -> Result<(), String> {
        s.set_window_size(1024, 700)?;
        by_testid(&s, "first-run")?;
        for (field, path) in [("base-path", gguf.as_path()), ("embedder-path", &minilm)] {
            let input = by_testid(&s, field)?;
            s.clear(&input)?;
            s.type_text(&input, path.to_str().unwrap())?;
        }
        shot(&display, "first-run");
        // The app's own commands answer; anything else is refused by the capability.
        let status = invoke(&s, "app_status", json!({}))?;
        if status["ok"] != true || status["value"]["ready"] != false {
            return Err(format!("app_status before setup: {status}"));
        }
        for (cmd, args) in [
            (
                "plugin:event|listen",
                json!({"event": "x", "target": {"kind": "Any"}, "handler": 1}),
            ),
            ("plugin:path|resolve_directory", json!({"directory": 1})),
            ("plugin:app|version", json!({})),
        ] {
            let r = invoke(&s, cmd, args)?;
            if r["ok"] != false || !r["failure"].to_string().contains("not allowed") {
                return Err(format!(
                    "{cmd} should be refused by the capability, got {r}"
                ));
            }
        }
        // A wrong path is refused with its name; nothing is written.
        let bad = invoke(
            &s,
            "setup_models",
            json!({"request": {"base_path": "/nonexistent/model.gguf",
                               "embedder_path": minilm, "base_id": null}}),
        )?;
        if bad["failure"]["code"] != "invalid"
            || !bad["failure"]["message"]
                .to_string()
                .contains("/nonexistent/model.gguf")
        {
            return Err(format!("a missing base should be named: {bad}"));
        }
        if data.join("settings.json").exists() {
            return Err("a refused setup wrote settings.json".into());
        }
        s.click(&by_testid(&s, "setup-start")?)?;
        s.wait_for("the chat after setup", LONG, |s| {
            Ok((s.find_all("[data-testid=\"engine-loading\"]")?.is_empty()
                && !s.find_all("[data-testid=\"chat-input\"]")?.is_empty())
            .then_some(()))
        })?;
        let settings = config::Settings::load(&data).map_err(|e| e.to_string())?;
        if settings.base_path != gguf || settings.embedder_path != minilm {
            return Err(format!("stored settings {settings:?}"));
        }
        shot(&display, "first-run-ready");
        if let Some(banner) = s.find_all("[data-testid=\"error-banner\"]")?.first() {
            return Err(format!("an error showed on the way: {}", s.text(banner)?));
        }
        Ok(())
    })();
    if result.is_err() {
        shot(&display, "first-run-failure");
    }
    let _ = s.close();
    result.unwrap();
}
