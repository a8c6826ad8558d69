//! Restore: writes a complete backup onto an LU of the array — the mirror
//! LU of a volume db-server took offline for the run (so that origin and
//! mate both get it), or a plain LU — verified, and writing only what
//! differs.
//!
//! Refused before any byte changes ([`Restores::start`], each refusal its
//! own [`RestoreError`]): an unknown backup, one that did not complete, an
//! LU of another size or block size, a backup whose index names a chunk the
//! store does not hold, a `to_lu` that is not a plain LU, a volume db-server
//! does not report offline for this run (restore kind "from a backup", the
//! same run id), an LU another run of this process is restoring.
//!
//! Then the job, in phases ([`RestorePhase`]):
//! 1. **Comparing**: the array's digest of every 1 MiB chunk
//!    (`ChecksumRange`) of origin and mate at once (a volume) or of the
//!    plain LU. A chunk is to be written when any side differs from the
//!    backup's digest (an all-zero chunk's digest is
//!    [`zero_digest`]: zeros are written where the LU differs).
//! 2. **Checking**: every chunk to write is read from the store, decoded
//!    and re-hashed before the first write, reads in parallel; a damaged or
//!    missing one fails the job (`ChunkDamaged`) with nothing written.
//!    Decoded chunks are kept in memory up to [`KEPT_CHUNKS_BUDGET_BYTES`]
//!    so that a small restore reads the store once; above the budget the
//!    rest are read again (and re-hashed again) by the write pass, which
//!    costs a second read of the store rather than memory the size of the
//!    image.
//! 3. **Writing**: db-server confirms the volume offline for the run again,
//!    then the chunks to write go to the mirror LU (or the plain LU) on
//!    [`WRITE_STREAMS`] write streams at once, in messages of up to
//!    [`WRITE_MESSAGE_BYTES`], paced by the optional rate cap.
//! 4. **Verifying**: the LU is flushed, the array digests every chunk
//!    written again on every side (coalesced into runs), each must equal
//!    the backup's digest; db-server confirms the volume still offline for
//!    the run. The job is complete and verified.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use splitmirror_proto::client::{Backoff, ClientError, ErrorKind};
use splitmirror_proto::pace::RateLimit;
use splitmirror_proto::run_id::RunIdError;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backups::{Backups, JobState};
use crate::crash;
use crate::manifest::{self, CHUNK_SIZE_BYTES, Manifest};
use crate::owner::{CONFIRM_DEADLINE, OwnerFailure, RestoreHold, RestoreHoldKind, VolumeOwner};
use crate::source::{LuRole, LuSource, LuTarget, WriteMessages};
use crate::store::{ChunkStore, StoreError, zero_digest};

/// Write streams in flight at once.
pub const WRITE_STREAMS: usize = 4;
/// The data of one message of a write stream, at most (consecutive chunks
/// to write are sent together; the array takes up to 16 MiB).
pub const WRITE_MESSAGE_BYTES: u64 = 4 << 20;
/// One write stream carries at most this many bytes of consecutive chunks:
/// small enough that progress moves and four streams share the work.
const SEGMENT_BYTES: u64 = 32 << 20;
/// Messages of one stream being assembled (and re-read from the store,
/// above the budget) ahead of the one being sent.
const MESSAGES_AHEAD_PER_STREAM: usize = 2;
/// Chunks read, decoded and re-hashed from the store at once while
/// checking.
const CHECK_READS_IN_FLIGHT: usize = 8;
/// Decoded chunks kept in memory between the check and the write pass.
pub const KEPT_CHUNKS_BUDGET_BYTES: u64 = 256 << 20;
/// Chunks whose digest one `ChecksumRange` asks for (256 MiB of the LU):
/// large calls, and progress that still moves.
const COMPARE_CHUNKS_PER_CALL: u64 = 256;
/// `ChecksumRange` calls in flight per side: the array hashes up to two
/// bulk transfers at once, so a plain LU (one side) keeps both busy, and a
/// volume's two sides each have one waiting when the other's ends.
const COMPARE_CALLS_PER_SIDE: usize = 2;
/// How many missing chunks a refusal names.
const MISSING_NAMED: usize = 8;
/// How often a job's progress is sent while nothing else changes.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// Where a restore writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A db-server volume: its mirror LU (the volume id), so that origin and
    /// mate both get the data.
    Volume(u32),
    /// A plain LU of the array (no pair).
    PlainLu(u32),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Volume(volume) => write!(f, "volume {volume}"),
            Target::PlainLu(lu) => write!(f, "LU {lu}"),
        }
    }
}

/// A request to start a restore, checked by
/// [`validate::start_restore`](crate::service::validate::start_restore).
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub run_id: String,
    pub backup_id: String,
    pub target: Target,
    pub max_bytes_per_s: Option<u64>,
    pub checked: crate::service::validate::Checked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestorePhase {
    Comparing,
    Checking,
    Writing,
    Verifying,
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreState {
    Running,
    /// Verified: `verification` says what was compared.
    Complete {
        verification: String,
    },
    Failed {
        kind: RestoreFailureKind,
        message: String,
    },
}

impl RestoreState {
    pub fn is_finished(&self) -> bool {
        *self != RestoreState::Running
    }
}

/// Why a restore job failed, for a program to act on (the wire's
/// `RestoreFailure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreFailureKind {
    /// The array or db-server did not answer: run again once they are back.
    NodeUnavailable,
    /// The array answered with a failure or other than asked.
    ArrayFailed,
    /// The store could not be read.
    StoreFailed,
    /// A chunk read from the store is missing or does not hash to its
    /// digest.
    ChunkDamaged,
    /// db-server no longer reports the volume offline for this run.
    NotOffline,
    /// After writing, the array's digests differ from the backup's.
    VerifyFailed,
    /// This server failed, or it is stopping.
    Internal,
}

/// What `WatchRestore` reports.
#[derive(Debug, Clone)]
pub struct RestoreInfo {
    pub run_id: String,
    pub backup_id: String,
    pub state: RestoreState,
    pub phase: RestorePhase,
    /// The LU written: the volume's mirror LU, or the plain LU.
    pub lu: u32,
    pub volume: Option<u32>,
    pub chunks_total: u64,
    /// Chunks compared with the array's digests on every side so far.
    pub chunks_compared: u64,
    pub chunks_to_write: u64,
    pub chunks_written: u64,
    pub bytes_written: u64,
    pub throughput_bytes_per_s: u64,
    pub elapsed_ms: u64,
    pub ledger_sequence: Option<u64>,
    pub image_digest: [u8; 32],
}

