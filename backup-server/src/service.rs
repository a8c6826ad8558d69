//! The gRPC adapter: `splitmirror.backup.v1` onto [`Backups`] and
//! [`Restores`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use splitmirror_proto::backup::v1 as pb;
use splitmirror_proto::backup::v1::backup_service_server::{BackupService, BackupServiceServer};
use splitmirror_proto::node;
use tonic::{Request, Response, Status};

/// The methods only the control identities (`--control-identity`, the
/// console by default) may call: they start work that reads the array or
/// the store for a long time, writes the array (a restore), or stop it.
/// Get, List and Watch (WatchBackup, WatchRestore) answer any identity of
/// the cluster's CA.
pub const CONTROL_METHODS: &[&str] = &[
    "/splitmirror.backup.v1.BackupService/StartBackup",
    "/splitmirror.backup.v1.BackupService/StartRestore",
    "/splitmirror.backup.v1.BackupService/CancelBackup",
    "/splitmirror.backup.v1.BackupService/VerifyBackup",
    "/splitmirror.backup.v1.BackupService/PruneBackups",
    "/splitmirror.backup.v1.BackupService/CollectGarbage",
];

pub mod validate;

use crate::backups::{BackupError, BackupInfo, Backups, FailureKind, JobState};
use crate::blobs::BlobError;
use crate::manifest::{self, Manifest, SnapshotRecord};
use crate::restore::{
    PROGRESS_INTERVAL, RestoreError, RestoreFailureKind, RestoreInfo, RestorePhase, RestoreState,
    Restores,
};
use crate::store::{ChunkProblemKind, StoreError};

/// How often `WatchBackup` reports progress while nothing else changes.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// The largest request message the backup server decodes. Its requests
/// are small: ids, run ids, a label, a snapshot reference — a few hundred
/// bytes; 64 KiB leaves room for any label an operator types and refuses
/// anything bigger with `RESOURCE_EXHAUSTED` before it is decoded.
pub const MAX_REQUEST_MESSAGE_BYTES: usize = 64 << 10;
/// The largest answer it encodes: `GetBackup` with every chunk digest
/// (32 bytes per 1 MiB chunk) of a large image.
pub const MAX_ANSWER_MESSAGE_BYTES: usize = node::MAX_MESSAGE_BYTES;

pub struct BackupGrpc {
    backups: Arc<Backups>,
    restores: Arc<Restores>,
}

impl BackupGrpc {
    pub fn new(backups: Arc<Backups>, restores: Arc<Restores>) -> Self {
        Self { backups, restores }
    }
}

/// The gRPC service over `backups` and `restores`, with its message
/// limits. No compression is enabled (tonic compresses nothing unless
/// asked).
pub fn server(backups: Arc<Backups>, restores: Arc<Restores>) -> BackupServiceServer<BackupGrpc> {
    BackupServiceServer::new(BackupGrpc::new(backups, restores))
        .max_decoding_message_size(MAX_REQUEST_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_ANSWER_MESSAGE_BYTES)
}

/// One code per error, decided here and nowhere else. A fault of the array,
/// of db-server or of the store is INTERNAL (UNAVAILABLE when the node did
/// not answer), never the caller's INVALID_ARGUMENT.
impl From<BackupError> for Status {
    fn from(error: BackupError) -> Self {
        let message = error.to_string();
        match error {
            BackupError::NotFound(_) | BackupError::UnknownLu(_) => Status::not_found(message),
            BackupError::UnknownVolume { .. } => Status::not_found(message),
            BackupError::Malformed(_)
            | BackupError::BadId(_)
            | BackupError::BadRunId { .. }
            | BackupError::BadRetention(_) => Status::invalid_argument(message),
            BackupError::NotFrozen(_) | BackupError::NotComplete { .. } => {
                Status::failed_precondition(message)
            }
            BackupError::ArrayUnavailable(_) | BackupError::OwnerUnavailable(_) => {
                Status::unavailable(message)
            }
            BackupError::Store(store) => store_status(store, message),
            BackupError::DamagedManifest { .. } => Status::data_loss(message),
            BackupError::ArrayFailed(_) | BackupError::OwnerFailed(_) | BackupError::Task(_) => {
                Status::internal(message)
            }
        }
    }
}

