//! The backup store: `<store>/<backup-id>/image.raw` and `manifest.json`.
//!
//! A job writes into `<store>/.partial-<backup-id>/`; only a complete,
//! fsynced backup is renamed to its final name (and the store directory
//! fsynced), so anything without the partial prefix is complete. Partial
//! directories left by a crash are removed when the store is opened.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::manifest::{self, Manifest};

const PARTIAL_PREFIX: &str = ".partial-";
pub const IMAGE_FILE: &str = "image.raw";
pub const MANIFEST_FILE: &str = "manifest.json";

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No complete backup has this id. Not retryable.
    #[error("backup {0} does not exist")]
    NotFound(String),
    /// The id cannot name a backup (it could escape the store). Not
    /// retryable: the caller's fault.
    #[error("{0:?} is not a backup id")]
    BadId(String),
    /// A file system call failed (`context` says which, on what path): no
    /// permission, a full disk, an I/O error. Not retryable until the store
    /// is fixed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A `manifest.json` is not valid JSON of a manifest (edited or
    /// damaged). Not retryable.
    #[error("manifest of backup {id} is unreadable: {source}")]
    BadManifest {
        id: String,
        #[source]
        source: serde_json::Error,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// The result of re-hashing an image against its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOutcome {
    pub ok: bool,
    pub chunks: u64,
    pub bad_chunks: Vec<u64>,
    pub image_digest: [u8; 32],
    pub problem: Option<String>,
    /// The manifest the image was checked against.
    pub manifest: Manifest,
}

impl VerifyOutcome {
    /// The hex image digest of the image as read now.
    pub fn image_digest_hex(&self) -> String {
        manifest::to_hex(&self.image_digest)
    }

    /// True when the manifest records a snapshot confirmed held before the
    /// first read and after the last one.
    pub fn frozen(&self) -> bool {
        self.manifest.snapshot.is_some()
    }

    /// What the check proved, in words.
    pub fn proved(&self) -> String {
        if self.ok {
            format!(
                "the image matches its manifest: all {} chunk digests and the image digest {}",
                self.chunks,
                self.image_digest_hex()
            )
        } else {
            format!(
                "the image does NOT match its manifest: {} of {} chunks differ {:?}{}",
                self.bad_chunks.len(),
                self.chunks,
                self.bad_chunks,
                self.problem
                    .as_ref()
                    .map(|p| format!("; {p}"))
                    .unwrap_or_default()
            )
        }
    }

