//! One backup job, incremental by digest with no change tracking to trust:
//! asks the array for the digest of every chunk of the LU (`ChecksumRange`,
//! no data moved), records them as the digests it may reuse (`gc.rs`),
//! reads only the chunks the store does not hold (with several streams in
//! flight; hashing, checking against the array's digest and compressing
//! off the async threads), confirms with db-server that the snapshot it
//! copies is still the one confirmed before the first read, and writes the
//! index last.
//!
//! A copy-on-write snapshot is read differently: its image is no LU of the
//! array (db-server serves it from the save area over the mate), so the
//! array's digests cannot describe it. Every chunk is read through
//! db-server's `Read` of the snapshot virtual LU, hashed as read and
//! stored under that digest (the store keeps one copy of each content);
//! the before/after confirmation is the same.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures_util::{StreamExt, TryStreamExt};
use splitmirror_proto::client::{Backoff, ClientError};
use splitmirror_proto::pace::RateLimit;
use tokio_util::sync::CancellationToken;

use crate::backups::FailureKind;
use crate::blobs::BlobError;
use crate::direct::AlignedBuf;
use crate::manifest::{
    self, CHUNK_SIZE_BYTES, ChunkCounts, FORMAT_VERSION, Manifest, SnapshotMethod, SnapshotRecord,
};
use crate::owner::{
    CONFIRM_DEADLINE, HeldSnapshot, NotFrozen, OwnerFailure, SnapshotOwner, SnapshotRef,
    check_unchanged,
};
use crate::source::{DataStream, LuSource};
use crate::store::{ChunkStore, StoreError, encode_chunk_aligned, zero_digest};
use splitmirror_proto::reason::Reason;

/// Read streams in flight at once.
pub const READ_STREAMS: usize = 4;
/// Chunks of one stream being hashed, compressed and stored at once while
/// the stream goes on: a directory store fsyncs every chunk, and these
/// fsyncs overlap (one at a time, a full backup took 1.7× as long as
/// `qemu-img convert` + fsync).
const CHUNKS_IN_FLIGHT_PER_STREAM: usize = 4;
/// Each stream reads at most this many bytes of consecutive chunks.
const SEGMENT_BYTES: u64 = 64 << 20;
/// Chunks whose digests one `ChecksumRange` asks for (16 GiB of the LU,
/// about 550 KB of answer).
const CHECKSUM_CHUNKS_PER_CALL: u64 = 16 << 10;

/// What a job is asked to back up.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub backup_id: String,
    pub run_id: String,
    pub lu: u32,
    pub expected_block_count: Option<u64>,
    pub label: String,
    /// Caps the copy rate; `None` = as fast as it goes.
    pub max_bytes_per_s: Option<u64>,
    pub frozen_by: FrozenBy,
    /// Read the chunks the store holds too, and compare them.
    pub verify_read: bool,
}

/// What keeps the copied LU from changing under the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrozenBy {
    /// A snapshot, confirmed held (by `wanted.holder_run_id`, freezing the
    /// copied LU) before the job started; confirmed again after the last
    /// read.
    Snapshot {
        wanted: SnapshotRef,
        before: HeldSnapshot,
        confirmed_before_unix_ms: u64,
    },
    /// Nothing: the caller asked for a live copy.
    Live,
}

/// Progress, readable while the job runs.
#[derive(Debug)]
pub struct Progress {
    pub bytes_done: AtomicU64,
    pub bytes_total: AtomicU64,
    pub started: Instant,
}

impl Progress {
    pub fn new() -> Self {
        Self {
            bytes_done: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    pub fn throughput_bytes_per_s(&self) -> u64 {
        let seconds = self.started.elapsed().as_secs_f64();
        if seconds <= 0.0 {
            return 0;
        }
        (self.bytes_done.load(Ordering::Relaxed) as f64 / seconds) as u64
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a job failed. [`JobError::is_unavailable`] says which failures a
/// later job (a retry of the run) may not meet again.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The array failed a mode sense or a read. Retryable when the client
    /// says it is transient (the array did not answer); otherwise the array
    /// failed, not the caller.
    #[error("{0}")]
    Array(#[from] ClientError),
    /// The LU is not the size the caller expected. Not retryable.
    #[error("LU {lu} has {actual} blocks, the caller expected {expected}")]
    WrongSize { lu: u32, expected: u64, actual: u64 },
    /// A read stream ended before (or after) the end of its segment: the
    /// array sent other than asked. Not retryable as it is (an array fault).
    #[error(
        "the array ended the stream of LU {lu} at byte {ended_at_byte} of a segment ending at {end_byte}"
    )]
    ShortRead {
        lu: u32,
        ended_at_byte: u64,
        end_byte: u64,
    },
    /// The copy answered fewer chunks than the LU holds: the array sent less
    /// than asked. Not retryable as it is (an array fault).
    #[error("copied {copied} of {expected} chunks; the array sent less than asked")]
    MissingChunks { copied: u64, expected: u64 },
    /// The store failed: unreachable (retryable once it is back), refused
    /// the credentials, or could not be written (a full disk).
    #[error("writing the backup: {0}")]
    Store(#[from] StoreError),
    /// The data the array sent for a chunk does not hash to the digest the
    /// array answered for it before the copy: the frozen mate changed, or
    /// the array is faulty. Not retryable as it is.
    #[error(
        "chunk {index} of LU {lu} as read does not match the array's digest of it taken before the copy (the LU changed under a frozen copy, or the array is faulty)"
    )]
    DigestMismatch { lu: u32, index: u64 },
    /// The LU's block size does not divide the store's chunk size.
    #[error(
        "LU {lu} has {block_size_bytes}-byte blocks, which do not divide the store's {CHUNK_SIZE_BYTES}-byte chunks"
    )]
    BlockSize { lu: u32, block_size_bytes: u32 },
    /// A blocking task (hashing, writing) panicked or was dropped at
    /// shutdown. Not retryable: a bug or a stopping server.
    #[error("a blocking task of the copy failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The snapshot was not the one confirmed before the copy: the image
    /// may not be frozen. Retrying cannot help.
    #[error("the image is not known to be frozen: {0}")]
    SnapshotLost(NotFrozen),
    /// db-server did not confirm the snapshot after the copy: it did not
    /// answer within [`CONFIRM_DEADLINE`] (transient) or failed the question.
    #[error("could not confirm the snapshot after the copy: {0}")]
    NotConfirmed(ClientError),
    /// db-server refused or failed a read of a copy-on-write snapshot's
    /// virtual LU (other than invalidating it). Retryable when it did not
    /// answer.
    #[error("reading the copy-on-write snapshot through db-server: {0}")]
    SnapshotRead(ClientError),
    /// db-server invalidated the copy-on-write snapshot during the copy
    /// (its save area filled up, or db-server restarted): the image is
    /// gone. Not retryable: acquire a new snapshot.
    #[error(
        "the copy-on-write snapshot of volume {volume} was invalidated during the copy (reason snapshot-invalidated): {source}"
    )]
    SnapshotInvalidated { volume: u32, source: ClientError },
    /// The job was cancelled. Not a failure of anything.
    #[error("cancelled")]
    Cancelled,
}

