//! The backup program (1526): starts jobs, answers their progress, lists
//! and verifies what the store holds. A job copies either the mate LU of a
//! snapshot that db-server confirms held (before the first read and after
//! the last one) or, when the caller asks for it, a live LU.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use splitmirror_proto::client::{ClientError, ErrorKind};
use splitmirror_proto::run_id::RunIdError;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::gc::GcReport;
use crate::job::{self, FrozenBy, JobError, JobSpec, Progress};
use crate::manifest::{self, Manifest, SnapshotRecord};
use crate::owner::{NotFrozen, OwnerFailure, SnapshotOwner, SnapshotRef, check_held};
use crate::prune::{self, Decision, Retention};
use crate::source::LuSource;
use crate::store::{ChunkStore, StoreError, StoreSummary, VerifyOutcome};

/// How long `CancelBackup` waits for the job to stop before it answers.
pub const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// What a backup copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    /// The mate LU of this snapshot (confirmed with db-server).
    Snapshot(SnapshotRef),
    /// The LU as it is, while it may be written (asked for explicitly).
    Live,
}

/// A request to start a backup, checked by
/// [`validate::start_backup`](crate::service::validate::start_backup).
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub run_id: String,
    pub lu: u32,
    pub expected_block_count: Option<u64>,
    pub label: String,
    pub max_bytes_per_s: Option<u64>,
    pub wanted: Wanted,
    pub verify_read: bool,
    pub checked: crate::service::validate::Checked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Running,
    Complete,
    /// The job failed: why, as a program acts on it, and as people read it.
    Failed {
        kind: FailureKind,
        message: String,
    },
    Cancelled,
}

/// Why a job failed, for a program to act on (the wire's `BackupFailure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The array or db-server did not answer: retryable by a new run.
    NodeUnavailable,
    /// The snapshot was lost, replaced or not confirmed: not retryable.
    NotFrozen,
    /// The array failed or sent other than asked.
    ArrayFailed,
    /// The LU is not the size the request expected.
    WrongSize,
    /// The store could not be written or synced.
    StoreFailed,
    /// The store (S3) did not answer: retryable by a new run.
    StoreUnavailable,
    /// The store refused the credentials or the operation.
    StoreDenied,
    /// A chunk as read differs from the array's digest of it.
    DigestMismatch,
    /// db-server failed the confirmation, or this server failed.
    Internal,
}

impl JobState {
    pub fn is_finished(&self) -> bool {
        *self != JobState::Running
    }
}

/// What `GetBackup` and `ListBackups` report.
#[derive(Debug, Clone)]
pub struct BackupInfo {
    pub backup_id: String,
    pub run_id: String,
    pub label: String,
    pub lu: u32,
    pub state: JobState,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub throughput_bytes_per_s: u64,
    /// True when the LU is copied without a snapshot.
    pub live: bool,
    /// The snapshot the backup copies (confirmed before the first read;
    /// for a complete backup, after the last one too).
    pub snapshot: Option<SnapshotRecord>,
    pub manifest: Option<Arc<Manifest>>,
}

impl BackupInfo {
    /// "frozen (snapshot of volume 0 held by run …)" or "live (not frozen)".
    pub fn consistency(&self) -> String {
        manifest::describe_consistency(self.snapshot.as_ref(), self.live)
    }
}

