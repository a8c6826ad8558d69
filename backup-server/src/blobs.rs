//! Where the chunk store keeps its objects: a directory on this machine
//! ([`DirBlobs`]) or an S3 bucket ([`crate::s3::S3Blobs`]), behind one small
//! trait so that the store's logic is written once.
//!
//! The trait asks only what S3 offers: whole objects put atomically, read,
//! listed by prefix with their size and last-modified time, and deleted.
//! No rename, no append, no access time, no conditional write — the garbage
//! collection protocol (`gc.rs`) is built from these alone.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use crate::direct::{self, AlignedBuf, WriteCounts, WriteHooks};
use crate::source::BoxFuture;

/// One object as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The key, relative to the store (`chunks/0a1/0a1b…`).
    pub key: String,
    pub size_bytes: u64,
    /// When it was last written, by the store's clock (the file's mtime,
    /// S3's `Last-Modified`).
    pub modified_unix_ms: u64,
}

/// Why an object operation failed, by what the caller can do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BlobError {
    /// The object does not exist.
    #[error("{0} does not exist in the store")]
    NotFound(String),
    /// The store did not answer (connection refused, timeout, a 5xx):
    /// retryable once it is back.
    #[error("the store is unavailable while {doing}: {message}")]
    Unavailable { doing: String, message: String },
    /// The store refused the credentials or the operation (403, EACCES).
    /// Not retryable until the credentials or permissions are fixed.
    #[error("the store refused {doing}: {message}")]
    PermissionDenied { doing: String, message: String },
    /// Anything else: an I/O error, a full disk, a malformed answer. Not
    /// retryable until the store is fixed.
    #[error("{doing}: {message}")]
    Failed { doing: String, message: String },
}

/// An object store. Every method is safe to call concurrently, from this
/// process and from other processes using the same store.
pub trait Blobs: Send + Sync + 'static {
    /// Where the store is, for people: a directory or `s3://bucket/prefix`.
    fn location(&self) -> String;
    /// Writes a whole object, replacing any object of that key. Atomic (a
    /// reader sees the old object or the new one, never a part) and durable
    /// when it returns.
    fn put<'a>(&'a self, key: &'a str, data: Vec<u8>) -> BoxFuture<'a, Result<(), BlobError>>;
    /// [`Blobs::put`] of bytes in an aligned buffer: a directory writes
    /// them with `O_DIRECT` as they are; other stores copy them.
    fn put_aligned<'a>(
        &'a self,
        key: &'a str,
        data: AlignedBuf,
    ) -> BoxFuture<'a, Result<(), BlobError>> {
        self.put(key, data.to_vec())
    }
    /// [`Blobs::put_aligned`] on the calling thread, for a caller already
    /// on a blocking thread (no hop to another): `Err` gives the data back
    /// when this store writes only asynchronously.
    fn put_aligned_blocking(
        &self,
        key: &str,
        data: AlignedBuf,
    ) -> Result<Result<(), BlobError>, AlignedBuf> {
        let _ = key;
        Err(data)
    }
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Vec<u8>, BlobError>>;
    /// Every object below `prefix`, a folder ending in `/` (`chunks/`), in
    /// key order.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>, BlobError>>;
    /// Removes an object; a missing one is not an error.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), BlobError>>;
    /// Gets folders (keys ending in `/`) ready for puts, where a store has
    /// folders: a directory creates those missing and makes them durable
    /// together (one fsync per parent) instead of one put at a time.
    fn prepare_folders<'a>(&'a self, folders: Vec<String>) -> BoxFuture<'a, Result<(), BlobError>> {
        let _ = folders;
        Box::pin(async { Ok(()) })
    }
    /// Removes what interrupted puts left behind that is older than
    /// `older_than`, and answers how many; S3 shows an object only once it
    /// is complete, so there is nothing to remove there.
    fn sweep_interrupted<'a>(
        &'a self,
        older_than: std::time::Duration,
    ) -> BoxFuture<'a, Result<u64, BlobError>> {
        let _ = older_than;
        Box::pin(async { Ok(0) })
    }
}

