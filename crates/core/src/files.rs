//! Crash-safe file writes: every file that matters is written to a temporary sibling, synced,
//! and renamed over the target, so a crash leaves the old or the new content, never a mix.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically (temp file + fsync + rename + directory fsync).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        sync_parent(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Fsyncs the directory holding `path`, making a rename in it durable.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// `<name>.tmp-<pid>` beside `path`.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Copies the regular files of `src` (not recursing) into the new directory `dst`, syncing each.
pub fn copy_dir_files(src: &Path, dst: &Path) -> std::io::Result<u64> {
    std::fs::create_dir_all(dst)?;
    let mut total = 0;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let to = dst.join(entry.file_name());
            total += std::fs::copy(entry.path(), &to)?;
            std::fs::File::open(&to)?.sync_all()?;
        }
    }
    Ok(total)
}

/// FNV-1a (64-bit): a fast checksum for detecting damaged or different files, not for security.
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// Why a JSON-lines file could not be read: the file, and for a bad line its 1-based number.
#[derive(Debug, thiserror::Error)]
pub enum JsonLinesError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {size} bytes exceeds the limit of {limit} bytes", path.display())]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{}: line {line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Reads a JSON-lines file (samples, training examples): every non-blank line is parsed as one
/// JSON value and turned into an item by `item`, which names what is wrong with it; the first
/// bad line stops the read. A file larger than `max_bytes` is refused before it is read.
pub fn read_json_lines<T>(
    path: &Path,
    max_bytes: u64,
    mut item: impl FnMut(&serde_json::Value) -> Result<T, String>,
) -> Result<Vec<T>, JsonLinesError> {
    use std::io::BufRead;
    let io = |source| JsonLinesError::Io {
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > max_bytes {
        return Err(JsonLinesError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit: max_bytes,
        });
    }
    let file = std::fs::File::open(path).map_err(io)?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| JsonLinesError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        out.push(item(&v).map_err(bad)?);
    }
    Ok(out)
}

/// The text of the first of `names` that `v` has (`input` or `inputs`, say); an error names the
/// fields when none is there or the value is not a string.
pub fn text_field<'v>(v: &'v serde_json::Value, names: [&str; 2]) -> Result<&'v str, String> {
    let (name, value) = names
        .iter()
        .find_map(|k| v.get(*k).map(|x| (*k, x)))
        .ok_or_else(|| {
            let article = if names[0].starts_with(['a', 'e', 'i', 'o', 'u']) {
                "an"
            } else {
                "a"
            };
            format!("needs {article} \"{}\" or \"{}\" field", names[0], names[1])
        })?;
    value
        .as_str()
        .ok_or_else(|| format!("\"{name}\" must be a string, not {value}"))
}
