//! Just enough HTTP/1.1 to serve one request per connection.
//!
//! Hand-rolled on purpose: the fault injection needs to send a `Content-Length` and then cut the
//! body short or close the socket, which a server framework would not let us do. Every response
//! carries `Connection: close`, so a pooling client never reuses a socket we are about to drop.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::ops::Range;
use std::sync::Arc;

/// A parsed request head; GETs and HEADs have no body, anything else is answered 405.
pub(crate) struct Request {
    pub method: String,
    /// The raw path, still percent-encoded, without the query.
    pub path: String,
    /// The raw query string, without the `?`.
    pub query: String,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Query pairs, percent-decoded (`+` is a space, as in forms).
    pub fn params(&self) -> Vec<(String, String)> {
        parse_query(&self.query)
    }

    pub fn param(&self, name: &str) -> Option<String> {
        self.params()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    pub fn param_all(&self, name: &str) -> Vec<String> {
        self.params()
            .into_iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v)
            .collect()
    }

    /// `true` for `name=true` or `name=1`; the Hub is lenient about boolean spellings.
    pub fn flag(&self, name: &str) -> bool {
        matches!(
            self.param(name).as_deref(),
            Some("true") | Some("1") | Some("True")
        )
    }
}

pub(crate) fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(&k.replace('+', " ")), decode(&v.replace('+', " ")))
        })
        .collect()
}

/// Reads one request head. `Ok(None)` when the peer closed without sending one (e.g. the
/// wake-up connection made by `Drop`).
pub(crate) fn read_request(stream: &TcpStream) -> io::Result<Option<Request>> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad request line",
        ));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut request = Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        headers: Vec::new(),
    };
    let mut head_bytes = line.len();
    loop {
        let mut h = String::new();
        let n = reader.read_line(&mut h)?;
        head_bytes += n;
        // A bound on the head keeps a confused client from growing memory without limit.
        if n == 0 || head_bytes > 64 * 1024 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad head"));
        }
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            request
                .headers
                .push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    // Drain a body if one was sent so that closing the socket does not reset the connection
    // before the client has read our answer.
    if let Some(len) = request
        .header("content-length")
        .and_then(|v| v.parse::<u64>().ok())
    {
        io::copy(&mut reader.by_ref().take(len), &mut io::sink())?;
    }
    Ok(Some(request))
}

/// The bytes of a response body; file contents are shared, not copied, until a fault needs to
/// alter them.
pub(crate) enum Body {
    Bytes(Vec<u8>),
    Slice(Arc<Vec<u8>>, Range<usize>),
}

impl Body {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Body::Bytes(b) => b,
            Body::Slice(b, r) => &b[r.clone()],
        }
    }
}

pub(crate) struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

impl Response {
    pub fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Body::Bytes(Vec::new()),
        }
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        Response::new(status)
            .header("Content-Type", "application/json; charset=utf-8")
            .body(Body::Bytes(value.to_string().into_bytes()))
    }

    /// An error in the Hub's shape: a JSON `error` plus `X-Error-Code`/`X-Error-Message`, which
    /// is what `huggingface_hub` inspects to tell a missing repo from a missing file.
    pub fn error(status: u16, code: Option<&str>, message: &str) -> Response {
        let mut r = Response::json(status, &serde_json::json!({ "error": message }));
        if let Some(code) = code {
            r = r.header("X-Error-Code", code);
        }
        r.header("X-Error-Message", message)
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Response {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    pub fn body(mut self, body: Body) -> Response {
        self.body = body;
        self
    }
}

/// How the body of a response leaves the server.
pub(crate) enum Send {
    Full,
    /// Headers only (HEAD).
    NoBody,
    /// Full `Content-Length`, then only this many body bytes, then the socket closes.
    CutAfter(usize),
}

pub(crate) fn write_response(
    stream: &mut TcpStream,
    response: &Response,
    send: Send,
) -> io::Result<()> {
    let body = response.body.as_slice();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        response.status,
        reason(response.status)
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    stream.write_all(head.as_bytes())?;
    match send {
        Send::Full => stream.write_all(body)?,
        Send::NoBody => {}
        Send::CutAfter(n) => stream.write_all(&body[..n.min(body.len())])?,
    }
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Write)
}

pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// Percent-decodes; malformed escapes are kept literally rather than rejected.
pub(crate) fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes everything but unreserved characters and `/` (for paths in URLs we build).
pub(crate) fn encode_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The outcome of a `Range` header against a body of `total` bytes.
pub(crate) enum RangeAsk {
    /// No usable single range: serve everything with 200 (RFC 9110 lets a server ignore
    /// malformed or multi-part ranges).
    Whole,
    Part(Range<usize>),
    Unsatisfiable,
}

pub(crate) fn parse_range(header: Option<&str>, total: usize) -> RangeAsk {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeAsk::Whole;
    };
    if spec.contains(',') {
        return RangeAsk::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAsk::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // Suffix form `bytes=-n`: the last n bytes.
        return match b.parse::<usize>() {
            Ok(0) => RangeAsk::Unsatisfiable,
            Ok(_) if total == 0 => RangeAsk::Unsatisfiable,
            Ok(n) => RangeAsk::Part(total.saturating_sub(n)..total),
            Err(_) => RangeAsk::Whole,
        };
    }
    let Ok(start) = a.parse::<usize>() else {
        return RangeAsk::Whole;
    };
    let end = if b.is_empty() {
        None
    } else {
        match b.parse::<usize>() {
            Ok(e) if e >= start => Some(e),
            _ => return RangeAsk::Whole,
        }
    };
    if start >= total {
        return RangeAsk::Unsatisfiable;
    }
    let last = end.map_or(total - 1, |e| e.min(total - 1));
    RangeAsk::Part(start..last + 1)
}