impl JobError {
    /// What kind of failure this is, for the job's answer.
    pub fn failure_kind(&self) -> FailureKind {
        if self.is_unavailable() {
            return FailureKind::NodeUnavailable;
        }
        match self {
            JobError::Array(_) | JobError::ShortRead { .. } | JobError::MissingChunks { .. } => {
                FailureKind::ArrayFailed
            }
            JobError::WrongSize { .. } | JobError::BlockSize { .. } => FailureKind::WrongSize,
            JobError::DigestMismatch { .. } => FailureKind::DigestMismatch,
            JobError::Store(StoreError::Blob(BlobError::Unavailable { .. })) => {
                FailureKind::StoreUnavailable
            }
            JobError::Store(StoreError::Blob(BlobError::PermissionDenied { .. })) => {
                FailureKind::StoreDenied
            }
            JobError::Store(_) => FailureKind::StoreFailed,
            JobError::SnapshotLost(_) | JobError::SnapshotInvalidated { .. } => {
                FailureKind::NotFrozen
            }
            JobError::NotConfirmed(_)
            | JobError::SnapshotRead(_)
            | JobError::Task(_)
            | JobError::Cancelled => FailureKind::Internal,
        }
    }

    /// True when the job failed because a node did not answer: the array
    /// (a read) or db-server (the confirmation after the copy).
    pub fn is_unavailable(&self) -> bool {
        match self {
            JobError::Array(e) | JobError::NotConfirmed(e) | JobError::SnapshotRead(e) => {
                e.is_transient()
            }
            JobError::WrongSize { .. }
            | JobError::ShortRead { .. }
            | JobError::MissingChunks { .. }
            | JobError::Store(_)
            | JobError::DigestMismatch { .. }
            | JobError::BlockSize { .. }
            | JobError::Task(_)
            | JobError::SnapshotLost(_)
            | JobError::SnapshotInvalidated { .. }
            | JobError::Cancelled => false,
        }
    }
}

/// Runs the job to the end: a complete backup (its index written last), or
/// no index at all. Chunks a failed job stored stay until garbage
/// collection finds them unreferenced after the grace period.
pub async fn run(
    store: &Arc<ChunkStore>,
    source: &dyn LuSource,
    owner: &dyn SnapshotOwner,
    spec: &JobSpec,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<Manifest, JobError> {
    // A writable snapshot's mate may be written during the copy: refused
    // before anything is read (the start refuses it too, in check_held;
    // this holds for any spec however it was built).
    if let FrozenBy::Snapshot { wanted, before, .. } = &spec.frozen_by
        && before.writable
    {
        return Err(JobError::SnapshotLost(NotFrozen::Writable {
            volume: wanted.volume,
            holder_run_id: before.holder_run_id.clone(),
            mate_lu: before.mate_lu,
        }));
    }
    let started_at_unix_ms = manifest::now_unix_ms();
    let geometry = source.geometry(spec.lu).await?;
    if let Some(expected) = spec.expected_block_count
        && expected != geometry.block_count
    {
        return Err(JobError::WrongSize {
            lu: spec.lu,
            expected,
            actual: geometry.block_count,
        });
    }
    let block_size_bytes = u64::from(geometry.block_size_bytes);
    if block_size_bytes == 0 || !CHUNK_SIZE_BYTES.is_multiple_of(block_size_bytes) {
        return Err(JobError::BlockSize {
            lu: spec.lu,
            block_size_bytes: geometry.block_size_bytes,
        });
    }
    let size_bytes = geometry.block_count * block_size_bytes;
    progress.bytes_total.store(size_bytes, Ordering::Relaxed);
    let reader = match &spec.frozen_by {
        FrozenBy::Snapshot { wanted, before, .. } if before.method == SnapshotMethod::Cow => {
            Reader::Snapshot {
                owner,
                volume: wanted.volume,
                mate: wanted.mate,
            }
        }
        FrozenBy::Snapshot { .. } | FrozenBy::Live => Reader::Array(source),
    };
    let (mut digests, plan) = match reader {
        Reader::Array(source) => {
            let digests =
                array_digests(source, spec.lu, geometry.block_count, block_size_bytes).await?;
            let plan = Plan::new(&digests, size_bytes, spec.verify_read);
            (digests, plan)
        }
        // No digest is known before the read: every chunk is read, and its
        // digest is the one of the data read.
        Reader::Snapshot { .. } => {
            let chunks = size_bytes.div_ceil(CHUNK_SIZE_BYTES) as usize;
            (vec![[0; 32]; chunks], Plan::read_all(chunks, size_bytes))
        }
    };
    let (writer, held) = store
        .begin_writing(&spec.backup_id, &plan.nonzero_digests(), cancel)
        .await?;
    let copied = async {
        let plan = plan.with_held(&held);
        let held = Arc::new(held);
        progress
            .bytes_done
            .fetch_add(plan.bytes_not_read(), Ordering::Relaxed);
        let limit = spec.max_bytes_per_s.map(RateLimit::new);
        let stored = futures_util::stream::iter(plan.segments(block_size_bytes))
            .map(|segment| {
                copy_segment(
                    store,
                    reader,
                    &held,
                    spec,
                    segment,
                    progress,
                    cancel,
                    limit.as_ref(),
                )
            })
            .buffer_unordered(READ_STREAMS)
            .try_fold(SegmentCounts::default(), |total, one| async move {
                Ok(total + one)
            })
            .await?;
        for &(index, digest) in &stored.replaced {
            digests[index as usize] = digest;
        }
        if stored.chunks != plan.chunks_to_read() {
            return Err(JobError::MissingChunks {
                copied: stored.chunks,
                expected: plan.chunks_to_read(),
            });
        }
        // The last read is done: the image is frozen only if the snapshot
        // confirmed before the first read still holds the mate now.
        let snapshot = match &spec.frozen_by {
            FrozenBy::Snapshot {
                wanted,
                before,
                confirmed_before_unix_ms,
            } => {
                let confirmed_after_unix_ms = confirm_after(owner, wanted, before, cancel).await?;
                Some(SnapshotRecord {
                    volume: wanted.volume,
                    holder_run_id: wanted.holder_run_id.clone(),
                    ledger_sequence: before.ledger_sequence,
                    snapshot_id: before.snapshot_id,
                    owner: owner.describe(),
                    confirmed_before_unix_ms: *confirmed_before_unix_ms,
                    confirmed_after_unix_ms,
                    method: before.method,
                    mate: wanted.mate,
                })
            }
            FrozenBy::Live => None,
        };
        let counts = ChunkCounts {
            // Read through db-server, every chunk was read: the zero ones
            // and those whose content the store held are counted as such.
            chunks_read: stored.chunks - stored.chunks_zero_read - stored.chunks_held_read,
            chunks_reused: plan.chunks_reused() + stored.chunks_held_read,
            chunks_zero: plan.chunks_zero() + stored.chunks_zero_read,
            new_bytes_stored: stored.new_bytes_stored,
            bytes_read: stored.bytes_read,
            verify_read: spec.verify_read,
        };
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            backup_id: spec.backup_id.clone(),
            run_id: spec.run_id.clone(),
            label: spec.label.clone(),
            source_array: source.describe(),
            source_lu: spec.lu,
            block_size_bytes: geometry.block_size_bytes,
            block_count: geometry.block_count,
            size_bytes,
            started_at_unix_ms,
            completed_at_unix_ms: manifest::now_unix_ms(),
            ledger_sequence: snapshot.as_ref().map(|s| s.ledger_sequence),
            live: snapshot.is_none(),
            snapshot,
            chunk_size_bytes: CHUNK_SIZE_BYTES,
            image_digest: manifest::to_hex(&manifest::image_digest(&digests)),
            chunk_digests: digests.iter().map(manifest::to_hex).collect(),
            counts: Some(counts),
        };
        if cancel.is_cancelled() {
            return Err(JobError::Cancelled);
        }
        writer.check_fresh()?;
        store.write_index(&manifest).await?;
        Ok(manifest)
    }
    .await;
    writer.finish(store).await;
    copied
}

