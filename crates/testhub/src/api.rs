//! The Hub endpoints: routing, JSON shapes, auth rules and byte serving.
//!
//! Shapes follow what huggingface.co answers (and `huggingface_hub` / `hf-hub` parse), down to
//! the quoted `ETag`s, the `X-Error-Code` header and the 302 to a CDN for LFS files, so that a
//! client passing here has exercised the paths it will take against the real Hub.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::http::{Body, RangeAsk, Request, Response, decode, encode_path, parse_range};
use crate::store::{RepoState, Snapshot, State, Stored, hex, sha1_hex};
use crate::{Gated, Meta};

/// Whether the request carries the valid token, none, or a wrong one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Auth {
    Anonymous,
    Valid,
    Invalid,
}

impl Auth {
    pub fn of(state: &State, req: &Request) -> Auth {
        match req.header("authorization") {
            None => Auth::Anonymous,
            Some(h) => {
                let presented = h.strip_prefix("Bearer ").map(str::trim);
                match (&state.token, presented) {
                    (Some(t), Some(p)) if t == p => Auth::Valid,
                    _ => Auth::Invalid,
                }
            }
        }
    }
}

/// Names `expand=` accepts. Those we have no data for (config, gguf, safetensors, …) are
/// accepted and produce no field, as the Hub omits fields a repo lacks.
const EXPAND_FIELDS: &[&str] = &[
    "author",
    "baseModels",
    "cardData",
    "childrenModelCount",
    "config",
    "createdAt",
    "disabled",
    "downloads",
    "downloadsAllTime",
    "gated",
    "gguf",
    "inference",
    "inferenceProviderMapping",
    "lastModified",
    "library_name",
    "likes",
    "mask_token",
    "model-index",
    "pipeline_tag",
    "private",
    "safetensors",
    "sha",
    "siblings",
    "spaces",
    "tags",
    "transformersInfo",
    "trendingScore",
    "usedStorage",
    "widgetData",
    "xetEnabled",
];

const SORT_FIELDS: &[&str] = &[
    "downloads",
    "likes",
    "lastModified",
    "createdAt",
    "trendingScore",
];

pub(crate) fn handle(state: &State, req: &Request, base: &str) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        return Response::error(405, None, "Method not allowed");
    }
    let segs: Vec<String> = req
        .path
        .trim_start_matches('/')
        .split('/')
        .map(decode)
        .collect();
    // The CDN stands for a different host: it ignores Authorization, like S3/CloudFront do
    // for the presigned URLs the Hub redirects to.
    if segs.len() >= 2 && segs[0] == "cdn" {
        return cdn(state, req, &segs[1]);
    }
    let auth = Auth::of(state, req);
    if auth == Auth::Invalid {
        return Response::error(401, None, "Invalid credentials in Authorization header");
    }
    let authorized = auth == Auth::Valid;
    if segs.len() >= 2 && segs[0] == "api" && segs[1] == "models" {
        if segs.len() == 2 || (segs.len() == 3 && segs[2].is_empty()) {
            return list(state, req, base, authorized);
        }
        return model_api(state, req, base, &segs[2..], authorized);
    }
    if let Some(at) = (1..=2).find(|&i| segs.get(i).is_some_and(|s| s == "resolve")) {
        return resolve(state, req, base, &segs, at, authorized);
    }
    Response::error(404, None, "Not Found")
}

/// Finds the repo a path starts with: `org/name` first, then a bare `name` (like `gpt2`).
fn split_repo<'a, 's>(
    state: &'s State,
    segs: &'a [String],
) -> Option<(&'s RepoState, &'a [String])> {
    if segs.len() >= 2
        && let Some(r) = state.repos.get(&format!("{}/{}", segs[0], segs[1]))
    {
        return Some((r, &segs[2..]));
    }
    segs.first()
        .and_then(|s| state.repos.get(s))
        .map(|r| (r, &segs[1..]))
}

fn repo_not_found(status: u16) -> Response {
    Response::error(status, Some("RepoNotFound"), "Repository not found")
}

fn revision_not_found(rev: &str) -> Response {
    Response::error(
        404,
        Some("RevisionNotFound"),
        &format!("Invalid rev id: {rev}"),
    )
}

fn entry_not_found() -> Response {
    Response::error(404, Some("EntryNotFound"), "Entry not found")
}

fn bad_request(message: &str) -> Response {
    Response::error(400, None, message)
}