/// One code per refusal of a restore, decided here and nowhere else.
impl From<RestoreError> for Status {
    fn from(error: RestoreError) -> Self {
        let message = error.to_string();
        match error {
            RestoreError::Malformed(_)
            | RestoreError::BadRunId(_)
            | RestoreError::BadBackupId(_)
            | RestoreError::NotPlain { .. } => Status::invalid_argument(message),
            RestoreError::BackupNotFound(_)
            | RestoreError::NoSuchRun(_)
            | RestoreError::UnknownLu(_)
            | RestoreError::UnknownVolume { .. } => Status::not_found(message),
            RestoreError::NotComplete { .. }
            | RestoreError::SizeDiffers { .. }
            | RestoreError::NotAMirror { .. }
            | RestoreError::NotOffline { .. }
            | RestoreError::LuBusy { .. }
            | RestoreError::RunIdReused { .. } => Status::failed_precondition(message),
            RestoreError::DamagedManifest { .. } | RestoreError::MissingChunks { .. } => {
                Status::data_loss(message)
            }
            RestoreError::ArrayUnavailable(_) | RestoreError::OwnerUnavailable(_) => {
                Status::unavailable(message)
            }
            RestoreError::ArrayFailed(_) | RestoreError::OwnerFailed(_) => {
                Status::internal(message)
            }
            RestoreError::Store(store) => store_status(store, message),
        }
    }
}

fn restore_progress_of(info: RestoreInfo) -> pb::RestoreProgress {
    let none = pb::RestoreFailure::Unspecified;
    let (state, failure, error, verified, verification) = match info.state {
        RestoreState::Running => (
            pb::RestoreState::Running,
            none,
            String::new(),
            false,
            String::new(),
        ),
        RestoreState::Complete { verification } => (
            pb::RestoreState::Complete,
            none,
            String::new(),
            true,
            verification,
        ),
        RestoreState::Failed { kind, message } => (
            pb::RestoreState::Failed,
            restore_failure_to_pb(kind),
            message,
            false,
            String::new(),
        ),
    };
    pb::RestoreProgress {
        run_id: info.run_id,
        backup_id: info.backup_id,
        state: state.into(),
        phase: match info.phase {
            RestorePhase::Comparing => pb::RestorePhase::Comparing,
            RestorePhase::Checking => pb::RestorePhase::Checking,
            RestorePhase::Writing => pb::RestorePhase::Writing,
            RestorePhase::Verifying => pb::RestorePhase::Verifying,
            RestorePhase::Done => pb::RestorePhase::Done,
        }
        .into(),
        lu: info.lu,
        volume: info.volume,
        chunks_total: info.chunks_total,
        chunks_compared: info.chunks_compared,
        chunks_to_write: info.chunks_to_write,
        chunks_written: info.chunks_written,
        bytes_written: info.bytes_written,
        throughput_bytes_per_s: info.throughput_bytes_per_s,
        elapsed_ms: info.elapsed_ms,
        verified,
        verification,
        ledger_sequence: info.ledger_sequence,
        image_digest: info.image_digest.to_vec(),
        error,
        failure: failure.into(),
    }
}

fn restore_failure_to_pb(kind: RestoreFailureKind) -> pb::RestoreFailure {
    match kind {
        RestoreFailureKind::NodeUnavailable => pb::RestoreFailure::NodeUnavailable,
        RestoreFailureKind::ArrayFailed => pb::RestoreFailure::ArrayFailed,
        RestoreFailureKind::StoreFailed => pb::RestoreFailure::StoreFailed,
        RestoreFailureKind::ChunkDamaged => pb::RestoreFailure::ChunkDamaged,
        RestoreFailureKind::NotOffline => pb::RestoreFailure::NotOffline,
        RestoreFailureKind::VerifyFailed => pb::RestoreFailure::VerifyFailed,
        RestoreFailureKind::Internal => pb::RestoreFailure::Internal,
    }
}

