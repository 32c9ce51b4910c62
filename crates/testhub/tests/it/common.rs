//! A raw HTTP/1.1 client over `TcpStream`, so these tests exercise the server byte for byte and
//! do not depend on the Hub client being written elsewhere in the workspace.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn content_length(&self) -> usize {
        self.header("content-length")
            .expect("Content-Length")
            .parse()
            .unwrap()
    }

    /// The URL in `Link: <…>; rel="next"`, if any.
    pub fn next_link(&self) -> Option<String> {
        let link = self.header("link")?;
        assert!(link.ends_with("; rel=\"next\""), "{link}");
        Some(link[1..link.find('>').unwrap()].to_string())
    }
}

/// Sends one request to `url` (absolute, `http://host:port/path?query`) and reads the whole
/// answer until the server closes the connection.
pub fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> Reply {
    let rest = url.strip_prefix("http://").expect("absolute http URL");
    let (host, target) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let target = if target.is_empty() { "/" } else { target };
    let mut stream = TcpStream::connect(host).expect("connect");
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: test\r\n");
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of head");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    Reply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

pub fn get(url: &str) -> Reply {
    request("GET", url, &[])
}

pub fn get_with(url: &str, headers: &[(&str, &str)]) -> Reply {
    request("GET", url, headers)
}

pub fn head(url: &str) -> Reply {
    request("HEAD", url, &[])
}

/// `ids` of a JSON array of models.
pub fn ids(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// Git's blob id, computed here independently of the server.
pub fn git_blob_sha1(bytes: &[u8]) -> String {
    use sha1::{Digest, Sha1};
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex(&h.finalize())
}

pub fn sha256(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex(&Sha256::digest(bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The pointer git-lfs writes for content with this sha256 and size.
pub fn lfs_pointer(sha: &str, size: usize) -> String {
    format!("version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n")
}