/// Why a call on the backups failed. Each variant says whose fault it is
/// and whether trying again can help; the gRPC adapter maps each to one
/// code (`From<BackupError> for Status`, no catch-all arm).
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// No job of this process and no complete backup has this id. Not
    /// retryable.
    #[error("backup {0} does not exist")]
    NotFound(String),
    /// The request contradicts itself or lacks what it needs (a start that
    /// names a snapshot and asks for a live copy). Not retryable: the
    /// caller's fault.
    #[error("{0}")]
    Malformed(String),
    /// The id cannot name a backup (not hex and dashes, or too long). Not
    /// retryable: the caller's fault.
    #[error("{0:?} is not a backup id")]
    BadId(String),
    /// A run id of the request breaks the run id rules. Not retryable: the
    /// caller's fault.
    #[error("{field}: {source}")]
    BadRunId {
        /// Which field: "run_id" or "the snapshot's holder_run_id".
        field: &'static str,
        #[source]
        source: RunIdError,
    },
    /// The array does not define the LU. Not retryable.
    #[error("LU {0} does not exist on the array")]
    UnknownLu(u32),
    /// The array did not answer (a transient client error). Retryable.
    #[error("the array is unavailable: {0}")]
    ArrayUnavailable(#[source] ClientError),
    /// The array answered with a failure that is not the caller's fault.
    /// Not retryable as it is.
    #[error("the array failed: {0}")]
    ArrayFailed(#[source] ClientError),
    /// db-server does not know the volume the request names. Not retryable.
    #[error(
        "cannot confirm that LU {lu} is frozen by the snapshot of volume {volume}: db-server does not know the volume ({source})"
    )]
    UnknownVolume {
        volume: u32,
        lu: u32,
        #[source]
        source: ClientError,
    },
    /// The named snapshot does not freeze the LU (none is held, another
    /// run holds it, its mate is another LU, it has no id). Not retryable
    /// until the caller names the snapshot that freezes the LU.
    #[error("{0}")]
    NotFrozen(#[from] NotFrozen),
    /// db-server did not answer whether the snapshot is held. Retryable.
    #[error("db-server is unavailable: {0}")]
    OwnerUnavailable(#[source] ClientError),
    /// db-server failed the question. Not retryable as it is.
    #[error("db-server failed: {0}")]
    OwnerFailed(#[source] ClientError),
    /// Verify of a backup that is running, failed or was cancelled. Not
    /// retryable (a running one: once it completes).
    #[error("backup {id} is not complete: {}", not_complete_reason(.state))]
    NotComplete { id: String, state: JobState },
    /// The store failed: unreachable, refused, an I/O error, a damaged
    /// index or chunk (the variant says which; the adapter maps each).
    #[error("{0}")]
    Store(#[source] StoreError),
    /// A prune without a rule, or with `keep_last` 0. Not retryable.
    #[error("{0}")]
    BadRetention(String),
    /// The manifest of a complete backup holds a digest that is not a
    /// BLAKE3 digest in hex (it was edited or damaged). Not retryable.
    #[error("the manifest of backup {id} is damaged: {what}")]
    DamagedManifest { id: String, what: String },
    /// A blocking task (verify's hashing) panicked or was dropped at
    /// shutdown. Not retryable.
    #[error("a blocking task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

fn not_complete_reason(state: &JobState) -> String {
    match state {
        JobState::Running => "it is still running".to_string(),
        JobState::Failed { message, .. } => format!("it failed: {message}"),
        JobState::Cancelled => "it was cancelled".to_string(),
        JobState::Complete => "it is complete".to_string(),
    }
}

impl From<StoreError> for BackupError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(id) => BackupError::NotFound(id),
            StoreError::BadId(id) => BackupError::BadId(id),
            StoreError::BadLocation(_)
            | StoreError::Blob(_)
            | StoreError::Damaged { .. }
            | StoreError::MissingChunk { .. }
            | StoreError::CorruptChunk { .. }
            | StoreError::NeedsConversion { .. }
            | StoreError::Export { .. }
            | StoreError::Task(_) => BackupError::Store(error),
        }
    }
}

struct Job {
    spec: JobSpec,
    progress: Progress,
    cancel: CancellationToken,
    state: watch::Sender<JobState>,
    manifest: Mutex<Option<Arc<Manifest>>>,
}

pub struct Backups {
    store: Arc<ChunkStore>,
    source: Arc<dyn LuSource>,
    owner: Arc<dyn SnapshotOwner>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    /// run id → backup id, so that a retried start answers the first job.
    by_run: Mutex<HashMap<String, String>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    /// The rate cap of jobs that do not ask for one.
    default_max_bytes_per_s: Option<u64>,
}

impl Backups {
    pub fn new(
        store: Arc<ChunkStore>,
        source: Arc<dyn LuSource>,
        owner: Arc<dyn SnapshotOwner>,
        tasks: TaskTracker,
        cancel: CancellationToken,
        default_max_bytes_per_s: Option<u64>,
    ) -> Self {
        Self {
            store,
            source,
            owner,
            jobs: Mutex::new(HashMap::new()),
            by_run: Mutex::new(HashMap::new()),
            tasks,
            cancel,
            default_max_bytes_per_s,
        }
    }

    /// Starts a job and answers its backup id at once (and whether the run
    /// id had started one already, in this process or in the store). A
    /// snapshot is confirmed with db-server here, before the first read.
    pub async fn start(
        self: &Arc<Self>,
        request: StartRequest,
    ) -> Result<(String, bool), BackupError> {
        let run_id = request.run_id.as_str();
        let lu = request.lu;
        if let Some(id) = self.by_run.lock().expect("by_run").get(run_id) {
            return Ok((id.clone(), true));
        }
        if let Some(done) = self
            .store
            .list()
            .await?
            .into_iter()
            .find(|m| m.run_id == run_id)
        {
            return Ok((done.backup_id.clone(), true));
        }
        // A snapshot is confirmed with its owner first: whether the LU is
        // its mate is a better answer than the array's NOT_FOUND for an LU
        // this server's identity is not granted (LUN masking shows it only
        // the mates). Then unknown LUs and an unreachable array are
        // answered now, not as a job that fails later.
        let held = match request.wanted {
            Wanted::Live => None,
            Wanted::Snapshot(wanted) => {
                let before = self
                    .owner
                    .snapshot(wanted.volume, wanted.mate)
                    .await
                    .map_err(|e| match OwnerFailure::of(&e) {
                        OwnerFailure::UnknownVolume => BackupError::UnknownVolume {
                            volume: wanted.volume,
                            lu,
                            source: e,
                        },
                        OwnerFailure::NoSnapshot => BackupError::NotFrozen(NotFrozen::NoSnapshot {
                            volume: wanted.volume,
                            holder_run_id: wanted.holder_run_id.clone(),
                            lu,
                            cause: Box::new(e),
                        }),
                        OwnerFailure::Unavailable => BackupError::OwnerUnavailable(e),
                        OwnerFailure::Failed => BackupError::OwnerFailed(e),
                    })?;
                check_held(&wanted, lu, &before)?;
                Some((wanted, before))
            }
        };
        let geometry = self
            .source
            .geometry(lu)
            .await
            .map_err(|e| array_error(lu, e))?;
        // An unreachable store, or one that refuses this server's
        // credentials, is answered now (UNAVAILABLE, PERMISSION_DENIED),
        // not as a job that fails later.
        self.store.probe().await?;
        let mut expected_block_count = request.expected_block_count;
        let frozen_by = match held {
            Some((wanted, before)) => {
                if before.block_count != geometry.block_count {
                    return Err(NotFrozen::SizeDiffers {
                        volume: wanted.volume,
                        lu,
                        owner_block_count: before.block_count,
                        array_block_count: geometry.block_count,
                    }
                    .into());
                }
                expected_block_count.get_or_insert(before.block_count);
                FrozenBy::Snapshot {
                    wanted,
                    before,
                    confirmed_before_unix_ms: manifest::now_unix_ms(),
                }
            }
            None => FrozenBy::Live,
        };
        let backup_id = uuid::Uuid::now_v7().to_string();
        let live = frozen_by == FrozenBy::Live;
        let job = Arc::new(Job {
            spec: JobSpec {
                backup_id: backup_id.clone(),
                run_id: run_id.to_string(),
                lu,
                expected_block_count,
                label: request.label.clone(),
                max_bytes_per_s: request.max_bytes_per_s.or(self.default_max_bytes_per_s),
                frozen_by,
                verify_read: request.verify_read,
            },
            progress: Progress::new(),
            cancel: self.cancel.child_token(),
            state: watch::Sender::new(JobState::Running),
            manifest: Mutex::new(None),
        });
        {
            let mut by_run = self.by_run.lock().expect("by_run");
            if let Some(id) = by_run.get(run_id) {
                // A concurrent start with the same run id won the race.
                return Ok((id.clone(), true));
            }
            by_run.insert(run_id.to_string(), backup_id.clone());
            self.jobs
                .lock()
                .expect("jobs")
                .insert(backup_id.clone(), job.clone());
        }
        let backups = self.clone();
        // The job's span is a child of the StartBackup call's, so the job
        // belongs to the run's trace though it outlives the call.
        let span = tracing::info_span!("backup job", %backup_id, run_id, lu);
        self.tasks.spawn(tracing::Instrument::instrument(
            async move {
                backups.run(job).await;
            },
            span,
        ));
        if live {
            tracing::warn!(%backup_id, run_id, lu, "live backup started: LU {lu} is copied unfrozen, as asked");
        } else {
            tracing::info!(%backup_id, run_id, lu, "backup started");
        }
        Ok((backup_id, false))
    }

    async fn run(&self, job: Arc<Job>) {
        let started = std::time::Instant::now();
        let result = job::run(
            &self.store,
            self.source.as_ref(),
            self.owner.as_ref(),
            &job.spec,
            &job.progress,
            &job.cancel,
        )
        .await;
        let id = &job.spec.backup_id;
        let state = match result {
            Ok(manifest) => {
                let counts = manifest.counts.unwrap_or_default();
                tracing::info!(
                    backup_id = %id,
                    bytes = manifest.size_bytes,
                    image_digest = %manifest.image_digest,
                    chunks_read = counts.chunks_read,
                    chunks_reused = counts.chunks_reused,
                    chunks_zero = counts.chunks_zero,
                    new_bytes_stored = counts.new_bytes_stored,
                    "backup complete"
                );
                let store_bytes = if splitmirror_proto::telemetry::export_enabled() {
                    self.store
                        .summary()
                        .await
                        .inspect_err(|e| tracing::warn!("measuring the store: {e}"))
                        .ok()
                        .map(|s| s.stored_bytes)
                } else {
                    None
                };
                splitmirror_proto::telemetry::record_backup_finished(
                    manifest.size_bytes,
                    started.elapsed(),
                    store_bytes,
                );
                *job.manifest.lock().expect("manifest") = Some(Arc::new(manifest));
                JobState::Complete
            }
            Err(JobError::Cancelled) => {
                tracing::info!(backup_id = %id, "backup cancelled");
                JobState::Cancelled
            }
            Err(error) => {
                let kind = error.failure_kind();
                tracing::warn!(backup_id = %id, ?kind, "backup failed: {error}");
                JobState::Failed {
                    kind,
                    message: error.to_string(),
                }
            }
        };
        job.state.send_replace(state);
    }

    /// The state of a job of this process, if it has one with this id (a
    /// restore refuses a backup that is running, failed or was cancelled).
    pub fn job_state(&self, id: &str) -> Option<JobState> {
        self.job(id).map(|job| job.state.borrow().clone())
    }

    fn job(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().expect("jobs").get(id).cloned()
    }

    fn job_info(job: &Job) -> BackupInfo {
        let manifest = job.manifest.lock().expect("manifest").clone();
        // A complete job's manifest records what was confirmed after the
        // copy too; before that, the spec says what was confirmed before.
        let (live, snapshot) = match (&manifest, &job.spec.frozen_by) {
            (Some(m), _) => (m.live, m.snapshot.clone()),
            (None, FrozenBy::Live) => (true, None),
            (
                None,
                FrozenBy::Snapshot {
                    wanted,
                    before,
                    confirmed_before_unix_ms,
                },
            ) => (
                false,
                Some(SnapshotRecord {
                    volume: wanted.volume,
                    holder_run_id: wanted.holder_run_id.clone(),
                    ledger_sequence: before.ledger_sequence,
                    snapshot_id: before.snapshot_id,
                    owner: String::new(),
                    confirmed_before_unix_ms: *confirmed_before_unix_ms,
                    confirmed_after_unix_ms: 0,
                    method: before.method,
                    mate: wanted.mate,
                }),
            ),
        };
        BackupInfo {
            backup_id: job.spec.backup_id.clone(),
            run_id: job.spec.run_id.clone(),
            label: job.spec.label.clone(),
            lu: job.spec.lu,
            state: job.state.borrow().clone(),
            bytes_done: job
                .progress
                .bytes_done
                .load(std::sync::atomic::Ordering::Relaxed),
            bytes_total: job
                .progress
                .bytes_total
                .load(std::sync::atomic::Ordering::Relaxed),
            throughput_bytes_per_s: job.progress.throughput_bytes_per_s(),
            live,
            snapshot,
            manifest,
        }
    }

    fn manifest_info(manifest: Arc<Manifest>) -> BackupInfo {
        BackupInfo {
            backup_id: manifest.backup_id.clone(),
            run_id: manifest.run_id.clone(),
            label: manifest.label.clone(),
            lu: manifest.source_lu,
            state: JobState::Complete,
            bytes_done: manifest.size_bytes,
            bytes_total: manifest.size_bytes,
            throughput_bytes_per_s: 0,
            live: manifest.live,
            snapshot: manifest.snapshot.clone(),
            manifest: Some(manifest),
        }
    }

    /// A job of this process that is running or did not complete, or a
    /// complete backup as the store holds it now (a pruned one is gone,
    /// whoever pruned it).
    pub async fn get(&self, id: &str) -> Result<BackupInfo, BackupError> {
        if let Some(job) = self.job(id)
            && *job.state.borrow() != JobState::Complete
        {
            return Ok(Self::job_info(&job));
        }
        Ok(Self::manifest_info(self.store.manifest(id).await?))
    }

    /// Jobs of this process that are running or did not complete, and every
    /// complete backup in the store.
    pub async fn list(&self) -> Result<Vec<BackupInfo>, BackupError> {
        let mut infos: Vec<BackupInfo> = self
            .jobs
            .lock()
            .expect("jobs")
            .values()
            .filter(|job| *job.state.borrow() != JobState::Complete)
            .map(|job| Self::job_info(job))
            .collect();
        for manifest in self.store.list().await? {
            if !infos.iter().any(|i| i.backup_id == manifest.backup_id) {
                infos.push(Self::manifest_info(manifest));
            }
        }
        // uuid v7 ids sort by creation time.
        infos.sort_by(|a, b| a.backup_id.cmp(&b.backup_id));
        Ok(infos)
    }

    /// Cancels a job and answers its state once the cancel took effect
    /// (its partial image removed): Cancelled, or the state it had already
    /// ended in. A job that does not stop within [`CANCEL_WAIT`] is
    /// answered as it is then.
    pub async fn cancel(&self, id: &str) -> Result<BackupInfo, BackupError> {
        let Some(job) = self.job(id) else {
            return self.get(id).await;
        };
        job.cancel.cancel();
        let mut state = job.state.subscribe();
        if tokio::time::timeout(CANCEL_WAIT, state.wait_for(JobState::is_finished))
            .await
            .is_err()
        {
            tracing::warn!(backup_id = %id, "the job did not stop within {CANCEL_WAIT:?} of its cancel");
        }
        Ok(Self::job_info(&job))
    }

    /// A receiver that changes when the job's state does.
    pub async fn subscribe(
        &self,
        id: &str,
    ) -> Result<Option<watch::Receiver<JobState>>, BackupError> {
        match self.job(id) {
            Some(job) => Ok(Some(job.state.subscribe())),
            None => self
                .store
                .manifest(id)
                .await
                .map(|_| None)
                .map_err(Into::into),
        }
    }

    /// Re-hashes a complete backup against its manifest. A job of this
    /// process that did not complete is refused with the reason.
    pub async fn verify(&self, id: &str) -> Result<VerifyOutcome, BackupError> {
        if let Some(job) = self.job(id) {
            let state = job.state.borrow().clone();
            if state != JobState::Complete {
                return Err(BackupError::NotComplete {
                    id: id.to_string(),
                    state,
                });
            }
        }
        Ok(self.store.verify(id).await?)
    }

    /// The store's grace period (garbage collection).
    pub fn summary_grace(&self) -> std::time::Duration {
        self.store.gc_grace()
    }

    /// What the store holds.
    pub async fn summary(&self) -> Result<StoreSummary, BackupError> {
        Ok(self.store.summary().await?)
    }

    /// Applies (or, with `dry_run`, only decides) a volume's retention
    /// rules: removes the indexes the rules do not keep, newest first in
    /// the answer. Backups of this process that are still running are not
    /// in the store yet, so never pruned.
    pub async fn prune(
        &self,
        volume: u32,
        retention: Retention,
        dry_run: bool,
    ) -> Result<Vec<Decision>, BackupError> {
        if retention.keep_last.is_none() && retention.keep_within.is_none() {
            return Err(BackupError::BadRetention(
                "say what to keep: keep_last, keep_within_s, or both".into(),
            ));
        }
        if retention.keep_last == Some(0) {
            return Err(BackupError::BadRetention(
                "keep_last must be at least 1 (to remove every backup of a volume, remove them by hand)"
                    .into(),
            ));
        }
        let manifests = self.store.list().await?;
        let refs: Vec<&Manifest> = manifests.iter().map(|m| m.as_ref()).collect();
        let decisions = prune::decide(&refs, volume, retention, manifest::now_unix_ms());
        if !dry_run {
            for decision in decisions.iter().filter(|d| !d.keep) {
                self.store.remove_index(&decision.backup_id).await?;
                // A retried start of the pruned backup's run starts anew.
                self.jobs.lock().expect("jobs").remove(&decision.backup_id);
                self.by_run
                    .lock()
                    .expect("by_run")
                    .retain(|_, id| *id != decision.backup_id);
                tracing::info!(backup_id = %decision.backup_id, volume, "pruned: {}", decision.reason);
            }
        }
        Ok(decisions)
    }

    /// Removes the chunks no backup references (`gc.rs`).
    pub async fn collect_garbage(&self) -> Result<GcReport, BackupError> {
        Ok(self.store.collect_garbage().await?)
    }
}

/// What a failed mode sense of the LU to copy means: the one mapping from
/// the array's error kind to a backup error. An array fault is never the
/// caller's INVALID_ARGUMENT.
fn array_error(lu: u32, error: ClientError) -> BackupError {
    match error.kind {
        ErrorKind::NotFound => BackupError::UnknownLu(lu),
        ErrorKind::Unavailable | ErrorKind::DeadlineExceeded | ErrorKind::Broken => {
            BackupError::ArrayUnavailable(error)
        }
        ErrorKind::InvalidArgument
        | ErrorKind::OutOfRange
        | ErrorKind::FailedPrecondition
        | ErrorKind::ResourceExhausted
        | ErrorKind::AlreadyExists
        | ErrorKind::Aborted
        | ErrorKind::PermissionDenied
        | ErrorKind::DataLoss
        | ErrorKind::Internal => BackupError::ArrayFailed(error),
    }
}