/// A store failure's code: unreachable → UNAVAILABLE, refused →
/// PERMISSION_DENIED, a damaged index or a missing or corrupt chunk →
/// DATA_LOSS (the message names it), the rest INTERNAL.
fn store_status(error: StoreError, message: String) -> Status {
    match error {
        StoreError::NotFound(_) => Status::not_found(message),
        StoreError::BadId(_) => Status::invalid_argument(message),
        StoreError::Blob(BlobError::NotFound(_)) => Status::not_found(message),
        StoreError::Blob(BlobError::Unavailable { .. }) => Status::unavailable(message),
        StoreError::Blob(BlobError::PermissionDenied { .. }) => Status::permission_denied(message),
        StoreError::Damaged { .. }
        | StoreError::MissingChunk { .. }
        | StoreError::CorruptChunk { .. } => Status::data_loss(message),
        StoreError::BadLocation(_)
        | StoreError::Blob(BlobError::Failed { .. })
        | StoreError::NeedsConversion { .. }
        | StoreError::Export { .. }
        | StoreError::Task(_) => Status::internal(message),
    }
}

fn snapshot_to_pb(s: &SnapshotRecord) -> pb::SnapshotRecord {
    pb::SnapshotRecord {
        volume: s.volume,
        holder_run_id: s.holder_run_id.clone(),
        ledger_sequence: s.ledger_sequence,
        snapshot_id: s.snapshot_id,
        owner: s.owner.clone(),
        confirmed_before_unix_ms: s.confirmed_before_unix_ms,
        confirmed_after_unix_ms: s.confirmed_after_unix_ms,
    }
}

