//! The typed client of `splitmirror.backup.v1.BackupService`.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tonic::transport::Channel;

use super::{ClientError, connect_lazy};
use crate::backup::v1 as pb;
use crate::backup::v1::backup_service_client::BackupServiceClient;
use crate::node;

const NODE: &str = "backup server";

/// Progress of one backup job, as `WatchBackup` streams it.
pub type ProgressStream =
    Pin<Box<dyn Stream<Item = Result<pb::BackupProgress, ClientError>> + Send>>;

/// The backup server over gRPC. Cloning is cheap; the connection is made
/// at the first call and remade after the server restarts.
#[derive(Clone)]
pub struct BackupClient {
    inner: BackupServiceClient<Channel>,
    target: String,
}

impl BackupClient {
    /// A client of the backup server at `target`. Fails only for an
    /// address that cannot be parsed.
    pub fn new(target: &str) -> Result<Self, ClientError> {
        Ok(Self {
            inner: BackupServiceClient::new(connect_lazy(NODE, target)?)
                .max_decoding_message_size(node::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(node::MAX_MESSAGE_BYTES),
            target: target.to_string(),
        })
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    fn error(&self, doing: impl Into<String>, status: &tonic::Status) -> ClientError {
        ClientError::from_status(NODE, &self.target, doing, status)
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
        Ok(self
            .inner
            .clone()
            .start_backup(request)
            .await
            .map_err(|s| self.error(doing, &s))?
            .into_inner())
    }

    /// The job's progress until it ends.
    pub async fn watch_backup(&self, backup_id: &str) -> Result<ProgressStream, ClientError> {
        let doing = format!("watching backup {backup_id}");
        let stream = self
            .inner
            .clone()
            .watch_backup(pb::BackupIdRequest {
                backup_id: backup_id.to_string(),
            })
            .await
            .map_err(|s| self.error(doing.clone(), &s))?
            .into_inner();
        let target = self.target.clone();
        Ok(Box::pin(stream.map(move |progress| {
            progress.map_err(|s| ClientError::from_status(NODE, &target, doing.clone(), &s))
        })))
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
        Ok(self
            .inner
            .clone()
            .get_backup(pb::GetBackupRequest {
                backup_id: backup_id.to_string(),
                include_digests,
            })
            .await
            .map_err(|s| self.error(format!("getting backup {backup_id}"), &s))?
            .into_inner())
    }

    /// Every backup the store holds, without per-chunk digests.
    pub async fn list_backups(&self) -> Result<Vec<pb::BackupInfo>, ClientError> {
        Ok(self
            .inner
            .clone()
            .list_backups(pb::ListBackupsRequest {})
            .await
            .map_err(|s| self.error("listing backups", &s))?
            .into_inner()
            .backups)
    }

    /// Stops a running job (its partial image is removed).
    pub async fn cancel_backup(&self, backup_id: &str) -> Result<pb::BackupInfo, ClientError> {
        Ok(self
            .inner
            .clone()
            .cancel_backup(pb::BackupIdRequest {
                backup_id: backup_id.to_string(),
            })
            .await
            .map_err(|s| self.error(format!("cancelling backup {backup_id}"), &s))?
            .into_inner())
    }

    /// Re-reads a stored image against its manifest.
    pub async fn verify_backup(
        &self,
        backup_id: &str,
    ) -> Result<pb::VerifyBackupResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .verify_backup(pb::BackupIdRequest {
                backup_id: backup_id.to_string(),
            })
            .await
            .map_err(|s| self.error(format!("verifying backup {backup_id}"), &s))?
            .into_inner())
    }

    /// The generated client, for tests that must send what this client
    /// never would.
    pub fn raw(&self) -> BackupServiceClient<Channel> {
        self.inner.clone()
    }
}