// ---------------------------------------------------------------------------------------------
// Model metadata

/// The relation the Hub infers for `base_model:<relation>:<id>` when the card does not say.
fn relation(meta: &Meta) -> String {
    if let Some(r) = meta
        .card_data
        .get("base_model_relation")
        .and_then(Value::as_str)
    {
        return r.to_string();
    }
    if meta.library_name.as_deref() == Some("peft") {
        "adapter".into()
    } else if meta.tags.iter().any(|t| t == "gguf") {
        "quantized".into()
    } else {
        "finetune".into()
    }
}

fn base_models(meta: &Meta) -> Vec<String> {
    match meta.card_data.get("base_model") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

/// The tags the Hub shows and filters on: the repo's own plus those it derives from the
/// library, task, license and base models.
pub(crate) fn tags(meta: &Meta) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    let mut push = |t: String| {
        if !tags.contains(&t) {
            tags.push(t);
        }
    };
    for t in &meta.tags {
        push(t.clone());
    }
    if let Some(l) = &meta.library_name {
        push(l.clone());
    }
    if let Some(p) = &meta.pipeline_tag {
        push(p.clone());
    }
    if let Some(l) = meta.card_data.get("license").and_then(Value::as_str) {
        push(format!("license:{l}"));
    }
    let rel = relation(meta);
    for b in base_models(meta) {
        push(format!("base_model:{b}"));
        push(format!("base_model:{rel}:{b}"));
    }
    tags
}

/// A stable 24-hex id in the style of the Hub's Mongo `_id`.
fn object_id(id: &str) -> String {
    sha1_hex(id.as_bytes())[..24].to_string()
}

fn gated_value(g: Gated) -> Value {
    match g {
        Gated::No => Value::Bool(false),
        Gated::Auto => json!("auto"),
        Gated::Manual => json!("manual"),
    }
}

fn siblings(snap: &Snapshot, blobs: bool) -> Value {
    snap.files
        .iter()
        .map(|(path, f)| {
            let mut s = json!({ "rfilename": path });
            if blobs {
                s["size"] = json!(f.bytes.len());
                s["blobId"] = json!(f.oid());
                if let Some(l) = &f.lfs {
                    s["lfs"] = json!({
                        "sha256": l.sha256,
                        "size": f.bytes.len(),
                        "pointerSize": l.pointer_size,
                    });
                }
            }
            s
        })
        .collect()
}

/// One named field of a model object, or `None` when the repo has no value for it (the Hub
/// then omits the key).
fn field(
    state: &State,
    repo: &RepoState,
    snap: &Snapshot,
    name: &str,
    blobs: bool,
) -> Option<Value> {
    let meta = &repo.meta;
    Some(match name {
        "_id" => json!(object_id(&repo.id)),
        "id" | "modelId" => json!(repo.id),
        "author" => json!(repo.id.split_once('/')?.0),
        "sha" => json!(snap.sha),
        "lastModified" => json!(meta.last_modified),
        "createdAt" => json!(meta.created_at),
        "private" => json!(meta.private),
        "gated" => gated_value(meta.gated),
        "disabled" => json!(false),
        "downloads" | "downloadsAllTime" => json!(meta.downloads),
        "likes" | "trendingScore" => json!(meta.likes),
        "library_name" => json!(meta.library_name.as_ref()?),
        "pipeline_tag" => json!(meta.pipeline_tag.as_ref()?),
        "tags" => json!(tags(meta)),
        "cardData" if meta.card_data.is_null() => return None,
        "cardData" => meta.card_data.clone(),
        "siblings" => siblings(snap, blobs),
        "usedStorage" => json!(snap.size()),
        "spaces" => json!([]),
        "childrenModelCount" => json!(
            state
                .repos
                .values()
                .filter(|r| base_models(&r.meta).contains(&repo.id))
                .count()
        ),
        "baseModels" => {
            let models = base_models(meta);
            if models.is_empty() {
                return None;
            }
            json!({
                "relation": relation(meta),
                "models": models.iter().map(|m| json!({ "id": m })).collect::<Vec<_>>(),
            })
        }
        _ => return None,
    })
}

fn object(state: &State, repo: &RepoState, snap: &Snapshot, names: &[&str], blobs: bool) -> Value {
    let mut m = Map::new();
    for name in names {
        if let Some(v) = field(state, repo, snap, name, blobs) {
            m.insert((*name).to_string(), v);
        }
    }
    Value::Object(m)
}