/// Why a restore could not start (or be watched). Each variant says whose
/// fault it is and whether trying again can help; the gRPC adapter maps
/// each to one code (`From<RestoreError> for Status`, no catch-all arm).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The request contradicts itself (no target, or two). Not retryable.
    #[error("{0}")]
    Malformed(String),
    /// The run id breaks the run id rules. Not retryable.
    #[error("run_id: {0}")]
    BadRunId(#[source] RunIdError),
    /// The backup id cannot name a backup. Not retryable.
    #[error("{0:?} is not a backup id")]
    BadBackupId(String),
    /// No complete backup and no job of this process has this id. Not
    /// retryable.
    #[error("backup {0} does not exist")]
    BackupNotFound(String),
    /// `WatchRestore` of a run this process has no restore job for.
    #[error("this backup server has no restore job for run {0:?}")]
    NoSuchRun(String),
    /// The backup is running, failed or was cancelled. Not retryable (a
    /// running one: once it completes).
    #[error("backup {id} is not complete ({state}): only a complete backup can be restored")]
    NotComplete { id: String, state: &'static str },
    /// The backup's index cannot be read as digests (edited or damaged).
    /// Not retryable.
    #[error("the index of backup {id} is damaged: {what}")]
    DamagedManifest { id: String, what: String },
    /// The LU is not the size or block size of the backup. Not retryable.
    #[error(
        "LU {lu} has {lu_block_count} blocks of {lu_block_size_bytes} bytes, backup {backup_id} has {backup_block_count} blocks of {backup_block_size_bytes} bytes: a restore writes an LU of the backup's size and block size only"
    )]
    SizeDiffers {
        lu: u32,
        backup_id: String,
        lu_block_size_bytes: u32,
        lu_block_count: u64,
        backup_block_size_bytes: u32,
        backup_block_count: u64,
    },
    /// Chunks the index names are not in the store: the backup cannot be
    /// restored. Not retryable (the evidence is kept).
    #[error(
        "backup {backup_id} cannot be restored: {missing} chunk(s) its index names are missing from the store, first {}",
        first.iter().map(|(index, digest)| format!("chunk {index} ({digest})")).collect::<Vec<_>>().join(", ")
    )]
    MissingChunks {
        backup_id: String,
        missing: u64,
        /// The first missing chunks, by index and hex digest.
        first: Vec<(u64, String)>,
    },
    /// `to_lu` is a mirror, origin or mate LU: a volume is restored through
    /// db-server (`volume`), never written behind its back. Not retryable.
    #[error(
        "LU {lu} is {role} LU, not a plain LU: restore a volume with `volume` (after db-server's BeginRestore), or name a plain LU"
    )]
    NotPlain { lu: u32, role: &'static str },
    /// The array does not define the LU (or does not show it to this
    /// server). Not retryable.
    #[error("LU {0} does not exist on the array (or this server may not see it)")]
    UnknownLu(u32),
    /// The volume's LU is not a mirror LU on the array. Not retryable.
    #[error("volume {volume}: LU {volume} is not a mirror LU on the array")]
    NotAMirror { volume: u32 },
    /// db-server does not know the volume. Not retryable.
    #[error("db-server does not know volume {volume}: {source}")]
    UnknownVolume {
        volume: u32,
        #[source]
        source: ClientError,
    },
    /// db-server does not report the volume offline for a restore of this
    /// run (call BeginRestore first). Not retryable until it does.
    #[error("volume {volume} is not offline for restore run {run_id:?}: {found}")]
    NotOffline {
        volume: u32,
        run_id: String,
        found: String,
    },
    /// Another run of this process is restoring the LU. Not retryable
    /// until it ends.
    #[error("LU {lu} is being restored by run {other_run_id:?}")]
    LuBusy { lu: u32, other_run_id: String },
    /// The run id started a restore of another backup or target. Not
    /// retryable: a new restore needs a new run id.
    #[error("run {run_id:?} is already restoring {what}")]
    RunIdReused { run_id: String, what: String },
    /// The array did not answer. Retryable.
    #[error("the array is unavailable: {0}")]
    ArrayUnavailable(#[source] ClientError),
    /// The array failed the question. Not retryable as it is.
    #[error("the array failed: {0}")]
    ArrayFailed(#[source] ClientError),
    /// db-server did not answer. Retryable.
    #[error("db-server is unavailable: {0}")]
    OwnerUnavailable(#[source] ClientError),
    /// db-server failed the question. Not retryable as it is.
    #[error("db-server failed: {0}")]
    OwnerFailed(#[source] ClientError),
    /// The store failed (the variant says how; the adapter maps each).
    #[error("{0}")]
    Store(#[source] StoreError),
}

impl From<StoreError> for RestoreError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(id) => RestoreError::BackupNotFound(id),
            StoreError::BadId(id) => RestoreError::BadBackupId(id),
            StoreError::BadLocation(_)
            | StoreError::Blob(_)
            | StoreError::Damaged { .. }
            | StoreError::MissingChunk { .. }
            | StoreError::CorruptChunk { .. }
            | StoreError::NeedsConversion { .. }
            | StoreError::Export { .. }
            | StoreError::Task(_) => RestoreError::Store(error),
        }
    }
}

/// The one mapping from a failed question to the array, before the job, to
/// a refusal.
fn array_refusal(lu: u32, error: ClientError) -> RestoreError {
    match error.kind {
        ErrorKind::NotFound => RestoreError::UnknownLu(lu),
        ErrorKind::Unavailable | ErrorKind::DeadlineExceeded | ErrorKind::Broken => {
            RestoreError::ArrayUnavailable(error)
        }
        ErrorKind::InvalidArgument
        | ErrorKind::OutOfRange
        | ErrorKind::FailedPrecondition
        | ErrorKind::ResourceExhausted
        | ErrorKind::AlreadyExists
        | ErrorKind::Aborted
        | ErrorKind::PermissionDenied
        | ErrorKind::DataLoss
        | ErrorKind::Internal => RestoreError::ArrayFailed(error),
    }
}

/// Why a running job failed.
#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error("{0}")]
    Array(#[source] ClientError),
    #[error("the array answered {got} digests of LU {lu} for {expected} chunks")]
    ShortDigests { lu: u32, got: u64, expected: u64 },
    #[error(
        "the array wrote {written} of {expected} blocks of the write stream to LU {lu} at LBA {lba}"
    )]
    ShortWrite {
        lu: u32,
        lba: u64,
        written: u64,
        expected: u64,
    },
    /// Reading or checking a chunk: before the first write (nothing
    /// written), or in the write pass (a chunk above the memory budget read
    /// again, and damaged since it was checked).
    #[error("{source}{}", if *.after_writes { " (in the write pass, after the check: some chunks were written)" } else { " (found before the first write: nothing was written)" })]
    Store {
        #[source]
        source: StoreError,
        after_writes: bool,
    },
    #[error("{0}")]
    Owner(#[source] ClientError),
    #[error("{0}")]
    NotOffline(String),
    #[error(
        "after the flush, LU {lu}'s digest of chunk {index} differs from the backup's ({mismatched} chunk(s) differ on that LU)"
    )]
    VerifyFailed {
        lu: u32,
        index: u64,
        mismatched: u64,
    },
    #[error("a blocking task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("cancelled: the backup server is stopping")]
    Cancelled,
}

impl JobError {
    /// The one mapping from a failure to its kind, from error kinds alone.
    fn failure_kind(&self) -> RestoreFailureKind {
        match self {
            JobError::Array(e) if e.is_transient() => RestoreFailureKind::NodeUnavailable,
            JobError::Array(_) | JobError::ShortDigests { .. } | JobError::ShortWrite { .. } => {
                RestoreFailureKind::ArrayFailed
            }
            JobError::Store {
                source: StoreError::MissingChunk { .. } | StoreError::CorruptChunk { .. },
                ..
            } => RestoreFailureKind::ChunkDamaged,
            JobError::Store {
                source: StoreError::Task(_),
                ..
            } => RestoreFailureKind::Internal,
            JobError::Store {
                source:
                    StoreError::NotFound(_)
                    | StoreError::BadId(_)
                    | StoreError::BadLocation(_)
                    | StoreError::Blob(_)
                    | StoreError::Damaged { .. }
                    | StoreError::NeedsConversion { .. }
                    | StoreError::Export { .. },
                ..
            } => RestoreFailureKind::StoreFailed,
            JobError::Owner(e) => match OwnerFailure::of(e) {
                OwnerFailure::Unavailable => RestoreFailureKind::NodeUnavailable,
                OwnerFailure::UnknownVolume | OwnerFailure::NoSnapshot => {
                    RestoreFailureKind::NotOffline
                }
                OwnerFailure::Failed => RestoreFailureKind::Internal,
            },
            JobError::NotOffline(_) => RestoreFailureKind::NotOffline,
            JobError::VerifyFailed { .. } => RestoreFailureKind::VerifyFailed,
            JobError::Task(_) | JobError::Cancelled => RestoreFailureKind::Internal,
        }
    }
}

/// Which chunks must be written: those where any side's digest differs
/// from the backup's. Sides shorter than the backup count as different.
pub fn chunks_to_write(backup: &[[u8; 32]], sides: &[Vec<[u8; 32]>]) -> Vec<u64> {
    (0..backup.len())
        .filter(|&i| sides.iter().any(|side| side.get(i) != Some(&backup[i])))
        .map(|i| i as u64)
        .collect()
}

/// Ascending chunk indexes coalesced into runs of consecutive chunks, each
/// at most `max_chunks` long.
pub fn runs(indexes: &[u64], max_chunks: u64) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    for &index in indexes {
        match runs.last_mut() {
            Some(last) if last.end == index && last.end - last.start < max_chunks => {
                last.end += 1;
            }
            _ => runs.push(index..index + 1),
        }
    }
    runs
}