/// Temporary files of [`DirBlobs::put`] start with this, so that a listing
/// never shows a half-written object.
const TEMPORARY_PREFIX: &str = ".tmp-";

/// A directory as an object store: a key is a path below the root. A put
/// writes a temporary file, fsyncs it, renames it over the key and fsyncs
/// the directory, so that a crash leaves the old object or the new one.
///
/// The temporary file is written with `O_DIRECT` (`direct.rs`: no copy
/// into the page cache) unless the filesystem refuses it; then through the
/// page cache, with one warning per store.
#[derive(Debug, Clone)]
pub struct DirBlobs {
    root: PathBuf,
    writes: Arc<WriteCounts>,
    hooks: WriteHooks,
    /// Directories below the root that exist and whose entry in their
    /// parent was fsynced by this store: a put into one makes no `mkdir`
    /// and no parent fsync. Shared by the clones of this store.
    durable_dirs: Arc<Mutex<HashSet<PathBuf>>>,
    /// How many times this store made sure a directory exists (`mkdir` and
    /// an fsync of its parent), for tests.
    dirs_made_durable: Arc<AtomicU64>,
}

impl DirBlobs {
    /// The store in `root`, created if missing.
    pub fn create(root: &Path) -> Result<Self, BlobError> {
        fs::create_dir_all(root).map_err(failed(format!("creating {}", root.display())))?;
        Ok(Self::at(root))
    }

    /// The store in `root`, which must exist (offline commands never
    /// create a store by mistake).
    pub fn existing(root: &Path) -> Result<Self, BlobError> {
        if !root.is_dir() {
            return Err(BlobError::NotFound(format!(
                "the store directory {}",
                root.display()
            )));
        }
        Ok(Self::at(root))
    }

    fn at(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            writes: direct::store_write_counts(root),
            hooks: WriteHooks::default(),
            durable_dirs: Arc::default(),
            dirs_made_durable: Arc::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How many objects this store's directory got with `O_DIRECT` and how
    /// many through the page cache (its filesystem refused `O_DIRECT`),
    /// counted by every `DirBlobs` of that directory in this process.
    pub fn write_counts(&self) -> &WriteCounts {
        &self.writes
    }

    /// The same store with test options of its writes.
    #[cfg(test)]
    fn with_hooks(mut self, hooks: WriteHooks) -> Self {
        self.hooks = hooks;
        self
    }

    /// The write counts of the directory store at `root` in this process
    /// (for tests of a store a server opened).
    pub fn write_counts_of(root: &Path) -> Arc<WriteCounts> {
        direct::store_write_counts(root)
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Makes sure `dir` (below the root) and each directory between it and
    /// the root exist and are durable: each one not yet known is created if
    /// missing and its parent fsynced, so that a power loss cannot drop the
    /// directory entry — and with it every object put into it, which an
    /// index written later would reference. A directory found already there
    /// gets the same parent fsync (another process, or an earlier run that
    /// crashed, may have created it without one). Known directories cost
    /// a set lookup: no syscall.
    fn ensure_durable_dir(&self, dir: &Path) -> Result<(), BlobError> {
        let known = |d: &Path| {
            d == self.root
                || self
                    .durable_dirs
                    .lock()
                    .expect("durable directory set poisoned")
                    .contains(d)
        };
        if known(dir) {
            return Ok(());
        }
        // The unknown levels, from the outermost down.
        let mut missing: Vec<&Path> = dir
            .ancestors()
            .take_while(|d| d.starts_with(&self.root) && !known(d))
            .collect();
        missing.reverse();
        for level in missing {
            match fs::create_dir(level) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && level.is_dir() => {}
                Err(e) => return Err(failed(format!("creating {}", level.display()))(e)),
            }
            let parent = level.parent().unwrap_or(&self.root);
            File::open(parent)
                .and_then(|p| p.sync_all())
                .map_err(failed(format!(
                    "syncing {} after creating {}",
                    parent.display(),
                    level.display()
                )))?;
            self.dirs_made_durable.fetch_add(1, Ordering::Relaxed);
            self.durable_dirs
                .lock()
                .expect("durable directory set poisoned")
                .insert(level.to_path_buf());
        }
        Ok(())
    }

    /// Creates the directories of `folders` that are missing, then fsyncs
    /// each distinct parent once (made durable first itself), and remembers
    /// them all as durable.
    fn prepare_folders_blocking(&self, folders: &[String]) -> Result<(), BlobError> {
        let mut parents: Vec<PathBuf> = Vec::new();
        let mut made: Vec<PathBuf> = Vec::new();
        for folder in folders {
            let dir = self.path(folder.trim_end_matches('/'));
            let parent = dir.parent().unwrap_or(&self.root).to_path_buf();
            if !parents.contains(&parent) {
                self.ensure_durable_dir(&parent)?;
                parents.push(parent);
            }
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
                Err(e) => return Err(failed(format!("creating {}", dir.display()))(e)),
            }
            made.push(dir);
        }
        for parent in &parents {
            File::open(parent)
                .and_then(|p| p.sync_all())
                .map_err(failed(format!("syncing {}", parent.display())))?;
        }
        self.durable_dirs
            .lock()
            .expect("durable directory set poisoned")
            .extend(made);
        Ok(())
    }

