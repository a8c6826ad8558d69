//! The chunk store: every backup is an index (its manifest, with one BLAKE3
//! digest per 1 MiB chunk) over chunks stored once each, by digest.
//!
//! Layout, the same in a directory and in an S3 bucket ([`Blobs`]):
//!
//! ```text
//! store.json                  what the store is: format, chunk size
//! chunks/<3 hex>/<64 hex>     one chunk, named by the digest of its bytes
//! indexes/<backup id>.json    a complete backup (written last)
//! writers/<backup id>.json    a running backup: the digests it may reuse
//! collectors/<uuid>.json      a running garbage collection: its lease
//! ```
//!
//! A chunk is stored as `SMC1`, a codec byte (0 raw, 1 zstd) and the data;
//! zstd is kept only when it is smaller. An all-zero chunk is never stored:
//! its digest is known, and readers make the zeros. A backup is complete
//! exactly when its index exists; every index is a whole backup (restoring
//! or exporting one needs no other). `gc.rs` holds the protocol that lets
//! garbage collection run beside backups.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::blobs::{BlobError, Blobs, DirBlobs};
use crate::direct::{self, AlignedBuf};
use crate::manifest::{self, Manifest};
use crate::s3::{S3Args, S3Blobs};

/// The chunk size of every store: the array's `ChecksumRange` chunk and
/// the chunk of every manifest written before the chunk store, so that the
/// array's digests name chunks directly and converted backups keep their
/// digests (ARCHITECTURE.md, "Chunk store").
pub const CHUNK_SIZE_BYTES: u64 = manifest::CHUNK_SIZE_BYTES;

/// The default grace period: an unreferenced chunk, a writer record and a
/// collector's lease younger than this are left alone.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(24 * 3600);

const STORE_KEY: &str = "store.json";
const STORE_FORMAT: &str = "splitmirror chunk store";
const STORE_VERSION: u32 = 1;
pub(crate) const CHUNKS: &str = "chunks/";
pub(crate) const INDEXES: &str = "indexes/";

const CHUNK_MAGIC: &[u8; 4] = b"SMC1";
const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;
/// zstd's fastest level: the backup server's CPU goes to hashing and the
/// network first; level 1 already finds what a database image repeats.
const ZSTD_LEVEL: i32 = 1;
/// Chunks fetched at once by verify and export.
const FETCHES_IN_FLIGHT: usize = 8;

/// Where a store is: `--store DIR` or `--store s3://BUCKET/PREFIX`.
#[derive(Debug, Clone)]
pub enum StoreLocation {
    Dir(PathBuf),
    S3 {
        bucket: String,
        prefix: String,
        args: S3Args,
    },
}

impl StoreLocation {
    /// `s3://BUCKET/PREFIX` is a bucket (with the S3 flags and `AWS_*`
    /// variables); anything else is a directory.
    pub fn parse(text: &str, s3: &S3Args) -> Result<Self, StoreError> {
        if text.starts_with("s3://") {
            let (bucket, prefix) = crate::s3::parse_s3_url(text).ok_or_else(|| {
                StoreError::BadLocation(format!(
                    "{text:?} is not s3://BUCKET or s3://BUCKET/PREFIX"
                ))
            })?;
            return Ok(StoreLocation::S3 {
                bucket,
                prefix,
                args: s3.clone(),
            });
        }
        if text.is_empty() {
            return Err(StoreError::BadLocation(
                "the store location is empty".into(),
            ));
        }
        Ok(StoreLocation::Dir(PathBuf::from(text)))
    }

    /// The objects, creating a directory store's directory when `create`.
    fn blobs(&self, create: bool) -> Result<Arc<dyn Blobs>, StoreError> {
        Ok(match self {
            StoreLocation::Dir(dir) if create => Arc::new(DirBlobs::create(dir)?),
            StoreLocation::Dir(dir) => Arc::new(DirBlobs::existing(dir)?),
            StoreLocation::S3 {
                bucket,
                prefix,
                args,
            } => Arc::new(S3Blobs::connect(bucket, prefix, args)?),
        })
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Dir(dir) => write!(f, "{}", dir.display()),
            StoreLocation::S3 { bucket, prefix, .. } if prefix.is_empty() => {
                write!(f, "s3://{bucket}")
            }
            StoreLocation::S3 { bucket, prefix, .. } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

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
    /// `--store` cannot name a store. Not retryable.
    #[error("{0}")]
    BadLocation(String),
    /// The store's objects could not be read or written (see the kind:
    /// unavailable, refused, or failed).
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// `store.json` or an index is not what this version writes (edited,
    /// damaged, or another program's). Not retryable; the object is kept.
    #[error("{what} is damaged: {why}")]
    Damaged { what: String, why: String },
    /// A chunk a backup references is not in the store.
    #[error("chunk {index} ({digest}) of backup {id} is missing from the store")]
    MissingChunk {
        id: String,
        index: u64,
        digest: String,
    },
    /// A stored chunk cannot be decoded or does not hash to its name.
    #[error("chunk {index} ({digest}) of backup {id} is corrupt: {why}")]
    CorruptChunk {
        id: String,
        index: u64,
        digest: String,
        why: String,
    },
    /// The directory holds backups in the raw-image format of earlier
    /// versions: converted by `backup-server convert`, never silently.
    #[error(
        "{dir} holds {count} backup(s) as raw images (the format before the chunk store): convert them with `backup-server convert --store {dir}` (they stay readable until converted, and are removed only once their chunks and index are stored and verified)"
    )]
    NeedsConversion { dir: String, count: usize },
    /// Writing the export file failed.
    #[error("{doing} {path}: {source}")]
    Export {
        doing: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A blocking task panicked or was dropped at shutdown.
    #[error("a blocking task of the store failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// `store.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoreHeader {
    format: String,
    version: u32,
    chunk_size_bytes: u64,
    created_at_unix_ms: u64,
}