/// Checks that db-server reports the volume offline for a restore of this
/// run from this backup; answers what it found otherwise.
pub fn check_offline(
    hold: Option<&RestoreHold>,
    run_id: &str,
    backup_id: &str,
) -> Result<(), String> {
    match hold {
        None => Err("db-server reports no restore of it (call BeginRestore first)".into()),
        Some(h) if h.kind != RestoreHoldKind::FromBackup => Err(format!(
            "it is offline for run {:?}, but not for a restore from a backup",
            h.run_id
        )),
        Some(h) if h.run_id != run_id => Err(format!(
            "it is offline for another restore, run {:?}",
            h.run_id
        )),
        Some(h) if !h.backup_id.is_empty() && h.backup_id != backup_id => Err(format!(
            "run {run_id:?} is restoring backup {} there, not {backup_id}",
            h.backup_id
        )),
        Some(_) => Ok(()),
    }
}

/// What one job is asked, as checked at its start.
struct JobSpec {
    run_id: String,
    backup_id: String,
    target: Target,
    /// The LU written.
    lu: u32,
    /// The LUs compared and verified: origin and mate, or the plain LU.
    sides: Vec<u32>,
    /// Every LU the job may write (the mirror LU, its origin and mate).
    locked_lus: Vec<u32>,
    manifest: Arc<Manifest>,
    digests: Arc<Vec<[u8; 32]>>,
    max_bytes_per_s: Option<u64>,
}

struct Progress {
    phase: Mutex<RestorePhase>,
    /// Per side: chunks the array digested so far.
    compared_per_side: Vec<AtomicU64>,
    chunks_to_write: AtomicU64,
    chunks_written: AtomicU64,
    bytes_written: AtomicU64,
    started: Instant,
    writing_started: Mutex<Option<Instant>>,
}

struct Job {
    spec: JobSpec,
    progress: Progress,
    state: watch::Sender<RestoreState>,
}

impl Job {
    fn info(&self) -> RestoreInfo {
        let spec = &self.spec;
        let progress = &self.progress;
        let bytes_written = progress.bytes_written.load(Ordering::Relaxed);
        let throughput_bytes_per_s = progress
            .writing_started
            .lock()
            .expect("writing_started")
            .map(|at| {
                let seconds = at.elapsed().as_secs_f64();
                if seconds > 0.0 {
                    (bytes_written as f64 / seconds) as u64
                } else {
                    0
                }
            })
            .unwrap_or(0);
        RestoreInfo {
            run_id: spec.run_id.clone(),
            backup_id: spec.backup_id.clone(),
            state: self.state.borrow().clone(),
            phase: *progress.phase.lock().expect("phase"),
            lu: spec.lu,
            volume: match spec.target {
                Target::Volume(volume) => Some(volume),
                Target::PlainLu(_) => None,
            },
            chunks_total: spec.digests.len() as u64,
            chunks_compared: progress
                .compared_per_side
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .min()
                .unwrap_or(0),
            chunks_to_write: progress.chunks_to_write.load(Ordering::Relaxed),
            chunks_written: progress.chunks_written.load(Ordering::Relaxed),
            bytes_written,
            throughput_bytes_per_s,
            elapsed_ms: progress.started.elapsed().as_millis() as u64,
            ledger_sequence: spec.manifest.ledger_sequence,
            image_digest: manifest::image_digest(&spec.digests),
        }
    }

    fn set_phase(&self, phase: RestorePhase) {
        *self.progress.phase.lock().expect("phase") = phase;
        // Watchers learn of the phase at once (the state is unchanged).
        self.state.send_modify(|_| {});
    }
}

/// The restore jobs of this process, by run id.
pub struct Restores {
    store: Arc<ChunkStore>,
    source: Arc<dyn LuSource>,
    target: Arc<dyn LuTarget>,
    owner: Arc<dyn VolumeOwner>,
    backups: Arc<Backups>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

impl Restores {
    pub fn new(
        store: Arc<ChunkStore>,
        source: Arc<dyn LuSource>,
        target: Arc<dyn LuTarget>,
        owner: Arc<dyn VolumeOwner>,
        backups: Arc<Backups>,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            store,
            source,
            target,
            owner,
            backups,
            jobs: Mutex::new(HashMap::new()),
            tasks,
            cancel,
        }
    }

    /// Checks everything that can be checked before a byte changes, starts
    /// the job and answers at once; `true` when this run id had already
    /// started it (a running or complete job is answered as it is; a failed
    /// one is started again, so that re-running a restore completes it).
    pub async fn start(self: &Arc<Self>, request: RestoreRequest) -> Result<bool, RestoreError> {
        let run_id = request.run_id.clone();
        if let Some(existing) = self.existing(&request)? {
            return Ok(existing);
        }
        let manifest = self.complete_backup(&request.backup_id).await?;
        let digests = manifest
            .digests()
            .map_err(|index| RestoreError::DamagedManifest {
                id: manifest.backup_id.clone(),
                what: format!("chunk digest {index} is not a hex BLAKE3 digest"),
            })?;
        let expected_chunks = manifest.size_bytes.div_ceil(CHUNK_SIZE_BYTES);
        if manifest.chunk_size_bytes != CHUNK_SIZE_BYTES || digests.len() as u64 != expected_chunks
        {
            return Err(RestoreError::DamagedManifest {
                id: manifest.backup_id.clone(),
                what: format!(
                    "it lists {} chunks of {} bytes for {} bytes (this store's chunks are {CHUNK_SIZE_BYTES} bytes)",
                    digests.len(),
                    manifest.chunk_size_bytes,
                    manifest.size_bytes
                ),
            });
        }
        let (lu, sides, locked_lus) = match request.target {
            Target::PlainLu(lu) => {
                let page = match self.target.page(lu).await {
                    Ok(page) => page,
                    Err(error) if error.kind == ErrorKind::NotFound => {
                        // Masked, or missing: a pair's LU the array hides
                        // from the backup server is still not plain.
                        if let Ok(Some(role)) = self.owner.pair_role(lu).await {
                            return Err(RestoreError::NotPlain { lu, role });
                        }
                        return Err(array_refusal(lu, error));
                    }
                    Err(error) => return Err(array_refusal(lu, error)),
                };
                let role = match page.role {
                    LuRole::Plain => None,
                    LuRole::Mirror { .. } => Some("a mirror"),
                    LuRole::Origin => Some("an origin"),
                    LuRole::Mate => Some("a mate"),
                };
                if let Some(role) = role {
                    return Err(RestoreError::NotPlain { lu, role });
                }
                check_geometry(lu, &page.geometry, &manifest)?;
                (lu, vec![lu], vec![lu])
            }
            Target::Volume(volume) => {
                self.confirm_offline_now(volume, &run_id, &request.backup_id)
                    .await?;
                let page = self
                    .target
                    .page(volume)
                    .await
                    .map_err(|e| array_refusal(volume, e))?;
                let LuRole::Mirror { origin_lu, mate_lu } = page.role else {
                    return Err(RestoreError::NotAMirror { volume });
                };
                check_geometry(volume, &page.geometry, &manifest)?;
                (
                    volume,
                    vec![origin_lu, mate_lu],
                    vec![volume, origin_lu, mate_lu],
                )
            }
        };
        self.check_chunks_held(&manifest.backup_id, &manifest, &digests)
            .await?;
        let job = Arc::new(Job {
            progress: Progress {
                phase: Mutex::new(RestorePhase::Comparing),
                compared_per_side: sides.iter().map(|_| AtomicU64::new(0)).collect(),
                chunks_to_write: AtomicU64::new(0),
                chunks_written: AtomicU64::new(0),
                bytes_written: AtomicU64::new(0),
                started: Instant::now(),
                writing_started: Mutex::new(None),
            },
            spec: JobSpec {
                run_id: run_id.clone(),
                backup_id: request.backup_id.clone(),
                target: request.target,
                lu,
                sides,
                locked_lus,
                manifest,
                digests: Arc::new(digests),
                max_bytes_per_s: request.max_bytes_per_s,
            },
            state: watch::Sender::new(RestoreState::Running),
        });
        {
            let mut jobs = self.jobs.lock().expect("jobs");
            // A concurrent start of the same run or of the same LU may have
            // won the race since the first look.
            if let Some(existing) = existing_job(&jobs, &request)? {
                return Ok(existing);
            }
            for other in jobs.values() {
                if other.spec.run_id != run_id
                    && *other.state.borrow() == RestoreState::Running
                    && let Some(&lu) = other
                        .spec
                        .locked_lus
                        .iter()
                        .find(|lu| job.spec.locked_lus.contains(lu))
                {
                    return Err(RestoreError::LuBusy {
                        lu,
                        other_run_id: other.spec.run_id.clone(),
                    });
                }
            }
            jobs.insert(run_id.clone(), job.clone());
        }
        let restores = self.clone();
        let span = tracing::info_span!("restore job", run_id, backup_id = %request.backup_id, lu);
        self.tasks.spawn(tracing::Instrument::instrument(
            async move { restores.run(job).await },
            span,
        ));
        tracing::info!(run_id, backup_id = %request.backup_id, lu, "restore started");
        Ok(false)
    }

