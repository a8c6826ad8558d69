//! One backup job: reads an LU with several streams in flight, hashes and
//! writes each chunk off the async threads (skipping all-zero chunks, so the
//! image stays sparse), confirms with db-server that the snapshot it copies
//! is still the one confirmed before the first read, and commits the image
//! and its manifest.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures_util::{StreamExt, TryStreamExt};
use splitmirror_proto::client::{Backoff, ClientError};
use splitmirror_proto::pace::RateLimit;
use tokio_util::sync::CancellationToken;

use crate::backups::FailureKind;
use crate::manifest::{self, CHUNK_SIZE_BYTES, FORMAT_VERSION, Manifest, SnapshotRecord};
use crate::owner::{
    CONFIRM_DEADLINE, HeldSnapshot, NotFrozen, OwnerFailure, SnapshotOwner, SnapshotRef,
    check_unchanged,
};
use crate::source::LuSource;
use crate::store::{BackupStore, StoreError};

/// Read streams in flight at once.
pub const READ_STREAMS: usize = 4;
/// Each stream reads a segment of this many bytes (whole chunks).
const SEGMENT_BYTES: u64 = 64 << 20;

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
    /// Creating the partial backup or committing it failed (disk full, no
    /// permission, I/O error). Not retryable until the store is fixed.
    #[error("writing the backup: {0}")]
    Store(#[from] StoreError),
    /// Writing or syncing the image file failed. Not retryable until the
    /// store is fixed.
    #[error("{doing} the image: {source}")]
    Image {
        doing: &'static str,
        #[source]
        source: std::io::Error,
    },
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
            JobError::WrongSize { .. } => FailureKind::WrongSize,
            JobError::Store(_) | JobError::Image { .. } => FailureKind::StoreFailed,
            JobError::SnapshotLost(_) => FailureKind::NotFrozen,
            JobError::NotConfirmed(_) | JobError::Task(_) | JobError::Cancelled => {
                FailureKind::Internal
            }
        }
    }

    /// True when the job failed because a node did not answer: the array
    /// (a read) or db-server (the confirmation after the copy).
    pub fn is_unavailable(&self) -> bool {
        match self {
            JobError::Array(e) | JobError::NotConfirmed(e) => e.is_transient(),
            JobError::WrongSize { .. }
            | JobError::ShortRead { .. }
            | JobError::MissingChunks { .. }
            | JobError::Store(_)
            | JobError::Image { .. }
            | JobError::Task(_)
            | JobError::SnapshotLost(_)
            | JobError::Cancelled => false,
        }
    }
}

