//! The Hub's HTTP API as typed calls: model listing (filters, sort, search, `Link` pagination),
//! model info, file trees, and file metadata / bodies / ranges from `resolve`. Retries 429 and
//! 5xx answers with exponential backoff (honouring `Retry-After`), and turns the Hub's error
//! answers (`X-Error-Code`) into [`HubError`]s that say what to do.

use std::io::Read;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use ts_rs::TS;

use super::{HubError, Result, check_repo_path};
use crate::config::HubConfig;

/// How often and how patiently a request is retried on 429, 5xx and dropped connections.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Tries in all (1 = no retry).
    pub attempts: usize,
    /// Wait before the first retry; doubled each time.
    pub base_delay: Duration,
    /// No single wait is longer, whatever `Retry-After` says.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
        }
    }
}

/// Listing order (always descending, as the Hub sorts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
pub enum Sort {
    #[default]
    Downloads,
    Likes,
    /// Recently updated (`lastModified`).
    Recent,
}

impl Sort {
    fn param(self) -> &'static str {
        match self {
            Sort::Downloads => "downloads",
            Sort::Likes => "likes",
            Sort::Recent => "lastModified",
        }
    }
}

impl std::str::FromStr for Sort {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "downloads" => Ok(Sort::Downloads),
            "likes" => Ok(Sort::Likes),
            "recent" | "updated" | "lastModified" => Ok(Sort::Recent),
            other => Err(format!(
                "sort {other:?}: expected downloads, likes or recent"
            )),
        }
    }
}

/// `GET /api/models` parameters.
#[derive(Debug, Clone, Default)]
pub struct SearchQuery {
    /// Substring of the repository id.
    pub search: Option<String>,
    pub author: Option<String>,
    /// Tags that must all match (sent as repeated `filter=`).
    pub filters: Vec<String>,
    pub sort: Sort,
    /// Items per page the Hub is asked for.
    pub limit: usize,
    /// Ask for file lists and card data with each item.
    pub full: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LfsInfo {
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sibling {
    pub rfilename: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub lfs: Option<LfsInfo>,
}

/// A model repository as the listing and the info endpoint describe it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub id: String,
    #[serde(default)]
    pub author: Option<String>,
    /// The commit the listing saw.
    #[serde(default)]
    pub sha: Option<String>,
    #[serde(default, rename = "lastModified")]
    pub last_modified: Option<String>,
    #[serde(default, rename = "createdAt")]
    pub created_at: Option<String>,
    #[serde(default)]
    pub private: bool,
    /// `None` when not gated, else `auto` or `manual`.
    #[serde(default, deserialize_with = "gated_from_json")]
    pub gated: Option<String>,
    #[serde(default)]
    pub downloads: u64,
    #[serde(default)]
    pub likes: u64,
    #[serde(default)]
    pub library_name: Option<String>,
    #[serde(default)]
    pub pipeline_tag: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub siblings: Vec<Sibling>,
    #[serde(default, rename = "cardData")]
    pub card_data: Option<serde_json::Value>,
    #[serde(default, rename = "usedStorage")]
    pub used_storage: Option<u64>,
}

fn gated_from_json<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Bool(true) => Some("true".into()),
        serde_json::Value::String(s) if !s.is_empty() && s != "false" => Some(s),
        _ => None,
    })
}

impl ModelInfo {
    /// Bytes of all files, where the info carried sizes.
    pub fn total_size(&self) -> Option<u64> {
        let sizes: Option<Vec<u64>> = self.siblings.iter().map(|s| s.size).collect();
        sizes
            .filter(|s| !s.is_empty())
            .map(|s| s.iter().sum())
            .or(self.used_storage)
    }