    /// A job of this run that answers the request as it is.
    fn existing(&self, request: &RestoreRequest) -> Result<Option<bool>, RestoreError> {
        existing_job(&self.jobs.lock().expect("jobs"), request)
    }

    /// The index of a complete backup; a job of this process that did not
    /// complete is refused with its state.
    async fn complete_backup(&self, id: &str) -> Result<Arc<Manifest>, RestoreError> {
        match self.store.manifest(id).await {
            Ok(manifest) => Ok(manifest),
            Err(StoreError::NotFound(_)) => match self.backups.job_state(id) {
                Some(state) => Err(RestoreError::NotComplete {
                    id: id.to_string(),
                    state: match state {
                        JobState::Running => "still running",
                        JobState::Failed { .. } => "it failed",
                        JobState::Cancelled => "it was cancelled",
                        // Pruned since it completed.
                        JobState::Complete => return Err(RestoreError::BackupNotFound(id.into())),
                    },
                }),
                None => Err(RestoreError::BackupNotFound(id.to_string())),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// Asks db-server whether the volume is offline for this run's restore.
    async fn confirm_offline_now(
        &self,
        volume: u32,
        run_id: &str,
        backup_id: &str,
    ) -> Result<(), RestoreError> {
        let hold =
            self.owner
                .restore_hold(volume)
                .await
                .map_err(|e| match OwnerFailure::of(&e) {
                    OwnerFailure::UnknownVolume => {
                        RestoreError::UnknownVolume { volume, source: e }
                    }
                    OwnerFailure::Unavailable => RestoreError::OwnerUnavailable(e),
                    OwnerFailure::NoSnapshot | OwnerFailure::Failed => RestoreError::OwnerFailed(e),
                })?;
        check_offline(hold.as_ref(), run_id, backup_id).map_err(|found| RestoreError::NotOffline {
            volume,
            run_id: run_id.to_string(),
            found,
        })
    }

    /// Refuses a backup whose index names a chunk the store does not hold
    /// (by the store's listing; all-zero chunks are never stored).
    async fn check_chunks_held(
        &self,
        backup_id: &str,
        manifest: &Manifest,
        digests: &[[u8; 32]],
    ) -> Result<(), RestoreError> {
        let held = self.store.held_chunks().await?;
        let missing = missing_chunks(manifest, digests, &held);
        if missing.is_empty() {
            return Ok(());
        }
        Err(RestoreError::MissingChunks {
            backup_id: backup_id.to_string(),
            missing: missing.len() as u64,
            first: missing
                .iter()
                .take(MISSING_NAMED)
                .map(|&index| (index, manifest::to_hex(&digests[index as usize])))
                .collect(),
        })
    }

    /// The job's progress now.
    pub fn info(&self, run_id: &str) -> Result<RestoreInfo, RestoreError> {
        Ok(self.job(run_id)?.info())
    }

    /// A receiver that changes when the job's state or phase does.
    pub fn subscribe(&self, run_id: &str) -> Result<watch::Receiver<RestoreState>, RestoreError> {
        Ok(self.job(run_id)?.state.subscribe())
    }

    fn job(&self, run_id: &str) -> Result<Arc<Job>, RestoreError> {
        self.jobs
            .lock()
            .expect("jobs")
            .get(run_id)
            .cloned()
            .ok_or_else(|| RestoreError::NoSuchRun(run_id.to_string()))
    }

    async fn run(&self, job: Arc<Job>) {
        let cancel = self.cancel.child_token();
        let result = tokio::select! {
            result = self.run_phases(&job) => result,
            () = cancel.cancelled() => Err(JobError::Cancelled),
        };
        let spec = &job.spec;
        let state = match result {
            Ok(verification) => {
                let info = job.info();
                tracing::info!(
                    run_id = spec.run_id,
                    backup_id = spec.backup_id,
                    lu = spec.lu,
                    chunks = info.chunks_total,
                    chunks_written = info.chunks_written,
                    bytes_written = info.bytes_written,
                    elapsed_ms = info.elapsed_ms,
                    "restore complete and verified: {verification}"
                );
                job.set_phase(RestorePhase::Done);
                RestoreState::Complete { verification }
            }
            Err(error) => {
                let kind = error.failure_kind();
                tracing::warn!(
                    run_id = spec.run_id,
                    backup_id = spec.backup_id,
                    ?kind,
                    "restore failed: {error}"
                );
                RestoreState::Failed {
                    kind,
                    message: error.to_string(),
                }
            }
        };
        job.state.send_replace(state);
    }

    /// The phases; answers what was verified.
    async fn run_phases(&self, job: &Job) -> Result<String, JobError> {
        let spec = &job.spec;
        let block_size_bytes = u64::from(spec.manifest.block_size_bytes);
        let chunk_blocks = CHUNK_SIZE_BYTES / block_size_bytes;
        let chunks_total = spec.digests.len() as u64;

        let mut phase_started = Instant::now();
        let mut phase_ms = Vec::with_capacity(4);
        let mut end_phase = |name: &'static str| {
            phase_ms.push((name, phase_started.elapsed().as_millis() as u64));
            phase_started = Instant::now();
        };
        // Comparing: every side at once.
        let sides =
            futures_util::future::try_join_all(spec.sides.iter().enumerate().map(|(side, &lu)| {
                side_digests(
                    self.source.as_ref(),
                    lu,
                    spec.manifest.block_count,
                    chunk_blocks,
                    &job.progress.compared_per_side[side],
                )
            }))
            .await?;
        let to_write = chunks_to_write(&spec.digests, &sides);
        drop(sides);
        job.progress
            .chunks_to_write
            .store(to_write.len() as u64, Ordering::Relaxed);

        end_phase("compare");
        // Checking: every chunk to write, before the first write.
        job.set_phase(RestorePhase::Checking);
        let kept = Arc::new(self.check_chunks(spec, &to_write).await?);
        end_phase("check");

        // Writing.
        job.set_phase(RestorePhase::Writing);
        if let Target::Volume(volume) = spec.target {
            self.confirm_offline_during(volume, spec).await?;
        }
        *job.progress
            .writing_started
            .lock()
            .expect("writing_started") = Some(Instant::now());
        let writer = Arc::new(ChunkWriter {
            store: self.store.clone(),
            backup_id: spec.backup_id.clone(),
            digests: spec.digests.clone(),
            size_bytes: spec.manifest.size_bytes,
            kept,
            limit: spec
                .max_bytes_per_s
                .map(|rate| Arc::new(RateLimit::new(rate))),
        });
        let segments = runs(&to_write, SEGMENT_BYTES / CHUNK_SIZE_BYTES);
        futures_util::stream::iter(segments)
            .map(|segment| self.write_segment(job, &writer, segment, block_size_bytes))
            .buffer_unordered(WRITE_STREAMS)
            .try_collect::<Vec<()>>()
            .await?;
        end_phase("write");
        crash::point("restore.before_verify");

        // Verifying.
        job.set_phase(RestorePhase::Verifying);
        self.target.flush(spec.lu).await.map_err(JobError::Array)?;
        let verify_runs = runs(&to_write, COMPARE_CHUNKS_PER_CALL);
        futures_util::future::try_join_all(
            spec.sides
                .iter()
                .map(|&lu| self.verify_side(spec, lu, &verify_runs, chunk_blocks)),
        )
        .await?;
        end_phase("verify");
        tracing::info!(
            run_id = spec.run_id,
            "restore phases (ms): {}",
            phase_ms
                .iter()
                .map(|(name, ms)| format!("{name} {ms}"))
                .collect::<Vec<_>>()
                .join(" · ")
        );
        let sides_text = match spec.target {
            Target::Volume(volume) => {
                self.confirm_offline_during(volume, spec).await?;
                format!(
                    "origin LU {} and mate LU {}: {chunks_total} chunks compared with the backup's digests before writing, {} written through mirror LU {} and re-digested on both sides after the flush; db-server confirmed volume {volume} offline for run {:?} before the first write and after the last",
                    spec.sides[0],
                    spec.sides[1],
                    to_write.len(),
                    spec.lu,
                    spec.run_id
                )
            }
            Target::PlainLu(lu) => format!(
                "LU {lu}: {chunks_total} chunks compared with the backup's digests before writing, {} written and re-digested after the flush",
                to_write.len()
            ),
        };
        Ok(sides_text)
    }

    /// Reads, decodes and re-hashes every distinct chunk to write (zeros
    /// need no reading), in parallel; keeps what fits in the budget.
    async fn check_chunks(
        &self,
        spec: &JobSpec,
        to_write: &[u64],
    ) -> Result<HashMap<[u8; 32], Arc<Vec<u8>>>, JobError> {
        let mut seen = HashSet::new();
        let distinct: Vec<(u64, [u8; 32], u64)> = to_write
            .iter()
            .map(|&index| {
                let len = spec.manifest.chunk_len_bytes(index);
                (index, spec.digests[index as usize], len)
            })
            .filter(|&(_, digest, len)| digest != zero_digest(len) && seen.insert(digest))
            .collect();
        let mut kept = HashMap::new();
        let mut kept_bytes = 0u64;
        let mut reads = futures_util::stream::iter(distinct)
            .map(|(index, digest, len)| async move {
                let data = self
                    .store
                    .read_chunk(&spec.backup_id, index, &digest, len)
                    .await?;
                Ok::<_, StoreError>((digest, data))
            })
            .buffer_unordered(CHECK_READS_IN_FLIGHT);
        while let Some(read) = reads.next().await {
            let (digest, data) = read.map_err(|source| JobError::Store {
                source,
                after_writes: false,
            })?;
            if kept_bytes + data.len() as u64 <= KEPT_CHUNKS_BUDGET_BYTES {
                kept_bytes += data.len() as u64;
                kept.insert(digest, Arc::new(data));
            }
        }
        Ok(kept)
    }

    /// Confirms, during the job, that db-server still reports the volume
    /// offline for this run; retries a db-server that does not answer for
    /// [`CONFIRM_DEADLINE`] (a restart keeps the volume offline).
    async fn confirm_offline_during(&self, volume: u32, spec: &JobSpec) -> Result<(), JobError> {
        let give_up = Instant::now() + CONFIRM_DEADLINE;
        let mut backoff = Backoff::standard();
        loop {
            let error = match self.owner.restore_hold(volume).await {
                Ok(hold) => {
                    return check_offline(hold.as_ref(), &spec.run_id, &spec.backup_id).map_err(
                        |found| {
                            JobError::NotOffline(format!(
                                "volume {volume} is no longer offline for restore run {:?}: {found}",
                                spec.run_id
                            ))
                        },
                    );
                }
                Err(error) => error,
            };
            let wait = backoff.next_wait();
            if !error.is_transient() || Instant::now() + wait >= give_up {
                return Err(JobError::Owner(error));
            }
            tracing::warn!(
                "confirming that volume {volume} is offline: {error} — retrying in {wait:?}"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// Writes one run of consecutive chunks on one write stream.
    async fn write_segment(
        &self,
        job: &Job,
        writer: &Arc<ChunkWriter>,
        segment: Range<u64>,
        block_size_bytes: u64,
    ) -> Result<(), JobError> {
        let spec = &job.spec;
        let lba = segment.start * CHUNK_SIZE_BYTES / block_size_bytes;
        let bytes: u64 = segment
            .clone()
            .map(|i| spec.manifest.chunk_len_bytes(i))
            .sum();
        let expected = bytes / block_size_bytes;
        let failed = Arc::new(Mutex::new(None));
        let messages = writer.messages(segment.clone(), block_size_bytes, failed.clone());
        let written = self
            .target
            .write_stream(spec.lu, messages)
            .await
            .map_err(JobError::Array);
        if let Some(error) = failed.lock().expect("failed").take() {
            return Err(JobError::Store {
                source: error,
                after_writes: true,
            });
        }
        let written = written?;
        if written != expected {
            return Err(JobError::ShortWrite {
                lu: spec.lu,
                lba,
                written,
                expected,
            });
        }
        job.progress
            .chunks_written
            .fetch_add(segment.end - segment.start, Ordering::Relaxed);
        job.progress
            .bytes_written
            .fetch_add(bytes, Ordering::Relaxed);
        crash::point("restore.after_first_write");
        Ok(())
    }

    /// Has the array digest the written runs of one side again, and
    /// compares each with the backup's digest.
    async fn verify_side(
        &self,
        spec: &JobSpec,
        lu: u32,
        verify_runs: &[Range<u64>],
        chunk_blocks: u64,
    ) -> Result<(), JobError> {
        let calls = verify_runs.iter().cloned().map(|run| async move {
            let lba = run.start * chunk_blocks;
            let blocks = (run.end * chunk_blocks).min(spec.manifest.block_count) - lba;
            let digests = self
                .source
                .checksums(lu, lba, blocks, chunk_blocks)
                .await
                .map_err(JobError::Array)?;
            if digests.len() as u64 != run.end - run.start {
                return Err(JobError::ShortDigests {
                    lu,
                    got: digests.len() as u64,
                    expected: run.end - run.start,
                });
            }
            Ok(run.zip(digests))
        });
        let mut answers = futures_util::stream::iter(calls).buffered(COMPARE_CALLS_PER_SIDE);
        let mut first_mismatch = None;
        let mut mismatched = 0u64;
        while let Some(answer) = answers.next().await {
            for (index, digest) in answer? {
                if digest != spec.digests[index as usize] {
                    first_mismatch.get_or_insert(index);
                    mismatched += 1;
                }
            }
        }
        match first_mismatch {
            None => Ok(()),
            Some(index) => Err(JobError::VerifyFailed {
                lu,
                index,
                mismatched,
            }),
        }
    }
}

/// The answer to a start of a run id that has a job already: `Some(true)`
/// for a running or complete job of the same backup and target, `None`
/// when there is none or it failed (started again), a refusal when the run
/// id names another backup or target.
fn existing_job(
    jobs: &HashMap<String, Arc<Job>>,
    request: &RestoreRequest,
) -> Result<Option<bool>, RestoreError> {
    let Some(job) = jobs.get(&request.run_id) else {
        return Ok(None);
    };
    if job.spec.backup_id != request.backup_id || job.spec.target != request.target {
        return Err(RestoreError::RunIdReused {
            run_id: request.run_id.clone(),
            what: format!("backup {} onto {}", job.spec.backup_id, job.spec.target),
        });
    }
    match &*job.state.borrow() {
        RestoreState::Running | RestoreState::Complete { .. } => Ok(Some(true)),
        RestoreState::Failed { .. } => Ok(None),
    }
}

fn check_geometry(
    lu: u32,
    geometry: &crate::source::Geometry,
    manifest: &Manifest,
) -> Result<(), RestoreError> {
    if geometry.block_size_bytes != manifest.block_size_bytes
        || geometry.block_count != manifest.block_count
    {
        return Err(RestoreError::SizeDiffers {
            lu,
            backup_id: manifest.backup_id.clone(),
            lu_block_size_bytes: geometry.block_size_bytes,
            lu_block_count: geometry.block_count,
            backup_block_size_bytes: manifest.block_size_bytes,
            backup_block_count: manifest.block_count,
        });
    }
    Ok(())
}

/// The indexes of the chunks that are not all zeros and that the store
/// does not hold.
pub fn missing_chunks(
    manifest: &Manifest,
    digests: &[[u8; 32]],
    held: &HashSet<[u8; 32]>,
) -> Vec<u64> {
    (0..digests.len() as u64)
        .filter(|&index| {
            let digest = &digests[index as usize];
            *digest != zero_digest(manifest.chunk_len_bytes(index)) && !held.contains(digest)
        })
        .collect()
}

/// The array's digest of every chunk of one side, in calls of
/// [`COMPARE_CHUNKS_PER_CALL`] chunks, counting them as they come.
async fn side_digests(
    source: &dyn LuSource,
    lu: u32,
    block_count: u64,
    chunk_blocks: u64,
    compared: &AtomicU64,
) -> Result<Vec<[u8; 32]>, JobError> {
    let expected = block_count.div_ceil(chunk_blocks);
    let blocks_per_call = chunk_blocks * COMPARE_CHUNKS_PER_CALL;
    let calls = (0..block_count.div_ceil(blocks_per_call)).map(|call| {
        let lba = call * blocks_per_call;
        let blocks = blocks_per_call.min(block_count - lba);
        async move {
            let answer = source
                .checksums(lu, lba, blocks, chunk_blocks)
                .await
                .map_err(JobError::Array)?;
            compared.fetch_add(answer.len() as u64, Ordering::Relaxed);
            Ok::<_, JobError>(answer)
        }
    });
    let answers: Vec<Vec<[u8; 32]>> = futures_util::stream::iter(calls)
        .buffered(COMPARE_CALLS_PER_SIDE)
        .try_collect()
        .await?;
    let digests: Vec<[u8; 32]> = answers.into_iter().flatten().collect();
    if digests.len() as u64 != expected {
        return Err(JobError::ShortDigests {
            lu,
            got: digests.len() as u64,
            expected,
        });
    }
    Ok(digests)
}

/// Makes the messages of the write streams: the data of each chunk from
/// memory (checked), zeros, or the store again (read, decoded and
/// re-hashed once more).
struct ChunkWriter {
    store: Arc<ChunkStore>,
    backup_id: String,
    digests: Arc<Vec<[u8; 32]>>,
    size_bytes: u64,
    kept: Arc<HashMap<[u8; 32], Arc<Vec<u8>>>>,
    limit: Option<Arc<RateLimit>>,
}

impl ChunkWriter {
    fn chunk_len_bytes(&self, index: u64) -> u64 {
        CHUNK_SIZE_BYTES.min(self.size_bytes - index * CHUNK_SIZE_BYTES)
    }

    /// The messages of one segment, [`MESSAGES_AHEAD_PER_STREAM`] made
    /// ahead. A chunk that cannot be read ends the stream early, its error
    /// left in `failed`.
    fn messages(
        self: &Arc<Self>,
        segment: Range<u64>,
        block_size_bytes: u64,
        failed: Arc<Mutex<Option<StoreError>>>,
    ) -> WriteMessages {
        let per_message = (WRITE_MESSAGE_BYTES / CHUNK_SIZE_BYTES).max(1);
        let groups: Vec<Range<u64>> = (segment.start..segment.end)
            .step_by(per_message as usize)
            .map(|start| start..(start + per_message).min(segment.end))
            .collect();
        let writer = self.clone();
        let stream = futures_util::stream::iter(groups)
            .map(move |group| {
                let writer = writer.clone();
                async move { writer.message(group, block_size_bytes).await }
            })
            .buffered(MESSAGES_AHEAD_PER_STREAM)
            .map(move |made| match made {
                Ok(message) => Some(message),
                Err(error) => {
                    failed.lock().expect("failed").get_or_insert(error);
                    None
                }
            })
            .take_while(|message| std::future::ready(message.is_some()))
            .map(|message| message.expect("taken while some"));
        Box::pin(stream)
    }

    async fn message(
        &self,
        group: Range<u64>,
        block_size_bytes: u64,
    ) -> Result<(u64, Vec<u8>), StoreError> {
        let lba = group.start * CHUNK_SIZE_BYTES / block_size_bytes;
        let len_bytes: u64 = group.clone().map(|i| self.chunk_len_bytes(i)).sum();
        let mut data = Vec::with_capacity(len_bytes as usize);
        for index in group {
            let digest = self.digests[index as usize];
            let len = self.chunk_len_bytes(index);
            if digest == zero_digest(len) {
                data.resize(data.len() + len as usize, 0);
            } else if let Some(kept) = self.kept.get(&digest) {
                data.extend_from_slice(kept);
            } else {
                let read = self
                    .store
                    .read_chunk(&self.backup_id, index, &digest, len)
                    .await?;
                data.extend_from_slice(&read);
            }
        }
        if let Some(limit) = &self.limit {
            limit.take(len_bytes).await;
        }
        Ok((lba, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u64) -> [u8; 32] {
        *blake3::hash(&n.to_le_bytes()).as_bytes()
    }

    #[test]
    fn a_chunk_is_written_when_any_side_differs_from_the_backup() {
        let backup: Vec<[u8; 32]> = (0..6).map(digest).collect();
        let mut origin = backup.clone();
        let mut mate = backup.clone();
        assert!(chunks_to_write(&backup, &[origin.clone(), mate.clone()]).is_empty());
        origin[1] = digest(100);
        mate[4] = digest(101);
        origin[5] = digest(102);
        mate[5] = digest(102);
        assert_eq!(
            chunks_to_write(&backup, &[origin.clone(), mate.clone()]),
            vec![1, 4, 5]
        );
        // A side that answered fewer digests differs where it is silent.
        mate.truncate(3);
        assert_eq!(chunks_to_write(&backup, &[origin, mate]), vec![1, 3, 4, 5]);
        // A plain LU is one side.
        let mut plain = backup.clone();
        plain[0] = digest(7);
        assert_eq!(chunks_to_write(&backup, &[plain]), vec![0]);
    }

    #[test]
    fn zeros_are_written_where_the_lu_is_not_zero() {
        let zero = zero_digest(CHUNK_SIZE_BYTES);
        let backup = vec![zero, digest(1), zero];
        let lu = vec![digest(9), digest(1), zero];
        assert_eq!(chunks_to_write(&backup, &[lu]), vec![0]);
    }

    #[test]
    fn runs_coalesce_consecutive_chunks_up_to_a_length() {
        assert_eq!(runs(&[], 4), Vec::<Range<u64>>::new());
        assert_eq!(runs(&[0, 1, 2, 5, 6, 9], 8), vec![0..3, 5..7, 9..10]);
        assert_eq!(runs(&[0, 1, 2, 3, 4, 5, 6], 3), vec![0..3, 3..6, 6..7]);
    }

    #[test]
    fn only_this_runs_restore_from_a_backup_lets_the_volume_be_written() {
        let hold = |kind, run_id: &str, backup_id: &str| RestoreHold {
            kind,
            run_id: run_id.into(),
            backup_id: backup_id.into(),
        };
        assert!(check_offline(None, "r", "b").is_err());
        assert!(
            check_offline(Some(&hold(RestoreHoldKind::FromBackup, "r", "b")), "r", "b").is_ok()
        );
        assert!(check_offline(Some(&hold(RestoreHoldKind::FromBackup, "r", "")), "r", "b").is_ok());
        for refused in [
            hold(RestoreHoldKind::FromBackup, "other", "b"),
            hold(RestoreHoldKind::FromBackup, "r", "another-backup"),
            hold(RestoreHoldKind::ToSnapshot, "r", ""),
            hold(RestoreHoldKind::Other, "r", "b"),
        ] {
            assert!(
                check_offline(Some(&refused), "r", "b").is_err(),
                "{refused:?}"
            );
        }
    }

    fn manifest_of(digests: &[[u8; 32]], size_bytes: u64) -> Manifest {
        Manifest {
            format_version: manifest::FORMAT_VERSION,
            backup_id: "0190d3c4-0000-7000-8000-000000000000".into(),
            run_id: "run-1".into(),
            label: String::new(),
            source_array: "x:1".into(),
            source_lu: 2,
            block_size_bytes: 4096,
            block_count: size_bytes / 4096,
            size_bytes,
            started_at_unix_ms: 1,
            completed_at_unix_ms: 2,
            ledger_sequence: Some(7),
            snapshot: None,
            live: true,
            chunk_size_bytes: CHUNK_SIZE_BYTES,
            image_digest: manifest::to_hex(&manifest::image_digest(digests)),
            chunk_digests: digests.iter().map(manifest::to_hex).collect(),
            counts: None,
        }
    }

    #[test]
    fn a_chunk_the_store_lacks_is_missing_unless_it_is_all_zeros() {
        // The last chunk is short: its zero digest is of its own length.
        let size_bytes = 3 * CHUNK_SIZE_BYTES + 8192;
        let short_zero = zero_digest(8192);
        let digests = vec![
            digest(1),
            zero_digest(CHUNK_SIZE_BYTES),
            digest(2),
            short_zero,
        ];
        let manifest = manifest_of(&digests, size_bytes);
        let held: HashSet<[u8; 32]> = [digest(1)].into_iter().collect();
        assert_eq!(missing_chunks(&manifest, &digests, &held), vec![2]);
        let all: HashSet<[u8; 32]> = [digest(1), digest(2)].into_iter().collect();
        assert!(missing_chunks(&manifest, &digests, &all).is_empty());
        // A full-size zero digest in the short last place is not zeros.
        let odd = vec![
            digest(1),
            digest(2),
            digest(2),
            zero_digest(CHUNK_SIZE_BYTES),
        ];
        assert_eq!(
            missing_chunks(&manifest_of(&odd, size_bytes), &odd, &all),
            vec![3]
        );
    }

    /// An array in memory: a mirror LU 0 over origin 1 and mate 2, and a
    /// plain LU 6, of `CHUNKS` chunks of 4096-byte blocks.
    struct MemoryArray {
        lus: Mutex<HashMap<u32, Vec<u8>>>,
        /// Acknowledge writes without doing them (a broken array).
        drops_writes: bool,
        blocks_written: AtomicU64,
    }

    const CHUNKS: u64 = 8;
    const BLOCK: u64 = 4096;

    impl MemoryArray {
        fn new(image: &[u8], drops_writes: bool) -> Arc<Self> {
            let lus = [1, 2, 6]
                .map(|lu| (lu, image.to_vec()))
                .into_iter()
                .collect();
            Arc::new(Self {
                lus: Mutex::new(lus),
                drops_writes,
                blocks_written: AtomicU64::new(0),
            })
        }

        fn lu(&self, lu: u32) -> Vec<u8> {
            self.lus.lock().expect("lus")[&lu].clone()
        }

        fn corrupt(&self, lu: u32, chunk: u64) {
            let at = (chunk * CHUNK_SIZE_BYTES) as usize;
            self.lus.lock().expect("lus").get_mut(&lu).expect("lu")[at] ^= 0x5a;
        }

        fn real(lu: u32) -> Vec<u32> {
            if lu == 0 { vec![1, 2] } else { vec![lu] }
        }
    }

    fn unsupported(doing: &str) -> ClientError {
        ClientError::local(
            ErrorKind::Internal,
            "array",
            "memory",
            doing,
            "not in this fake",
        )
    }

    impl LuSource for MemoryArray {
        fn describe(&self) -> String {
            "memory".into()
        }
        fn geometry(
            &self,
            _lu: u32,
        ) -> crate::source::BoxFuture<'_, Result<crate::source::Geometry, ClientError>> {
            Box::pin(async { Err(unsupported("geometry")) })
        }
        fn read(
            &self,
            _: u32,
            _: u64,
            _: u64,
        ) -> crate::source::BoxFuture<'_, Result<crate::source::DataStream, ClientError>> {
            Box::pin(async { Err(unsupported("read")) })
        }
        fn checksums(
            &self,
            lu: u32,
            lba: u64,
            blocks: u64,
            chunk_blocks: u64,
        ) -> crate::source::BoxFuture<'_, Result<Vec<[u8; 32]>, ClientError>> {
            let data = self.lu(MemoryArray::real(lu)[0]);
            Box::pin(async move {
                let range = &data[(lba * BLOCK) as usize..((lba + blocks) * BLOCK) as usize];
                Ok(range
                    .chunks((chunk_blocks * BLOCK) as usize)
                    .map(|c| *blake3::hash(c).as_bytes())
                    .collect())
            })
        }
    }

    impl LuTarget for MemoryArray {
        fn page(
            &self,
            lu: u32,
        ) -> crate::source::BoxFuture<'_, Result<crate::source::LuPage, ClientError>> {
            Box::pin(async move {
                let role = match lu {
                    0 => LuRole::Mirror {
                        origin_lu: 1,
                        mate_lu: 2,
                    },
                    1 => LuRole::Origin,
                    2 => LuRole::Mate,
                    6 => LuRole::Plain,
                    _ => {
                        return Err(ClientError::local(
                            ErrorKind::NotFound,
                            "array",
                            "memory",
                            "mode sense",
                            "no LU",
                        ));
                    }
                };
                Ok(crate::source::LuPage {
                    role,
                    geometry: crate::source::Geometry {
                        block_size_bytes: BLOCK as u32,
                        block_count: CHUNKS * CHUNK_SIZE_BYTES / BLOCK,
                    },
                })
            })
        }
        fn write_stream(
            &self,
            lu: u32,
            mut writes: WriteMessages,
        ) -> crate::source::BoxFuture<'_, Result<u64, ClientError>> {
            Box::pin(async move {
                let mut blocks = 0;
                while let Some((lba, data)) = writes.next().await {
                    blocks += data.len() as u64 / BLOCK;
                    if self.drops_writes {
                        continue;
                    }
                    let mut lus = self.lus.lock().expect("lus");
                    for real in MemoryArray::real(lu) {
                        let at = (lba * BLOCK) as usize;
                        lus.get_mut(&real).expect("lu")[at..at + data.len()].copy_from_slice(&data);
                    }
                }
                self.blocks_written.fetch_add(blocks, Ordering::Relaxed);
                Ok(blocks)
            })
        }
        fn flush(&self, _lu: u32) -> crate::source::BoxFuture<'_, Result<(), ClientError>> {
            Box::pin(async { Ok(()) })
        }
    }

    struct MemoryOwner {
        hold: Mutex<Option<RestoreHold>>,
    }

    impl VolumeOwner for MemoryOwner {
        fn describe(&self) -> String {
            "memory".into()
        }
        fn restore_hold(
            &self,
            _volume: u32,
        ) -> crate::source::BoxFuture<'_, Result<Option<RestoreHold>, ClientError>> {
            let hold = self.hold.lock().expect("hold").clone();
            Box::pin(async move { Ok(hold) })
        }
        fn pair_role(
            &self,
            _lu: u32,
        ) -> crate::source::BoxFuture<'_, Result<Option<&'static str>, ClientError>> {
            Box::pin(async { Ok(None) })
        }
    }