/// The problem verify found with one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkProblemKind {
    Missing,
    Corrupt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkProblem {
    pub index: u64,
    pub digest: [u8; 32],
    pub kind: ChunkProblemKind,
    /// What was wrong, for people.
    pub why: String,
}

/// The result of re-reading a backup's chunks against its index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOutcome {
    pub ok: bool,
    pub chunks: u64,
    /// Chunks read from the store and hashed (the others are all zeros).
    pub chunks_read: u64,
    pub problems: Vec<ChunkProblem>,
    pub image_digest: [u8; 32],
    /// A problem with the index itself (its image digest).
    pub problem: Option<String>,
    pub manifest: Arc<Manifest>,
}

impl VerifyOutcome {
    pub fn image_digest_hex(&self) -> String {
        manifest::to_hex(&self.image_digest)
    }

    /// Indexes of the chunks with a problem.
    pub fn bad_chunks(&self) -> Vec<u64> {
        self.problems.iter().map(|p| p.index).collect()
    }

    /// True when the index records a snapshot confirmed held before the
    /// first read and after the last one.
    pub fn frozen(&self) -> bool {
        self.manifest.snapshot.is_some()
    }

    /// What the check proved, in words.
    pub fn proved(&self) -> String {
        if self.ok {
            format!(
                "every chunk the backup references is in the store and hashes to its digest: {} chunks ({} read from {} and re-hashed, {} all zeros), image digest {}",
                self.chunks,
                self.chunks_read,
                "the store",
                self.chunks - self.chunks_read,
                self.image_digest_hex()
            )
        } else {
            let named: Vec<String> = self
                .problems
                .iter()
                .take(10)
                .map(|p| {
                    format!(
                        "chunk {} ({}) {}",
                        p.index,
                        manifest::to_hex(&p.digest),
                        match p.kind {
                            ChunkProblemKind::Missing => "missing",
                            ChunkProblemKind::Corrupt => "corrupt",
                        }
                    )
                })
                .collect();
            format!(
                "the backup does NOT match its index: {} of {} chunks bad{}{}{}",
                self.problems.len(),
                self.chunks,
                if named.is_empty() { "" } else { ": " },
                named.join(", "),
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
        let trust = match m.counts {
            Some(c) if !c.verify_read && c.chunks_reused > 0 => format!(
                "; {} of its chunks were not read from the array when it was taken (the store held them: they were trusted on the array's ChecksumRange digest)",
                c.chunks_reused
            ),
            _ => String::new(),
        };
        let consistency = match (&m.snapshot, m.live) {
            (Some(s), _) => format!(
                "that the image is a consistent database: it was copied from mate LU {} while the snapshot of volume {} was held by run {} (ledger sequence {}), as db-server confirmed before the first read and after the last; only the database's own verifier (db-server verify-image on an export) checks the data",
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
        };
        format!("{consistency}{trust}")
    }
}

/// What `export` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOutcome {
    pub size_bytes: u64,
    pub chunks_written: u64,
    pub chunks_zero: u64,
    /// The image was written with `O_DIRECT` (false: its filesystem refused
    /// direct I/O and it went through the page cache).
    pub direct: bool,
}

/// What the store holds, for `ListBackups` and `console backup list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSummary {
    pub location: String,
    pub chunk_size_bytes: u64,
    pub chunks: u64,
    pub stored_bytes: u64,
    pub logical_bytes: u64,
    pub gc_grace: Duration,
}

/// The digest of an all-zero chunk of `len_bytes`.
pub fn zero_digest(len_bytes: u64) -> [u8; 32] {
    static FULL: OnceLock<[u8; 32]> = OnceLock::new();
    let hash = |len: u64| *blake3::hash(&vec![0u8; len as usize]).as_bytes();
    if len_bytes == CHUNK_SIZE_BYTES {
        *FULL.get_or_init(|| hash(CHUNK_SIZE_BYTES))
    } else {
        hash(len_bytes)
    }
}

/// Chunk keys are spread over this many folders, by the first three hex
/// digits of their digest.
const CHUNK_FOLDERS: u32 = 16 * 16 * 16;

/// The key of a chunk.
pub fn chunk_key(digest: &[u8; 32]) -> String {
    let hex = manifest::to_hex(digest);
    format!("{CHUNKS}{}/{hex}", &hex[..3])
}

/// The digest a chunk key names, if it is one.
fn digest_of_key(key: &str) -> Option<[u8; 32]> {
    let name = key.strip_prefix(CHUNKS)?.rsplit('/').next()?;
    manifest::from_hex(name)
}

fn index_key(id: &str) -> String {
    format!("{INDEXES}{id}.json")
}

/// A chunk as stored: zstd when that is smaller, raw otherwise.
pub fn encode_chunk(data: &[u8]) -> Vec<u8> {
    encode_chunk_aligned(data).to_vec()
}

thread_local! {
    /// One zstd context per thread (the blocking threads that encode and
    /// decode chunks), instead of one allocated per chunk.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Bytes zstd tries first, from the middle of a chunk larger than twice
/// this, before compressing the whole chunk.
const SAMPLE_BYTES: usize = 64 << 10;

/// A chunk whose sample compresses to more than this share of its size
/// (in 1/16ths) is stored raw without compressing the rest: random or
/// already compressed data, where zstd would spend the CPU of a whole chunk
/// to save a few bytes at best.
const SAMPLE_KEPT_SIXTEENTHS: usize = 15;

#[cfg(test)]
thread_local! {
    /// Whole chunks given to zstd on this thread (tests: a sample that does
    /// not shrink spares the whole).
    static WHOLE_COMPRESSIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// [`encode_chunk`] into an aligned buffer, ready for a direct write: the
/// data is compressed straight into it (kept when smaller than the data),
/// else copied once. A large chunk whose sample does not shrink is stored
/// raw without compressing it all.
pub fn encode_chunk_aligned(data: &[u8]) -> AlignedBuf {
    const HEADER_BYTES: usize = CHUNK_MAGIC.len() + 1;
    let mut out = AlignedBuf::with_capacity(HEADER_BYTES + data.len());
    out.extend_from_slice(CHUNK_MAGIC);
    out.extend_from_slice(&[CODEC_ZSTD]);
    // Room for a compressed form smaller than the data only: zstd gives up
    // (an error) when it does not fit.
    let room = data.len().saturating_sub(1);
    let compressed = COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        let compressor = cell.as_mut()?;
        if data.len() >= 2 * SAMPLE_BYTES {
            // The sample is compressed into the output's spare room, which
            // the whole chunk overwrites if it is worth compressing.
            let start = (data.len() - SAMPLE_BYTES) / 2;
            let sample = &data[start..start + SAMPLE_BYTES];
            let sample_bytes = compressor
                .compress_to_buffer(sample, &mut out.spare_mut()[..room])
                .ok()?;
            if sample_bytes * 16 > SAMPLE_BYTES * SAMPLE_KEPT_SIXTEENTHS {
                return None;
            }
        }
        #[cfg(test)]
        WHOLE_COMPRESSIONS.with(|n| n.set(n.get() + 1));
        compressor
            .compress_to_buffer(data, &mut out.spare_mut()[..room])
            .ok()
    });
    match compressed {
        Some(compressed_bytes) if compressed_bytes < data.len() => {
            out.set_len(HEADER_BYTES + compressed_bytes);
        }
        _ => {
            out.set_len(CHUNK_MAGIC.len());
            out.extend_from_slice(&[CODEC_RAW]);
            out.extend_from_slice(data);
        }
    }
    out
}

/// [`decode_chunk`] into an aligned buffer (pooled: no allocation per
/// chunk), ready for a direct write.
pub fn decode_chunk_aligned(
    stored: &[u8],
    digest: &[u8; 32],
    len_bytes: u64,
) -> Result<AlignedBuf, String> {
    let Some(payload) = stored.strip_prefix(CHUNK_MAGIC) else {
        return Err("it does not start with the chunk header".into());
    };
    let len = len_bytes as usize;
    let mut out = AlignedBuf::with_capacity(len);
    match payload.split_first() {
        Some((&CODEC_RAW, data)) => {
            if data.len() != len {
                return Err(format!(
                    "it holds {} bytes, the index says {len_bytes}",
                    data.len()
                ));
            }
            out.extend_from_slice(data);
        }
        Some((&CODEC_ZSTD, data)) => {
            let decompressed = DECOMPRESSOR.with(|cell| {
                let mut cell = cell.borrow_mut();
                if cell.is_none() {
                    *cell = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
                }
                let decompressor = cell.as_mut().expect("just made");
                decompressor
                    .decompress_to_buffer(data, &mut out.spare_mut()[..len])
                    .map_err(|e| format!("it does not decompress: {e}"))
            })?;
            if decompressed != len {
                return Err(format!(
                    "it holds {decompressed} bytes, the index says {len_bytes}"
                ));
            }
            out.set_len(len);
        }
        Some((codec, _)) => return Err(format!("unknown codec {codec}")),
        None => return Err("it is truncated".into()),
    }
    if blake3::hash(&out).as_bytes() != digest {
        return Err("its data does not hash to its digest".into());
    }
    Ok(out)
}

/// The data of a stored chunk, checked against the digest it is stored
/// under; the error says what is wrong with it.
pub fn decode_chunk(stored: &[u8], digest: &[u8; 32], len_bytes: u64) -> Result<Vec<u8>, String> {
    let Some(payload) = stored.strip_prefix(CHUNK_MAGIC) else {
        return Err("it does not start with the chunk header".into());
    };
    let data = match payload.split_first() {
        Some((&CODEC_RAW, data)) => data.to_vec(),
        Some((&CODEC_ZSTD, data)) => zstd::bulk::decompress(data, len_bytes as usize)
            .map_err(|e| format!("it does not decompress: {e}"))?,
        Some((codec, _)) => return Err(format!("unknown codec {codec}")),
        None => return Err("it is truncated".into()),
    };
    if data.len() as u64 != len_bytes {
        return Err(format!(
            "it holds {} bytes, the index says {len_bytes}",
            data.len()
        ));
    }
    if blake3::hash(&data).as_bytes() != digest {
        return Err("its data does not hash to its digest".into());
    }
    Ok(data)
}

/// The chunk store over any [`Blobs`].
pub struct ChunkStore {
    blobs: Arc<dyn Blobs>,
    location: String,
    gc_grace: Duration,
    /// Indexes read so far: an index never changes once written, so it is
    /// read once (a listing still says which exist).
    indexes: Mutex<HashMap<String, Arc<Manifest>>>,
    #[cfg(feature = "testing")]
    pub(crate) hooks: crate::gc::ProtocolHooks,
}

impl ChunkStore {
    /// Opens the store at `location` for a server: creates it (its
    /// `store.json`) if new, and refuses a directory of raw-image backups
    /// until it is converted.
    pub async fn open(location: &StoreLocation, gc_grace: Duration) -> Result<Self, StoreError> {
        if let StoreLocation::Dir(dir) = location {
            let count = crate::legacy::count(dir)?;
            if count > 0 {
                return Err(StoreError::NeedsConversion {
                    dir: dir.display().to_string(),
                    count,
                });
            }
        }
        Self::create(location, gc_grace).await
    }