/// The array's digest of every chunk of the LU, asked in pieces.
async fn array_digests(
    source: &dyn LuSource,
    lu: u32,
    block_count: u64,
    block_size_bytes: u64,
) -> Result<Vec<[u8; 32]>, JobError> {
    let chunk_blocks = CHUNK_SIZE_BYTES / block_size_bytes;
    let blocks_per_call = chunk_blocks * CHECKSUM_CHUNKS_PER_CALL;
    let mut digests = Vec::with_capacity(block_count.div_ceil(chunk_blocks) as usize);
    let mut lba = 0;
    while lba < block_count {
        let blocks = blocks_per_call.min(block_count - lba);
        digests.extend(source.checksums(lu, lba, blocks, chunk_blocks).await?);
        lba += blocks;
    }
    let expected = block_count.div_ceil(chunk_blocks);
    if digests.len() as u64 != expected {
        return Err(JobError::MissingChunks {
            copied: digests.len() as u64,
            expected,
        });
    }
    Ok(digests)
}

/// Where the job reads the image.
#[derive(Clone, Copy)]
enum Reader<'a> {
    /// An LU of the array: a split snapshot's mate, or a live LU.
    Array(&'a dyn LuSource),
    /// db-server's snapshot virtual LU of `volume`: a copy-on-write
    /// snapshot, whose image is no LU of the array.
    Snapshot {
        owner: &'a dyn SnapshotOwner,
        volume: u32,
        mate: u32,
    },
}

impl Reader<'_> {
    async fn read(&self, lu: u32, lba: u64, blocks: u64) -> Result<DataStream, JobError> {
        match *self {
            Reader::Array(source) => Ok(source.read(lu, lba, blocks).await?),
            Reader::Snapshot {
                owner,
                volume,
                mate,
            } => owner
                .read_snapshot(volume, mate, lba, blocks)
                .await
                .map_err(|e| self.error(e)),
        }
    }

    /// The job's error for a failed read: an invalidated copy-on-write
    /// snapshot says so.
    fn error(&self, error: ClientError) -> JobError {
        match *self {
            Reader::Array(_) => JobError::Array(error),
            Reader::Snapshot { volume, .. } => snapshot_read_error(volume, error),
        }
    }
}

/// A failed read of a copy-on-write snapshot through db-server: invalidated
/// (reason `snapshot-invalidated`, decided by the reason, not the text), or
/// another failure.
fn snapshot_read_error(volume: u32, error: ClientError) -> JobError {
    if error.reason == Some(Reason::SnapshotInvalidated) {
        JobError::SnapshotInvalidated {
            volume,
            source: error,
        }
    } else {
        JobError::SnapshotRead(error)
    }
}

/// What the job does with each chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkAction {
    /// All zeros: neither read nor stored.
    Zero,
    /// The store holds it (or an earlier chunk of this job stores it).
    Reuse,
    /// The store holds it, and `verify_read` asks to read and compare it.
    ReadAndCompare,
    /// Read, compare and store.
    ReadAndStore,
}

/// The action for each chunk, decided from the array's digests and the
/// chunks the store holds.
struct Plan {
    digests: Vec<[u8; 32]>,
    /// False when no digest is known before the read (a copy-on-write
    /// snapshot): `digests` are placeholders and every chunk is read.
    digests_known: bool,
    size_bytes: u64,
    verify_read: bool,
    actions: Vec<ChunkAction>,
}

impl Plan {
    fn new(digests: &[[u8; 32]], size_bytes: u64, verify_read: bool) -> Self {
        Self {
            digests: digests.to_vec(),
            digests_known: true,
            size_bytes,
            verify_read,
            actions: Vec::new(),
        }
    }