    /// The base models its card declares (`base_model`: a string or a list).
    pub fn declared_bases(&self) -> Vec<String> {
        match self.card_data.as_ref().and_then(|c| c.get("base_model")) {
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    }

    pub fn license(&self) -> Option<String> {
        self.card_data
            .as_ref()
            .and_then(|c| c.get("license"))
            .and_then(|l| l.as_str())
            .map(str::to_string)
            .or_else(|| {
                self.tags
                    .iter()
                    .find_map(|t| t.strip_prefix("license:").map(str::to_string))
            })
    }
}

/// One page of a listing and the URL of the next, if any.
#[derive(Debug, Clone)]
pub struct ModelPage {
    pub items: Vec<ModelInfo>,
    pub next: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeEntry {
    /// `file` or `directory`.
    #[serde(rename = "type")]
    pub kind: String,
    pub path: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub oid: Option<String>,
    #[serde(default)]
    pub lfs: Option<TreeLfs>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeLfs {
    pub oid: String,
    pub size: u64,
}

/// What `HEAD .../resolve/<rev>/<file>` says about a file.
#[derive(Debug, Clone, PartialEq)]
pub struct FileMeta {
    /// The commit the revision resolved to.
    pub commit: String,
    /// The content's id: sha256 for LFS files, the git blob sha1 otherwise.
    pub etag: String,
    pub size: u64,
    /// Where the bytes are served (a CDN for LFS files); the resolve URL otherwise.
    pub url: String,
}

pub struct HubClient {
    endpoint: String,
    token: Option<String>,
    offline: bool,
    agent: ureq::Agent,
    /// Same agent settings but returns redirects instead of following them (file metadata
    /// lives on the first answer).
    agent_no_redirect: ureq::Agent,
    retry: RetryPolicy,
}

/// JSON bodies larger than this are refused (listings of 1000 full items are ~10 MB).
const MAX_JSON_BYTES: u64 = 64 << 20;

enum Method {
    Get,
    Head,
}

impl HubClient {
    pub fn new(cfg: &HubConfig) -> Self {
        let agent = |redirects: u32| -> ureq::Agent {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(redirects)
                .max_redirects_will_error(false)
                .timeout_connect(Some(Duration::from_secs(20)))
                .timeout_recv_response(Some(Duration::from_secs(60)))
                .timeout_recv_body(None)
                .timeout_per_read(Some(Duration::from_secs(60)))
                .user_agent(concat!("ramole/", env!("CARGO_PKG_VERSION")))
                .build()
                .into()
        };
        Self {
            endpoint: cfg.endpoint.trim_end_matches('/').to_string(),
            token: cfg.token.clone(),
            offline: cfg.offline,
            agent: agent(5),
            agent_no_redirect: agent(0),
            retry: RetryPolicy::default(),
        }
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn offline(&self) -> bool {
        self.offline
    }

    fn online(&self, what: &str) -> Result<()> {
        if self.offline {
            Err(HubError::Offline { what: what.into() })
        } else {
            Ok(())
        }
    }

    /// One request with retries; answers below 400 (and 416 for ranges) come back, the rest
    /// become errors naming `what`.
    fn send(
        &self,
        method: Method,
        url: &str,
        range: Option<(u64, Option<u64>)>,
        follow: bool,
        what: &str,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let agent = if follow {
            &self.agent
        } else {
            &self.agent_no_redirect
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = match method {
                Method::Get => agent.get(url),
                Method::Head => agent.head(url),
            };
            // Only the Hub itself sees the token (ureq drops it on redirects to a CDN).
            if let Some(t) = &self.token
                && url.starts_with(&self.endpoint)
            {
                req = req.header("Authorization", &format!("Bearer {t}"));
            }
            if let Some((a, b)) = range {
                let v = match b {
                    Some(b) => format!("bytes={a}-{b}"),
                    None => format!("bytes={a}-"),
                };
                req = req.header("Range", &v);
            }
            let last = attempt >= self.retry.attempts.max(1);
            let resp = match req.call() {
                Ok(r) => r,
                Err(e) => {
                    if !last && retryable_transport(&e) {
                        std::thread::sleep(self.backoff(attempt, None));
                        continue;
                    }
                    return Err(HubError::Transport {
                        url: url.into(),
                        message: e.to_string(),
                    });
                }
            };
            let status = resp.status().as_u16();
            if status < 400 || (status == 416 && range.is_some()) {
                return Ok(resp);
            }
            let retry_after = retry_after(resp.headers());
            if (status == 429 || status >= 500) && !last {
                std::thread::sleep(self.backoff(attempt, retry_after));
                continue;
            }
            return Err(self.status_error(resp, url, what, attempt, retry_after));
        }
    }

    fn backoff(&self, attempt: usize, retry_after: Option<u64>) -> Duration {
        let exp = self
            .retry
            .base_delay
            .saturating_mul(1u32 << (attempt - 1).min(16) as u32);
        let asked = retry_after.map(Duration::from_secs).unwrap_or_default();
        exp.max(asked).min(self.retry.max_delay)
    }

    fn status_error(
        &self,
        mut resp: ureq::http::Response<ureq::Body>,
        url: &str,
        what: &str,
        attempts: usize,
        retry_after: Option<u64>,
    ) -> HubError {
        let status = resp.status().as_u16();
        let code = resp
            .headers()
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 << 10)
            .read_to_string()
            .unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| body.chars().take(300).collect());
        let repo = repo_of(url, &self.endpoint);
        match (status, code.as_str()) {
            (429, _) => HubError::RateLimited {
                url: url.into(),
                attempts,
                retry_after,
            },
            (401 | 403, "GatedRepo") => HubError::Gated { repo },
            (401 | 403, "RepoNotFound") | (404, _) => HubError::NotFound {
                what: match code.as_str() {
                    "RepoNotFound" if self.token.is_none() && status == 401 => {
                        format!("{what} (repository {repo}; if it is private, set HF_TOKEN)")
                    }
                    "RevisionNotFound" => format!("{what} (the revision does not exist)"),
                    _ => what.to_string(),
                },
                url: url.into(),
            },
            (401, _) if message.to_ascii_lowercase().contains("credentials") => {
                HubError::Unauthorized { message }
            }
            (401 | 403, _) if self.token.is_none() => HubError::Gated { repo },
            (401, _) => HubError::Unauthorized { message },
            _ => HubError::Status {
                url: url.into(),
                status,
                message,
            },
        }
    }

    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        what: &str,
    ) -> Result<(T, Option<String>)> {
        self.online(what)?;
        let mut resp = self.send(Method::Get, url, None, true, what)?;
        let next = resp
            .headers()
            .get("link")
            .and_then(|v| v.to_str().ok())
            .and_then(next_link);
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_JSON_BYTES)
            .read_to_string()
            .map_err(|e| HubError::Transport {
                url: url.into(),
                message: e.to_string(),
            })?;
        let value = serde_json::from_str(&text).map_err(|e| HubError::Invalid {
            what: url.into(),
            message: format!("the Hub's answer is not the JSON expected: {e}"),
        })?;
        Ok((value, next))
    }