    /// Opens the store at `location`, creating it if new, whatever else the
    /// directory holds (`backup-server convert`, which moves raw-image
    /// backups into it).
    pub async fn create(location: &StoreLocation, gc_grace: Duration) -> Result<Self, StoreError> {
        let store = Self::over(location.blobs(true)?, gc_grace);
        store.check_or_create_header(true).await?;
        // Every chunk folder made at once, with one fsync of `chunks/`,
        // instead of a new folder and an fsync of its parent for most of
        // the first chunks a backup stores.
        let folders: Vec<String> = (0..CHUNK_FOLDERS)
            .map(|n| format!("{CHUNKS}{n:03x}/"))
            .collect();
        store.blobs.prepare_folders(folders).await?;
        Ok(store)
    }

    /// Opens an existing store without creating anything (offline `list`,
    /// `verify`, `export`).
    pub async fn open_existing(
        location: &StoreLocation,
        gc_grace: Duration,
    ) -> Result<Self, StoreError> {
        let store = Self::over(location.blobs(false)?, gc_grace);
        store.check_or_create_header(false).await?;
        Ok(store)
    }

    /// A store over `blobs` (tests open stores on their own objects).
    pub fn over(blobs: Arc<dyn Blobs>, gc_grace: Duration) -> Self {
        Self {
            location: blobs.location(),
            blobs,
            gc_grace,
            indexes: Mutex::new(HashMap::new()),
            #[cfg(feature = "testing")]
            hooks: crate::gc::ProtocolHooks::default(),
        }
    }

