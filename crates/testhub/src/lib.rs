//! A local stand-in for the Hugging Face Hub, for tests only.
//!
//! [`TestHub::start`] binds `127.0.0.1:0` and serves, over plain HTTP/1.1, the part of the Hub
//! API that ramole's Hub client uses, over repositories a test builds in memory with [`Repo`]:
//!
//! | route | what |
//! | --- | --- |
//! | `GET /api/models` | listing: `search`, `author`, repeatable `filter` (AND), `pipeline_tag`, `gated`, `sort`, `limit`, `full`, `cardData`, `expand`; `Link` pagination |
//! | `GET /api/models/{repo}[/revision/{rev}]` | model info; `blobs=true` adds sizes and oids; `expand` projects |
//! | `GET /api/models/{repo}/tree/{rev}[/{path}]` | folder listing, `recursive`, `expand`; `Link` pagination |
//! | `GET`/`HEAD /{repo}/resolve/{rev}/{path}` | file bytes; LFS files answer 302 to `/cdn/{sha256}` |
//! | `GET`/`HEAD /cdn/{sha256}` | LFS bytes; no auth |
//!
//! Behaviour follows huggingface.co where a client can tell the difference: quoted `ETag`s,
//! `X-Repo-Commit`, `X-Linked-Etag`/`X-Linked-Size` on LFS redirects, ranges (206/416),
//! `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`, `GatedRepo`) with a JSON
//! `{"error": …}` body, 401 for a wrong token, and derived `base_model:…`/`license:…` tags.
//!
//! Storage rule: a file is stored as **LFS** when its name ends in `.safetensors`, `.gguf` or
//! `.bin`, or when it is 10 MiB or larger; anything else is a plain git blob. A plain file's
//! `oid`/`blobId`/`ETag` is its git blob sha1 (`sha1("blob {len}\0" + bytes)`). For an LFS
//! file, as on the Hub, the tree `oid`, `blobId` and the 302's `ETag` are the git sha1 of the
//! LFS *pointer*, while `lfs.oid`/`lfs.sha256`, `X-Linked-Etag` and the CDN's `ETag` are the
//! sha256 of the content.
//!
//! Every response closes its connection (`Connection: close`), so pooling clients never reuse
//! a socket the server is about to drop. [`Fault`]s make the next matching requests fail in
//! the ways real networks and the real Hub do.

mod api;
mod http;
mod store;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::http::{Body, Response, Send};
use crate::store::{RepoState, State, Stored};

/// A running fake Hub. Dropping it stops accepting connections and joins the accept thread;
/// requests already being answered finish on their own threads.
pub struct TestHub {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
    base: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not take the server down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One model repository to serve. Build with [`Repo::new`] and the chained setters.
#[derive(Clone, Debug)]
pub struct Repo {
    /// `org/name`, or a bare `name` like `gpt2`.
    pub id: String,
    /// `(path in repo, bytes)`; a later entry for the same path wins.
    pub files: Vec<(String, Vec<u8>)>,
    pub meta: Meta,
}

impl Repo {
    /// An empty repo with default [`Meta`].
    pub fn new(id: &str) -> Repo {
        Repo {
            id: id.to_string(),
            files: Vec::new(),
            meta: Meta::default(),
        }
    }

    /// Adds one file (`path` uses `/`, relative to the repo root).
    pub fn file(mut self, path: &str, bytes: impl Into<Vec<u8>>) -> Repo {
        self.files.push((path.to_string(), bytes.into()));
        self
    }

    /// Adds every file under `local_dir`, recursively, at `under/<relative path>` (`under` =
    /// `""` for the repo root). Panics if the folder cannot be read, as a test fixture should.
    pub fn dir(mut self, local_dir: &Path, under: &str) -> Repo {
        let mut found = Vec::new();
        collect_files(local_dir, local_dir, &mut found);
        found.sort();
        let under = under.trim_matches('/');
        for (rel, path) in found {
            let bytes =
                std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            let repo_path = if under.is_empty() {
                rel
            } else {
                format!("{under}/{rel}")
            };
            self.files.push((repo_path, bytes));
        }
        self
    }

    /// Edits the metadata in place: `Repo::new("a/b").meta(|m| m.likes = 3)`.
    pub fn meta(mut self, f: impl FnOnce(&mut Meta)) -> Repo {
        f(&mut self.meta);
        self
    }
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<(String, std::path::PathBuf)>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .path();
        if path.is_dir() {
            collect_files(root, &path, out);
        } else {
            let rel = path.strip_prefix(root).expect("walked under root");
            let rel: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.push((rel.join("/"), path));
        }
    }
}

/// Who may download a repo's files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Gated {
    /// Open to anonymous downloads.
    #[default]
    No,
    /// Gated, approved automatically: downloads need the valid token.
    Auto,
    /// Gated, approved by the authors: downloads need the valid token (the token is taken to
    /// belong to an approved user).
    Manual,
}

