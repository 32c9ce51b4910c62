//! Injected faults: status answers, cut bodies, flipped bytes.

use crate::common::{get, get_with, head, sha256};
use ramole_testhub::{Fault, Repo, TestHub};

fn hub() -> TestHub {
    let hub = TestHub::start();
    hub.add_repo(
        Repo::new("o/r")
            .file("config.json", r#"{"hidden_size": 64}"#)
            .file("model.safetensors", (0..=255u8).collect::<Vec<_>>()),
    );
    hub
}

#[test]
fn status_fault_counts_down_then_clears() {
    let hub = hub();
    hub.inject(Fault::Status {
        path_contains: "config.json".into(),
        status: 503,
        times: 2,
        retry_after: None,
    });
    let url = format!("{}/o/r/resolve/main/config.json", hub.url());
    // Unrelated paths are untouched.
    assert_eq!(get(&format!("{}/api/models/o/r", hub.url())).status, 200);
    let r = head(&url);
    assert_eq!(r.status, 503);
    assert!(r.body.is_empty());
    let r = get(&url);
    assert_eq!(r.status, 503);
    assert!(r.json()["error"].is_string());
    assert!(r.header("Retry-After").is_none());
    assert_eq!(get(&url).status, 200);
}

#[test]
fn rate_limit_carries_retry_after() {
    let hub = hub();
    hub.inject(Fault::Status {
        path_contains: "/api/models".into(),
        status: 429,
        times: 1,
        retry_after: Some(2),
    });
    let r = get(&format!("{}/api/models?search=o", hub.url()));
    assert_eq!(r.status, 429);
    assert_eq!(r.header("Retry-After"), Some("2"));
    assert_eq!(r.header("RateLimit"), Some("\"api\";r=0;t=2"));
    assert_eq!(
        get(&format!("{}/api/models?search=o", hub.url())).status,
        200
    );
    let log = hub.requests();
    assert_eq!(log.iter().map(|l| l.status).collect::<Vec<_>>(), [429, 200]);
}

#[test]
fn truncate_cuts_the_lfs_body_behind_the_redirect() {
    let hub = hub();
    hub.inject(Fault::Truncate {
        path_contains: "model.safetensors".into(),
        after_bytes: 100,
        times: 1,
    });
    let resolve = get(&format!("{}/o/r/resolve/main/model.safetensors", hub.url()));
    // The 302 has no body to cut: the fault waits for the download it leads to.
    assert_eq!(resolve.status, 302);
    let cdn = resolve.header("Location").unwrap().to_string();
    // HEADs do not consume it either.
    assert_eq!(head(&cdn).status, 200);
    let r = get(&cdn);
    assert_eq!(r.status, 200);
    assert_eq!(r.content_length(), 256);
    assert_eq!(r.body, (0..100u8).collect::<Vec<_>>());
    // A resumed range now completes.
    let r = get_with(&cdn, &[("Range", "bytes=100-")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, (100..=255u8).collect::<Vec<_>>());
}

#[test]
fn truncate_plain_file() {
    let hub = hub();
    hub.inject(Fault::Truncate {
        path_contains: "config.json".into(),
        after_bytes: 5,
        times: 1,
    });
    let url = format!("{}/o/r/resolve/main/config.json", hub.url());
    let r = get(&url);
    assert_eq!(r.content_length(), 19);
    assert_eq!(r.body, br#"{"hid"#);
    assert_eq!(get(&url).body.len(), 19);
}

#[test]
fn corrupt_flips_one_byte_keeping_headers() {
    let hub = hub();
    let good: Vec<u8> = (0..=255u8).collect();
    let sha = sha256(&good);
    hub.inject(Fault::Corrupt {
        path_contains: format!("/cdn/{sha}"),
        times: 1,
    });
    let cdn = format!("{}/cdn/{sha}", hub.url());
    let r = get(&cdn);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("ETag"), Some(format!("\"{sha}\"").as_str()));
    assert_eq!(r.body.len(), good.len());
    let differing = r.body.iter().zip(&good).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 1);
    assert_ne!(sha256(&r.body), sha);
    assert_eq!(get(&cdn).body, good);
}

#[test]
fn first_matching_fault_wins() {
    let hub = hub();
    hub.inject(Fault::Status {
        path_contains: "resolve".into(),
        status: 500,
        times: 1,
        retry_after: None,
    });
    hub.inject(Fault::Status {
        path_contains: "config".into(),
        status: 502,
        times: 1,
        retry_after: None,
    });
    let url = format!("{}/o/r/resolve/main/config.json", hub.url());
    assert_eq!(get(&url).status, 500);
    assert_eq!(get(&url).status, 502);
    assert_eq!(get(&url).status, 200);
}