    async fn check_or_create_header(&self, create: bool) -> Result<(), StoreError> {
        let damaged = |why: String| StoreError::Damaged {
            what: format!("{} of the store at {}", STORE_KEY, self.location),
            why,
        };
        match self.blobs.get(STORE_KEY).await {
            Ok(bytes) => {
                let header: StoreHeader =
                    serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
                if header.format != STORE_FORMAT || header.version != STORE_VERSION {
                    return Err(damaged(format!(
                        "it is {:?} version {}, this program reads {STORE_FORMAT:?} version {STORE_VERSION}",
                        header.format, header.version
                    )));
                }
                if header.chunk_size_bytes != CHUNK_SIZE_BYTES {
                    return Err(damaged(format!(
                        "its chunk size is {} bytes, this program's {CHUNK_SIZE_BYTES}",
                        header.chunk_size_bytes
                    )));
                }
                Ok(())
            }
            Err(BlobError::NotFound(_)) if create => {
                let header = StoreHeader {
                    format: STORE_FORMAT.into(),
                    version: STORE_VERSION,
                    chunk_size_bytes: CHUNK_SIZE_BYTES,
                    created_at_unix_ms: manifest::now_unix_ms(),
                };
                let json = serde_json::to_vec_pretty(&header).expect("a header serializes");
                self.blobs.put(STORE_KEY, json).await?;
                tracing::info!(location = %self.location, "created a chunk store");
                Ok(())
            }
            Err(BlobError::NotFound(_)) => Err(StoreError::BadLocation(format!(
                "{} is not a chunk store (it has no {STORE_KEY})",
                self.location
            ))),
            Err(e) => Err(e.into()),
        }
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// Reads the store's header: answers whether the store is reachable
    /// and accepts this server's credentials, before a job is started.
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.blobs
            .get(STORE_KEY)
            .await
            .map(drop)
            .map_err(Into::into)
    }

