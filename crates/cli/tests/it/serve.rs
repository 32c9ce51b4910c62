//! `ramole serve` end to end: the real binary over a temporary `$RAMOLE_HOME` with SmolLM2,
//! MiniLM and three seeded adapters, driven over HTTP. Eight concurrent streaming clients with
//! different routing each get the reply they get alone; malformed requests get a 400 with a JSON
//! error; a client that disconnects mid-stream leaves the server serving.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::common::{Adapters, Home};
use serde_json::{Value, json};

struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(home: &Home) -> Self {
        let mut child = home
            .cmd(&["serve", "--port", "0", "--max-rows", "8"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ramole serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        assert!(
            addr.starts_with("http://127.0.0.1:"),
            "loopback by default: {addr}"
        );
        Self { child, base: addr }
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(600)))
            .build()
            .into()
    }

    /// (status, body as JSON).
    fn post(&self, body: &str) -> (u16, Value) {
        let mut r = Self::agent()
            .post(format!("{}/v1/chat/completions", self.base))
            .header("Content-Type", "application/json")
            .send(body)
            .unwrap();
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
        )
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let mut r = Self::agent()
            .get(format!("{}{path}", self.base))
            .call()
            .unwrap();
        let status = r.status().as_u16();
        (
            status,
            serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap(),
        )
    }

    /// A streamed answer: (the concatenated content, the final chunk with the provenance).
    fn stream(&self, mut body: Value) -> (String, Value) {
        body["stream"] = json!(true);
        let r = Self::agent()
            .post(format!("{}/v1/chat/completions", self.base))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let mut text = String::new();
        let mut last = Value::Null;
        let mut done = false;
        for line in BufReader::new(r.into_body().into_reader()).lines() {
            let line = line.unwrap();
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            assert!(!done, "nothing follows [DONE]");
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let chunk: Value = serde_json::from_str(data).unwrap();
            assert!(chunk.get("error").is_none(), "{chunk}");
            assert_eq!(chunk["object"], "chat.completion.chunk");
            if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
                text.push_str(t);
            }
            last = chunk;
        }
        assert!(done, "the stream ends with [DONE]");
        (text, last)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ask(text: &str, ramole: Value) -> Value {
    json!({"model": "ramole", "max_tokens": 12, "temperature": 0,
           "messages": [{"role": "user", "content": text}], "ramole": ramole})
}

#[test]
fn concurrent_streaming_clients_bad_requests_and_a_dropped_client() {
    let home = Home::init();
    let ad = Adapters::make();
    let ids: Vec<String> = ["french", "sentiment", "math"]
        .iter()
        .map(|n| ad.add(&home, n)["id"].as_str().unwrap().to_string())
        .collect();
    let server = Server::start(&home);

    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200);
    let listed: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(listed[0].contains("SmolLM2"), "{models}");
    for id in &ids {
        assert!(listed.contains(&id.as_str()), "{id} in {listed:?}");
    }

    // Eight requests with different routing: retrieval with each plan, adapters named with
    // gates, an adapter named as the model, and the base alone.
    let requests = [
        ask(
            "Translate to French: the cat sleeps.",
            json!({"k": 2, "plan": "mixture"}),
        ),
        ask(
            "Is this review positive? I loved it.",
            json!({"plan": "selection"}),
        ),
        ask("What is 12 times 12?", json!({"k": 3, "plan": "fusion"})),
        ask("Say something kind.", json!({"plan": "none"})),
        ask(
            "Translate to French: good night.",
            json!({"adapters": [{"id": ids[0], "gate": 0.7}, {"id": ids[2], "gate": 0.3}]}),
        ),
        ask("Solve 2x = 10.", json!({"k": 2, "gating": "softmax:0.05"})),
        json!({"model": ids[1], "max_tokens": 12, "temperature": 0,
               "messages": [{"role": "system", "content": "Answer briefly."},
                            {"role": "user", "content": "Classify: the soup was cold."}]}),
        ask("Name a planet.", json!({"k": 1})),
    ];
    let streamed: Vec<(String, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .iter()
            .map(|r| {
                let server = &server;
                let r = r.clone();
                s.spawn(move || server.stream(r))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (req, (text, last))) in requests.iter().zip(&streamed).enumerate() {
        // The same request alone, not streamed.
        let (status, alone) = server.post(&req.to_string());
        assert_eq!(status, 200, "{alone}");
        assert_eq!(
            text,
            alone["choices"][0]["message"]["content"].as_str().unwrap(),
            "request {i}: the streamed reply in a batch of 8 equals the reply alone"
        );
        let prov = &last["ramole"]["provenance"];
        assert_eq!(prov, &alone["ramole"]["provenance"], "request {i}");
        assert!(last["choices"][0]["finish_reason"].is_string());
        let gates: Vec<f64> = prov["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["gate"].as_f64().unwrap())
            .collect();
        match i {
            0 | 5 => {
                assert_eq!(prov["plan"], "mixture");
                assert_eq!(gates.len(), 2);
                assert!((gates.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{gates:?}");
            }
            1 => assert_eq!(
                (prov["plan"].as_str().unwrap(), gates.clone()),
                ("selection", vec![1.0])
            ),
            2 => assert_eq!(prov["plan"], "fusion"),
            3 => assert_eq!((prov["plan"].as_str().unwrap(), gates.len()), ("none", 0)),
            4 => {
                assert_eq!(prov["gating"], "given");
                assert_eq!(gates.len(), 2);
                assert!((gates[0] - 0.7).abs() < 1e-6 && (gates[1] - 0.3).abs() < 1e-6);
            }
            6 => {
                assert_eq!(prov["plan"], "selection");
                assert_eq!(prov["adapters"][0]["id"], ids[1].as_str());
            }
            _ => {}
        }
    }

    // Malformed requests: 400 with an OpenAI-style JSON error naming the field.
    let bad = [
        ("{not json", "body"),
        (r#"{"messages": "hello"}"#, "messages"),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}"#,
            "max_tokens",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "ramole": {"plan": "best"}}"#,
            "ramole",
        ),
    ];
    for (body, param) in bad {
        let (status, err) = server.post(body);
        assert_eq!(status, 400, "{body}: {err}");
        assert_eq!(err["error"]["type"], "invalid_request_error", "{err}");
        assert_eq!(err["error"]["param"], param, "{err}");
        assert!(!err["error"]["message"].as_str().unwrap().is_empty());
    }
    let (status, err) = server.post(
        &json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
            .to_string(),
    );
    assert_eq!(status, 404, "{err}");
    assert_eq!(err["error"]["code"], "model_not_found");
    let (status, err) =
        server.post(&ask("x", json!({"adapters": [{"id": "no-such-adapter"}]})).to_string());
    assert_eq!(status, 404, "{err}");

    // A client that asks for a long stream and hangs up after the first bytes.
    let addr = server.base.strip_prefix("http://").unwrap();
    let mut sock = TcpStream::connect(addr).unwrap();
    let body = json!({"stream": true, "max_tokens": 400, "temperature": 0,
                      "messages": [{"role": "user", "content": "Write a very long story."}]})
    .to_string();
    write!(
        sock,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 512];
    let n = sock.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(sock);
    // The server goes on: a new request is answered, and promptly (the dropped row was cancelled
    // rather than decoding 400 tokens first).
    let t = std::time::Instant::now();
    let (status, v) = server.post(&ask("Name a colour.", json!({"plan": "none"})).to_string());
    assert_eq!(status, 200, "{v}");
    assert!(
        !v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    assert!(t.elapsed() < Duration::from_secs(120), "{:?}", t.elapsed());
}