/// Listing items without `full`: what the Hub returns by default.
const LIST_FIELDS: &[&str] = &[
    "_id",
    "id",
    "modelId",
    "likes",
    "trendingScore",
    "private",
    "downloads",
    "tags",
    "pipeline_tag",
    "library_name",
    "createdAt",
];

/// What `full=true` adds to a listing item.
const FULL_FIELDS: &[&str] = &[
    "author",
    "sha",
    "lastModified",
    "gated",
    "disabled",
    "siblings",
];

/// The single-model endpoint's fields (before `siblings`/`cardData`).
const INFO_FIELDS: &[&str] = &[
    "_id",
    "id",
    "modelId",
    "author",
    "sha",
    "lastModified",
    "createdAt",
    "private",
    "gated",
    "disabled",
    "downloads",
    "likes",
    "trendingScore",
    "library_name",
    "pipeline_tag",
    "tags",
    "cardData",
    "siblings",
    "spaces",
    "usedStorage",
];

/// `expand` values (repeatable; commas also split them), checked against what the Hub knows.
fn expand_list(req: &Request) -> Result<Vec<String>, Response> {
    let mut out = Vec::new();
    for (k, v) in req.params() {
        if k != "expand" && k != "expand[]" {
            continue;
        }
        for name in v.split(',').filter(|s| !s.is_empty()) {
            if !EXPAND_FIELDS.contains(&name) {
                return Err(bad_request(&format!(
                    "\"expand\" must be one of {}",
                    EXPAND_FIELDS.join(", ")
                )));
            }
            out.push(name.to_string());
        }
    }
    Ok(out)
}

fn expanded(state: &State, repo: &RepoState, snap: &Snapshot, expand: &[String]) -> Value {
    let mut names: Vec<&str> = vec!["_id", "id"];
    names.extend(expand.iter().map(String::as_str));
    object(state, repo, snap, &names, false)
}

// ---------------------------------------------------------------------------------------------
// Listing

fn list(state: &State, req: &Request, base: &str, authorized: bool) -> Response {
    let expand = match expand_list(req) {
        Ok(e) => e,
        Err(r) => return r,
    };
    let full = req.flag("full");
    let card = req.flag("cardData");
    if !expand.is_empty() && (full || card || req.flag("config")) {
        return bad_request("Cannot use 'expand' together with 'full', 'cardData' or 'config'");
    }
    let search = req.param("search").map(|s| s.to_lowercase());
    let author = req.param("author");
    let filters = req.param_all("filter");
    let pipeline = req.param("pipeline_tag");
    let gated = req.param("gated");
    let sort = req.param("sort");
    if let Some(s) = &sort
        && !SORT_FIELDS.contains(&s.as_str())
    {
        return bad_request(&format!(
            "\"sort\" must be one of {}",
            SORT_FIELDS.join(", ")
        ));
    }
    let limit = match req.param("limit").map(|l| l.parse::<usize>()) {
        None => usize::MAX,
        Some(Ok(l)) => l,
        Some(Err(_)) => return bad_request("\"limit\" must be a number"),
    };

    let mut hits: Vec<&RepoState> = state
        .repos
        .values()
        .filter(|r| !r.meta.private || authorized)
        .filter(|r| {
            search
                .as_ref()
                .is_none_or(|s| r.id.to_lowercase().contains(s))
        })
        .filter(|r| {
            author.as_ref().is_none_or(|a| {
                r.id.split_once('/')
                    .is_some_and(|(o, _)| o.eq_ignore_ascii_case(a))
            })
        })
        .filter(|r| {
            let t = tags(&r.meta);
            filters.iter().all(|f| t.contains(f))
        })
        .filter(|r| {
            pipeline
                .as_ref()
                .is_none_or(|p| r.meta.pipeline_tag.as_ref() == Some(p))
        })
        .filter(|r| match gated.as_deref() {
            Some("true") => r.meta.gated != Gated::No,
            Some("false") => r.meta.gated == Gated::No,
            _ => true,
        })
        .collect();
    // Descending, ties by id so pages are stable. Timestamps compare as strings, which orders
    // correctly for RFC 3339 in one time zone (the Hub always answers in UTC with a `Z`).
    if let Some(s) = &sort {
        hits.sort_by(|a, b| {
            let (ma, mb) = (&a.meta, &b.meta);
            let ord = match s.as_str() {
                "downloads" => mb.downloads.cmp(&ma.downloads),
                "likes" | "trendingScore" => mb.likes.cmp(&ma.likes),
                "lastModified" => mb.last_modified.cmp(&ma.last_modified),
                _ => mb.created_at.cmp(&ma.created_at),
            };
            ord.then_with(|| a.id.cmp(&b.id))
        });
    }
    hits.truncate(limit);

    let (start, end, next) = match page(req, hits.len(), state.page_size) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let mut names: Vec<&str> = LIST_FIELDS.to_vec();
    if full {
        names.extend_from_slice(FULL_FIELDS);
    }
    if card {
        names.push("cardData");
    }
    let items: Vec<Value> = hits[start..end]
        .iter()
        .map(|r| {
            if expand.is_empty() {
                object(state, r, r.main(), &names, false)
            } else {
                expanded(state, r, r.main(), &expand)
            }
        })
        .collect();
    with_next(Response::json(200, &Value::Array(items)), base, req, next)
}

