//! The typed client of `splitmirror.backup.v1.BackupService`.

use crate::telemetry::TracedChannel;

use super::{AnswerStream, ClientError, Peer};
use crate::backup::v1 as pb;
use crate::backup::v1::backup_service_client::BackupServiceClient;
use crate::node;
use crate::security::{Security, role};

/// The backup server over gRPC. Cloning is cheap; the connection is made
/// at the first call and remade after the server restarts.
#[derive(Clone)]
pub struct BackupClient {
    inner: BackupServiceClient<TracedChannel>,
    peer: Peer,
}

impl BackupClient {
    /// A client of the backup server at `target`. Fails only for an
    /// address that cannot be parsed.
    pub fn new(target: &str, security: &Security) -> Result<Self, ClientError> {
        let (peer, channel) = Peer::connect("backup server", role::BACKUP, target, security)?;
        let inner = BackupServiceClient::new(channel)
            .max_decoding_message_size(node::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(node::MAX_MESSAGE_BYTES);
        Ok(Self { inner, peer })
    }

    /// The address this client calls.
    pub fn target(&self) -> &str {
        &self.peer.target
    }

    fn id(backup_id: &str) -> pb::BackupIdRequest {
        pb::BackupIdRequest {
            backup_id: backup_id.to_string(),
        }
    }

    /// Starts (or, for a run id already started, finds) a backup job.
    pub async fn start_backup(
        &self,
        request: pb::StartBackupRequest,
    ) -> Result<pb::StartBackupResponse, ClientError> {
        let doing = format!(
            "starting a backup of LU {} for run {}",
            request.lu, request.run_id
        );
        let answer = self.inner.clone().start_backup(request).await;
        self.peer.answer(answer, || doing)
    }

    /// Starts (or, for a run id already started, finds) a restore job.
    pub async fn start_restore(
        &self,
        request: pb::StartRestoreRequest,
    ) -> Result<pb::StartRestoreResponse, ClientError> {
        let target = match (request.volume, request.to_lu) {
            (Some(volume), _) => format!("volume {volume}"),
            (None, Some(lu)) => format!("LU {lu}"),
            (None, None) => "no target".to_string(),
        };
        let doing = format!(
            "starting restore run {} of backup {} onto {target}",
            request.run_id, request.backup_id
        );
        let answer = self.inner.clone().start_restore(request).await;
        self.peer.answer(answer, || doing)
    }

    /// The restore job's progress until it ends.
    pub async fn watch_restore(
        &self,
        run_id: &str,
    ) -> Result<AnswerStream<pb::RestoreProgress>, ClientError> {
        let doing = || format!("watching restore run {run_id}");
        let request = pb::RestoreIdRequest {
            run_id: run_id.to_string(),
        };
        let answer = self.inner.clone().watch_restore(request).await;
        let stream = self.peer.answer(answer, doing)?;
        Ok(self.peer.stream(stream, doing()))
    }

    /// The job's progress until it ends.
    pub async fn watch_backup(
        &self,
        backup_id: &str,
    ) -> Result<AnswerStream<pb::BackupProgress>, ClientError> {
        let doing = || format!("watching backup {backup_id}");
        let answer = self.inner.clone().watch_backup(Self::id(backup_id)).await;
        let stream = self.peer.answer(answer, doing)?;
        Ok(self.peer.stream(stream, doing()))
    }

    /// One backup: its state, and its manifest once complete. The
    /// manifest's per-chunk digests (34 bytes per MiB of the image) are
    /// answered only with `include_digests`; without them the answer is a
    /// small summary (`Manifest.chunk_count` still says how many there are).
    pub async fn get_backup(
        &self,
        backup_id: &str,
        include_digests: bool,
    ) -> Result<pb::BackupInfo, ClientError> {
        let request = pb::GetBackupRequest {
            backup_id: backup_id.to_string(),
            include_digests,
        };
        let answer = self.inner.clone().get_backup(request).await;
        self.peer
            .answer(answer, || format!("getting backup {backup_id}"))
    }

    /// Every backup the store holds, without per-chunk digests.
    pub async fn list_backups(&self) -> Result<Vec<pb::BackupInfo>, ClientError> {
        let answer = self
            .inner
            .clone()
            .list_backups(pb::ListBackupsRequest {})
            .await;
        Ok(self
            .peer
            .answer(answer, || "listing backups".into())?
            .backups)
    }

    /// Every backup the store holds (without per-chunk digests), and the
    /// store's summary: its location, chunks and sizes.
    pub async fn list_backups_and_store(&self) -> Result<pb::ListBackupsResponse, ClientError> {
        let answer = self
            .inner
            .clone()
            .list_backups(pb::ListBackupsRequest {})
            .await;
        self.peer.answer(answer, || "listing backups".into())
    }

    /// Applies (or, with `dry_run`, shows) a volume's retention rules.
    pub async fn prune_backups(
        &self,
        request: pb::PruneBackupsRequest,
    ) -> Result<pb::PruneBackupsResponse, ClientError> {
        let doing = format!("pruning the backups of volume {}", request.volume);
        let answer = self.inner.clone().prune_backups(request).await;
        self.peer.answer(answer, || doing)
    }

    /// Removes the chunks no backup references, once past the grace period.
    pub async fn collect_garbage(&self) -> Result<pb::CollectGarbageResponse, ClientError> {
        let answer = self
            .inner
            .clone()
            .collect_garbage(pb::CollectGarbageRequest {})
            .await;
        self.peer
            .answer(answer, || "collecting the store's garbage".into())
    }

    /// Stops a running job (its partial image is removed).
    pub async fn cancel_backup(&self, backup_id: &str) -> Result<pb::BackupInfo, ClientError> {
        let answer = self.inner.clone().cancel_backup(Self::id(backup_id)).await;
        self.peer
            .answer(answer, || format!("cancelling backup {backup_id}"))
    }

    /// Re-reads a stored image against its manifest.
    pub async fn verify_backup(
        &self,
        backup_id: &str,
    ) -> Result<pb::VerifyBackupResponse, ClientError> {
        let answer = self.inner.clone().verify_backup(Self::id(backup_id)).await;
        self.peer
            .answer(answer, || format!("verifying backup {backup_id}"))
    }

    /// The generated client, for tests that must send what this client
    /// never would.
    pub fn raw(&self) -> BackupServiceClient<TracedChannel> {
        self.inner.clone()
    }
}