    /// `chunks` chunks whose digests are not known before the read: each
    /// is read, hashed and stored.
    fn read_all(chunks: usize, size_bytes: u64) -> Self {
        Self {
            digests: vec![[0; 32]; chunks],
            digests_known: false,
            size_bytes,
            verify_read: false,
            actions: Vec::new(),
        }
    }

    fn len_bytes(&self, index: usize) -> u64 {
        CHUNK_SIZE_BYTES.min(self.size_bytes - index as u64 * CHUNK_SIZE_BYTES)
    }

    fn is_zero(&self, index: usize) -> bool {
        self.digests[index] == zero_digest(self.len_bytes(index))
    }

    /// The digests a backup may reference in the store (for the writer
    /// record): all but the all-zero chunks'.
    fn nonzero_digests(&self) -> Vec<[u8; 32]> {
        if !self.digests_known {
            return Vec::new();
        }
        (0..self.digests.len())
            .filter(|&i| !self.is_zero(i))
            .map(|i| self.digests[i])
            .collect()
    }

    fn with_held(mut self, held: &HashSet<[u8; 32]>) -> Self {
        if !self.digests_known {
            self.actions = vec![ChunkAction::ReadAndStore; self.digests.len()];
            return self;
        }
        let mut stored_by_this_job = HashSet::new();
        self.actions = (0..self.digests.len())
            .map(|i| {
                let digest = self.digests[i];
                if self.is_zero(i) {
                    ChunkAction::Zero
                } else if held.contains(&digest) {
                    if self.verify_read {
                        ChunkAction::ReadAndCompare
                    } else {
                        ChunkAction::Reuse
                    }
                } else if !stored_by_this_job.insert(digest) {
                    // The same data twice in one LU: stored once.
                    if self.verify_read {
                        ChunkAction::ReadAndCompare
                    } else {
                        ChunkAction::Reuse
                    }
                } else {
                    ChunkAction::ReadAndStore
                }
            })
            .collect();
        self
    }

    fn count(&self, wanted: impl Fn(ChunkAction) -> bool) -> u64 {
        self.actions.iter().filter(|&&a| wanted(a)).count() as u64
    }

    fn chunks_zero(&self) -> u64 {
        self.count(|a| a == ChunkAction::Zero)
    }

    fn chunks_reused(&self) -> u64 {
        self.count(|a| matches!(a, ChunkAction::Reuse | ChunkAction::ReadAndCompare))
    }

    fn chunks_to_read(&self) -> u64 {
        self.count(|a| matches!(a, ChunkAction::ReadAndCompare | ChunkAction::ReadAndStore))
    }

    /// The bytes of the chunks not read (zero and reused): done at once.
    fn bytes_not_read(&self) -> u64 {
        (0..self.actions.len())
            .filter(|&i| matches!(self.actions[i], ChunkAction::Zero | ChunkAction::Reuse))
            .map(|i| self.len_bytes(i))
            .sum()
    }

    /// Runs of consecutive chunks to read, each at most [`SEGMENT_BYTES`].
    fn segments(&self, block_size_bytes: u64) -> Vec<Segment> {
        let per_segment = (SEGMENT_BYTES / CHUNK_SIZE_BYTES) as usize;
        let mut segments: Vec<Segment> = Vec::new();
        for (index, action) in self.actions.iter().enumerate() {
            if matches!(action, ChunkAction::Zero | ChunkAction::Reuse) {
                continue;
            }
            let chunk = SegmentChunk {
                index: index as u64,
                digest: self.digests_known.then_some(self.digests[index]),
                len_bytes: self.len_bytes(index),
                store: *action == ChunkAction::ReadAndStore,
            };
            match segments.last_mut() {
                Some(last)
                    if last.chunks.len() < per_segment
                        && last.chunks.last().map(|c| c.index + 1) == Some(index as u64) =>
                {
                    last.chunks.push(chunk);
                }
                _ => segments.push(Segment {
                    block_size_bytes,
                    chunks: vec![chunk],
                }),
            }
        }
        segments
    }
}

/// Consecutive chunks read with one stream.
struct Segment {
    block_size_bytes: u64,
    chunks: Vec<SegmentChunk>,
}

#[derive(Debug, Clone, Copy)]
struct SegmentChunk {
    index: u64,
    /// The array's digest of it, taken before the copy; `None` when none
    /// is known (a copy-on-write snapshot): the data read is stored under
    /// its own digest.
    digest: Option<[u8; 32]>,
    len_bytes: u64,
    /// Store it (else only compare it).
    store: bool,
}

/// What a segment read and stored.
#[derive(Debug, Clone, Default)]
struct SegmentCounts {
    chunks: u64,
    bytes_read: u64,
    new_bytes_stored: u64,
    /// Chunks read without a known digest that were all zeros (not
    /// stored).
    chunks_zero_read: u64,
    /// Chunks read without a known digest whose content the store held
    /// (put again all the same: see [`spawn_chunk`]).
    chunks_held_read: u64,
    /// Chunks whose digest is the one of the data read, not the one the
    /// plan knew: live copies' chunks that changed after the array digested
    /// them, and every chunk read without a known digest.
    replaced: Vec<(u64, [u8; 32])>,
}

impl std::ops::Add for SegmentCounts {
    type Output = Self;
    fn add(mut self, other: Self) -> Self {
        self.replaced.extend(other.replaced);
        Self {
            chunks: self.chunks + other.chunks,
            bytes_read: self.bytes_read + other.bytes_read,
            new_bytes_stored: self.new_bytes_stored + other.new_bytes_stored,
            chunks_zero_read: self.chunks_zero_read + other.chunks_zero_read,
            chunks_held_read: self.chunks_held_read + other.chunks_held_read,
            replaced: self.replaced,
        }
    }
}