    fn put_blocking(&self, key: &str, data: &mut AlignedBuf) -> Result<(), BlobError> {
        let path = self.path(key);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        self.ensure_durable_dir(&dir)?;
        let temporary = dir.join(format!("{TEMPORARY_PREFIX}{}", uuid::Uuid::now_v7()));
        let written = (|| {
            let store = format_args!("the store {}", self.root.display());
            direct::write_new_file(&temporary, data, &self.writes, &store, self.hooks)?;
            fs::rename(&temporary, &path)?;
            File::open(&dir)?.sync_all()
        })();
        written.map_err(|e| {
            let _ = fs::remove_file(&temporary);
            failed(format!("writing {}", path.display()))(e)
        })
    }

    fn list_blocking(&self, prefix: &str) -> Result<Vec<ObjectMeta>, BlobError> {
        let mut found = Vec::new();
        let mut pending = vec![self.root.join(prefix)];
        while let Some(dir) = pending.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(failed(format!("listing {}", dir.display()))(e)),
            };
            for entry in entries {
                let entry = entry.map_err(failed(format!("listing {}", dir.display())))?;
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(TEMPORARY_PREFIX)
                {
                    continue;
                }
                let path = entry.path();
                let metadata = match entry.metadata() {
                    Ok(metadata) => metadata,
                    // Removed since the directory was read (a concurrent
                    // delete): not there any more.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(failed(format!("reading {}", path.display()))(e)),
                };
                if metadata.is_dir() {
                    pending.push(path);
                    continue;
                }
                let key = path
                    .strip_prefix(&self.root)
                    .expect("listed below the root")
                    .to_string_lossy()
                    .into_owned();
                let modified_unix_ms = metadata
                    .modified()
                    .ok()
                    .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as u64);
                found.push(ObjectMeta {
                    key,
                    size_bytes: metadata.len(),
                    modified_unix_ms,
                });
            }
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }
}

/// Removes the temporary files of puts that a crash interrupted (never
/// renamed into place), once older than `older_than` so that a put in
/// progress in another process is left alone.
fn sweep_temporaries(root: &Path, older_than: std::time::Duration) -> Result<u64, BlobError> {
    let cutoff = std::time::SystemTime::now() - older_than;
    let mut removed = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(failed(format!("listing {}", dir.display()))(e)),
        };
        for entry in entries.flatten() {
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            if metadata.is_dir() {
                pending.push(entry.path());
            } else if entry
                .file_name()
                .to_string_lossy()
                .starts_with(TEMPORARY_PREFIX)
                && metadata.modified().is_ok_and(|m| m < cutoff)
                && fs::remove_file(entry.path()).is_ok()
            {
                removed += 1;
            }
        }
    }
    Ok(removed)
}

fn failed(doing: String) -> impl FnOnce(io::Error) -> BlobError {
    move |e| match e.kind() {
        io::ErrorKind::PermissionDenied => BlobError::PermissionDenied {
            doing,
            message: e.to_string(),
        },
        _ => BlobError::Failed {
            doing,
            message: e.to_string(),
        },
    }
}