/// The one conversion from the store's `manifest.json` to the wire
/// `Manifest`: hex digests become 32-byte values, and the per-chunk
/// digests are sent only with `include_digests`. A digest that is not hex
/// BLAKE3 (an edited or damaged file) is [`BackupError::DamagedManifest`].
pub fn manifest_to_pb(m: &Manifest, include_digests: bool) -> Result<pb::Manifest, BackupError> {
    let damaged = |what: String| BackupError::DamagedManifest {
        id: m.backup_id.clone(),
        what,
    };
    let image_digest = manifest::from_hex(&m.image_digest)
        .ok_or_else(|| damaged("the image digest is not a hex BLAKE3 digest".into()))?;
    let chunk_digests = if include_digests {
        m.chunk_digests
            .iter()
            .enumerate()
            .map(|(index, hex)| {
                manifest::from_hex(hex).map(|d| d.to_vec()).ok_or_else(|| {
                    damaged(format!("chunk digest {index} is not a hex BLAKE3 digest"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    Ok(pb::Manifest {
        format_version: m.format_version,
        backup_id: m.backup_id.clone(),
        run_id: m.run_id.clone(),
        label: m.label.clone(),
        source_array: m.source_array.clone(),
        source_lu: m.source_lu,
        block_size_bytes: m.block_size_bytes,
        block_count: m.block_count,
        size_bytes: m.size_bytes,
        started_at_unix_ms: m.started_at_unix_ms,
        completed_at_unix_ms: m.completed_at_unix_ms,
        snapshot: m.snapshot.as_ref().map(snapshot_to_pb),
        live: m.live,
        ledger_sequence: m.ledger_sequence,
        chunk_size_bytes: m.chunk_size_bytes,
        chunk_count: m.chunk_digests.len() as u64,
        chunk_digests,
        image_digest: image_digest.to_vec(),
        counts: m.counts.map(|c| pb::ChunkCounts {
            chunks_read: c.chunks_read,
            chunks_reused: c.chunks_reused,
            chunks_zero: c.chunks_zero,
            new_bytes_stored: c.new_bytes_stored,
            bytes_read: c.bytes_read,
            verify_read: c.verify_read,
        }),
    })
}

/// The state, the failure kind (unspecified unless failed) and the text.
fn state_to_pb(state: &JobState) -> (pb::BackupState, pb::BackupFailure, String) {
    let none = pb::BackupFailure::Unspecified;
    match state {
        JobState::Running => (pb::BackupState::Running, none, String::new()),
        JobState::Complete => (pb::BackupState::Complete, none, String::new()),
        JobState::Failed { kind, message } => (
            pb::BackupState::Failed,
            failure_to_pb(*kind),
            message.clone(),
        ),
        JobState::Cancelled => (pb::BackupState::Cancelled, none, "cancelled".into()),
    }
}

fn failure_to_pb(kind: FailureKind) -> pb::BackupFailure {
    match kind {
        FailureKind::NodeUnavailable => pb::BackupFailure::NodeUnavailable,
        FailureKind::NotFrozen => pb::BackupFailure::NotFrozen,
        FailureKind::ArrayFailed => pb::BackupFailure::ArrayFailed,
        FailureKind::WrongSize => pb::BackupFailure::WrongSize,
        FailureKind::StoreFailed => pb::BackupFailure::StoreFailed,
        FailureKind::StoreUnavailable => pb::BackupFailure::StoreUnavailable,
        FailureKind::StoreDenied => pb::BackupFailure::StoreDenied,
        FailureKind::DigestMismatch => pb::BackupFailure::DigestMismatch,
        FailureKind::Internal => pb::BackupFailure::Internal,
    }
}

fn info_to_pb(info: BackupInfo, include_digests: bool) -> Result<pb::BackupInfo, BackupError> {
    let (state, failure, error) = state_to_pb(&info.state);
    let consistency = info.consistency();
    let manifest = info
        .manifest
        .as_ref()
        .map(|m| manifest_to_pb(m, include_digests))
        .transpose()?;
    Ok(pb::BackupInfo {
        backup_id: info.backup_id,
        run_id: info.run_id,
        state: state.into(),
        lu: info.lu,
        bytes_done: info.bytes_done,
        bytes_total: info.bytes_total,
        error,
        label: info.label,
        live: info.live,
        snapshot: info.snapshot.as_ref().map(snapshot_to_pb),
        consistency,
        manifest,
        failure: failure.into(),
    })
}

fn progress_of(info: &BackupInfo) -> pb::BackupProgress {
    let (state, failure, error) = state_to_pb(&info.state);
    pb::BackupProgress {
        backup_id: info.backup_id.clone(),
        state: state.into(),
        bytes_done: info.bytes_done,
        bytes_total: info.bytes_total,
        throughput_bytes_per_s: info.throughput_bytes_per_s,
        error,
        failure: failure.into(),
    }
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::BackupProgress, Status>> + Send>>;

#[tonic::async_trait]
impl BackupService for BackupGrpc {
    async fn start_restore(
        &self,
        request: Request<pb::StartRestoreRequest>,
    ) -> Result<Response<pb::StartRestoreResponse>, Status> {
        let request = validate::start_restore(request.into_inner())?;
        let span = tracing::Span::current();
        span.record("run_id", request.run_id.as_str());
        span.record("backup_id", request.backup_id.as_str());
        match request.target {
            crate::restore::Target::Volume(volume) => span.record("volume", volume),
            crate::restore::Target::PlainLu(lu) => span.record("lu", lu),
        };
        let already_started = self.restores.start(request).await?;
        Ok(Response::new(pb::StartRestoreResponse { already_started }))
    }

    type WatchRestoreStream =
        Pin<Box<dyn Stream<Item = Result<pb::RestoreProgress, Status>> + Send>>;

    async fn watch_restore(
        &self,
        request: Request<pb::RestoreIdRequest>,
    ) -> Result<Response<Self::WatchRestoreStream>, Status> {
        let run_id = validate::restore_run_id(request.into_inner().run_id)?;
        let receiver = self.restores.subscribe(&run_id)?;
        let restores = self.restores.clone();
        // Sends the progress now, then on every state or phase change or
        // interval, and ends after sending a finished state.
        let stream =
            futures_util::stream::unfold((receiver, false), move |(mut receiver, finished)| {
                let restores = restores.clone();
                let run_id = run_id.clone();
                async move {
                    if finished {
                        return None;
                    }
                    let info = match restores.info(&run_id) {
                        Ok(info) => info,
                        Err(e) => return Some((Err(Status::from(e)), (receiver, true))),
                    };
                    let done = info.state.is_finished();
                    if !done {
                        let _ = tokio::time::timeout(PROGRESS_INTERVAL, receiver.changed()).await;
                    }
                    Some((Ok(restore_progress_of(info)), (receiver, done)))
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn start_backup(
        &self,
        request: Request<pb::StartBackupRequest>,
    ) -> Result<Response<pb::StartBackupResponse>, Status> {
        let request = validate::start_backup(request.into_inner())?;
        let span = tracing::Span::current();
        span.record("run_id", request.run_id.as_str());
        span.record("lu", request.lu);
        let (backup_id, already_started) = self.backups.start(request).await?;
        span.record("backup_id", backup_id.as_str());
        Ok(Response::new(pb::StartBackupResponse {
            backup_id,
            already_started,
        }))
    }

    type WatchBackupStream = ProgressStream;

    async fn watch_backup(
        &self,
        request: Request<pb::BackupIdRequest>,
    ) -> Result<Response<Self::WatchBackupStream>, Status> {
        let id = validate::backup_id(request.into_inner().backup_id)?.id;
        let receiver = self.backups.subscribe(&id).await?;
        let backups = self.backups.clone();
        // Sends the progress now, then on every state change or interval,
        // and ends after sending a finished state.
        let stream =
            futures_util::stream::unfold((receiver, false), move |(mut receiver, finished)| {
                let backups = backups.clone();
                let id = id.clone();
                async move {
                    if finished {
                        return None;
                    }
                    let info = match backups.get(&id).await {
                        Ok(info) => info,
                        Err(e) => return Some((Err(Status::from(e)), (receiver, true))),
                    };
                    let done = info.state.is_finished();
                    if !done && let Some(rx) = &mut receiver {
                        let _ = tokio::time::timeout(WATCH_INTERVAL, rx.changed()).await;
                    }
                    Some((Ok(progress_of(&info)), (receiver, done)))
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_backup(
        &self,
        request: Request<pb::GetBackupRequest>,
    ) -> Result<Response<pb::BackupInfo>, Status> {
        let request = request.into_inner();
        let id = validate::backup_id(request.backup_id)?;
        let info = self.backups.get(&id.id).await?;
        Ok(Response::new(info_to_pb(info, request.include_digests)?))
    }

    async fn list_backups(
        &self,
        _request: Request<pb::ListBackupsRequest>,
    ) -> Result<Response<pb::ListBackupsResponse>, Status> {
        // A backup whose manifest is damaged is left out with a warning, as
        // the store leaves out one whose manifest.json is unreadable: one
        // damaged backup does not hide the others.
        let backups = self
            .backups
            .list()
            .await?
            .into_iter()
            .filter_map(|info| {
                let id = info.backup_id.clone();
                info_to_pb(info, false)
                    .inspect_err(|e| tracing::warn!(backup_id = %id, "listing backups: {e}"))
                    .ok()
            })
            .collect();
        let summary = self.backups.summary().await?;
        Ok(Response::new(pb::ListBackupsResponse {
            backups,
            store: Some(pb::StoreSummary {
                location: summary.location,
                chunk_size_bytes: summary.chunk_size_bytes,
                chunks: summary.chunks,
                stored_bytes: summary.stored_bytes,
                logical_bytes: summary.logical_bytes,
                gc_grace_s: summary.gc_grace.as_secs(),
            }),
        }))
    }

    async fn cancel_backup(
        &self,
        request: Request<pb::BackupIdRequest>,
    ) -> Result<Response<pb::BackupInfo>, Status> {
        let id = validate::backup_id(request.into_inner().backup_id)?;
        let info = self.backups.cancel(&id.id).await?;
        Ok(Response::new(info_to_pb(info, false)?))
    }

    async fn verify_backup(
        &self,
        request: Request<pb::BackupIdRequest>,
    ) -> Result<Response<pb::VerifyBackupResponse>, Status> {
        let id = validate::backup_id(request.into_inner().backup_id)?;
        let outcome = self.backups.verify(&id.id).await?;
        Ok(Response::new(pb::VerifyBackupResponse {
            ok: outcome.ok,
            chunks: outcome.chunks,
            image_digest: outcome.image_digest_hex(),
            frozen: outcome.frozen(),
            live: outcome.manifest.live,
            proved: outcome.proved(),
            not_checked: outcome.not_checked(),
            bad_chunks: outcome.bad_chunks(),
            problems: outcome
                .problems
                .iter()
                .map(|p| pb::ChunkProblem {
                    index: p.index,
                    digest: manifest::to_hex(&p.digest),
                    kind: match p.kind {
                        ChunkProblemKind::Missing => pb::ChunkProblemKind::Missing,
                        ChunkProblemKind::Corrupt => pb::ChunkProblemKind::Corrupt,
                    }
                    .into(),
                })
                .collect(),
            error: outcome.problem.clone().unwrap_or_default(),
        }))
    }

    async fn prune_backups(
        &self,
        request: Request<pb::PruneBackupsRequest>,
    ) -> Result<Response<pb::PruneBackupsResponse>, Status> {
        let prune = validate::prune_backups(request.into_inner())?;
        let decisions = self
            .backups
            .prune(prune.volume, prune.retention, prune.dry_run)
            .await?;
        let kept = decisions.iter().filter(|d| d.keep).count() as u32;
        Ok(Response::new(pb::PruneBackupsResponse {
            removed: decisions.len() as u32 - kept,
            kept,
            dry_run: prune.dry_run,
            decisions: decisions
                .into_iter()
                .map(|d| pb::PruneDecision {
                    backup_id: d.backup_id,
                    completed_at_unix_ms: d.completed_at_unix_ms,
                    ledger_sequence: d.ledger_sequence,
                    keep: d.keep,
                    reason: d.reason,
                })
                .collect(),
        }))
    }

    async fn collect_garbage(
        &self,
        _request: Request<pb::CollectGarbageRequest>,
    ) -> Result<Response<pb::CollectGarbageResponse>, Status> {
        let report = self.backups.collect_garbage().await?;
        let summary_grace_s = self.backups.summary_grace().as_secs();
        Ok(Response::new(pb::CollectGarbageResponse {
            chunks_listed: report.chunks_listed,
            chunks_referenced: report.chunks_referenced,
            chunks_protected: report.chunks_protected,
            chunks_young: report.chunks_young,
            chunks_removed: report.chunks_removed,
            bytes_removed: report.bytes_removed,
            writers_active: report.writers_active,
            writers_expired: report.writers_expired,
            gc_grace_s: summary_grace_s,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(chunks: u64) -> Manifest {
        let digests: Vec<[u8; 32]> = (0..chunks)
            .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
            .collect();
        Manifest {
            format_version: manifest::FORMAT_VERSION,
            backup_id: "0190d3c4-0000-7000-8000-000000000000".into(),
            run_id: "run-1".into(),
            label: String::new(),
            source_array: "127.0.0.1:50051".into(),
            source_lu: 2,
            block_size_bytes: 4096,
            block_count: chunks * 256,
            size_bytes: chunks << 20,
            started_at_unix_ms: 1,
            completed_at_unix_ms: 2,
            ledger_sequence: Some(42),
            snapshot: Some(SnapshotRecord {
                volume: 0,
                holder_run_id: "run-1".into(),
                ledger_sequence: 42,
                snapshot_id: 0xabc,
                owner: "127.0.0.1:50052".into(),
                confirmed_before_unix_ms: 1,
                confirmed_after_unix_ms: 2,
                method: manifest::SnapshotMethod::Split,
                mate: 1,
            }),
            live: false,
            chunk_size_bytes: manifest::CHUNK_SIZE_BYTES,
            image_digest: manifest::to_hex(&manifest::image_digest(&digests)),
            chunk_digests: digests.iter().map(manifest::to_hex).collect(),
            counts: Some(manifest::ChunkCounts {
                chunks_read: 2,
                chunks_reused: 3,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_wire_manifest_carries_chunk_digests_only_when_asked() {
        let on_disk = manifest(5);
        let summary = manifest_to_pb(&on_disk, false).expect("summary");
        assert_eq!(summary.chunk_count, 5);
        assert!(summary.chunk_digests.is_empty());
        let image_digest = manifest::from_hex(&on_disk.image_digest).expect("hex");
        assert_eq!(summary.image_digest, image_digest.to_vec());
        let snapshot = summary.snapshot.clone().expect("snapshot");
        assert_eq!(
            (snapshot.snapshot_id, snapshot.ledger_sequence),
            (0xabc, 42)
        );
        let full = manifest_to_pb(&on_disk, true).expect("with digests");
        let expected: Vec<Vec<u8>> = on_disk
            .chunk_digests
            .iter()
            .map(|hex| manifest::from_hex(hex).expect("hex").to_vec())
            .collect();
        assert_eq!(full.chunk_digests, expected);
        assert_eq!(
            pb::Manifest {
                chunk_digests: Vec::new(),
                ..full
            },
            summary
        );
    }

    #[test]
    fn a_damaged_digest_is_data_loss_not_a_wrong_answer() {
        let mut damaged = manifest(3);
        damaged.chunk_digests[1] = "not hex".into();
        // The summary does not read the chunk digests.
        assert!(manifest_to_pb(&damaged, false).is_ok());
        let error = manifest_to_pb(&damaged, true).expect_err("damaged");
        assert!(
            matches!(&error, BackupError::DamagedManifest { what, .. } if what.contains("chunk digest 1")),
            "{error}"
        );
        assert_eq!(Status::from(error).code(), tonic::Code::DataLoss);
    }
}