/// Asks db-server, after the last read, whether the snapshot is still the
/// one confirmed before the first: held by the same run, with the same
/// snapshot id. Retries a db-server that does not answer for
/// [`CONFIRM_DEADLINE`] (a restart keeps its snapshots), waiting by the
/// shared [`Backoff`]; answers when it confirmed.
async fn confirm_after(
    owner: &dyn SnapshotOwner,
    wanted: &SnapshotRef,
    before: &HeldSnapshot,
    cancel: &CancellationToken,
) -> Result<u64, JobError> {
    let give_up = Instant::now() + CONFIRM_DEADLINE;
    let mut backoff = Backoff::standard();
    loop {
        let error = match owner.snapshot(wanted.volume, wanted.mate).await {
            Ok(now) => {
                check_unchanged(before, &now).map_err(JobError::SnapshotLost)?;
                return Ok(manifest::now_unix_ms());
            }
            Err(error) => error,
        };
        match OwnerFailure::of(&error) {
            OwnerFailure::NoSnapshot | OwnerFailure::UnknownVolume => {
                return Err(JobError::SnapshotLost(NotFrozen::Deleted {
                    volume: wanted.volume,
                    holder_run_id: wanted.holder_run_id.clone(),
                    cause: Box::new(error),
                }));
            }
            OwnerFailure::Unavailable => {
                let wait = backoff.next_wait();
                if Instant::now() + wait >= give_up {
                    return Err(JobError::NotConfirmed(error));
                }
                tracing::warn!(
                    "confirming the snapshot of volume {}: {error} — retrying in {wait:?}",
                    wanted.volume
                );
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = cancel.cancelled() => return Err(JobError::Cancelled),
                }
            }
            OwnerFailure::Failed => return Err(JobError::NotConfirmed(error)),
        }
    }
}

/// Copies one segment: receives its chunks in order and hands each to a
/// task (hash and compare off the async threads, compress, store), up to
/// [`CHUNKS_IN_FLIGHT_PER_STREAM`] at once while receiving the next.
#[allow(clippy::too_many_arguments)]
async fn copy_segment(
    store: &Arc<ChunkStore>,
    reader: Reader<'_>,
    held: &Arc<HashSet<[u8; 32]>>,
    spec: &JobSpec,
    segment: Segment,
    progress: &Progress,
    cancel: &CancellationToken,
    limit: Option<&RateLimit>,
) -> Result<SegmentCounts, JobError> {
    let first = segment.chunks[0];
    let lba = first.index * CHUNK_SIZE_BYTES / segment.block_size_bytes;
    let len_bytes: u64 = segment.chunks.iter().map(|c| c.len_bytes).sum();
    let mut stream = reader
        .read(spec.lu, lba, len_bytes / segment.block_size_bytes)
        .await?;
    let mut counts = SegmentCounts::default();
    let mut chunks = segment.chunks.iter();
    let mut next_chunk = chunks.next().copied();
    let mut buffer: Vec<u8> = Vec::with_capacity(CHUNK_SIZE_BYTES as usize);
    let mut pending: std::collections::VecDeque<ChunkTask> = std::collections::VecDeque::new();
    let live = spec.frozen_by == FrozenBy::Live;
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            () = cancel.cancelled() => return Err(JobError::Cancelled),
        };
        let data = match next {
            Some(data) => data.map_err(|e| reader.error(e))?,
            None => break,
        };
        if let Some(limit) = limit {
            limit.take(data.len() as u64).await;
        }
        let mut data = data;
        loop {
            let Some(chunk) = next_chunk else {
                // More than asked: the array sent other than the range.
                return Err(JobError::ShortRead {
                    lu: spec.lu,
                    ended_at_byte: (first.index * CHUNK_SIZE_BYTES) + len_bytes + data.len() as u64,
                    end_byte: first.index * CHUNK_SIZE_BYTES + len_bytes,
                });
            };
            let want = chunk.len_bytes as usize - buffer.len();
            // The array sends whole 1 MiB chunks at chunk boundaries: take
            // them as they come instead of copying them into the buffer.
            let whole = if buffer.is_empty() && data.len() == want {
                std::mem::take(&mut data)
            } else {
                let take = want.min(data.len());
                buffer.extend_from_slice(&data[..take]);
                data.drain(..take);
                if buffer.len() < chunk.len_bytes as usize {
                    break;
                }
                std::mem::replace(&mut buffer, Vec::with_capacity(CHUNK_SIZE_BYTES as usize))
            };
            if pending.len() >= CHUNKS_IN_FLIGHT_PER_STREAM
                && let Some(oldest) = pending.pop_front()
            {
                counts = counts + finish(oldest, spec.lu, live, progress).await?;
            }
            pending.push_back(spawn_chunk(store.clone(), held.clone(), chunk, whole, live));
            next_chunk = chunks.next().copied();
            if data.is_empty() {
                break;
            }
        }
    }
    while let Some(oldest) = pending.pop_front() {
        counts = counts + finish(oldest, spec.lu, live, progress).await?;
    }
    if next_chunk.is_some() || !buffer.is_empty() {
        let read = counts.bytes_read + buffer.len() as u64;
        return Err(JobError::ShortRead {
            lu: spec.lu,
            ended_at_byte: first.index * CHUNK_SIZE_BYTES + read,
            end_byte: first.index * CHUNK_SIZE_BYTES + len_bytes,
        });
    }
    Ok(counts)
}

/// What became of one chunk read.
enum ChunkOutcome {
    /// Its data hashes to the array's digest (or, live, was stored under
    /// its own: `replaced`); `stored_bytes` were added to the store (0 when
    /// it was only compared).
    Matched {
        len_bytes: u64,
        stored_bytes: u64,
        replaced: Option<(u64, [u8; 32])>,
        /// Read without a known digest: all zeros, or content the store
        /// held.
        unknown: Option<UnknownChunk>,
    },
    /// Its data does not hash to the array's digest.
    Mismatch { index: u64 },
}

/// What a chunk read without a known digest turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnknownChunk {
    Zero,
    Held,
    New,
}

/// What the blocking task of a chunk did with it.
enum Stored {
    /// Its data does not hash to the array's digest (not stored).
    Mismatch,
    /// Only compared: the store holds it already.
    Nothing,
    /// Written to the store from the blocking task: the bytes stored.
    Written(Result<u64, StoreError>),
    /// Encoded, to be put by the async task (the store writes only
    /// asynchronously).
    ToPut(AlignedBuf),
}

type ChunkTask = tokio::task::JoinHandle<Result<ChunkOutcome, JobError>>;