/// Repo metadata as the Hub reports it.
#[derive(Clone, Debug)]
pub struct Meta {
    pub tags: Vec<String>,
    pub library_name: Option<String>,
    pub pipeline_tag: Option<String>,
    /// Parsed YAML front matter of the card, e.g. `{"base_model": "...", "license":
    /// "apache-2.0"}`. `base_model` (string or list), `base_model_relation` and `license` feed
    /// the derived tags. `Null` (the default) means no card data: the field is then omitted.
    pub card_data: serde_json::Value,
    pub gated: Gated,
    /// Private repos are invisible (404/401 `RepoNotFound`, absent from listings) without the
    /// valid token.
    pub private: bool,
    pub downloads: u64,
    pub likes: u64,
    /// RFC 3339, UTC with `Z` (sorting compares the strings).
    pub last_modified: String,
    pub created_at: String,
}

impl Default for Meta {
    fn default() -> Meta {
        Meta {
            tags: Vec::new(),
            library_name: None,
            pipeline_tag: None,
            card_data: serde_json::Value::Null,
            gated: Gated::No,
            private: false,
            downloads: 0,
            likes: 0,
            last_modified: "2024-01-01T00:00:00.000Z".into(),
            created_at: "2024-01-01T00:00:00.000Z".into(),
        }
    }
}

/// A failure to inject into the next matching requests.
///
/// A fault matches a request whose path (raw or percent-decoded) contains `path_contains`; a
/// request to `/cdn/{sha256}` also matches through the `{repo}/{path}` of every file with that
/// content, so a fault named after an LFS file reaches the download its 302 leads to. The first
/// matching fault that applies is used and its `times` counts down; at zero it is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer `status` with a JSON error body instead of the real response. A 429 with
    /// `retry_after` carries `Retry-After: <secs>` and `RateLimit: "api";r=0;t=<secs>`.
    Status {
        path_contains: String,
        status: u16,
        times: usize,
        retry_after: Option<u64>,
    },
    /// Send the real headers (full `Content-Length`), then only `after_bytes` body bytes, then
    /// close. Only applies to GETs answered 200/206 with a body longer than `after_bytes` (not
    /// HEADs, 302s, errors or short range reads, which are left alone and do not count down).
    Truncate {
        path_contains: String,
        after_bytes: usize,
        times: usize,
    },
    /// Serve the body with the byte in its middle inverted; headers (`ETag`, lengths) are
    /// unchanged. Applies only to whole-file GETs (answered 200), so range reads of a header
    /// stay intact.
    Corrupt { path_contains: String, times: usize },
}

impl Fault {
    fn path_contains(&self) -> &str {
        match self {
            Fault::Status { path_contains, .. }
            | Fault::Truncate { path_contains, .. }
            | Fault::Corrupt { path_contains, .. } => path_contains,
        }
    }

    fn left(&self) -> usize {
        match self {
            Fault::Status { times, .. }
            | Fault::Truncate { times, .. }
            | Fault::Corrupt { times, .. } => *times,
        }
    }

    fn times(&mut self) -> &mut usize {
        match self {
            Fault::Status { times, .. }
            | Fault::Truncate { times, .. }
            | Fault::Corrupt { times, .. } => times,
        }
    }
}

/// One request the server received, in arrival order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    /// `GET`, `HEAD`, …
    pub method: String,
    /// The path as sent (still percent-encoded), without the query.
    pub path: String,
    /// The raw query string without `?` (`""` when none).
    pub query: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// Whether the request carried the valid token.
    pub authorized: bool,
    /// The status answered (after faults).
    pub status: u16,
}

