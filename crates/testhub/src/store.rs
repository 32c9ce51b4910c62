//! The in-memory repositories: commits, file oids and the git tree hashes behind them.

use std::collections::BTreeMap;
use std::sync::Arc;

use sha1::{Digest, Sha1};
use sha2::Sha256;

use crate::{Fault, Logged, Meta};

/// Files at or above this size are stored as LFS whatever their name, as `git lfs` set up by
/// the Hub does for large files.
pub(crate) const LFS_MIN_SIZE: usize = 10 * 1024 * 1024;

/// Name endings the Hub's default `.gitattributes` routes through LFS (the subset our code
/// meets).
const LFS_SUFFIXES: [&str; 3] = [".safetensors", ".gguf", ".bin"];

pub(crate) fn is_lfs(path: &str, len: usize) -> bool {
    len >= LFS_MIN_SIZE || LFS_SUFFIXES.iter().any(|s| path.ends_with(s))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub(crate) fn sha1_hex(bytes: &[u8]) -> String {
    hex(&Sha1::digest(bytes))
}

/// Git's object id: sha1 over `"{kind} {len}\0"` and the content.
fn git_object_id(kind: &str, content: &[u8]) -> [u8; 20] {
    let mut h = Sha1::new();
    h.update(format!("{kind} {}\0", content.len()).as_bytes());
    h.update(content);
    h.finalize().into()
}

/// The LFS pointer git stores in place of the content; its size is the Hub's `pointerSize`.
fn lfs_pointer(sha256: &str, size: usize) -> String {
    format!("version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n")
}

pub(crate) struct Lfs {
    pub sha256: String,
    pub pointer_size: usize,
}

/// One file of one commit.
pub(crate) struct Stored {
    pub bytes: Arc<Vec<u8>>,
    /// The git blob id: of the content for plain files, of the pointer for LFS files (as on the
    /// Hub, where tree `oid` and `blobId` of an LFS file name the pointer).
    pub git_oid: [u8; 20],
    pub lfs: Option<Lfs>,
}

impl Stored {
    pub fn new(path: &str, bytes: Vec<u8>) -> Stored {
        if is_lfs(path, bytes.len()) {
            let sha256 = sha256_hex(&bytes);
            let pointer = lfs_pointer(&sha256, bytes.len());
            Stored {
                git_oid: git_object_id("blob", pointer.as_bytes()),
                lfs: Some(Lfs {
                    sha256,
                    pointer_size: pointer.len(),
                }),
                bytes: Arc::new(bytes),
            }
        } else {
            Stored {
                git_oid: git_object_id("blob", &bytes),
                lfs: None,
                bytes: Arc::new(bytes),
            }
        }
    }

    pub fn oid(&self) -> String {
        hex(&self.git_oid)
    }
}

/// One commit: a full snapshot of the files.
pub(crate) struct Snapshot {
    pub sha: String,
    pub files: BTreeMap<String, Arc<Stored>>,
}

impl Snapshot {
    /// Paths of the folders that hold at least one file, without a trailing slash.
    pub fn dirs(&self) -> Vec<String> {
        let mut dirs = std::collections::BTreeSet::new();
        for path in self.files.keys() {
            let mut p = path.as_str();
            while let Some((parent, _)) = p.rsplit_once('/') {
                dirs.insert(parent.to_string());
                p = parent;
            }
        }
        dirs.into_iter().collect()
    }

    /// The git tree id of a folder (`""` = root), computed like git does so directory oids
    /// look and behave like the Hub's.
    pub fn tree_oid(&self, dir: &str) -> [u8; 20] {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        // name -> (is_dir, oid)
        let mut children: BTreeMap<String, (bool, [u8; 20])> = BTreeMap::new();
        for (path, stored) in self.files.range(prefix.clone()..) {
            let Some(rest) = path.strip_prefix(&prefix) else {
                break;
            };
            match rest.split_once('/') {
                None => {
                    children.insert(rest.to_string(), (false, stored.git_oid));
                }
                Some((sub, _)) if !children.contains_key(sub) => {
                    let oid = self.tree_oid(&format!("{prefix}{sub}"));
                    children.insert(sub.to_string(), (true, oid));
                }
                Some(_) => {}
            }
        }
        // Git orders tree entries as if directory names ended in '/'.
        let mut entries: Vec<(String, bool, [u8; 20])> = children
            .into_iter()
            .map(|(name, (is_dir, oid))| (name, is_dir, oid))
            .collect();
        entries.sort_by(|a, b| {
            let key = |e: &(String, bool, [u8; 20])| {
                let mut k = e.0.as_bytes().to_vec();
                if e.1 {
                    k.push(b'/');
                }
                k
            };
            key(a).cmp(&key(b))
        });
        let mut body = Vec::new();
        for (name, is_dir, oid) in entries {
            body.extend_from_slice(if is_dir { b"40000 " } else { b"100644 " });
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            body.extend_from_slice(&oid);
        }
        git_object_id("tree", &body)
    }

    pub fn size(&self) -> usize {
        self.files.values().map(|f| f.bytes.len()).sum()
    }
}

pub(crate) struct RepoState {
    pub id: String,
    pub meta: Meta,
    /// Oldest first; the last one is `main`.
    pub commits: Vec<Snapshot>,
}

impl RepoState {
    pub fn main(&self) -> &Snapshot {
        self.commits.last().expect("a repo always has a commit")
    }

    /// `main` or the full sha of any commit this repo has had.
    pub fn revision(&self, rev: &str) -> Option<&Snapshot> {
        if rev == "main" || rev == "refs/heads/main" {
            return Some(self.main());
        }
        self.commits.iter().rev().find(|c| c.sha == rev)
    }
}

pub(crate) struct State {
    pub repos: BTreeMap<String, RepoState>,
    pub token: Option<String>,
    pub page_size: usize,
    pub faults: Vec<Fault>,
    pub log: Vec<Logged>,
    /// Bumped by every commit so two commits of identical content still get distinct shas.
    pub counter: u64,
}

impl State {
    pub fn new() -> State {
        State {
            repos: BTreeMap::new(),
            token: None,
            page_size: 1000,
            faults: Vec::new(),
            log: Vec::new(),
            counter: 0,
        }
    }

    /// Builds a commit from files and gives it a sha derived from its tree, its repo and the
    /// commit counter, the way a git commit id covers its tree and metadata.
    pub fn snapshot(&mut self, id: &str, files: BTreeMap<String, Arc<Stored>>) -> Snapshot {
        self.counter += 1;
        let mut snap = Snapshot {
            sha: String::new(),
            files,
        };
        let tree = hex(&snap.tree_oid(""));
        snap.sha = hex(&git_object_id(
            "commit",
            format!("tree {tree}\nrepo {id}\ncounter {}\n", self.counter).as_bytes(),
        ));
        snap
    }

    /// A blob served by the CDN route, found by its sha256 in any commit of any repo.
    pub fn lfs_blob(&self, sha256: &str) -> Option<Arc<Stored>> {
        self.repos
            .values()
            .flat_map(|r| r.commits.iter())
            .flat_map(|c| c.files.values())
            .find(|f| f.lfs.as_ref().is_some_and(|l| l.sha256 == sha256))
            .cloned()
    }

    /// `"{repo}/{path}"` of every file whose LFS content is `sha256`, so that a fault aimed at
    /// a file name also catches the CDN request that carries its bytes.
    pub fn lfs_names(&self, sha256: &str) -> Vec<String> {
        let mut names = Vec::new();
        for repo in self.repos.values() {
            for commit in &repo.commits {
                for (path, f) in &commit.files {
                    if f.lfs.as_ref().is_some_and(|l| l.sha256 == sha256) {
                        names.push(format!("{}/{}", repo.id, path));
                    }
                }
            }
        }
        names
    }
}