/// Hashes a chunk, compares it with the array's digest and, when it is to
/// be stored, compresses and stores it. A live copy (nothing froze the LU)
/// stores a changed chunk under the digest of what was read. A chunk with
/// no known digest (a copy-on-write snapshot) is stored under its own
/// unless it is all zeros — also when the store holds that content: the
/// writer record could not name it before the read, so only a fresh put
/// keeps garbage collection (`gc.rs`) from removing it under this backup.
/// A directory store is written from the same blocking task that hashed
/// and encoded the chunk (one thread hop per chunk); an S3 store from this
/// task.
fn spawn_chunk(
    store: Arc<ChunkStore>,
    held: Arc<HashSet<[u8; 32]>>,
    chunk: SegmentChunk,
    data: Vec<u8>,
    live: bool,
) -> ChunkTask {
    tokio::spawn(async move {
        let len_bytes = data.len() as u64;
        let blocking_store = store.clone();
        let (digest, stored) = tokio::task::spawn_blocking(move || {
            let digest = *blake3::hash(&data).as_bytes();
            let differs = chunk.digest.is_some_and(|expected| expected != digest);
            if differs && !live {
                return (digest, Stored::Mismatch);
            }
            let wanted = match chunk.digest {
                Some(_) => chunk.store || (live && differs),
                None => digest != zero_digest(len_bytes),
            };
            if !wanted {
                return (digest, Stored::Nothing);
            }
            let encoded = encode_chunk_aligned(&data);
            drop(data);
            let stored_bytes = encoded.len() as u64;
            match blocking_store.put_chunk_aligned_blocking(&digest, encoded) {
                Ok(put) => (digest, Stored::Written(put.map(|()| stored_bytes))),
                Err(encoded) => (digest, Stored::ToPut(encoded)),
            }
        })
        .await?;
        let stored_bytes = match stored {
            Stored::Mismatch => return Ok(ChunkOutcome::Mismatch { index: chunk.index }),
            Stored::Nothing => 0,
            Stored::Written(put) => put?,
            Stored::ToPut(encoded) => {
                let stored_bytes = encoded.len() as u64;
                store.put_chunk_aligned(&digest, encoded).await?;
                stored_bytes
            }
        };
        let unknown = chunk.digest.is_none().then(|| {
            if digest == zero_digest(len_bytes) {
                UnknownChunk::Zero
            } else if held.contains(&digest) {
                UnknownChunk::Held
            } else {
                UnknownChunk::New
            }
        });
        Ok(ChunkOutcome::Matched {
            len_bytes,
            // Content the store held adds nothing new, though put again.
            stored_bytes: if unknown == Some(UnknownChunk::Held) {
                0
            } else {
                stored_bytes
            },
            replaced: (chunk.digest != Some(digest)).then_some((chunk.index, digest)),
            unknown,
        })
    })
}