/// The window `[start, end)` of `total` items this request's cursor asks for, and the cursor of
/// the next page if any remain.
fn page(
    req: &Request,
    total: usize,
    page_size: usize,
) -> Result<(usize, usize, Option<String>), Response> {
    let start = match req.param("cursor") {
        None => 0,
        Some(c) => decode_cursor(&c).ok_or_else(|| bad_request("Invalid cursor"))?,
    };
    let start = start.min(total);
    let end = start.saturating_add(page_size.max(1)).min(total);
    let next = (end < total).then(|| encode_cursor(end));
    Ok((start, end, next))
}

/// Cursors are opaque to clients; hex keeps them URL-safe without escaping.
fn encode_cursor(offset: usize) -> String {
    hex(format!("offset:{offset}").as_bytes())
}

fn decode_cursor(c: &str) -> Option<usize> {
    let bytes: Option<Vec<u8>> = (0..c.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(c.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?)
        .ok()?
        .strip_prefix("offset:")?
        .parse()
        .ok()
}

/// Adds `Link: <…>; rel="next"` with the same query and the next cursor.
fn with_next(resp: Response, base: &str, req: &Request, next: Option<String>) -> Response {
    let Some(cursor) = next else {
        return resp;
    };
    let mut query: Vec<&str> = req
        .query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("cursor="))
        .collect();
    let c = format!("cursor={cursor}");
    query.push(&c);
    resp.header(
        "Link",
        format!("<{base}{}?{}>; rel=\"next\"", req.path, query.join("&")),
    )
}

// ---------------------------------------------------------------------------------------------
// /api/models/{repo}[/revision/{rev} | /tree/{rev}[/{path}]]

fn model_api(
    state: &State,
    req: &Request,
    base: &str,
    segs: &[String],
    authorized: bool,
) -> Response {
    let Some((repo, tail)) = split_repo(state, segs) else {
        return repo_not_found(404);
    };
    if repo.meta.private && !authorized {
        return repo_not_found(404);
    }
    match tail.first().map(String::as_str) {
        None => info(state, req, repo, "main"),
        Some("") if tail.len() == 1 => info(state, req, repo, "main"),
        Some("revision") if tail.len() >= 2 => info(state, req, repo, &tail[1..].join("/")),
        Some("tree") if tail.len() >= 2 => tree(state, req, base, repo, &tail[1], &tail[2..]),
        _ => Response::error(404, None, "Not Found"),
    }
}

fn info(state: &State, req: &Request, repo: &RepoState, rev: &str) -> Response {
    let Some(snap) = repo.revision(rev) else {
        return revision_not_found(rev);
    };
    let expand = match expand_list(req) {
        Ok(e) => e,
        Err(r) => return r,
    };
    let body = if expand.is_empty() {
        object(state, repo, snap, INFO_FIELDS, req.flag("blobs"))
    } else {
        expanded(state, repo, snap, &expand)
    };
    Response::json(200, &body)
}

