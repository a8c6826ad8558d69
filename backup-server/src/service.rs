//! The gRPC adapter: `splitmirror.backup.v1` onto [`Backups`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use splitmirror_proto::backup::v1 as pb;
use splitmirror_proto::backup::v1::backup_service_server::BackupService;
use tonic::{Request, Response, Status};

use crate::backups::{BackupError, BackupInfo, Backups, JobState, StartRequest, Wanted};
use crate::manifest::SnapshotRecord;
use crate::owner::SnapshotRef;

/// How often `WatchBackup` reports progress while nothing else changes.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

pub struct BackupGrpc {
    backups: Arc<Backups>,
}

impl BackupGrpc {
    pub fn new(backups: Arc<Backups>) -> Self {
        Self { backups }
    }
}

impl From<BackupError> for Status {
    fn from(error: BackupError) -> Self {
        let message = error.to_string();
        match error {
            BackupError::NotFound(_) => Status::not_found(message),
            BackupError::UnknownLu(_) => Status::not_found(message),
            BackupError::InvalidArgument(_) => Status::invalid_argument(message),
            BackupError::UnknownVolume(_) => Status::not_found(message),
            BackupError::NotFrozen(_) => Status::failed_precondition(message),
            BackupError::NotComplete { .. } => Status::failed_precondition(message),
            BackupError::Unavailable(_) => Status::unavailable(message),
            BackupError::Store(_) => Status::internal(message),
        }
    }
}

impl TryFrom<pb::StartBackupRequest> for StartRequest {
    type Error = Status;

    fn try_from(r: pb::StartBackupRequest) -> Result<Self, Status> {
        let wanted = match (r.snapshot, r.live) {
            (Some(s), false) => Wanted::Snapshot(SnapshotRef {
                volume: s.volume,
                holder_run_id: s.holder_run_id,
            }),
            (None, true) => Wanted::Live,
            (Some(_), true) => {
                return Err(Status::invalid_argument(
                    "name a snapshot or ask for a live backup, not both",
                ));
            }
            (None, false) => {
                return Err(Status::invalid_argument(format!(
                    "LU {} would be copied while it may be written: name the snapshot that freezes it (snapshot: volume and holder_run_id), or set live to copy it unfrozen",
                    r.lu
                )));
            }
        };
        Ok(StartRequest {
            run_id: r.run_id,
            lu: r.lu,
            expected_block_count: r.expected_block_count,
            label: r.label,
            max_bytes_per_s: r.max_bytes_per_s,
            wanted,
        })
    }
}

fn snapshot_to_pb(s: &SnapshotRecord) -> pb::SnapshotRecord {
    pb::SnapshotRecord {
        volume: s.volume,
        holder_run_id: s.holder_run_id.clone(),
        ledger_sequence: s.ledger_sequence,
    }
}

fn state_to_pb(state: &JobState) -> (pb::BackupState, String) {
    match state {
        JobState::Running => (pb::BackupState::Running, String::new()),
        JobState::Complete => (pb::BackupState::Complete, String::new()),
        JobState::Failed(reason) => (pb::BackupState::Failed, reason.clone()),
        JobState::Cancelled => (pb::BackupState::Cancelled, "cancelled".into()),
    }
}

fn info_to_pb(info: BackupInfo) -> pb::BackupInfo {
    let (state, error) = state_to_pb(&info.state);
    let consistency = info.consistency();
    pb::BackupInfo {
        backup_id: info.backup_id,
        run_id: info.run_id,
        state: state.into(),
        lu: info.lu,
        bytes_done: info.bytes_done,
        bytes_total: info.bytes_total,
        error,
        manifest_json: info
            .manifest
            .map(|m| serde_json::to_string(&m).expect("a manifest always serializes"))
            .unwrap_or_default(),
        label: info.label,
        live: info.live,
        snapshot: info.snapshot.as_ref().map(snapshot_to_pb),
        consistency,
    }
}

fn progress_of(info: &BackupInfo) -> pb::BackupProgress {
    let (state, error) = state_to_pb(&info.state);
    pb::BackupProgress {
        backup_id: info.backup_id.clone(),
        state: state.into(),
        bytes_done: info.bytes_done,
        bytes_total: info.bytes_total,
        throughput_bytes_per_s: info.throughput_bytes_per_s,
        error,
    }
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::BackupProgress, Status>> + Send>>;

#[tonic::async_trait]
impl BackupService for BackupGrpc {
    async fn start_backup(
        &self,
        request: Request<pb::StartBackupRequest>,
    ) -> Result<Response<pb::StartBackupResponse>, Status> {
        let request = StartRequest::try_from(request.into_inner())?;
        let (backup_id, already_started) = self.backups.start(request).await?;
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
        let id = request.into_inner().backup_id;
        let receiver = self.backups.subscribe(&id)?;
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
                    let info = match backups.get(&id) {
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
        request: Request<pb::BackupIdRequest>,
    ) -> Result<Response<pb::BackupInfo>, Status> {
        let info = self.backups.get(&request.into_inner().backup_id)?;
        Ok(Response::new(info_to_pb(info)))
    }

    async fn list_backups(
        &self,
        _request: Request<pb::ListBackupsRequest>,
    ) -> Result<Response<pb::ListBackupsResponse>, Status> {
        let backups = self.backups.list()?.into_iter().map(info_to_pb).collect();
        Ok(Response::new(pb::ListBackupsResponse { backups }))
    }

    async fn cancel_backup(
        &self,
        request: Request<pb::BackupIdRequest>,
    ) -> Result<Response<pb::BackupInfo>, Status> {
        let info = self.backups.cancel(&request.into_inner().backup_id).await?;
        Ok(Response::new(info_to_pb(info)))
    }

    async fn verify_backup(
        &self,
        request: Request<pb::BackupIdRequest>,
    ) -> Result<Response<pb::VerifyBackupResponse>, Status> {
        let outcome = self.backups.verify(&request.into_inner().backup_id).await?;
        Ok(Response::new(pb::VerifyBackupResponse {
            ok: outcome.ok,
            chunks: outcome.chunks,
            image_digest: outcome.image_digest_hex(),
            frozen: outcome.frozen(),
            live: outcome.manifest.live,
            proved: outcome.proved(),
            not_checked: outcome.not_checked(),
            bad_chunks: outcome.bad_chunks,
            error: outcome.problem.unwrap_or_default(),
        }))
    }
}