    /// The first page of `GET /api/models`.
    pub fn list_models(&self, q: &SearchQuery) -> Result<ModelPage> {
        let mut params: Vec<(&str, String)> = Vec::new();
        if let Some(s) = q.search.as_deref().filter(|s| !s.trim().is_empty()) {
            params.push(("search", s.trim().to_string()));
        }
        if let Some(a) = &q.author {
            params.push(("author", a.clone()));
        }
        for f in &q.filters {
            params.push(("filter", f.clone()));
        }
        params.push(("sort", q.sort.param().into()));
        params.push(("direction", "-1".into()));
        params.push(("limit", q.limit.clamp(1, 1000).to_string()));
        if q.full {
            params.push(("full", "true".into()));
            params.push(("cardData", "true".into()));
        }
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v, false)))
            .collect();
        let url = format!("{}/api/models?{}", self.endpoint, query.join("&"));
        self.next_page(&url)
    }

    /// The page at a `Link: rel="next"` URL (it must point at the same endpoint).
    pub fn next_page(&self, url: &str) -> Result<ModelPage> {
        if !url.starts_with(&self.endpoint) {
            return Err(HubError::Invalid {
                what: url.into(),
                message: format!("a next-page link must stay on {}", self.endpoint),
            });
        }
        let (items, next) = self.get_json::<Vec<ModelInfo>>(url, "model listing")?;
        Ok(ModelPage { items, next })
    }

    /// Up to `max` items, following pagination.
    pub fn list_all(&self, q: &SearchQuery, max: usize) -> Result<Vec<ModelInfo>> {
        let mut page = self.list_models(q)?;
        let mut out = Vec::new();
        loop {
            out.extend(page.items);
            if out.len() >= max {
                out.truncate(max);
                return Ok(out);
            }
            match page.next {
                Some(next) => page = self.next_page(&next)?,
                None => return Ok(out),
            }
        }
    }

    /// `GET /api/models/{repo}[/revision/{rev}]?blobs=true`: files with sizes and LFS ids.
    pub fn model_info(&self, repo: &str, rev: Option<&str>) -> Result<ModelInfo> {
        super::check_repo_id(repo)?;
        let url = match rev {
            Some(r) => format!(
                "{}/api/models/{repo}/revision/{}?blobs=true",
                self.endpoint,
                encode(r, false)
            ),
            None => format!("{}/api/models/{repo}?blobs=true", self.endpoint),
        };
        let what = match rev {
            Some(r) => format!("model {repo}@{r}"),
            None => format!("model {repo}"),
        };
        let (info, _) = self.get_json::<ModelInfo>(&url, &what)?;
        if info.id != repo && !info.id.eq_ignore_ascii_case(repo) {
            return Err(HubError::Invalid {
                what: url,
                message: format!("asked for {repo}, the Hub answered for {}", info.id),
            });
        }
        Ok(info)
    }

    /// Files (and folders) of `repo` at `rev`, under `path`, following pagination.
    pub fn tree(
        &self,
        repo: &str,
        rev: &str,
        path: Option<&str>,
        recursive: bool,
    ) -> Result<Vec<TreeEntry>> {
        super::check_repo_id(repo)?;
        let sub = match path.filter(|p| !p.is_empty()) {
            Some(p) => {
                check_repo_path(p)?;
                format!("/{}", encode(p, true))
            }
            None => String::new(),
        };
        let mut url = format!(
            "{}/api/models/{repo}/tree/{}{sub}?recursive={recursive}",
            self.endpoint,
            encode(rev, false)
        );
        let what = format!("files of {repo}@{rev}{sub}");
        let mut out = Vec::new();
        loop {
            let (entries, next) = self.get_json::<Vec<TreeEntry>>(&url, &what)?;
            for e in &entries {
                check_repo_path(&e.path)?;
            }
            out.extend(entries);
            match next {
                Some(n) if n.starts_with(&self.endpoint) => url = n,
                _ => return Ok(out),
            }
        }
    }

    fn resolve_url(&self, repo: &str, rev: &str, file: &str) -> String {
        format!(
            "{}/{repo}/resolve/{}/{}",
            self.endpoint,
            encode(rev, false),
            encode(file, true)
        )
    }

    /// `HEAD .../resolve/{rev}/{file}` without following the redirect: commit, content id,
    /// size and where to fetch the bytes.
    pub fn file_meta(&self, repo: &str, rev: &str, file: &str) -> Result<FileMeta> {
        super::check_repo_id(repo)?;
        check_repo_path(file)?;
        let what = format!("{file} in {repo}@{rev}");
        self.online(&what)?;
        let url = self.resolve_url(repo, rev, file);
        let resp = self.send(Method::Head, &url, None, false, &what)?;
        let h = resp.headers();
        let header = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let bad = |m: &str| HubError::Invalid {
            what: what.clone(),
            message: m.into(),
        };
        let commit = header("x-repo-commit").ok_or_else(|| bad("no X-Repo-Commit header"))?;
        if commit.len() != 40 || !commit.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad(&format!("X-Repo-Commit {commit:?} is not a commit id")));
        }
        let etag = header("x-linked-etag")
            .or_else(|| header("etag"))
            .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
            .filter(|e| !e.is_empty())
            .ok_or_else(|| bad("no ETag header"))?;
        if etag.contains(['/', '\\', '.']) || etag.len() > 128 {
            return Err(bad(&format!("ETag {etag:?} cannot name a cache blob")));
        }
        let size = header("x-linked-size")
            .or_else(|| header("content-length"))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| bad("no size (X-Linked-Size / Content-Length)"))?;
        let url = if resp.status().is_redirection() {
            let loc = header("location").ok_or_else(|| bad("a redirect without Location"))?;
            if loc.starts_with('/') {
                // A relative redirect stays on the endpoint's host.
                let origin: String = self
                    .endpoint
                    .splitn(4, '/')
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("/");
                format!("{origin}{loc}")
            } else {
                loc
            }
        } else {
            url
        };
        Ok(FileMeta {
            commit,
            etag,
            size,
            url,
        })
    }

    /// A small file's bytes (configs, cards), refused above `max` bytes.
    pub fn get_small(&self, repo: &str, rev: &str, file: &str, max: u64) -> Result<Vec<u8>> {
        super::check_repo_id(repo)?;
        check_repo_path(file)?;
        let what = format!("{file} in {repo}@{rev}");
        self.online(&what)?;
        let url = self.resolve_url(repo, rev, file);
        let mut resp = self.send(Method::Get, &url, None, true, &what)?;
        if let Some(len) = resp.body().content_length()
            && len > max
        {
            return Err(HubError::TooLarge {
                file: what,
                size: len,
                limit: max,
            });
        }
        resp.body_mut()
            .with_config()
            .limit(max)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => HubError::TooLarge {
                    file: what.clone(),
                    size: max + 1,
                    limit: max,
                },
                e => HubError::Transport {
                    url: url.clone(),
                    message: e.to_string(),
                },
            })
    }

    /// Bytes `start..=end` of the file at `url` (from [`FileMeta::url`]).
    pub fn get_range(&self, url: &str, start: u64, end: u64, what: &str) -> Result<Vec<u8>> {
        self.online(what)?;
        let mut resp = self.send(Method::Get, url, Some((start, Some(end))), true, what)?;
        let status = resp.status().as_u16();
        // A server that ignores ranges sends the file from byte 0: read just far enough.
        let wanted = if status == 206 {
            end - start + 1
        } else {
            end + 1
        };
        let mut bytes = Vec::new();
        resp.body_mut()
            .with_config()
            .limit(u64::MAX)
            .reader()
            .take(wanted)
            .read_to_end(&mut bytes)
            .map_err(|e| HubError::Transport {
                url: url.into(),
                message: e.to_string(),
            })?;
        match status {
            206 => Ok(bytes),
            // A server that ignores ranges sends everything from 0.
            200 => Ok(bytes.get(start as usize..).unwrap_or_default().to_vec()),
            _ => Err(HubError::Status {
                url: url.into(),
                status,
                message: "range not satisfiable".into(),
            }),
        }
    }

    /// Opens the body of `url` from byte `start` for a download: the reader and the offset
    /// it actually starts at (0 when the server ignored the range).
    pub(crate) fn open_from(
        &self,
        url: &str,
        start: u64,
        what: &str,
    ) -> Result<(u64, Box<dyn Read + Send>)> {
        self.online(what)?;
        let range = (start > 0).then_some((start, None));
        let resp = self.send(Method::Get, url, range, true, what)?;
        let status = resp.status().as_u16();
        let from = match status {
            206 => {
                let cr = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                content_range_start(cr).ok_or_else(|| HubError::Invalid {
                    what: what.into(),
                    message: format!("bad Content-Range {cr:?}"),
                })?
            }
            200 => 0,
            416 => {
                return Err(HubError::Status {
                    url: url.into(),
                    status,
                    message: format!("the server has no byte {start}"),
                });
            }
            s => {
                return Err(HubError::Status {
                    url: url.into(),
                    status: s,
                    message: "unexpected answer to a download".into(),
                });
            }
        };
        let reader = resp.into_body().into_with_config().limit(u64::MAX).reader();
        Ok((from, Box::new(reader)))
    }
}