async fn finish(
    task: ChunkTask,
    lu: u32,
    live: bool,
    progress: &Progress,
) -> Result<SegmentCounts, JobError> {
    match task.await?? {
        ChunkOutcome::Matched {
            len_bytes,
            stored_bytes,
            replaced,
            unknown,
        } => {
            progress.bytes_done.fetch_add(len_bytes, Ordering::Relaxed);
            splitmirror_proto::telemetry::record_backup_bytes(len_bytes);
            Ok(SegmentCounts {
                chunks: 1,
                bytes_read: len_bytes,
                new_bytes_stored: stored_bytes,
                chunks_zero_read: u64::from(unknown == Some(UnknownChunk::Zero)),
                chunks_held_read: u64::from(unknown == Some(UnknownChunk::Held)),
                replaced: replaced.into_iter().collect(),
            })
        }
        ChunkOutcome::Mismatch { index } => {
            debug_assert!(!live);
            Err(JobError::DigestMismatch { lu, index })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::owner::HeldSnapshot;
    use crate::source::{BoxFuture, Geometry};
    use crate::store::StoreLocation;
    use splitmirror_proto::client::ErrorKind;
    use std::time::Duration;

    const BLOCK_SIZE_BYTES: u32 = 4096;
    const VOLUME: u32 = 0;
    const MATE_LU: u32 = 2;

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

    /// Chunk 0 noise A, chunk 1 zeros, chunk 2 noise A again, then half a
    /// chunk of noise B.
    fn image() -> Vec<u8> {
        let chunk = CHUNK_SIZE_BYTES as usize;
        let a = noise(chunk, 1);
        let mut image = a.clone();
        image.extend(vec![0; chunk]);
        image.extend(a);
        image.extend(noise(chunk / 2, 2));
        image
    }

    /// The array: answers the geometry; any read or digest fails the test,
    /// since a copy-on-write snapshot's image is no LU of the array.
    struct ArrayThatMustNotBeRead {
        block_count: u64,
    }

    fn refused(what: &str) -> ClientError {
        ClientError::local(
            ErrorKind::Internal,
            "array",
            "test",
            what,
            format!("{what}: a copy-on-write backup must not ask the array for it"),
        )
    }

    impl LuSource for ArrayThatMustNotBeRead {
        fn describe(&self) -> String {
            "array".into()
        }
        fn geometry(&self, _lu: u32) -> BoxFuture<'_, Result<Geometry, ClientError>> {
            Box::pin(async move {
                Ok(Geometry {
                    block_size_bytes: BLOCK_SIZE_BYTES,
                    block_count: self.block_count,
                })
            })
        }
        fn read(&self, _: u32, _: u64, _: u64) -> BoxFuture<'_, Result<DataStream, ClientError>> {
            Box::pin(async { Err(refused("reading the mate")) })
        }
        fn checksums(
            &self,
            _: u32,
            _: u64,
            _: u64,
            _: u64,
        ) -> BoxFuture<'_, Result<Vec<[u8; 32]>, ClientError>> {
            Box::pin(async { Err(refused("ChecksumRange")) })
        }
    }

    /// db-server holding a copy-on-write snapshot of `image`; its reads
    /// come in 300 KiB pieces (not chunk-aligned), and with
    /// `invalidated_at_byte` a read past that byte of the volume fails as
    /// db-server fails a read of an invalidated snapshot.
    struct CowOwner {
        image: Vec<u8>,
        invalidated_at_byte: Option<u64>,
        /// Which of the volume's mates holds the snapshot; asked about
        /// another, it answers as db-server does for a mate not split.
        mate: u32,
        /// The mate each question named, in order ("get" or "read").
        asked: std::sync::Mutex<Vec<(&'static str, u32)>>,
    }

    impl CowOwner {
        fn of_mate(image: Vec<u8>, mate: u32) -> Self {
            Self {
                image,
                invalidated_at_byte: None,
                mate,
                asked: std::sync::Mutex::new(Vec::new()),
            }
        }

        fn asked(&self) -> Vec<(&'static str, u32)> {
            self.asked.lock().expect("not poisoned").clone()
        }
    }

    impl SnapshotOwner for CowOwner {
        fn describe(&self) -> String {
            "db-server".into()
        }
        fn snapshot(
            &self,
            volume: u32,
            mate: u32,
        ) -> BoxFuture<'_, Result<HeldSnapshot, ClientError>> {
            self.asked.lock().expect("not poisoned").push(("get", mate));
            let answer = match mate == self.mate {
                true => Ok(HeldSnapshot {
                    mate,
                    ..held(volume, self.image.len() as u64)
                }),
                false => Err(ClientError::from_status(
                    "db-server",
                    "test",
                    "asking",
                    &tonic::Status::failed_precondition("no snapshot"),
                )),
            };
            Box::pin(async move { answer })
        }
        fn read_snapshot(
            &self,
            volume: u32,
            mate: u32,
            lba: u64,
            blocks: u64,
        ) -> BoxFuture<'_, Result<DataStream, ClientError>> {
            assert_eq!(volume, VOLUME);
            self.asked
                .lock()
                .expect("not poisoned")
                .push(("read", mate));
            let start = (lba * u64::from(BLOCK_SIZE_BYTES)) as usize;
            let end = start + (blocks * u64::from(BLOCK_SIZE_BYTES)) as usize;
            let invalidated_at = self.invalidated_at_byte.map(|b| b as usize);
            let pieces: Vec<Result<Vec<u8>, ClientError>> = self.image[start..end]
                .chunks(300 << 10)
                .enumerate()
                .map(|(i, piece)| {
                    let at = start + i * (300 << 10);
                    match invalidated_at {
                        Some(limit) if at + piece.len() > limit => {
                            let status = Reason::SnapshotInvalidated.attach(
                                tonic::Status::failed_precondition(
                                    "the save area (LU 6, 16 blocks) filled up after 16 blocks were saved",
                                ),
                            );
                            Err(ClientError::from_status("db-server", "test", "reading", &status))
                        }
                        _ => Ok(piece.to_vec()),
                    }
                })
                .collect();
            Box::pin(async move {
                let stream: DataStream = Box::pin(futures_util::stream::iter(pieces));
                Ok(stream)
            })
        }
    }

    fn held(volume: u32, size_bytes: u64) -> HeldSnapshot {
        HeldSnapshot {
            volume,
            holder_run_id: "run-cow".into(),
            mate_lu: MATE_LU,
            ledger_sequence: 42,
            block_size_bytes: BLOCK_SIZE_BYTES,
            block_count: size_bytes / u64::from(BLOCK_SIZE_BYTES),
            snapshot_id: 0xc0e,
            mate: 1,
            method: SnapshotMethod::Cow,
            writable: false,
        }
    }

    fn spec(backup_id: &str, size_bytes: u64) -> JobSpec {
        spec_of_mate(backup_id, size_bytes, 1)
    }

    /// A backup of the snapshot of the volume's mate `mate`.
    fn spec_of_mate(backup_id: &str, size_bytes: u64, mate: u32) -> JobSpec {
        JobSpec {
            backup_id: backup_id.into(),
            run_id: format!("run-of-{backup_id}"),
            lu: MATE_LU,
            expected_block_count: None,
            label: String::new(),
            max_bytes_per_s: None,
            frozen_by: FrozenBy::Snapshot {
                wanted: SnapshotRef {
                    volume: VOLUME,
                    holder_run_id: "run-cow".into(),
                    mate,
                },
                before: HeldSnapshot {
                    mate,
                    ..held(VOLUME, size_bytes)
                },
                confirmed_before_unix_ms: 1,
            },
            verify_read: false,
        }
    }

    async fn backup(
        store: &Arc<ChunkStore>,
        owner: &CowOwner,
        backup_id: &str,
    ) -> Result<Manifest, JobError> {
        let size_bytes = owner.image.len() as u64;
        let array = ArrayThatMustNotBeRead {
            block_count: size_bytes / u64::from(BLOCK_SIZE_BYTES),
        };
        run(
            store,
            &array,
            owner,
            &spec_of_mate(backup_id, size_bytes, owner.mate),
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
    }

    /// A chunk store in `dir/store` (an hour's grace).
    async fn dir_store(dir: &std::path::Path) -> Arc<ChunkStore> {
        Arc::new(
            ChunkStore::create(
                &StoreLocation::Dir(dir.join("store")),
                Duration::from_secs(3600),
            )
            .await
            .expect("a store"),
        )
    }
    #[tokio::test]
    async fn a_copy_on_write_snapshot_is_read_whole_through_db_server_and_deduplicated_by_content()
    {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = dir_store(dir.path()).await;
        let owner = CowOwner::of_mate(image(), 1);
        let first_id = uuid::Uuid::now_v7().to_string();
        let first = backup(&store, &owner, &first_id).await.expect("backs up");
        let expected: Vec<String> = owner
            .image
            .chunks(CHUNK_SIZE_BYTES as usize)
            .map(|c| manifest::to_hex(blake3::hash(c).as_bytes()))
            .collect();
        assert_eq!(first.chunk_digests, expected);
        let snapshot = first.snapshot.as_ref().expect("frozen");
        assert_eq!(snapshot.method, SnapshotMethod::Cow);
        assert_eq!(snapshot.snapshot_id, 0xc0e);
        let counts = first.counts.expect("counts");
        // Every chunk was read; the zero one is not stored.
        assert_eq!(counts.bytes_read, owner.image.len() as u64);
        assert_eq!(
            (counts.chunks_read, counts.chunks_reused, counts.chunks_zero),
            (3, 0, 1)
        );
        assert!(counts.new_bytes_stored > 0);
        let exported = dir.path().join("first.img");
        store.export(&first_id, &exported).await.expect("exports");
        assert!(std::fs::read(&exported).expect("reads") == owner.image);

        // Again: every chunk read again, nothing new stored.
        let second_id = uuid::Uuid::now_v7().to_string();
        let second = backup(&store, &owner, &second_id).await.expect("backs up");
        assert_eq!(second.image_digest, first.image_digest);
        let counts = second.counts.expect("counts");
        assert_eq!(counts.bytes_read, owner.image.len() as u64);
        assert_eq!(
            (
                counts.chunks_read,
                counts.chunks_reused,
                counts.chunks_zero,
                counts.new_bytes_stored
            ),
            (0, 3, 1, 0)
        );
    }

    #[tokio::test]
    async fn the_snapshot_of_mate_two_is_confirmed_and_read_as_mate_two_and_recorded() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = dir_store(dir.path()).await;
        let owner = CowOwner::of_mate(image(), 2);
        let id = uuid::Uuid::now_v7().to_string();
        let manifest = backup(&store, &owner, &id).await.expect("backs up");
        let asked = owner.asked();
        // Every read and the confirmation after the last named mate 2.
        assert!(asked.iter().all(|&(_, mate)| mate == 2), "{asked:?}");
        assert_eq!(asked.last(), Some(&("get", 2)), "{asked:?}");
        assert!(asked.iter().any(|&(what, _)| what == "read"), "{asked:?}");
        let snapshot = manifest.snapshot.as_ref().expect("frozen");
        assert_eq!(snapshot.mate, 2);

        // A spec naming mate 1 while only mate 2 is split: the
        // confirmation after the copy asks about mate 1 and finds none.
        let error = run(
            &store,
            &ArrayThatMustNotBeRead {
                block_count: owner.image.len() as u64 / u64::from(BLOCK_SIZE_BYTES),
            },
            &owner,
            &spec_of_mate("of-mate-1", owner.image.len() as u64, 1),
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .expect_err("mate 1 holds no snapshot");
        assert!(
            matches!(error, JobError::SnapshotLost(NotFrozen::Deleted { .. })),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_snapshot_invalidated_during_the_copy_fails_the_job_with_the_reason() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = dir_store(dir.path()).await;
        let owner = CowOwner {
            invalidated_at_byte: Some(2 * CHUNK_SIZE_BYTES),
            ..CowOwner::of_mate(image(), 1)
        };
        let id = uuid::Uuid::now_v7().to_string();
        let error = backup(&store, &owner, &id)
            .await
            .expect_err("the snapshot was invalidated");
        assert!(
            matches!(error, JobError::SnapshotInvalidated { volume: VOLUME, .. }),
            "{error:?}"
        );
        assert_eq!(error.failure_kind(), FailureKind::NotFrozen);
        assert!(!error.is_unavailable());
        let text = error.to_string();
        assert!(text.contains("snapshot-invalidated"), "{text}");
        assert!(text.contains("filled up"), "{text}");
        assert!(store.backup_ids().await.expect("lists").is_empty());
    }

    /// db-server that must not be asked anything.
    struct OwnerThatMustNotBeAsked;

    impl SnapshotOwner for OwnerThatMustNotBeAsked {
        fn describe(&self) -> String {
            "db-server".into()
        }
        fn snapshot(&self, _: u32, _: u32) -> BoxFuture<'_, Result<HeldSnapshot, ClientError>> {
            Box::pin(async { Err(refused("GetSnapshot")) })
        }
        fn read_snapshot(
            &self,
            _: u32,
            _: u32,
            _: u64,
            _: u64,
        ) -> BoxFuture<'_, Result<DataStream, ClientError>> {
            Box::pin(async { Err(refused("reading the snapshot virtual LU")) })
        }
    }

    #[tokio::test]
    async fn a_writable_snapshot_fails_the_job_before_the_first_read() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = dir_store(dir.path()).await;
        let size_bytes = 4 * CHUNK_SIZE_BYTES;
        let mut spec = spec("writable", size_bytes);
        let FrozenBy::Snapshot { before, wanted, .. } = &mut spec.frozen_by else {
            unreachable!("spec() names a snapshot")
        };
        // A split snapshot, acquired writable.
        *before = HeldSnapshot {
            holder_run_id: "run-w".into(),
            method: SnapshotMethod::Split,
            writable: true,
            ..before.clone()
        };
        wanted.holder_run_id = "run-w".into();
        // The array fails the test if its mate is read or digested.
        let array = ArrayThatMustNotBeRead {
            block_count: size_bytes / u64::from(BLOCK_SIZE_BYTES),
        };
        let progress = Progress::new();
        let error = run(
            &store,
            &array,
            &OwnerThatMustNotBeAsked,
            &spec,
            &progress,
            &CancellationToken::new(),
        )
        .await
        .expect_err("a writable snapshot is not frozen");
        assert!(
            matches!(
                &error,
                JobError::SnapshotLost(NotFrozen::Writable { volume: VOLUME, holder_run_id, mate_lu: MATE_LU })
                    if holder_run_id == "run-w"
            ),
            "{error:?}"
        );
        assert_eq!(error.failure_kind(), FailureKind::NotFrozen);
        assert!(!error.is_unavailable());
        let text = error.to_string();
        assert!(
            text.contains("is writable: its mate (LU 2) is not a frozen image"),
            "{text}"
        );
        assert_eq!(progress.bytes_done.load(Ordering::Relaxed), 0);
        assert!(store.backup_ids().await.expect("lists").is_empty());

        // The same spec read-only is copied (through the array, which this
        // one refuses: the refusal proves the copy got that far).
        let FrozenBy::Snapshot { before, .. } = &mut spec.frozen_by else {
            unreachable!()
        };
        before.writable = false;
        let error = run(
            &store,
            &array,
            &OwnerThatMustNotBeAsked,
            &spec,
            &Progress::new(),
            &CancellationToken::new(),
        )
        .await
        .expect_err("the array refuses the digests");
        assert!(matches!(error, JobError::Array(_)), "{error:?}");
    }

    #[test]
    fn only_the_reason_makes_a_failed_snapshot_read_an_invalidation() {
        let worded = tonic::Status::failed_precondition("snapshot-invalidated");
        let error = ClientError::from_status("db-server", "x:1", "reading", &worded);
        assert!(matches!(
            snapshot_read_error(0, error),
            JobError::SnapshotRead(_)
        ));
        let down = ClientError::from_status(
            "db-server",
            "x:1",
            "reading",
            &tonic::Status::unavailable("restarting"),
        );
        let error = snapshot_read_error(0, down);
        assert!(error.is_unavailable(), "{error:?}");
        assert_eq!(error.failure_kind(), FailureKind::NodeUnavailable);
    }
}