/// Runs the job to the end: a complete backup in the store, or nothing that
/// looks complete.
pub async fn run(
    store: &BackupStore,
    source: &dyn LuSource,
    owner: &dyn SnapshotOwner,
    spec: &JobSpec,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<Manifest, JobError> {
    let result = copy(store, source, owner, spec, progress, cancel).await;
    if result.is_err() {
        store.discard_partial(&spec.backup_id);
    }
    result
}

async fn copy(
    store: &BackupStore,
    source: &dyn LuSource,
    owner: &dyn SnapshotOwner,
    spec: &JobSpec,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<Manifest, JobError> {
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
    let size_bytes = geometry.block_count * block_size_bytes;
    progress.bytes_total.store(size_bytes, Ordering::Relaxed);
    let image = {
        let store = store.clone();
        let id = spec.backup_id.clone();
        tokio::task::spawn_blocking(move || store.create_partial(&id, size_bytes)).await??
    };
    let image = Arc::new(image);
    let chunk_count = size_bytes.div_ceil(CHUNK_SIZE_BYTES);
    let segment_count = size_bytes.div_ceil(SEGMENT_BYTES);
    let segments = (0..segment_count).map(|s| {
        let start = s * SEGMENT_BYTES;
        (start, SEGMENT_BYTES.min(size_bytes - start))
    });
    let limit = spec.max_bytes_per_s.map(RateLimit::new);
    let limit = limit.as_ref();
    let per_segment: Vec<Vec<(u64, [u8; 32])>> = futures_util::stream::iter(segments)
        .map(|(offset, len)| {
            copy_segment(
                source,
                spec.lu,
                block_size_bytes,
                offset,
                len,
                image.clone(),
                progress,
                cancel,
                limit,
            )
        })
        .buffer_unordered(READ_STREAMS)
        .try_collect()
        .await?;
    let mut digests = vec![[0u8; 32]; chunk_count as usize];
    let mut seen = 0;
    for (index, digest) in per_segment.into_iter().flatten() {
        digests[index as usize] = digest;
        seen += 1;
    }
    if seen != chunk_count {
        return Err(JobError::MissingChunks {
            copied: seen,
            expected: chunk_count,
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
            })
        }
        FrozenBy::Live => None,
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
    };
    if cancel.is_cancelled() {
        return Err(JobError::Cancelled);
    }
    let store = store.clone();
    let committed = manifest.clone();
    tokio::task::spawn_blocking(move || store.commit(&image, &committed)).await??;
    Ok(manifest)
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
        let error = match owner.snapshot(wanted.volume).await {
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

/// Copies one segment: receives it chunk by chunk and hands each whole
/// chunk to a blocking task (hash, skip if all zero, write), overlapping the
/// work on chunk k with receiving chunk k + 1.
#[allow(clippy::too_many_arguments)]
async fn copy_segment(
    source: &dyn LuSource,
    lu: u32,
    block_size_bytes: u64,
    offset_bytes: u64,
    len_bytes: u64,
    image: Arc<File>,
    progress: &Progress,
    cancel: &CancellationToken,
    limit: Option<&RateLimit>,
) -> Result<Vec<(u64, [u8; 32])>, JobError> {
    let mut stream = source
        .read(
            lu,
            offset_bytes / block_size_bytes,
            len_bytes / block_size_bytes,
        )
        .await?;
    let mut digests = Vec::new();
    let mut chunk: Vec<u8> = Vec::with_capacity(CHUNK_SIZE_BYTES as usize);
    let mut chunk_offset = offset_bytes;
    let mut pending: Option<ChunkTask> = None;
    let end = offset_bytes + len_bytes;
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            () = cancel.cancelled() => return Err(JobError::Cancelled),
        };
        let data = match next {
            Some(data) => data?,
            None => break,
        };
        if let Some(limit) = limit {
            limit.take(data.len() as u64).await;
        }
        // The array sends whole 1 MiB chunks at chunk boundaries: take them
        // as they come instead of copying them into the chunk buffer.
        let whole_chunk = chunk.is_empty()
            && (data.len() as u64 == CHUNK_SIZE_BYTES || chunk_offset + data.len() as u64 == end);
        if whole_chunk {
            if let Some(previous) = pending.take() {
                digests.push(finish(previous, progress).await?);
            }
            let at = chunk_offset;
            chunk_offset += data.len() as u64;
            pending = Some(spawn_chunk(image.clone(), data, at));
            continue;
        }
        let mut data = &data[..];
        while !data.is_empty() {
            let want = (CHUNK_SIZE_BYTES as usize - chunk.len()).min(data.len());
            chunk.extend_from_slice(&data[..want]);
            data = &data[want..];
            let chunk_end = chunk_offset + chunk.len() as u64;
            if chunk.len() as u64 == CHUNK_SIZE_BYTES || chunk_end == end {
                if let Some(previous) = pending.take() {
                    digests.push(finish(previous, progress).await?);
                }
                let full =
                    std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_SIZE_BYTES as usize));
                pending = Some(spawn_chunk(image.clone(), full, chunk_offset));
                chunk_offset = chunk_end;
            }
        }
    }
    if let Some(previous) = pending.take() {
        digests.push(finish(previous, progress).await?);
    }
    // Flush this segment now, while the other streams keep copying, so that
    // the final fsync of the commit has little left to write.
    tokio::task::spawn_blocking(move || image.sync_data())
        .await?
        .map_err(|source| JobError::Image {
            doing: "syncing",
            source,
        })?;
    if chunk_offset != end || !chunk.is_empty() {
        return Err(JobError::ShortRead {
            lu,
            ended_at_byte: chunk_offset + chunk.len() as u64,
            end_byte: end,
        });
    }
    Ok(digests
        .into_iter()
        .map(|(at, digest)| (at / CHUNK_SIZE_BYTES, digest))
        .collect())
}

/// Hashes a chunk and writes it at `at`, off the async threads. All-zero
/// chunks are not written: the image file was sized sparse, so they read
/// back as zeros.
fn spawn_chunk(image: Arc<File>, data: Vec<u8>, at: u64) -> ChunkTask {
    tokio::task::spawn_blocking(move || {
        let digest = *blake3::hash(&data).as_bytes();
        if data.iter().any(|&b| b != 0) {
            image.write_all_at(&data, at)?;
        }
        Ok((at, digest))
    })
}

/// A chunk being hashed and written: answers its offset and digest.
type ChunkTask = tokio::task::JoinHandle<std::io::Result<(u64, [u8; 32])>>;

async fn finish(task: ChunkTask, progress: &Progress) -> Result<(u64, [u8; 32]), JobError> {
    let (at, digest) = task.await?.map_err(|source| JobError::Image {
        doing: "writing",
        source,
    })?;
    let chunk_bytes = CHUNK_SIZE_BYTES.min(progress.bytes_total.load(Ordering::Relaxed) - at);
    progress
        .bytes_done
        .fetch_add(chunk_bytes, Ordering::Relaxed);
    splitmirror_proto::telemetry::record_backup_bytes(chunk_bytes);
    Ok((at, digest))
}