fn tree(
    state: &State,
    req: &Request,
    base: &str,
    repo: &RepoState,
    rev: &str,
    path: &[String],
) -> Response {
    let Some(snap) = repo.revision(rev) else {
        return revision_not_found(rev);
    };
    let dir = path.join("/").trim_matches('/').to_string();
    let dirs = snap.dirs();
    if !dir.is_empty() && !dirs.contains(&dir) {
        return entry_not_found();
    }
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    let recursive = req.flag("recursive");
    // Direct children only, unless recursive.
    let wanted = |p: &str| {
        p.strip_prefix(&prefix)
            .is_some_and(|rest| recursive || !rest.contains('/'))
    };
    let expand = req.flag("expand");
    let last_commit = json!({ "id": snap.sha, "title": "Upload", "date": repo.meta.last_modified });
    let mut entries: Vec<(String, Value)> = Vec::new();
    for d in dirs.iter().filter(|d| wanted(d)) {
        let mut e =
            json!({ "type": "directory", "oid": hex(&snap.tree_oid(d)), "size": 0, "path": d });
        if expand {
            e["lastCommit"] = last_commit.clone();
        }
        entries.push((d.clone(), e));
    }
    for (p, f) in snap.files.iter().filter(|(p, _)| wanted(p)) {
        let mut e = json!({ "type": "file", "oid": f.oid(), "size": f.bytes.len(), "path": p });
        if let Some(l) = &f.lfs {
            e["lfs"] =
                json!({ "oid": l.sha256, "size": f.bytes.len(), "pointerSize": l.pointer_size });
        }
        if expand {
            e["lastCommit"] = last_commit.clone();
        }
        entries.push((p.clone(), e));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let (start, end, next) = match page(req, entries.len(), state.page_size) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let items: Vec<Value> = entries.drain(start..end).map(|(_, v)| v).collect();
    with_next(Response::json(200, &Value::Array(items)), base, req, next)
}

// ---------------------------------------------------------------------------------------------
// Files

fn resolve(
    state: &State,
    req: &Request,
    base: &str,
    segs: &[String],
    at: usize,
    authorized: bool,
) -> Response {
    // The Hub cannot tell an anonymous caller whether a repo is private or missing, so both
    // answer 401 RepoNotFound; with a valid token a missing repo is a 404.
    let Some(repo) = state.repos.get(&segs[..at].join("/")) else {
        return repo_not_found(if authorized { 404 } else { 401 });
    };
    if repo.meta.private && !authorized {
        return repo_not_found(401);
    }
    if repo.meta.gated != Gated::No && !authorized {
        return Response::error(
            401,
            Some("GatedRepo"),
            &format!(
                "Access to model {} is restricted. You must have access to it and be \
                 authenticated to access it. Please log in.",
                repo.id
            ),
        );
    }
    let Some(rev) = segs.get(at + 1) else {
        return entry_not_found();
    };
    let Some(snap) = repo.revision(rev) else {
        return revision_not_found(rev);
    };
    let path = segs[at + 2..].join("/");
    let Some(stored) = snap.files.get(&path) else {
        return entry_not_found();
    };
    match &stored.lfs {
        None => serve_bytes(req, stored, &stored.oid()).header("X-Repo-Commit", &snap.sha),
        Some(l) => Response::new(302)
            .header("Location", format!("{base}/cdn/{}", encode_path(&l.sha256)))
            .header("ETag", format!("\"{}\"", stored.oid()))
            .header("X-Linked-Etag", format!("\"{}\"", l.sha256))
            .header("X-Linked-Size", stored.bytes.len().to_string())
            .header("X-Repo-Commit", &snap.sha),
    }
}

fn cdn(state: &State, req: &Request, sha256: &str) -> Response {
    match state.lfs_blob(sha256) {
        Some(stored) => serve_bytes(req, &stored, sha256),
        None => Response::error(404, None, "Not Found"),
    }
}

/// The bytes of a file with `ETag`, ranges and `If-None-Match`.
fn serve_bytes(req: &Request, stored: &Arc<Stored>, etag: &str) -> Response {
    let quoted = format!("\"{etag}\"");
    let total = stored.bytes.len();
    let base = |status| {
        Response::new(status)
            .header("ETag", &quoted)
            .header("Accept-Ranges", "bytes")
            .header("Content-Type", "application/octet-stream")
    };
    if req
        .header("if-none-match")
        .is_some_and(|v| v.trim_start_matches("W/").trim_matches('"') == etag)
    {
        return base(304);
    }
    match parse_range(req.header("range"), total) {
        RangeAsk::Whole => base(200).body(Body::Slice(stored.bytes.clone(), 0..total)),
        RangeAsk::Part(r) => base(206)
            .header(
                "Content-Range",
                format!("bytes {}-{}/{total}", r.start, r.end - 1),
            )
            .body(Body::Slice(stored.bytes.clone(), r)),
        RangeAsk::Unsatisfiable => base(416).header("Content-Range", format!("bytes */{total}")),
    }
}