    /// What the check did not prove, in words.
    pub fn not_checked(&self) -> String {
        let m = &self.manifest;
        match (&m.snapshot, m.live) {
            (Some(s), _) => format!(
                "that the image is a consistent database: it was copied from mate LU {} while the snapshot of volume {} was held by run {} (ledger sequence {}), as db-server confirmed before the first read and after the last; only the database's own verifier (db-server verify-image) checks the data",
                m.source_lu, s.volume, s.holder_run_id, s.ledger_sequence
            ),
            (None, true) => format!(
                "that the image is consistent: it is a live backup (not frozen) of LU {}, copied while it could be written",
                m.source_lu
            ),
            (None, false) => format!(
                "that the image is consistent: its manifest (format {}) does not record a snapshot",
                m.format_version
            ),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BackupStore {
    root: PathBuf,
}

impl BackupStore {
    /// Opens (creating) the store and removes what crashed jobs left behind.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(root).map_err(io_error(format!("creating {}", root.display())))?;
        let entries =
            fs::read_dir(root).map_err(io_error(format!("listing {}", root.display())))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PARTIAL_PREFIX) {
                tracing::warn!("removing the partial backup {name} left by an interrupted job");
                fs::remove_dir_all(entry.path())
                    .map_err(io_error(format!("removing {}", entry.path().display())))?;
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// Opens an existing store without changing it (for offline `list`
    /// and `verify`, which must not race a running server's jobs).
    pub fn open_read_only(root: &Path) -> Result<Self, StoreError> {
        if !root.is_dir() {
            return Err(StoreError::Io {
                context: format!("opening the store {}", root.display()),
                source: io::Error::new(io::ErrorKind::NotFound, "no such directory"),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Checks that `id` names a backup and cannot escape the store.
    pub fn check_id(id: &str) -> Result<(), StoreError> {
        let valid = !id.is_empty()
            && id.len() <= 64
            && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        if valid {
            Ok(())
        } else {
            Err(StoreError::BadId(id.to_string()))
        }
    }

    pub fn partial_dir(&self, id: &str) -> PathBuf {
        self.root.join(format!("{PARTIAL_PREFIX}{id}"))
    }

    pub fn backup_dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Creates the partial directory and the sparse image file of a job.
    pub fn create_partial(&self, id: &str, size_bytes: u64) -> Result<File, StoreError> {
        Self::check_id(id)?;
        let dir = self.partial_dir(id);
        fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
        let path = dir.join(IMAGE_FILE);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_error(format!("creating {}", path.display())))?;
        file.set_len(size_bytes)
            .map_err(io_error(format!("sizing {}", path.display())))?;
        Ok(file)
    }

    /// Makes a partial backup complete: fsyncs the image, writes and fsyncs
    /// the manifest and the directory, renames it to its final name, and
    /// fsyncs the store.
    pub fn commit(&self, image: &File, manifest: &Manifest) -> Result<(), StoreError> {
        let id = &manifest.backup_id;
        let dir = self.partial_dir(id);
        image
            .sync_all()
            .map_err(io_error(format!("syncing the image of {id}")))?;
        let json = serde_json::to_vec_pretty(manifest).expect("a manifest always serializes");
        let path = dir.join(MANIFEST_FILE);
        let mut file =
            File::create(&path).map_err(io_error(format!("creating {}", path.display())))?;
        file.write_all(&json)
            .and_then(|()| file.sync_all())
            .map_err(io_error(format!("writing {}", path.display())))?;
        sync_dir(&dir)?;
        let complete = self.backup_dir(id);
        fs::rename(&dir, &complete).map_err(io_error(format!("completing backup {id}")))?;
        if let Err(error) = sync_dir(&self.root) {
            // The job fails, so nothing may look complete: the backup goes
            // back under its partial name (discarded with the job), or, if
            // even that fails, it is removed.
            if let Err(e) = fs::rename(&complete, &dir) {
                tracing::error!("un-completing backup {id} after a failed store sync: {e}");
                let _ = fs::remove_dir_all(&complete);
            }
            return Err(error);
        }
        Ok(())
    }

    /// Removes a partial backup (a failed or cancelled job).
    pub fn discard_partial(&self, id: &str) {
        let dir = self.partial_dir(id);
        if let Err(e) = fs::remove_dir_all(&dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("removing {}: {e}", dir.display());
        }
    }

    pub fn manifest(&self, id: &str) -> Result<Manifest, StoreError> {
        Self::check_id(id)?;
        let path = self.backup_dir(id).join(MANIFEST_FILE);
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(id.to_string()));
            }
            Err(e) => return Err(io_error(format!("reading {}", path.display()))(e)),
        };
        serde_json::from_slice(&text).map_err(|source| StoreError::BadManifest {
            id: id.to_string(),
            source,
        })
    }

    /// Every complete backup, oldest first.
    pub fn list(&self) -> Result<Vec<Manifest>, StoreError> {
        let entries = fs::read_dir(&self.root)
            .map_err(io_error(format!("listing {}", self.root.display())))?;
        let mut manifests = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PARTIAL_PREFIX) || Self::check_id(&name).is_err() {
                continue;
            }
            match self.manifest(&name) {
                Ok(manifest) => manifests.push(manifest),
                Err(e) => tracing::warn!("skipping {name}: {e}"),
            }
        }
        manifests.sort_by_key(|m| (m.started_at_unix_ms, m.backup_id.clone()));
        Ok(manifests)
    }

    /// The disk space the complete backups take (allocated blocks of every
    /// file in their directories: a sparse image counts what it holds), for
    /// the store-size metric.
    pub fn stored_bytes(&self) -> Result<u64, StoreError> {
        use std::os::unix::fs::MetadataExt as _;
        let entries = fs::read_dir(&self.root)
            .map_err(io_error(format!("listing {}", self.root.display())))?;
        let mut total_bytes = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PARTIAL_PREFIX) || Self::check_id(&name).is_err() {
                continue;
            }
            let dir = entry.path();
            let files =
                fs::read_dir(&dir).map_err(io_error(format!("listing {}", dir.display())))?;
            for file in files.flatten() {
                if let Ok(metadata) = file.metadata() {
                    total_bytes += metadata.blocks() * 512;
                }
            }
        }
        Ok(total_bytes)
    }

    /// Re-hashes the image of a complete backup against its manifest.
    pub fn verify(&self, id: &str) -> Result<VerifyOutcome, StoreError> {
        let manifest = self.manifest(id)?;
        let path = self.backup_dir(id).join(IMAGE_FILE);
        let mut file =
            File::open(&path).map_err(io_error(format!("opening {}", path.display())))?;
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
        let image_digest = manifest::image_digest(&digests);
        if manifest::from_hex(&manifest.image_digest) != Some(image_digest) && problem.is_none() {
            problem = Some("the image digest does not match the manifest".into());
        }
        Ok(VerifyOutcome {
            ok: bad_chunks.is_empty() && problem.is_none(),
            chunks: index,
            bad_chunks,
            image_digest,
            problem,
            manifest,
        })
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(format!("syncing {}", dir.display())))
}
