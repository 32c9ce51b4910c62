//! The Hub cache shared with Python tools (`huggingface_hub`'s layout):
//! `models--{org}--{name}/blobs/{etag}`, `snapshots/{commit}/{file}` (a relative symlink to the
//! blob), `refs/{branch}` (the commit), partial downloads as `blobs/{etag}.incomplete`, locks
//! under `.locks/`. A download resumes from its partial file with a range request, is checked
//! against its content id (sha256 for LFS files, git blob sha1 otherwise) before it becomes a
//! blob, and never exceeds its size limit.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha1::Digest;

use super::client::{FileMeta, HubClient};
use super::{HubError, Progress, ProgressEvent, Result, Stage, check_repo_id, check_repo_path};

pub struct HubCache {
    root: PathBuf,
}

/// A file in the cache: its snapshot path and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Fetched {
    pub path: PathBuf,
    pub commit: String,
    pub size: u64,
}

/// Transfer attempts for one file: a dropped connection resumes where it stopped.
const RESUMES: usize = 4;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl HubCache {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.root
            .join(format!("models--{}", repo.replace('/', "--")))
    }

    pub fn snapshot_dir(&self, repo: &str, commit: &str) -> PathBuf {
        self.repo_dir(repo).join("snapshots").join(commit)
    }

    /// The commit `rev` points at in the cache: a commit id names itself, a branch or tag is
    /// read from `refs/`.
    pub fn commit_of(&self, repo: &str, rev: &str) -> Option<String> {
        if is_commit(rev) {
            return self
                .snapshot_dir(repo, rev)
                .is_dir()
                .then(|| rev.to_string());
        }
        if rev.contains("..") {
            return None;
        }
        let text = std::fs::read_to_string(self.repo_dir(repo).join("refs").join(rev)).ok()?;
        let c = text.trim().to_string();
        is_commit(&c).then_some(c)
    }

    /// The cached copy of `file` at `rev`, if complete.
    pub fn cached(&self, repo: &str, rev: &str, file: &str) -> Option<Fetched> {
        check_repo_path(file).ok()?;
        let commit = self.commit_of(repo, rev)?;
        let path = self.snapshot_dir(repo, &commit).join(file);
        let size = std::fs::metadata(&path).ok()?.len();
        Some(Fetched { path, commit, size })
    }

    /// Downloads `file` of `repo` at `rev` into the cache (or finds it there) and returns its
    /// snapshot path. Refused before any byte is fetched when it is larger than `max_bytes`.
    pub fn fetch(
        &self,
        client: &HubClient,
        repo: &str,
        rev: &str,
        file: &str,
        max_bytes: u64,
        progress: &dyn Progress,
    ) -> Result<Fetched> {
        check_repo_id(repo)?;
        check_repo_path(file)?;
        if client.offline() {
            return self
                .cached(repo, rev, file)
                .ok_or_else(|| HubError::Offline {
                    what: format!("{file} of {repo}@{rev}"),
                });
        }
        let meta = client.file_meta(repo, rev, file)?;
        if meta.size > max_bytes {
            return Err(HubError::TooLarge {
                file: format!("{file} in {repo}"),
                size: meta.size,
                limit: max_bytes,
            });
        }
        let repo_dir = self.repo_dir(repo);
        let blobs = repo_dir.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
        let blob = blobs.join(&meta.etag);
        let have = std::fs::metadata(&blob).map(|m| m.len()).ok();
        if have != Some(meta.size) {
            let locks = self
                .root
                .join(".locks")
                .join(repo_dir.file_name().expect("named"));
            std::fs::create_dir_all(&locks).map_err(io(&locks))?;
            let lock_path = locks.join(format!("{}.lock", meta.etag));
            let lock = std::fs::File::create(&lock_path).map_err(io(&lock_path))?;
            // Another process fetching the same blob finishes first; then it is here.
            lock.lock().map_err(io(&lock_path))?;
            if std::fs::metadata(&blob).map(|m| m.len()).ok() != Some(meta.size) {
                self.transfer(client, &meta, file, &blob, progress)?;
            }
        }
        progress.report(&ProgressEvent {
            stage: Stage::Download,
            file: file.into(),
            done: meta.size,
            total: meta.size,
        });
        let path = self.link_snapshot(repo, &meta.commit, file, &meta.etag)?;
        if !is_commit(rev) {
            self.set_ref(repo, rev, &meta.commit)?;
        }
        Ok(Fetched {
            path,
            commit: meta.commit,
            size: meta.size,
        })
    }

    /// Records that branch or tag `rev` of `repo` points at `commit` (`refs/{rev}`).
    pub fn set_ref(&self, repo: &str, rev: &str, commit: &str) -> Result<()> {
        check_repo_path(rev)?;
        let r = self.repo_dir(repo).join("refs").join(rev);
        let parent = r.parent().expect("a ref has a folder");
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        crate::files::write_atomic(&r, commit.as_bytes()).map_err(io(&r))
    }

    /// Fetches the bytes into `blob.incomplete` (resuming what is there), verifies them and
    /// renames the file to `blob`.
    fn transfer(
        &self,
        client: &HubClient,
        meta: &FileMeta,
        file: &str,
        blob: &Path,
        progress: &dyn Progress,
    ) -> Result<()> {
        let partial = blob.with_extension("incomplete");
        let mut tries = 0;
        loop {
            tries += 1;
            let mut done = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            if done > meta.size {
                done = 0;
            }
            let r = self.append_from(client, meta, file, &partial, done, progress);
            match r {
                Ok(()) => break,
                Err(HubError::Transport { .. }) if tries < RESUMES => continue,
                Err(e) => return Err(e),
            }
        }
        let actual = content_id(&partial, &meta.etag)?;
        if let Some(actual) = actual
            && actual != meta.etag
        {
            let _ = std::fs::remove_file(&partial);
            return Err(HubError::Integrity {
                file: file.into(),
                expected: meta.etag.clone(),
                actual,
            });
        }
        std::fs::rename(&partial, blob).map_err(io(blob))?;
        crate::files::sync_parent(blob).map_err(io(blob))?;
        Ok(())
    }

    /// Appends bytes from offset `done` to `partial` until the file has `meta.size` bytes.
    fn append_from(
        &self,
        client: &HubClient,
        meta: &FileMeta,
        file: &str,
        partial: &Path,
        done: u64,
        progress: &dyn Progress,
    ) -> Result<()> {
        let (from, mut reader) = if done == meta.size {
            return Ok(());
        } else {
            client.open_from(&meta.url, done, file)?
        };
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(from > 0)
            .write(true)
            .truncate(from == 0)
            .open(partial)
            .map_err(io(partial))?;
        let mut at = from;
        let mut buf = vec![0u8; 256 << 10];
        let transport = |e: std::io::Error| HubError::Transport {
            url: meta.url.clone(),
            message: format!("download of {file} interrupted: {e}"),
        };
        while at < meta.size {
            if progress.cancelled() {
                out.sync_all().map_err(io(partial))?;
                return Err(HubError::Cancelled);
            }
            let n = reader.read(&mut buf).map_err(transport)?;
            if n == 0 {
                out.sync_all().map_err(io(partial))?;
                return Err(transport(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the connection closed at byte {at} of {}", meta.size),
                )));
            }
            let n = n.min((meta.size - at) as usize);
            out.write_all(&buf[..n]).map_err(io(partial))?;
            at += n as u64;
            progress.report(&ProgressEvent {
                stage: Stage::Download,
                file: file.into(),
                done: at,
                total: meta.size,
            });
        }
        out.sync_all().map_err(io(partial))?;
        Ok(())
    }

    /// Points `snapshots/{commit}/{file}` at the blob (a relative symlink, or a copy where
    /// symlinks are unavailable), replacing what was there atomically.
    fn link_snapshot(&self, repo: &str, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let snap = self.snapshot_dir(repo, commit);
        let path = snap.join(file);
        let parent = path.parent().expect("a file has a parent");
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        let depth = file.matches('/').count();
        let target: PathBuf = std::iter::repeat_n("..", depth + 2)
            .collect::<PathBuf>()
            .join("blobs")
            .join(etag);
        let tmp = crate::files::temp_sibling(&path);
        let _ = std::fs::remove_file(&tmp);
        #[cfg(unix)]
        std::os::unix::fs::symlink(&target, &tmp).map_err(io(&tmp))?;
        #[cfg(not(unix))]
        std::fs::copy(parent.join(&target), &tmp).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(path)
    }
}

pub(crate) fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// The id of the file's content in the form of `etag`: sha256 (64 hex digits) or the git blob
/// sha1 (40). `None` when the etag has another form and cannot be checked.
fn content_id(path: &Path, etag: &str) -> Result<Option<String>> {
    let hex = |s: &str| s.chars().all(|c| c.is_ascii_hexdigit());
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut feed = |update: &mut dyn FnMut(&[u8])| -> Result<()> {
        loop {
            let n = f.read(&mut buf).map_err(io(path))?;
            if n == 0 {
                return Ok(());
            }
            update(&buf[..n]);
        }
    };
    if etag.len() == 64 && hex(etag) {
        let mut h = sha2::Sha256::new();
        feed(&mut |b| h.update(b))?;
        Ok(Some(format!("{:x}", h.finalize())))
    } else if etag.len() == 40 && hex(etag) {
        let len = std::fs::metadata(path).map_err(io(path))?.len();
        let mut h = sha1::Sha1::new();
        h.update(format!("blob {len}\0").as_bytes());
        feed(&mut |b| h.update(b))?;
        Ok(Some(format!("{:x}", h.finalize())))
    } else {
        Ok(None)
    }
}