    impl crate::owner::SnapshotOwner for MemoryOwner {
        fn describe(&self) -> String {
            "memory".into()
        }
        fn snapshot(
            &self,
            _volume: u32,
            _mate: u32,
        ) -> crate::source::BoxFuture<'_, Result<crate::owner::HeldSnapshot, ClientError>> {
            Box::pin(async { Err(unsupported("snapshot")) })
        }
        fn read_snapshot(
            &self,
            _volume: u32,
            _mate: u32,
            _lba: u64,
            _blocks: u64,
        ) -> crate::source::BoxFuture<'_, Result<crate::source::DataStream, ClientError>> {
            Box::pin(async { Err(unsupported("read_snapshot")) })
        }
    }

    /// The backup's image: chunk i filled with i + 1, chunk 3 all zeros.
    fn image() -> Vec<u8> {
        let mut image = Vec::new();
        for i in 0..CHUNKS {
            let byte = if i == 3 { 0 } else { i as u8 + 1 };
            image.extend(std::iter::repeat_n(byte, CHUNK_SIZE_BYTES as usize));
        }
        image
    }

    struct Setup {
        _dir: tempfile::TempDir,
        store_dir: std::path::PathBuf,
        array: Arc<MemoryArray>,
        owner: Arc<MemoryOwner>,
        restores: Arc<Restores>,
        backup_id: String,
        digests: Vec<[u8; 32]>,
    }

    async fn setup(drops_writes: bool) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let store_dir = dir.path().join("store");
        let store = Arc::new(
            ChunkStore::create(
                &crate::store::StoreLocation::Dir(store_dir.clone()),
                Duration::from_secs(60),
            )
            .await
            .expect("store"),
        );
        let image = image();
        let digests: Vec<[u8; 32]> = image
            .chunks(CHUNK_SIZE_BYTES as usize)
            .map(|c| *blake3::hash(c).as_bytes())
            .collect();
        for chunk in image.chunks(CHUNK_SIZE_BYTES as usize) {
            if chunk[0] != 0 {
                let digest = *blake3::hash(chunk).as_bytes();
                store
                    .put_chunk(&digest, crate::store::encode_chunk(chunk))
                    .await
                    .expect("put");
            }
        }
        let manifest = manifest_of(&digests, image.len() as u64);
        store.write_index(&manifest).await.expect("index");
        let array = MemoryArray::new(&image, drops_writes);
        let owner = Arc::new(MemoryOwner {
            hold: Mutex::new(Some(RestoreHold {
                kind: RestoreHoldKind::FromBackup,
                run_id: "restore-1".into(),
                backup_id: manifest.backup_id.clone(),
            })),
        });
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        let backups = Arc::new(Backups::new(
            store.clone(),
            array.clone(),
            owner.clone(),
            tasks.clone(),
            cancel.clone(),
            None,
        ));
        let restores = Arc::new(Restores::new(
            store,
            array.clone(),
            array.clone(),
            owner.clone(),
            backups,
            tasks,
            cancel,
        ));
        Setup {
            _dir: dir,
            store_dir,
            array,
            owner,
            restores,
            backup_id: manifest.backup_id.clone(),
            digests,
        }
    }

    fn request(setup: &Setup, run_id: &str, target: Target) -> RestoreRequest {
        RestoreRequest {
            run_id: run_id.into(),
            backup_id: setup.backup_id.clone(),
            target,
            max_bytes_per_s: None,
            checked: crate::service::validate::Checked::for_tests(),
        }
    }

    async fn finished(restores: &Restores, run_id: &str) -> RestoreInfo {
        let mut state = restores.subscribe(run_id).expect("job");
        tokio::time::timeout(
            Duration::from_secs(10),
            state.wait_for(RestoreState::is_finished),
        )
        .await
        .expect("the job ends")
        .expect("job kept");
        restores.info(run_id).expect("job")
    }

    #[tokio::test]
    async fn a_volume_restore_writes_only_what_differs_on_either_side_and_verifies() {
        let setup = setup(false).await;
        let image = image();
        setup.array.corrupt(1, 1);
        setup.array.corrupt(1, 3); // a zero chunk made non-zero
        setup.array.corrupt(2, 6);
        let started = setup
            .restores
            .start(request(&setup, "restore-1", Target::Volume(0)))
            .await;
        assert!(!started.expect("started"));
        let info = finished(&setup.restores, "restore-1").await;
        assert!(
            matches!(&info.state, RestoreState::Complete { verification } if verification.contains("origin LU 1 and mate LU 2")),
            "{:?}",
            info.state
        );
        assert_eq!(
            (
                info.chunks_total,
                info.chunks_compared,
                info.chunks_to_write,
                info.chunks_written
            ),
            (CHUNKS, CHUNKS, 3, 3)
        );
        assert_eq!(info.bytes_written, 3 * CHUNK_SIZE_BYTES);
        assert_eq!(info.ledger_sequence, Some(7));
        assert_eq!(info.image_digest, manifest::image_digest(&setup.digests));
        assert!(
            setup.array.lu(1) == image && setup.array.lu(2) == image,
            "origin and mate equal the backup"
        );
        // The same run again answers the job; a second run of the LU, once
        // this one is done, starts (and finds nothing to write).
        let again = setup
            .restores
            .start(request(&setup, "restore-1", Target::Volume(0)))
            .await;
        assert!(again.expect("idempotent"));
    }

    #[tokio::test]
    async fn a_damaged_chunk_fails_the_job_before_any_write() {
        let setup = setup(false).await;
        setup.array.corrupt(6, 2);
        setup.array.corrupt(6, 5);
        let before = setup.array.lu(6);
        // Damage the stored chunk 5 (its data, behind its header).
        let key = crate::store::chunk_key(&setup.digests[5]);
        let path = setup.store_dir.join(&key);
        let mut stored = std::fs::read(&path).expect("chunk file");
        let last = stored.len() - 1;
        stored[last] ^= 0xff;
        std::fs::write(&path, stored).expect("damage");
        setup
            .restores
            .start(request(&setup, "r-damaged", Target::PlainLu(6)))
            .await
            .expect("starts");
        let info = finished(&setup.restores, "r-damaged").await;
        assert!(
            matches!(
                info.state,
                RestoreState::Failed {
                    kind: RestoreFailureKind::ChunkDamaged,
                    ..
                }
            ),
            "{:?}",
            info.state
        );
        assert_eq!(setup.array.blocks_written.load(Ordering::Relaxed), 0);
        assert!(setup.array.lu(6) == before, "nothing written");
    }

    #[tokio::test]
    async fn writes_the_array_did_not_keep_fail_verification() {
        let setup = setup(true).await;
        setup.array.corrupt(6, 4);
        setup
            .restores
            .start(request(&setup, "r-verify", Target::PlainLu(6)))
            .await
            .expect("starts");
        let info = finished(&setup.restores, "r-verify").await;
        assert!(
            matches!(
                info.state,
                RestoreState::Failed {
                    kind: RestoreFailureKind::VerifyFailed,
                    ..
                }
            ),
            "{:?}",
            info.state
        );
    }

    #[tokio::test]
    async fn refusals_come_before_any_byte_changes() {
        let setup = setup(false).await;
        setup.array.corrupt(6, 1);
        let code = |result: Result<bool, RestoreError>| {
            tonic::Status::from(result.expect_err("refused")).code()
        };
        let r = &setup.restores;
        assert_eq!(
            code(r.start(request(&setup, "a", Target::PlainLu(0))).await),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(r.start(request(&setup, "a", Target::PlainLu(2))).await),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(r.start(request(&setup, "a", Target::PlainLu(9))).await),
            tonic::Code::NotFound
        );
        let unknown = RestoreRequest {
            backup_id: "0190d3c4-0000-7000-8000-0000000000ff".into(),
            ..request(&setup, "a", Target::PlainLu(6))
        };
        assert_eq!(code(r.start(unknown).await), tonic::Code::NotFound);
        // Another run's restore holds the volume.
        assert_eq!(
            code(
                r.start(request(&setup, "other-run", Target::Volume(0)))
                    .await
            ),
            tonic::Code::FailedPrecondition
        );
        *setup.owner.hold.lock().expect("hold") = None;
        assert_eq!(
            code(
                r.start(request(&setup, "restore-1", Target::Volume(0)))
                    .await
            ),
            tonic::Code::FailedPrecondition
        );
        // A chunk missing from the store.
        std::fs::remove_file(
            setup
                .store_dir
                .join(crate::store::chunk_key(&setup.digests[7])),
        )
        .expect("remove");
        let missing = r.start(request(&setup, "a", Target::PlainLu(6))).await;
        assert!(
            matches!(&missing, Err(RestoreError::MissingChunks { missing: 1, first, .. }) if first[0].0 == 7),
            "{missing:?}"
        );
        assert_eq!(code(missing), tonic::Code::DataLoss);
        assert_eq!(setup.array.blocks_written.load(Ordering::Relaxed), 0);
        assert!(r.info("a").is_err(), "no job was started");
    }
}
