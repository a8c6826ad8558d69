//! The discipline of the array's small state files (`access.json` of LUN
//! masking, `modes.json` of the mirroring management table), in one place:
//!
//! - JSON with a `format` string and a BLAKE3 checksum (hex) of its items
//!   serialized as compact JSON;
//! - replaced atomically and durably (a temporary file beside it, fsync,
//!   rename, fsync of the directory) before the call that changed it
//!   answers; if the rename happened but the directory sync failed, the
//!   old content is written back (best effort), so that a failed call
//!   leaves the file as it was;
//! - read at start; a damaged file (unreadable, not JSON, another format, a
//!   wrong checksum, an item the configuration does not allow) stops the
//!   array from starting with an error naming the file and what to do,
//!   never a silent reset.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Why a state file could not be loaded. The array does not start: none of
/// these is retryable as it is; the file must be restored or deleted.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged: {reason}; {advice}")]
    Damaged {
        path: PathBuf,
        reason: String,
        /// What the operator can do about it.
        advice: &'static str,
    },
}

/// The bytes of the file at `path`, or `None` if it does not exist.
pub(crate) fn read(path: &Path) -> Result<Option<Vec<u8>>, StateFileError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateFileError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The file's checksum of `items`: BLAKE3 (hex) of their compact JSON.
pub(crate) fn checksum<T: Serialize + ?Sized>(items: &T) -> String {
    let json = serde_json::to_vec(items).expect("a state file's items serialize to JSON");
    blake3::hash(&json).to_hex().to_string()
}

/// Checks a decoded file's `format` and checksum against `expected_format`
/// and its `items`; the reason it is damaged otherwise.
pub(crate) fn check<T: Serialize + ?Sized>(
    format: &str,
    expected_format: &str,
    blake3: &str,
    items: &T,
) -> Result<(), String> {
    if format != expected_format {
        return Err(format!("its format is {format:?}, not {expected_format:?}"));
    }
    let digest = checksum(items);
    if blake3 != digest {
        return Err(format!(
            "its checksum is {blake3} but its content hashes to {digest}"
        ));
    }
    Ok(())
}

/// The bytes of a file: pretty JSON and a final newline.
pub(crate) fn encode<T: Serialize>(file: &T) -> Vec<u8> {
    let mut json = serde_json::to_vec_pretty(file).expect("a state file serializes to JSON");
    json.push(b'\n');
    json
}

/// Replaces the file at `path` with `next` atomically and durably. If the
/// rename happened but syncing the directory failed, `old` is written back
/// (best effort), so that a failed call leaves the file as it was.
pub(crate) fn persist(path: &Path, next: &[u8], old: &[u8]) -> std::io::Result<()> {
    match replace_file(path, next) {
        Ok(()) => Ok(()),
        Err(Failed::BeforeRename(e)) => Err(e),
        Err(Failed::AfterRename(e)) => {
            let _ = replace_file(path, old);
            Err(e)
        }
    }
}

/// How far a [`replace_file`] got before it failed.
enum Failed {
    /// The file is untouched.
    BeforeRename(std::io::Error),
    /// The new content is in place but perhaps not durable.
    AfterRename(std::io::Error),
}

/// Writes `content` to a temporary file beside `path`, syncs it, renames it
/// over `path` and syncs the directory.
fn replace_file(path: &Path, content: &[u8]) -> Result<(), Failed> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let written = (|| {
        let mut file = File::create(&temporary)?;
        file.write_all(content)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(Failed::BeforeRename(e));
    }
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(Failed::AfterRename)
}