impl TestHub {
    /// Binds `127.0.0.1:0` and starts serving on a background thread.
    pub fn start() -> TestHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new()),
            stop: AtomicBool::new(false),
            base: format!("http://{addr}"),
        });
        let for_thread = shared.clone();
        let accept = std::thread::Builder::new()
            .name("testhub-accept".into())
            .spawn(move || accept_loop(listener, for_thread))
            .expect("spawning the accept thread");
        TestHub {
            shared,
            addr,
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash: the endpoint to give a client.
    pub fn url(&self) -> String {
        self.shared.base.clone()
    }

    /// Serves `repo` with a single commit on `main` and returns that commit's sha. A repo with
    /// the same id is replaced, history included.
    pub fn add_repo(&self, repo: Repo) -> String {
        let mut state = self.shared.lock();
        let files: BTreeMap<_, _> = repo
            .files
            .into_iter()
            .map(|(p, b)| {
                let p = p.trim_start_matches('/').to_string();
                let s = Arc::new(Stored::new(&p, b));
                (p, s)
            })
            .collect();
        let snap = state.snapshot(&repo.id, files);
        let sha = snap.sha.clone();
        state.repos.insert(
            repo.id.clone(),
            RepoState {
                id: repo.id,
                meta: repo.meta,
                commits: vec![snap],
            },
        );
        sha
    }

    /// Makes a new commit on `main` of repo `id`: writes the files in `put`, then removes each
    /// path in `delete` (a folder path removes everything under it). Returns the new sha; older
    /// commits stay resolvable by their sha. Panics on an unknown repo or a `delete` path that
    /// matches nothing, which would be a bug in the test.
    pub fn commit(&self, id: &str, put: Vec<(String, Vec<u8>)>, delete: &[&str]) -> String {
        let mut state = self.shared.lock();
        let mut files = state
            .repos
            .get(id)
            .unwrap_or_else(|| panic!("commit to unknown repo {id}"))
            .main()
            .files
            .clone();
        for (p, b) in put {
            let p = p.trim_start_matches('/').to_string();
            let s = Arc::new(Stored::new(&p, b));
            files.insert(p, s);
        }
        for d in delete {
            let d = d.trim_matches('/');
            let before = files.len();
            let folder = format!("{d}/");
            files.retain(|p, _| p != d && !p.starts_with(&folder));
            assert!(
                files.len() < before,
                "commit to {id}: nothing to delete at {d}"
            );
        }
        let snap = state.snapshot(id, files);
        let sha = snap.sha.clone();
        state
            .repos
            .get_mut(id)
            .expect("checked above")
            .commits
            .push(snap);
        sha
    }

    /// Sets the one valid token: requests must send `Authorization: Bearer <token>`. Until it
    /// is set every presented token is invalid (401), as a made-up token is on the Hub.
    pub fn set_token(&self, token: &str) {
        self.shared.lock().token = Some(token.to_string());
    }

    /// Items per page for listings and trees (default 1000, like the Hub).
    pub fn set_page_size(&self, n: usize) {
        self.shared.lock().page_size = n.max(1);
    }

    /// Queues a fault; faults are tried in the order they were injected.
    pub fn inject(&self, fault: Fault) {
        self.shared.lock().faults.push(fault);
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Logged> {
        self.shared.lock().log.clone()
    }

    /// Forgets the logged requests.
    pub fn clear_requests(&self) {
        self.shared.lock().log.clear();
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // accept() blocks; a connection of our own wakes it to see the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let shared = shared.clone();
        let _ = std::thread::Builder::new()
            .name("testhub-conn".into())
            .spawn(move || serve(&shared, stream));
    }
}

fn serve(shared: &Shared, mut stream: TcpStream) {
    // A client that opens a socket and never writes must not pin a thread forever.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = stream.set_nodelay(true);
    let Ok(Some(req)) = http::read_request(&stream) else {
        return;
    };
    let (response, send) = {
        let mut state = shared.lock();
        let authorized = api::Auth::of(&state, &req) == api::Auth::Valid;
        let mut response = api::handle(&state, &req, &shared.base);
        let mut send = if req.method == "HEAD" {
            Send::NoBody
        } else {
            Send::Full
        };
        apply_fault(&mut state, &req, &mut response, &mut send);
        state.log.push(Logged {
            method: req.method.clone(),
            path: req.path.clone(),
            query: req.query.clone(),
            range: req.header("range").map(String::from),
            authorized,
            status: response.status,
        });
        (response, send)
    };
    let _ = http::write_response(&mut stream, &response, send);
}

/// Applies the first queued fault that matches this request and suits its response.
fn apply_fault(state: &mut State, req: &http::Request, response: &mut Response, send: &mut Send) {
    let decoded = http::decode(&req.path);
    let mut names = vec![req.path.clone(), decoded.clone()];
    if let Some(sha) = decoded.strip_prefix("/cdn/") {
        names.extend(state.lfs_names(sha.trim_end_matches('/')));
    }
    let body_len = response.body.as_slice().len();
    let carries_bytes = req.method == "GET" && matches!(response.status, 200 | 206) && body_len > 0;
    let suits = |f: &Fault| match f {
        Fault::Status { .. } => true,
        Fault::Truncate { after_bytes, .. } => carries_bytes && body_len > *after_bytes,
        Fault::Corrupt { .. } => carries_bytes && response.status == 200,
    };
    let Some(i) = state.faults.iter().position(|f| {
        f.left() > 0 && names.iter().any(|n| n.contains(f.path_contains())) && suits(f)
    }) else {
        return;
    };
    let fault = &mut state.faults[i];
    *fault.times() -= 1;
    match fault.clone() {
        Fault::Status {
            status,
            retry_after,
            ..
        } => {
            let mut r = Response::error(status, None, http::reason(status));
            if let Some(secs) = retry_after {
                r = r.header("Retry-After", secs.to_string());
                if status == 429 {
                    r = r
                        .header("RateLimit", format!("\"api\";r=0;t={secs}"))
                        .header("RateLimit-Policy", "\"fixed window\";\"api\";q=500;w=300");
                }
            }
            *response = r;
            if req.method == "HEAD" {
                *send = Send::NoBody;
            }
        }
        Fault::Truncate { after_bytes, .. } => *send = Send::CutAfter(after_bytes),
        Fault::Corrupt { .. } => {
            let mut bytes = response.body.as_slice().to_vec();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
            response.body = Body::Bytes(bytes);
        }
    }
    if state.faults[i].left() == 0 {
        state.faults.remove(i);
    }
}
