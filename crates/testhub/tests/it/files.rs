//! Model info, trees, resolve (plain and LFS), auth and commits.

use crate::common::{get, get_with, git_blob_sha1, head, lfs_pointer, request, sha256};
use ramole_testhub::{Gated, Repo, TestHub};
use serde_json::json;

const README: &[u8] = b"---\nlibrary_name: peft\n---\n# An adapter\n";

fn weights() -> Vec<u8> {
    (0..1000u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn adapter_hub() -> (TestHub, String) {
    let hub = TestHub::start();
    let sha = hub.add_repo(
        Repo::new("alice/adapters")
            .file("README.md", README)
            .file("adapter_config.json", r#"{"r": 8}"#)
            .file("adapter_model.safetensors", weights())
            .file("checkpoint-500/adapter_config.json", r#"{"r": 4}"#)
            .file("checkpoint-500/adapter_model.safetensors", vec![9u8; 100])
            .file("checkpoint-500/deep/notes.txt", "n")
            .meta(|m| {
                m.library_name = Some("peft".into());
                m.card_data = json!({"base_model": "base/llama"});
            }),
    );
    (hub, sha)
}

#[test]
fn known_hash_vectors() {
    // Pinned against `git hash-object` and `sha256sum`, so the helpers are not checked only
    // against themselves.
    assert_eq!(
        git_blob_sha1(b"hello\n"),
        "ce013625030ba8dba906f756967f9e9ca394464a"
    );
    assert_eq!(
        sha256(b"hello\n"),
        "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
    );
}

#[test]
fn info_with_and_without_blobs() {
    let (hub, sha) = adapter_hub();
    let u = hub.url();
    let v = get(&format!("{u}/api/models/alice/adapters")).json();
    assert_eq!(v["id"], "alice/adapters");
    assert_eq!(v["sha"], sha);
    assert_eq!(v["author"], "alice");
    assert_eq!(v["private"], false);
    assert_eq!(v["gated"], false);
    assert_eq!(v["cardData"]["base_model"], "base/llama");
    assert_eq!(v["siblings"].as_array().unwrap().len(), 6);
    assert_eq!(v["siblings"][0], json!({"rfilename": "README.md"}));
    let total = README.len() + 8 + 1000 + 8 + 100 + 1;
    assert_eq!(v["usedStorage"], total);

    let v = get(&format!("{u}/api/models/alice/adapters?blobs=true")).json();
    let sib = |name: &str| {
        v["siblings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["rfilename"] == name)
            .unwrap()
            .clone()
    };
    let readme = sib("README.md");
    assert_eq!(readme["size"], README.len());
    assert_eq!(readme["blobId"], git_blob_sha1(README));
    assert!(readme.get("lfs").is_none());
    let w = weights();
    let st = sib("adapter_model.safetensors");
    let pointer = lfs_pointer(&sha256(&w), w.len());
    assert_eq!(st["size"], w.len());
    assert_eq!(st["blobId"], git_blob_sha1(pointer.as_bytes()));
    assert_eq!(
        st["lfs"],
        json!({"sha256": sha256(&w), "size": w.len(), "pointerSize": pointer.len()})
    );

    // Revision form, by branch and by sha.
    let v = get(&format!("{u}/api/models/alice/adapters/revision/{sha}")).json();
    assert_eq!(v["sha"], sha);
    let r = get(&format!("{u}/api/models/alice/adapters/revision/nope"));
    assert_eq!(r.status, 404);
    assert_eq!(r.header("X-Error-Code"), Some("RevisionNotFound"));

    // expand on info projects like on the listing.
    let v = get(&format!("{u}/api/models/alice/adapters?expand=baseModels")).json();
    assert_eq!(v["baseModels"]["relation"], "adapter");
    assert!(v.get("siblings").is_none());

    let r = get(&format!("{u}/api/models/alice/missing"));
    assert_eq!(r.status, 404);
    assert_eq!(r.header("X-Error-Code"), Some("RepoNotFound"));
    assert!(r.json()["error"].is_string());
}

#[test]
fn private_info_needs_the_token() {
    let hub = TestHub::start();
    hub.set_token("hf_t");
    hub.add_repo(
        Repo::new("me/private")
            .file("a.txt", "a")
            .meta(|m| m.private = true),
    );
    let url = format!("{}/api/models/me/private", hub.url());
    let r = get(&url);
    assert_eq!(
        (r.status, r.header("X-Error-Code")),
        (404, Some("RepoNotFound"))
    );
    let r = get_with(&url, &[("Authorization", "Bearer hf_t")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["private"], true);
}

#[test]
fn tree_root_sub_folder_and_recursive() {
    let (hub, sha) = adapter_hub();
    let u = hub.url();
    let paths = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                format!(
                    "{}:{}",
                    e["type"].as_str().unwrap(),
                    e["path"].as_str().unwrap()
                )
            })
            .collect()
    };

    let v = get(&format!("{u}/api/models/alice/adapters/tree/main")).json();
    assert_eq!(
        paths(&v),
        [
            "file:README.md",
            "file:adapter_config.json",
            "file:adapter_model.safetensors",
            "directory:checkpoint-500",
        ]
    );
    let dir = &v[3];
    assert_eq!(dir["size"], 0);
    assert_eq!(dir["oid"].as_str().unwrap().len(), 40);
    let readme = &v[0];
    assert_eq!(readme["oid"], git_blob_sha1(README));
    assert_eq!(readme["size"], README.len());
    assert!(readme.get("lfs").is_none());
    let w = weights();
    let st = &v[2];
    let pointer = lfs_pointer(&sha256(&w), w.len());
    assert_eq!(st["oid"], git_blob_sha1(pointer.as_bytes()));
    assert_eq!(st["size"], w.len());
    assert_eq!(
        st["lfs"],
        json!({"oid": sha256(&w), "size": w.len(), "pointerSize": pointer.len()})
    );

    let v = get(&format!(
        "{u}/api/models/alice/adapters/tree/{sha}/checkpoint-500"
    ))
    .json();
    assert_eq!(
        paths(&v),
        [
            "file:checkpoint-500/adapter_config.json",
            "file:checkpoint-500/adapter_model.safetensors",
            "directory:checkpoint-500/deep",
        ]
    );

    let v = get(&format!(
        "{u}/api/models/alice/adapters/tree/main/checkpoint-500?recursive=true"
    ))
    .json();
    assert_eq!(
        paths(&v),
        [
            "file:checkpoint-500/adapter_config.json",
            "file:checkpoint-500/adapter_model.safetensors",
            "directory:checkpoint-500/deep",
            "file:checkpoint-500/deep/notes.txt",
        ]
    );
    let v = get(&format!(
        "{u}/api/models/alice/adapters/tree/main?recursive=true"
    ))
    .json();
    assert_eq!(v.as_array().unwrap().len(), 8);

    // Paged like listings.
    hub.set_page_size(3);
    let r = get(&format!(
        "{u}/api/models/alice/adapters/tree/main?recursive=true"
    ));
    assert_eq!(r.json().as_array().unwrap().len(), 3);
    let next = r.next_link().expect("next page");
    assert!(next.contains("recursive=true"));
    let r = get(&next);
    assert_eq!(r.json().as_array().unwrap().len(), 3);
    let r = get(&r.next_link().unwrap());
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    assert!(r.next_link().is_none());

    let r = get(&format!("{u}/api/models/alice/adapters/tree/v9"));
    assert_eq!(
        (r.status, r.header("X-Error-Code")),
        (404, Some("RevisionNotFound"))
    );
    let r = get(&format!("{u}/api/models/alice/adapters/tree/main/nowhere"));
    assert_eq!(
        (r.status, r.header("X-Error-Code")),
        (404, Some("EntryNotFound"))
    );
}

#[test]
fn directory_oids_are_git_tree_ids() {
    // `git write-tree` of a folder holding one file `a.txt` = "a\n": blob 78981922613b2afb6025042ff6bd878ac1994e85,
    // tree 08585692ce06452da6f82ae66b90d98b55536fca (pinned from git itself).
    let hub = TestHub::start();
    hub.add_repo(Repo::new("o/r").file("sub/a.txt", "a\n"));
    let v = get(&format!("{}/api/models/o/r/tree/main", hub.url())).json();
    assert_eq!(v[0]["path"], "sub");
    assert_eq!(v[0]["oid"], "08585692ce06452da6f82ae66b90d98b55536fca");
}

#[test]
fn resolve_plain_file_get_head_and_ranges() {
    let (hub, sha) = adapter_hub();
    let url = format!("{}/alice/adapters/resolve/main/README.md", hub.url());
    let etag = format!("\"{}\"", git_blob_sha1(README));

    let r = get(&url);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, README);
    assert_eq!(r.header("ETag"), Some(etag.as_str()));
    assert_eq!(r.header("X-Repo-Commit"), Some(sha.as_str()));
    assert_eq!(r.header("Accept-Ranges"), Some("bytes"));
    assert_eq!(r.header("Content-Type"), Some("application/octet-stream"));
    assert_eq!(r.content_length(), README.len());

    let r = head(&url);
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(r.content_length(), README.len());
    assert_eq!(r.header("ETag"), Some(etag.as_str()));

    let r = get_with(&url, &[("Range", "bytes=4-11")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &README[4..12]);
    assert_eq!(
        r.header("Content-Range"),
        Some(format!("bytes 4-11/{}", README.len()).as_str())
    );
    let r = get_with(&url, &[("Range", "bytes=10-")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &README[10..]);
    let r = get_with(&url, &[("Range", "bytes=-3")]);
    assert_eq!(r.body, &README[README.len() - 3..]);
    let r = get_with(&url, &[("Range", "bytes=9999-")]);
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("Content-Range"),
        Some(format!("bytes */{}", README.len()).as_str())
    );

    // Paths are percent-decoded.
    let r = get(&format!(
        "{}/alice/adapters/resolve/main/checkpoint-500%2Fdeep/notes%2Etxt",
        hub.url()
    ));
    assert_eq!((r.status, r.body.as_slice()), (200, b"n".as_slice()));
    // By commit sha too.
    let r = get(&format!(
        "{}/alice/adapters/resolve/{sha}/README.md",
        hub.url()
    ));
    assert_eq!(r.status, 200);

    let r = get(&format!(
        "{}/alice/adapters/resolve/main/absent.txt",
        hub.url()
    ));
    assert_eq!(
        (r.status, r.header("X-Error-Code")),
        (404, Some("EntryNotFound"))
    );
    let r = get(&format!(
        "{}/alice/adapters/resolve/dev/README.md",
        hub.url()
    ));
    assert_eq!(
        (r.status, r.header("X-Error-Code")),
        (404, Some("RevisionNotFound"))
    );
    // Unknown repo: anonymous callers cannot tell it from a private one.
    let r = get(&format!("{}/alice/none/resolve/main/README.md", hub.url()));
    assert_eq!(
        (r.status, r.header("X-Error-Code")),
        (401, Some("RepoNotFound"))
    );
}

#[test]
fn resolve_lfs_redirects_to_the_cdn() {
    let (hub, sha) = adapter_hub();
    let w = weights();
    let content_sha = sha256(&w);
    let pointer_oid = git_blob_sha1(lfs_pointer(&content_sha, w.len()).as_bytes());
    let url = format!(
        "{}/alice/adapters/resolve/main/adapter_model.safetensors",
        hub.url()
    );
    for r in [head(&url), get(&url)] {
        assert_eq!(r.status, 302);
        assert!(r.body.is_empty());
        let cdn = format!("{}/cdn/{content_sha}", hub.url());
        assert_eq!(r.header("Location"), Some(cdn.as_str()));
        assert_eq!(
            r.header("X-Linked-Etag"),
            Some(format!("\"{content_sha}\"").as_str())
        );
        assert_eq!(
            r.header("X-Linked-Size"),
            Some(w.len().to_string().as_str())
        );
        assert_eq!(
            r.header("ETag"),
            Some(format!("\"{pointer_oid}\"").as_str())
        );
        assert_eq!(r.header("X-Repo-Commit"), Some(sha.as_str()));
    }

    let cdn = format!("{}/cdn/{content_sha}", hub.url());
    let r = get(&cdn);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, w);
    assert_eq!(sha256(&r.body), content_sha);
    assert_eq!(
        r.header("ETag"),
        Some(format!("\"{content_sha}\"").as_str())
    );
    // The safetensors-header trick: the first 8 bytes by range.
    let r = get_with(&cdn, &[("Range", "bytes=0-7")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &w[..8]);
    assert_eq!(
        r.header("Content-Range"),
        Some(format!("bytes 0-7/{}", w.len()).as_str())
    );
    let r = head(&cdn);
    assert_eq!((r.status, r.content_length()), (200, w.len()));
    assert_eq!(
        get(&format!("{}/cdn/{}", hub.url(), "0".repeat(64))).status,
        404
    );
}

#[test]
fn large_files_are_lfs_whatever_their_name() {
    let hub = TestHub::start();
    let big = vec![3u8; 10 * 1024 * 1024];
    hub.add_repo(
        Repo::new("o/big")
            .file("data.txt", big.clone())
            .file("small.txt", "s"),
    );
    let v = get(&format!("{}/api/models/o/big/tree/main", hub.url())).json();
    assert_eq!(v[0]["lfs"]["oid"], sha256(&big));
    assert!(v[1].get("lfs").is_none());
    assert_eq!(
        head(&format!("{}/o/big/resolve/main/data.txt", hub.url())).status,
        302
    );
}

#[test]
fn gated_and_private_downloads_need_the_token() {
    let hub = TestHub::start();
    hub.add_repo(
        Repo::new("meta/gated")
            .file("config.json", "{}")
            .meta(|m| m.gated = Gated::Manual),
    );
    hub.add_repo(
        Repo::new("me/hidden")
            .file("config.json", "{}")
            .meta(|m| m.private = true),
    );
    let gated = format!("{}/meta/gated/resolve/main/config.json", hub.url());
    let hidden = format!("{}/me/hidden/resolve/main/config.json", hub.url());

    let r = get(&gated);
    assert_eq!(
        (r.status, r.header("X-Error-Code")),
        (401, Some("GatedRepo"))
    );
    assert_eq!(
        r.json()["error"],
        "Access to model meta/gated is restricted. You must have access to it and be authenticated to access it. Please log in."
    );
    // Metadata of a gated repo stays public, as on the Hub.
    assert_eq!(
        get(&format!("{}/api/models/meta/gated", hub.url())).json()["gated"],
        "manual"
    );
    let r = get(&hidden);
    assert_eq!(
        (r.status, r.header("X-Error-Code")),
        (401, Some("RepoNotFound"))
    );

    hub.set_token("hf_ok");
    let auth = [("Authorization", "Bearer hf_ok")];
    assert_eq!(get_with(&gated, &auth).status, 200);
    assert_eq!(get_with(&hidden, &auth).body, b"{}");
    let r = get_with(&gated, &[("Authorization", "Bearer hf_wrong")]);
    assert_eq!(r.status, 401);
    assert_eq!(
        r.json()["error"],
        "Invalid credentials in Authorization header"
    );
    // With a valid token an unknown repo is a plain 404.
    let r = get_with(&format!("{}/me/none/resolve/main/x", hub.url()), &auth);
    assert_eq!(
        (r.status, r.header("X-Error-Code")),
        (404, Some("RepoNotFound"))
    );

    let log = hub.requests();
    assert!(
        log.iter()
            .any(|l| l.authorized && l.path == "/meta/gated/resolve/main/config.json")
    );
    assert!(log.iter().any(|l| !l.authorized && l.status == 401));
}

#[test]
fn commit_moves_main_and_keeps_old_shas() {
    let (hub, first) = adapter_hub();
    let u = hub.url();
    let second = hub.commit(
        "alice/adapters",
        vec![("README.md".into(), b"new card".to_vec())],
        &["checkpoint-500"],
    );
    assert_ne!(first, second);
    assert_eq!(second.len(), 40);
    assert!(
        second
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );

    let r = get(&format!("{u}/alice/adapters/resolve/main/README.md"));
    assert_eq!(r.body, b"new card");
    assert_eq!(r.header("X-Repo-Commit"), Some(second.as_str()));
    let r = get(&format!("{u}/alice/adapters/resolve/{first}/README.md"));
    assert_eq!(r.body, README);
    assert_eq!(r.header("X-Repo-Commit"), Some(first.as_str()));

    let gone = format!("{u}/alice/adapters/resolve/main/checkpoint-500/adapter_config.json");
    assert_eq!(get(&gone).status, 404);
    let kept = format!("{u}/alice/adapters/resolve/{first}/checkpoint-500/adapter_config.json");
    assert_eq!(get(&kept).status, 200);

    assert_eq!(
        get(&format!("{u}/api/models/alice/adapters")).json()["sha"],
        second
    );
    assert_eq!(
        get(&format!("{u}/api/models/alice/adapters/revision/{first}")).json()["siblings"]
            .as_array()
            .unwrap()
            .len(),
        6
    );

    // Re-adding replaces the repo and its history.
    let third = hub.add_repo(Repo::new("alice/adapters").file("x", "y"));
    assert_ne!(third, second);
    assert_eq!(
        get(&format!("{u}/alice/adapters/resolve/{first}/README.md")).status,
        404
    );
}

#[test]
fn bare_ids_work_everywhere() {
    let hub = TestHub::start();
    hub.add_repo(
        Repo::new("gpt2")
            .file("config.json", "{}")
            .file("model.safetensors", vec![0u8; 16]),
    );
    let u = hub.url();
    let v = get(&format!("{u}/api/models/gpt2")).json();
    assert_eq!(v["id"], "gpt2");
    assert!(v.get("author").is_none());
    assert_eq!(
        get(&format!("{u}/api/models/gpt2/tree/main"))
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        get(&format!("{u}/gpt2/resolve/main/config.json")).body,
        b"{}"
    );
    assert_eq!(
        head(&format!("{u}/gpt2/resolve/main/model.safetensors")).status,
        302
    );
}

#[test]
fn repo_dir_adds_a_local_folder() {
    let root = std::env::temp_dir().join(format!("testhub-dir-{}", std::process::id()));
    std::fs::create_dir_all(root.join("nested")).unwrap();
    std::fs::write(root.join("top.json"), "1").unwrap();
    std::fs::write(root.join("nested/inner.txt"), "2").unwrap();
    let repo = Repo::new("o/r").dir(&root, "adapters/one");
    std::fs::remove_dir_all(&root).unwrap();
    let mut paths: Vec<&str> = repo.files.iter().map(|(p, _)| p.as_str()).collect();
    paths.sort();
    assert_eq!(
        paths,
        ["adapters/one/nested/inner.txt", "adapters/one/top.json"]
    );

    let hub = TestHub::start();
    let root2 = std::env::temp_dir().join(format!("testhub-dir2-{}", std::process::id()));
    std::fs::create_dir_all(&root2).unwrap();
    std::fs::write(root2.join("a.txt"), "a").unwrap();
    hub.add_repo(Repo::new("o/r").dir(&root2, ""));
    std::fs::remove_dir_all(&root2).unwrap();
    assert_eq!(
        get(&format!("{}/o/r/resolve/main/a.txt", hub.url())).body,
        b"a"
    );
}

#[test]
fn request_log_and_shutdown() {
    let hub = TestHub::start();
    hub.add_repo(Repo::new("o/r").file("f.txt", "hello"));
    hub.clear_requests();
    request(
        "GET",
        &format!("{}/o/r/resolve/main/f.txt?download=true", hub.url()),
        &[("Range", "bytes=0-1")],
    );
    let log = hub.requests();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].method, "GET");
    assert_eq!(log[0].path, "/o/r/resolve/main/f.txt");
    assert_eq!(log[0].query, "download=true");
    assert_eq!(log[0].range.as_deref(), Some("bytes=0-1"));
    assert!(!log[0].authorized);
    assert_eq!(log[0].status, 206);
    hub.clear_requests();
    assert!(hub.requests().is_empty());

    let addr = hub.url().trim_start_matches("http://").to_string();
    drop(hub);
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "still listening after drop"
    );
}