    pub fn gc_grace(&self) -> Duration {
        self.gc_grace
    }

    pub(crate) fn blobs(&self) -> &dyn Blobs {
        self.blobs.as_ref()
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

    /// The digests of every chunk the store holds now.
    pub async fn held_chunks(&self) -> Result<HashSet<[u8; 32]>, StoreError> {
        Ok(self
            .blobs
            .list(CHUNKS)
            .await?
            .iter()
            .filter_map(|m| digest_of_key(&m.key))
            .collect())
    }

    /// Stores an encoded chunk ([`encode_chunk`]) under its digest.
    pub async fn put_chunk(&self, digest: &[u8; 32], encoded: Vec<u8>) -> Result<(), StoreError> {
        Ok(self.blobs.put(&chunk_key(digest), encoded).await?)
    }

    /// [`ChunkStore::put_chunk`] of a chunk encoded into an aligned buffer
    /// ([`encode_chunk_aligned`]): a directory store writes it as it is,
    /// with `O_DIRECT`.
    pub async fn put_chunk_aligned(
        &self,
        digest: &[u8; 32],
        encoded: AlignedBuf,
    ) -> Result<(), StoreError> {
        Ok(self.blobs.put_aligned(&chunk_key(digest), encoded).await?)
    }

    /// [`ChunkStore::put_chunk_aligned`] on the calling (blocking) thread
    /// where the store can write that way (a directory): `Err` gives the
    /// chunk back when it must be put asynchronously (S3).
    pub fn put_chunk_aligned_blocking(
        &self,
        digest: &[u8; 32],
        encoded: AlignedBuf,
    ) -> Result<Result<(), StoreError>, AlignedBuf> {
        self.blobs
            .put_aligned_blocking(&chunk_key(digest), encoded)
            .map(|put| put.map_err(Into::into))
    }

    /// Reads chunk `index` of backup `id`: zeros for an all-zero digest,
    /// else the stored chunk, decoded and checked against its digest.
    pub async fn read_chunk(
        &self,
        id: &str,
        index: u64,
        digest: &[u8; 32],
        len_bytes: u64,
    ) -> Result<Vec<u8>, StoreError> {
        if *digest == zero_digest(len_bytes) {
            return Ok(vec![0; len_bytes as usize]);
        }
        let stored = self.stored_chunk(id, index, digest).await?;
        let digest_owned = *digest;
        tokio::task::spawn_blocking(move || decode_chunk(&stored, &digest_owned, len_bytes))
            .await?
            .map_err(|why| StoreError::CorruptChunk {
                id: id.to_string(),
                index,
                digest: manifest::to_hex(digest),
                why,
            })
    }

    /// A chunk's stored bytes, as the store holds them (not decoded); a
    /// missing one is [`StoreError::MissingChunk`] of backup `id`.
    async fn stored_chunk(
        &self,
        id: &str,
        index: u64,
        digest: &[u8; 32],
    ) -> Result<Vec<u8>, StoreError> {
        match self.blobs.get(&chunk_key(digest)).await {
            Ok(stored) => Ok(stored),
            Err(BlobError::NotFound(_)) => Err(StoreError::MissingChunk {
                id: id.to_string(),
                index,
                digest: manifest::to_hex(digest),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// [`ChunkStore::read_chunk`] into an aligned, pooled buffer (verify
    /// and export: no allocation per chunk, and ready for a direct write).
    pub async fn read_chunk_aligned(
        &self,
        id: &str,
        index: u64,
        digest: &[u8; 32],
        len_bytes: u64,
    ) -> Result<AlignedBuf, StoreError> {
        if *digest == zero_digest(len_bytes) {
            let mut zeros = AlignedBuf::with_capacity(len_bytes as usize);
            zeros.spare_mut()[..len_bytes as usize].fill(0);
            zeros.set_len(len_bytes as usize);
            return Ok(zeros);
        }
        let stored = self.stored_chunk(id, index, digest).await?;
        let digest_owned = *digest;
        tokio::task::spawn_blocking(move || decode_chunk_aligned(&stored, &digest_owned, len_bytes))
            .await?
            .map_err(|why| StoreError::CorruptChunk {
                id: id.to_string(),
                index,
                digest: manifest::to_hex(digest),
                why,
            })
    }

    /// Writes a backup's index: the backup is complete from here on.
    pub async fn write_index(&self, manifest: &Manifest) -> Result<(), StoreError> {
        Self::check_id(&manifest.backup_id)?;
        let json = serde_json::to_vec_pretty(manifest).expect("a manifest always serializes");
        self.blobs
            .put(&index_key(&manifest.backup_id), json)
            .await?;
        self.indexes
            .lock()
            .expect("indexes")
            .insert(manifest.backup_id.clone(), Arc::new(manifest.clone()));
        Ok(())
    }

    /// Removes a backup's index (prune). Its chunks stay until garbage
    /// collection finds no backup referencing them.
    pub async fn remove_index(&self, id: &str) -> Result<(), StoreError> {
        Self::check_id(id)?;
        self.blobs.delete(&index_key(id)).await?;
        self.indexes.lock().expect("indexes").remove(id);
        Ok(())
    }

    /// The index of a complete backup.
    pub async fn manifest(&self, id: &str) -> Result<Arc<Manifest>, StoreError> {
        Self::check_id(id)?;
        if let Some(known) = self.indexes.lock().expect("indexes").get(id) {
            return Ok(known.clone());
        }
        let bytes = match self.blobs.get(&index_key(id)).await {
            Ok(bytes) => bytes,
            Err(BlobError::NotFound(_)) => return Err(StoreError::NotFound(id.to_string())),
            Err(e) => return Err(e.into()),
        };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Damaged {
                what: format!("the index of backup {id}"),
                why: e.to_string(),
            })?;
        if manifest.backup_id != id {
            return Err(StoreError::Damaged {
                what: format!("the index of backup {id}"),
                why: format!("it names backup {}", manifest.backup_id),
            });
        }
        let manifest = Arc::new(manifest);
        self.indexes
            .lock()
            .expect("indexes")
            .insert(id.to_string(), manifest.clone());
        Ok(manifest)
    }

    /// The ids of every complete backup, by listing the indexes.
    pub async fn backup_ids(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .blobs
            .list(INDEXES)
            .await?
            .into_iter()
            .filter_map(|m| {
                let id = m.key.strip_prefix(INDEXES)?.strip_suffix(".json")?;
                Self::check_id(id).ok().map(|()| id.to_string())
            })
            .collect())
    }

    /// Every complete backup, oldest first. A damaged index is skipped
    /// with a warning (and kept: `verify` names it).
    pub async fn list(&self) -> Result<Vec<Arc<Manifest>>, StoreError> {
        let ids = self.backup_ids().await?;
        {
            // Forget indexes removed by another server (a prune there).
            let listed: HashSet<&String> = ids.iter().collect();
            self.indexes
                .lock()
                .expect("indexes")
                .retain(|id, _| listed.contains(id));
        }
        let mut manifests = Vec::with_capacity(ids.len());
        for id in ids {
            match self.manifest(&id).await {
                Ok(manifest) => manifests.push(manifest),
                Err(StoreError::NotFound(_)) => {} // pruned since the listing
                Err(e @ StoreError::Damaged { .. }) => tracing::warn!("skipping {id}: {e}"),
                Err(e) => return Err(e),
            }
        }
        manifests.sort_by_key(|m| (m.started_at_unix_ms, m.backup_id.clone()));
        Ok(manifests)
    }

    /// What the store holds.
    pub async fn summary(&self) -> Result<StoreSummary, StoreError> {
        let chunks = self.blobs.list(CHUNKS).await?;
        let logical_bytes = self.list().await?.iter().map(|m| m.size_bytes).sum();
        Ok(StoreSummary {
            location: self.location.clone(),
            chunk_size_bytes: CHUNK_SIZE_BYTES,
            chunks: chunks.len() as u64,
            stored_bytes: chunks.iter().map(|m| m.size_bytes).sum(),
            logical_bytes,
            gc_grace: self.gc_grace,
        })
    }

    /// Re-reads every chunk a backup references, decodes and re-hashes it,
    /// and names each one that is missing or corrupt.
    pub async fn verify(&self, id: &str) -> Result<VerifyOutcome, StoreError> {
        let manifest = self.manifest(id).await?;
        let digests = manifest.digests().map_err(|index| StoreError::Damaged {
            what: format!("the index of backup {id}"),
            why: format!("chunk digest {index} is not a hex BLAKE3 digest"),
        })?;
        let chunks = digests.len() as u64;
        let expected_chunks = manifest.size_bytes.div_ceil(manifest.chunk_size_bytes);
        let mut problem = (chunks != expected_chunks)
            .then(|| format!("the index lists {chunks} chunks, its size needs {expected_chunks}"));
        if manifest::from_hex(&manifest.image_digest) != Some(manifest::image_digest(&digests))
            && problem.is_none()
        {
            problem = Some("the image digest does not match the chunk digests".into());
        }
        let checks = futures_util::stream::iter(digests.iter().copied().enumerate())
            .filter(|(index, digest)| {
                let len = manifest.chunk_len_bytes(*index as u64);
                std::future::ready(*digest != zero_digest(len))
            })
            .map(|(index, digest)| {
                let len = manifest.chunk_len_bytes(index as u64);
                async move {
                    match self
                        .read_chunk_aligned(id, index as u64, &digest, len)
                        .await
                    {
                        Ok(_) => Ok(None),
                        Err(StoreError::MissingChunk { .. }) => Ok(Some(ChunkProblem {
                            index: index as u64,
                            digest,
                            kind: ChunkProblemKind::Missing,
                            why: "not in the store".into(),
                        })),
                        Err(StoreError::CorruptChunk { why, .. }) => Ok(Some(ChunkProblem {
                            index: index as u64,
                            digest,
                            kind: ChunkProblemKind::Corrupt,
                            why,
                        })),
                        Err(e) => Err(e),
                    }
                }
            })
            .buffered(FETCHES_IN_FLIGHT);
        let results: Vec<Option<ChunkProblem>> = checks.try_collect().await?;
        let chunks_read = results.len() as u64;
        let problems: Vec<ChunkProblem> = results.into_iter().flatten().collect();
        Ok(VerifyOutcome {
            ok: problems.is_empty() && problem.is_none(),
            chunks,
            chunks_read,
            problems,
            image_digest: manifest::image_digest(&digests),
            problem,
            manifest,
        })
    }

    /// Writes backup `id` as a raw sparse image to `path` (through
    /// `<path>.partial`, renamed when complete and synced): a missing or
    /// corrupt chunk fails the export, naming the chunk, and leaves no file
    /// at `path`.
    ///
    /// The chunks are written with `O_DIRECT` at their own offsets (1 MiB,
    /// aligned; a short last chunk padded, the file cut back to its size
    /// before the fsync), each by the task that read it, up to
    /// [`FETCHES_IN_FLIGHT`] at once; through the page cache when the
    /// filesystem refuses direct I/O.
    pub async fn export(&self, id: &str, path: &Path) -> Result<ExportOutcome, StoreError> {
        let manifest = self.manifest(id).await?;
        let digests = manifest.digests().map_err(|index| StoreError::Damaged {
            what: format!("the index of backup {id}"),
            why: format!("chunk digest {index} is not a hex BLAKE3 digest"),
        })?;
        let partial = PathBuf::from(format!("{}.partial", path.display()));
        let export_error = |doing: &'static str| {
            let path = partial.display().to_string();
            move |source| StoreError::Export {
                doing,
                path,
                source,
            }
        };
        let file = File::create(&partial).map_err(export_error("creating"))?;
        file.set_len(manifest.size_bytes)
            .map_err(export_error("sizing"))?;
        let written = async {
            let (file, direct) = export_file(file, &partial, manifest.chunk_size_bytes)
                .map_err(export_error("opening for direct writes"))?;
            let file = Arc::new(file);
            let writes = futures_util::stream::iter(digests.iter().copied().enumerate())
                .map(|(index, digest)| {
                    let len = manifest.chunk_len_bytes(index as u64);
                    let chunk_size_bytes = manifest.chunk_size_bytes;
                    let file = file.clone();
                    let export_error = &export_error;
                    async move {
                        if digest == zero_digest(len) {
                            return Ok(false);
                        }
                        let mut data = self
                            .read_chunk_aligned(id, index as u64, &digest, len)
                            .await?;
                        let at = index as u64 * chunk_size_bytes;
                        tokio::task::spawn_blocking(move || {
                            let bytes = if direct { data.padded() } else { &data };
                            direct::write_all_at(&file, bytes, at)
                        })
                        .await?
                        .map_err(export_error("writing"))?;
                        Ok::<_, StoreError>(true)
                    }
                })
                .buffer_unordered(FETCHES_IN_FLIGHT);
            let (chunks_written, chunks_zero) = writes
                .try_fold((0, 0), |(data, zero), written| async move {
                    Ok(if written {
                        (data + 1, zero)
                    } else {
                        (data, zero + 1)
                    })
                })
                .await?;
            let synced = file.clone();
            let size_bytes = manifest.size_bytes;
            tokio::task::spawn_blocking(move || {
                // A padded last chunk wrote past the end.
                if synced.metadata()?.len() != size_bytes {
                    synced.set_len(size_bytes)?;
                }
                synced.sync_all()
            })
            .await?
            .map_err(export_error("syncing"))?;
            std::fs::rename(&partial, path).map_err(|source| StoreError::Export {
                doing: "renaming the export to",
                path: path.display().to_string(),
                source,
            })?;
            Ok(ExportOutcome {
                size_bytes: manifest.size_bytes,
                chunks_written,
                chunks_zero,
                direct,
            })
        }
        .await;
        if written.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        written
    }
}

/// The file an export writes its chunks through: `partial` opened again
/// with `O_DIRECT` (and true), or `created` itself (and false) when the
/// filesystem refuses direct I/O (said once per export) or the chunks are
/// not aligned.
fn export_file(
    created: File,
    partial: &Path,
    chunk_size_bytes: u64,
) -> std::io::Result<(File, bool)> {
    if !chunk_size_bytes.is_multiple_of(direct::ALIGN_BYTES as u64) {
        return Ok((created, false));
    }
    match direct::open_direct(partial, false) {
        Ok(file) => Ok((file, true)),
        Err(e) if direct::refuses_direct(&e) => {
            let counts = direct::WriteCounts::default();
            let what = format_args!("the export {}", partial.display());
            direct::note_refusal(&counts, &what, partial, &e);
            Ok((created, false))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_compressed_only_when_that_is_smaller_and_checked_when_read() {
        let repetitive = vec![7u8; 1 << 20];
        let digest = *blake3::hash(&repetitive).as_bytes();
        let stored = encode_chunk(&repetitive);
        assert_eq!(stored[4], CODEC_ZSTD);
        assert!(stored.len() < 1 << 12, "{} bytes", stored.len());
        assert_eq!(
            decode_chunk(&stored, &digest, 1 << 20).expect("decodes"),
            repetitive
        );
        let mut noise = vec![0u8; 4096];
        let mut x = 0x9e37_79b9_u32;
        for b in &mut noise {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let stored = encode_chunk(&noise);
        assert_eq!(stored[4], CODEC_RAW);
        let noise_digest = *blake3::hash(&noise).as_bytes();
        assert!(decode_chunk(&stored, &noise_digest, 4096).is_ok());
        // One flipped bit, a wrong length, a foreign header: each named.
        let mut flipped = stored.clone();
        flipped[100] ^= 1;
        assert!(
            decode_chunk(&flipped, &noise_digest, 4096)
                .expect_err("flipped")
                .contains("hash")
        );
        assert!(decode_chunk(&stored, &noise_digest, 4000).is_err());
        assert!(decode_chunk(b"PK\x03\x04", &noise_digest, 4096).is_err());
        // The aligned forms (direct writes) store and decode the same.
        for data in [&repetitive[..], &noise[..], &noise[..4095], &[][..]] {
            let digest = *blake3::hash(data).as_bytes();
            let aligned = encode_chunk_aligned(data);
            let decoded =
                decode_chunk_aligned(&aligned, &digest, data.len() as u64).expect("decodes");
            assert_eq!(decoded.as_slice(), data);
            assert_eq!(decoded.as_ptr() as usize % direct::ALIGN_BYTES, 0);
        }
        assert!(
            decode_chunk_aligned(&flipped, &noise_digest, 4096)
                .expect_err("flipped")
                .contains("hash")
        );
        assert!(decode_chunk_aligned(&stored, &noise_digest, 4000).is_err());
        let compressed = encode_chunk_aligned(&repetitive);
        assert!(decode_chunk_aligned(&compressed, &digest, (1 << 20) - 1).is_err());
    }

    /// `len` bytes of xorshift noise (incompressible).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn whole_compressions() -> u64 {
        WHOLE_COMPRESSIONS.with(|n| n.get())
    }

    #[test]
    fn an_incompressible_chunk_is_stored_raw_without_compressing_it_whole() {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as u64;
        println!("seed {seed}");
        let random = noise(CHUNK_SIZE_BYTES as usize, seed);
        let before = whole_compressions();
        let stored = encode_chunk_aligned(&random);
        assert_eq!(stored[4], CODEC_RAW);
        assert_eq!(&stored[5..], &random[..]);
        assert_eq!(whole_compressions(), before, "only the sample was tried");
        let digest = *blake3::hash(&random).as_bytes();
        assert_eq!(
            decode_chunk_aligned(&stored, &digest, CHUNK_SIZE_BYTES)
                .expect("decodes")
                .as_slice(),
            &random[..]
        );

        // Text-like data (a few distinct lines over and over) is
        // compressed whole.
        let lines: Vec<u8> = (0..CHUNK_SIZE_BYTES)
            .map(|i| b"row 0042 | alice | 2026-11-28\n"[(i % 30) as usize])
            .collect();
        let before = whole_compressions();
        let stored = encode_chunk_aligned(&lines);
        assert_eq!(stored[4], CODEC_ZSTD);
        assert!(stored.len() < lines.len() / 8, "{} bytes", stored.len());
        assert_eq!(whole_compressions(), before + 1);
        let digest = *blake3::hash(&lines).as_bytes();
        assert_eq!(
            decode_chunk_aligned(&stored, &digest, CHUNK_SIZE_BYTES)
                .expect("decodes")
                .as_slice(),
            &lines[..]
        );

        // Half noise, half zeros, the sample straddling both: compressed
        // whole, and kept since it shrinks.
        let mut half = noise(CHUNK_SIZE_BYTES as usize / 2, seed);
        half.resize(CHUNK_SIZE_BYTES as usize, 0);
        let before = whole_compressions();
        let stored = encode_chunk_aligned(&half);
        assert_eq!(whole_compressions(), before + 1);
        assert_eq!(stored[4], CODEC_ZSTD);

        // Below twice the sample, no sample: the whole chunk is tried.
        let small = noise(SAMPLE_BYTES, seed);
        let before = whole_compressions();
        assert_eq!(encode_chunk_aligned(&small)[4], CODEC_RAW);
        assert_eq!(whole_compressions(), before + 1);
    }

    #[test]
    fn chunk_keys_name_their_digest() {
        let digest = *blake3::hash(b"x").as_bytes();
        let key = chunk_key(&digest);
        assert!(key.starts_with("chunks/"));
        assert_eq!(digest_of_key(&key), Some(digest));
        assert_eq!(digest_of_key("indexes/x.json"), None);
    }
}