/// Runs a blocking file operation off the async threads.
async fn blocking<T: Send + 'static>(
    doing: impl FnOnce() -> String,
    work: impl FnOnce() -> Result<T, BlobError> + Send + 'static,
) -> Result<T, BlobError> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(BlobError::Failed {
            doing: doing(),
            message: format!("the blocking task failed: {e}"),
        })
    })
}

impl Blobs for DirBlobs {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn put<'a>(&'a self, key: &'a str, data: Vec<u8>) -> BoxFuture<'a, Result<(), BlobError>> {
        let this = self.clone();
        let key_owned = key.to_string();
        Box::pin(blocking(
            move || format!("writing {key}"),
            move || this.put_blocking(&key_owned, &mut AlignedBuf::copy_of(&data)),
        ))
    }

    fn put_aligned<'a>(
        &'a self,
        key: &'a str,
        mut data: AlignedBuf,
    ) -> BoxFuture<'a, Result<(), BlobError>> {
        let this = self.clone();
        let key_owned = key.to_string();
        Box::pin(blocking(
            move || format!("writing {key}"),
            move || this.put_blocking(&key_owned, &mut data),
        ))
    }

    fn put_aligned_blocking(
        &self,
        key: &str,
        mut data: AlignedBuf,
    ) -> Result<Result<(), BlobError>, AlignedBuf> {
        Ok(self.put_blocking(key, &mut data))
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Vec<u8>, BlobError>> {
        let path = self.path(key);
        let key_owned = key.to_string();
        Box::pin(blocking(
            move || format!("reading {key}"),
            move || match fs::read(&path) {
                Ok(data) => Ok(data),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    Err(BlobError::NotFound(key_owned))
                }
                Err(e) => Err(failed(format!("reading {}", path.display()))(e)),
            },
        ))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>, BlobError>> {
        let this = self.clone();
        let prefix_owned = prefix.to_string();
        Box::pin(blocking(
            move || format!("listing {prefix}"),
            move || this.list_blocking(&prefix_owned),
        ))
    }

    fn prepare_folders<'a>(&'a self, folders: Vec<String>) -> BoxFuture<'a, Result<(), BlobError>> {
        let this = self.clone();
        Box::pin(blocking(
            || "creating the store's folders".to_string(),
            move || this.prepare_folders_blocking(&folders),
        ))
    }

    fn sweep_interrupted<'a>(
        &'a self,
        older_than: std::time::Duration,
    ) -> BoxFuture<'a, Result<u64, BlobError>> {
        let root = self.root.clone();
        Box::pin(blocking(
            || "removing interrupted writes".to_string(),
            move || sweep_temporaries(&root, older_than),
        ))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), BlobError>> {
        let path = self.path(key);
        Box::pin(blocking(
            move || format!("removing {key}"),
            move || match fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(failed(format!("removing {}", path.display()))(e)),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_directory_store_puts_lists_by_prefix_and_deletes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = DirBlobs::create(dir.path()).expect("create");
        blobs
            .put("chunks/abc/abcdef", vec![1, 2, 3])
            .await
            .expect("put");
        blobs.put("chunks/abd/abd000", vec![4]).await.expect("put");
        blobs
            .put("indexes/x.json", b"{}".to_vec())
            .await
            .expect("put");
        assert_eq!(
            blobs.get("chunks/abc/abcdef").await.expect("get"),
            vec![1, 2, 3]
        );
        let chunks: Vec<String> = blobs
            .list("chunks/")
            .await
            .expect("list")
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(chunks, ["chunks/abc/abcdef", "chunks/abd/abd000"]);
        let some: Vec<String> = blobs
            .list("chunks/abc/")
            .await
            .expect("list")
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(some, ["chunks/abc/abcdef"]);
        assert_eq!(blobs.list("nothing/").await.expect("list"), []);
        blobs.delete("chunks/abc/abcdef").await.expect("delete");
        blobs
            .delete("chunks/abc/abcdef")
            .await
            .expect("a second delete");
        assert!(matches!(
            blobs.get("chunks/abc/abcdef").await,
            Err(BlobError::NotFound(_))
        ));
        // What a put interrupted by a crash leaves is never listed, and is
        // swept once old enough.
        std::fs::write(dir.path().join("chunks/abd/.tmp-interrupted"), b"half").expect("tmp");
        assert_eq!(blobs.list("chunks/").await.expect("list").len(), 1);
        let young = std::time::Duration::from_secs(3600);
        assert_eq!(blobs.sweep_interrupted(young).await.expect("sweep"), 0);
        let any = std::time::Duration::ZERO;
        assert_eq!(blobs.sweep_interrupted(any).await.expect("sweep"), 1);
        assert!(!dir.path().join("chunks/abd/.tmp-interrupted").exists());
    }

    #[tokio::test]
    async fn a_new_directory_is_made_durable_once_and_then_known() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = DirBlobs::create(dir.path()).expect("create");
        let made = || blobs.dirs_made_durable.load(Ordering::Relaxed);
        blobs.put("chunks/abc/1", vec![1]).await.expect("put");
        assert!(dir.path().join("chunks/abc").is_dir());
        // `chunks/` and `chunks/abc/`, each with its parent fsynced.
        assert_eq!(made(), 2, "two new levels");
        // A second put into the same directory (from a clone, as the
        // server's tasks hold): no mkdir, no parent fsync.
        let clone = blobs.clone();
        clone.put("chunks/abc/2", vec![2]).await.expect("put");
        assert_eq!(made(), 2, "a known directory is not made again");
        // A sibling: only its own level.
        blobs.put("chunks/abd/3", vec![3]).await.expect("put");
        assert_eq!(made(), 3);
        assert_eq!(blobs.get("chunks/abc/2").await.expect("get"), vec![2]);
        // A directory that exists but this store never saw (another
        // process made it) is made durable once too, not refused.
        std::fs::create_dir_all(dir.path().join("chunks/abe")).expect("mkdir");
        blobs.put("chunks/abe/4", vec![4]).await.expect("put");
        assert_eq!(made(), 4);
        assert_eq!(blobs.get("chunks/abe/4").await.expect("get"), vec![4]);
    }

    #[tokio::test]
    async fn prepared_folders_exist_and_puts_into_them_make_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = DirBlobs::create(dir.path()).expect("create");
        std::fs::create_dir_all(dir.path().join("chunks/001")).expect("one already there");
        let folders: Vec<String> = (0..3).map(|n| format!("chunks/{n:03x}/")).collect();
        blobs.prepare_folders(folders).await.expect("prepare");
        for n in 0..3 {
            assert!(dir.path().join(format!("chunks/{n:03x}")).is_dir());
        }
        // `chunks/` itself was made durable on the way.
        let made = blobs.dirs_made_durable.load(Ordering::Relaxed);
        assert_eq!(made, 1);
        blobs.put("chunks/002/x", vec![9]).await.expect("put");
        assert_eq!(blobs.dirs_made_durable.load(Ordering::Relaxed), made);
        assert_eq!(blobs.get("chunks/002/x").await.expect("get"), vec![9]);
    }

    /// Sizes around the alignment: empty, shorter than a block, exactly
    /// one, one more, and a chunk plus a little.
    const ROUND_TRIP_SIZES: [usize; 6] = [0, 1, 4095, 4096, 4097, (1 << 20) + 3];

    /// Puts objects of [`ROUND_TRIP_SIZES`] (through both `put` and
    /// `put_aligned`), reads them back and compares bytes and file sizes;
    /// says what differs. Answers the puts made.
    async fn round_trip(blobs: &DirBlobs, seed: u64) -> Result<u64, String> {
        let mut puts = 0;
        for (i, &size) in ROUND_TRIP_SIZES.iter().enumerate() {
            let mut x = seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let data: Vec<u8> = (0..size)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            for aligned in [false, true] {
                let key = format!("chunks/{size:07}/{aligned}");
                let put = if aligned {
                    blobs.put_aligned(&key, AlignedBuf::copy_of(&data)).await
                } else {
                    blobs.put(&key, data.clone()).await
                };
                put.map_err(|e| format!("put of {size} bytes: {e}"))?;
                puts += 1;
                let read = blobs
                    .get(&key)
                    .await
                    .map_err(|e| format!("get of {size} bytes: {e}"))?;
                if read != data {
                    return Err(format!(
                        "{size} bytes put (aligned: {aligned}) read back as {} bytes that differ",
                        read.len()
                    ));
                }
                let on_disk = fs::metadata(blobs.root().join(&key))
                    .map_err(|e| e.to_string())?
                    .len();
                if on_disk != size as u64 {
                    return Err(format!("{size} bytes put left a file of {on_disk} bytes"));
                }
            }
        }
        Ok(puts)
    }

    fn seed() -> u64 {
        let seed = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as u64;
        println!("seed {seed}");
        seed
    }

    /// A directory on a disk filesystem (not tmpfs), or why there is none.
    fn disk_dir() -> Result<tempfile::TempDir, String> {
        const TMPFS_MAGIC: u64 = 0x0102_1994;
        for parent in ["/var/tmp", env!("CARGO_MANIFEST_DIR")] {
            let Ok(stat) = rustix::fs::statfs(parent) else {
                continue;
            };
            if stat.f_type as u64 != TMPFS_MAGIC
                && let Ok(dir) = tempfile::tempdir_in(parent)
            {
                return Ok(dir);
            }
        }
        Err("neither /var/tmp nor the source directory is on a disk filesystem".into())
    }

    #[tokio::test]
    async fn objects_written_direct_on_a_disk_read_back_byte_for_byte() {
        let dir = match disk_dir() {
            Ok(dir) => dir,
            Err(why) => {
                println!("SKIPPED: {why}");
                return;
            }
        };
        let blobs = DirBlobs::create(dir.path()).expect("create");
        let puts = round_trip(&blobs, seed()).await.expect("round trip");
        let counts = blobs.write_counts();
        assert_eq!(
            (counts.direct_files(), counts.buffered_files()),
            (puts, 0),
            "every object of {} was written with O_DIRECT",
            dir.path().display()
        );
        assert!(!counts.refused());
    }

    #[tokio::test]
    async fn objects_fall_back_to_buffered_writes_where_direct_io_is_refused() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            println!("SKIPPED: /dev/shm (tmpfs) does not exist here");
            return;
        }
        let dir = tempfile::tempdir_in(shm).expect("tempdir in /dev/shm");
        let probe = dir.path().join("probe");
        match direct::open_direct(&probe, true) {
            Ok(_) => {
                // tmpfs does O_DIRECT since Linux 6.6: refuse it here as
                // older tmpfs did, so that the fallback is what runs.
                println!(
                    "this kernel's tmpfs accepts O_DIRECT: refusing it below {} with the test hook",
                    dir.path().display()
                );
                direct::refuse_direct_io_below(dir.path());
            }
            Err(e) => println!("tmpfs refuses O_DIRECT here: {e}"),
        }
        let _ = fs::remove_file(&probe);
        let blobs = DirBlobs::create(&dir.path().join("store")).expect("create");
        let puts = round_trip(&blobs, seed()).await.expect("round trip");
        let counts = blobs.write_counts();
        assert_eq!(
            (counts.direct_files(), counts.buffered_files()),
            (0, puts),
            "every object went through the page cache"
        );
        assert!(counts.refused());
    }

    /// The canary: a direct write that keeps its padding (no truncation to
    /// the true length) is caught by the round trip.
    #[tokio::test]
    async fn the_round_trip_catches_a_direct_write_left_padded() {
        let dir = match disk_dir() {
            Ok(dir) => dir,
            Err(why) => {
                println!("SKIPPED: {why}");
                return;
            }
        };
        let blobs = DirBlobs::create(dir.path())
            .expect("create")
            .with_hooks(WriteHooks {
                skip_truncate: true,
            });
        let caught = round_trip(&blobs, seed())
            .await
            .expect_err("a padded object must not read back as what was put");
        println!("caught: {caught}");
        assert!(caught.contains("1 bytes"), "{caught}");
    }
}
