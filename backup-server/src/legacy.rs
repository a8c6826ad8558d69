//! Backups in the format before the chunk store: `<dir>/<backup-id>/`
//! holding `image.raw` and `manifest.json`. They are never read in place
//! by the server: `backup-server convert` checks each image against its
//! manifest, stores its chunks and its index in the chunk store, verifies
//! the converted backup, and only then removes the old directory. A backup
//! whose image does not match its manifest is left as it is and named.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::manifest::{self, Manifest};
use crate::store::{ChunkStore, StoreError, encode_chunk, zero_digest};

pub const IMAGE_FILE: &str = "image.raw";
pub const MANIFEST_FILE: &str = "manifest.json";

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let context = context.into();
    move |source| {
        StoreError::Blob(crate::blobs::BlobError::Failed {
            doing: context,
            message: source.to_string(),
        })
    }
}

/// The backup directories of the old format in `dir` (a missing `dir` has
/// none).
fn backup_dirs(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(format!("listing {}", dir.display()))(e)),
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if ChunkStore::check_id(&name).is_ok() && path.join(MANIFEST_FILE).is_file() {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// How many old-format backups `dir` holds.
pub fn count(dir: &Path) -> Result<usize, StoreError> {
    Ok(backup_dirs(dir)?.len())
}

/// What `convert` did with each old backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Converted {
    /// Stored and verified in the chunk store; the old directory removed.
    Done { id: String, chunks_stored: u64 },
    /// Left as it is: its image does not match its manifest (or cannot be
    /// read); the reason says which.
    Kept { id: String, reason: String },
}

/// Converts every old-format backup in `dir` into `store` (which lives in
/// the same directory).
pub async fn convert(dir: &Path, store: &Arc<ChunkStore>) -> Result<Vec<Converted>, StoreError> {
    let mut outcome = Vec::new();
    for backup_dir in backup_dirs(dir)? {
        let id = backup_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let checked = {
            let backup_dir = backup_dir.clone();
            tokio::task::spawn_blocking(move || verify(&backup_dir)).await?
        };
        let (manifest, ok, problem) = match checked {
            Ok(v) => (v.manifest, v.ok, v.problem),
            Err(e) => {
                outcome.push(Converted::Kept {
                    id,
                    reason: e.to_string(),
                });
                continue;
            }
        };
        if !ok {
            outcome.push(Converted::Kept {
                id,
                reason: problem.unwrap_or_else(|| {
                    "the image does not match its manifest's chunk digests".into()
                }),
            });
            continue;
        }
        let held = store.held_chunks().await?;
        let digests = manifest.digests().map_err(|index| StoreError::Damaged {
            what: format!("the manifest of backup {id}"),
            why: format!("chunk digest {index} is not hex"),
        })?;
        let mut file = File::open(backup_dir.join(IMAGE_FILE))
            .map_err(io_error(format!("opening the image of {id}")))?;
        let mut chunks_stored = 0;
        let mut stored_now = std::collections::HashSet::new();
        for (index, digest) in digests.iter().enumerate() {
            let len = manifest.chunk_len_bytes(index as u64);
            let mut data = vec![0u8; len as usize];
            file.read_exact(&mut data)
                .map_err(io_error(format!("reading the image of {id}")))?;
            if *digest == zero_digest(len) || held.contains(digest) || stored_now.contains(digest) {
                continue;
            }
            let encoded = tokio::task::spawn_blocking(move || encode_chunk(&data)).await?;
            store.put_chunk(digest, encoded).await?;
            stored_now.insert(*digest);
            chunks_stored += 1;
        }
        store.write_index(&manifest).await?;
        let verified = store.verify(&id).await?;
        if !verified.ok {
            outcome.push(Converted::Kept {
                id,
                reason: format!(
                    "the converted backup does not verify: {}",
                    verified.proved()
                ),
            });
            continue;
        }
        fs::remove_dir_all(&backup_dir)
            .map_err(io_error(format!("removing {}", backup_dir.display())))?;
        outcome.push(Converted::Done { id, chunks_stored });
    }
    Ok(outcome)
}

/// An old image checked against its manifest.
struct LegacyVerify {
    ok: bool,
    problem: Option<String>,
    manifest: Manifest,
}

/// Re-hashes an old backup's image against its manifest.
fn verify(dir: &Path) -> Result<LegacyVerify, StoreError> {
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = fs::read(dir.join(MANIFEST_FILE))
        .map_err(io_error(format!("reading the manifest of {id}")))?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| StoreError::Damaged {
        what: format!("the manifest of backup {id}"),
        why: e.to_string(),
    })?;
    let path = dir.join(IMAGE_FILE);
    let mut file = File::open(&path).map_err(io_error(format!("opening {}", path.display())))?;
    let len_bytes = file
        .metadata()
        .map_err(io_error(format!("reading {}", path.display())))?
        .len();
    let mut problem = (len_bytes != manifest.size_bytes).then(|| {
        format!(
            "image holds {len_bytes} bytes, manifest says {}",
            manifest.size_bytes
        )
    });
    let mut digests = Vec::with_capacity(manifest.chunk_digests.len());
    let mut bad_chunks = Vec::new();
    let mut buf = vec![0u8; manifest.chunk_size_bytes as usize];
    let mut remaining = len_bytes.min(manifest.size_bytes);
    let mut index = 0u64;
    while remaining > 0 {
        let n = remaining.min(manifest.chunk_size_bytes) as usize;
        file.read_exact(&mut buf[..n])
            .map_err(io_error(format!("reading {}", path.display())))?;
        let digest = *blake3::hash(&buf[..n]).as_bytes();
        let expected = manifest
            .chunk_digests
            .get(index as usize)
            .and_then(|hex| manifest::from_hex(hex));
        if expected != Some(digest) {
            bad_chunks.push(index);
        }
        digests.push(digest);
        remaining -= n as u64;
        index += 1;
    }
    if index as usize != manifest.chunk_digests.len() && problem.is_none() {
        problem = Some(format!(
            "image has {index} chunks, manifest lists {}",
            manifest.chunk_digests.len()
        ));
    }
    if !bad_chunks.is_empty() && problem.is_none() {
        problem = Some(format!("chunks {bad_chunks:?} do not match their digests"));
    }
    let image_digest = manifest::image_digest(&digests);
    if manifest::from_hex(&manifest.image_digest) != Some(image_digest) && problem.is_none() {
        problem = Some("the image digest does not match the manifest".into());
    }
    Ok(LegacyVerify {
        ok: bad_chunks.is_empty() && problem.is_none(),
        problem,
        manifest,
    })
}