fn retryable_transport(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::Timeout(_)
    )
}

/// Seconds from `Retry-After` or the `RateLimit` header's `t=`.
fn retry_after(h: &ureq::http::HeaderMap) -> Option<u64> {
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok());
    get("retry-after")
        .and_then(|v| v.trim().parse().ok())
        .or_else(|| {
            get("ratelimit")?
                .split(';')
                .find_map(|p| p.trim().strip_prefix("t="))
                .and_then(|t| t.trim().parse().ok())
        })
}

/// The `rel="next"` target of a `Link` header.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"" || p.trim() == "rel=next");
        let url = url.trim().strip_prefix('<')?.strip_suffix('>')?;
        is_next.then(|| url.to_string())
    })
}

fn content_range_start(v: &str) -> Option<u64> {
    v.trim()
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// The `org/name` part of a Hub URL, for messages.
fn repo_of(url: &str, endpoint: &str) -> String {
    let rest = url.strip_prefix(endpoint).unwrap_or(url);
    let rest = rest.strip_prefix("/api/models/").unwrap_or(rest);
    let parts: Vec<&str> = rest
        .trim_start_matches('/')
        .split(['/', '?'])
        .take(2)
        .collect();
    parts.join("/")
}

/// Percent-encodes `s` for a URL query value or path (`keep_slash` keeps `/` for paths).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers_and_ranges_parse() {
        assert_eq!(
            next_link(r#"<https://h/api/models?cursor=abc>; rel="next""#).as_deref(),
            Some("https://h/api/models?cursor=abc")
        );
        assert_eq!(
            next_link(r#"<https://h/p1>; rel="prev", <https://h/p3>; rel="next""#).as_deref(),
            Some("https://h/p3")
        );
        assert_eq!(next_link(r#"<https://h/p1>; rel="prev""#), None);
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("items 1-2"), None);
        assert_eq!(
            encode("base_model:adapter:a/b c", false),
            "base_model%3Aadapter%3Aa%2Fb%20c"
        );
        assert_eq!(encode("sub dir/a.json", true), "sub%20dir/a.json");
        assert_eq!(
            repo_of("http://h/api/models/org/x/tree/main", "http://h"),
            "org/x"
        );
        assert_eq!(
            repo_of("http://h/org/x/resolve/main/f", "http://h"),
            "org/x"
        );
    }
}
