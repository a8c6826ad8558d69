//! The typed client of `splitmirror.db.v1.DbService`.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tonic::transport::Channel;

use super::{ClientError, connect_lazy};
use crate::db::v1 as pb;
use crate::db::v1::db_service_client::DbServiceClient;
use crate::node;

const NODE: &str = "db-server";

/// Status answers, one per interval, as `WatchStatus` streams them.
pub type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::StatusResponse, ClientError>> + Send>>;

/// db-server over gRPC: the snapshot manager, the gate and the ledger's
/// status. Cloning is cheap; the connection is made at the first call and
/// remade after db-server restarts.
#[derive(Clone)]
pub struct DbClient {
    inner: DbServiceClient<Channel>,
    target: String,
}

impl DbClient {
    /// A client of db-server at `target`. Fails only for an address that
    /// cannot be parsed.
    pub fn new(target: &str) -> Result<Self, ClientError> {
        Ok(Self {
            inner: DbServiceClient::new(connect_lazy(NODE, target)?)
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

    /// Splits the pair of `volume` for run `run_id` (idempotent per run).
    pub async fn acquire_snapshot(
        &self,
        volume: u32,
        run_id: &str,
    ) -> Result<pb::AcquireSnapshotResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .acquire_snapshot(pb::AcquireSnapshotRequest {
                volume,
                run_id: run_id.to_string(),
            })
            .await
            .map_err(|s| self.error(format!("acquiring a snapshot of volume {volume}"), &s))?
            .into_inner())
    }

    /// Deletes the snapshot `run_id` holds on `volume` and starts the
    /// resync; `force` deletes whoever holds it.
    pub async fn delete_snapshot(
        &self,
        volume: u32,
        run_id: &str,
        force: bool,
    ) -> Result<pb::DeleteSnapshotResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .delete_snapshot(pb::DeleteSnapshotRequest {
                volume,
                run_id: run_id.to_string(),
                force,
            })
            .await
            .map_err(|s| self.error(format!("deleting the snapshot of volume {volume}"), &s))?
            .into_inner())
    }

    /// Who holds the snapshot of `volume`, and what it froze.
    pub async fn get_snapshot(&self, volume: u32) -> Result<pb::GetSnapshotResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .get_snapshot(pb::GetSnapshotRequest { volume })
            .await
            .map_err(|s| self.error(format!("asking for the snapshot of volume {volume}"), &s))?
            .into_inner())
    }

    /// Every volume's modes, the ledger, the gate, the journal.
    pub async fn status(
        &self,
        include_latency_histogram: bool,
    ) -> Result<pb::StatusResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .status(pb::StatusRequest {
                include_latency_histogram,
            })
            .await
            .map_err(|s| self.error("asking for status", &s))?
            .into_inner())
    }

    /// The status of one volume.
    pub async fn volume_status(&self, volume: u32) -> Result<pb::VolumeStatus, ClientError> {
        self.status(false)
            .await?
            .volumes
            .into_iter()
            .find(|v| v.volume == volume)
            .ok_or_else(|| {
                ClientError::local(
                    super::ErrorKind::NotFound,
                    NODE,
                    &self.target,
                    "asking for status",
                    format!("db-server has no volume {volume}"),
                )
            })
    }

    /// Status every `interval_ms`, until the stream is dropped.
    pub async fn watch_status(
        &self,
        interval_ms: u32,
        include_latency_histogram: bool,
    ) -> Result<StatusStream, ClientError> {
        let stream = self
            .inner
            .clone()
            .watch_status(pb::WatchStatusRequest {
                interval_ms,
                include_latency_histogram,
            })
            .await
            .map_err(|s| self.error("watching status", &s))?
            .into_inner();
        let target = self.target.clone();
        Ok(Box::pin(stream.map(move |answer| {
            answer.map_err(|s| ClientError::from_status(NODE, &target, "watching status", &s))
        })))
    }

    /// Closes the write gate for at most `lease_ms` (renewed by calling
    /// again).
    pub async fn suspend(&self, lease_ms: u32) -> Result<pb::SuspendResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .suspend(pb::SuspendRequest { lease_ms })
            .await
            .map_err(|s| self.error("suspending the database", &s))?
            .into_inner())
    }

    /// Opens the write gate.
    pub async fn resume(&self) -> Result<pb::ResumeResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .resume(pb::ResumeRequest {})
            .await
            .map_err(|s| self.error("resuming the database", &s))?
            .into_inner())
    }

    /// Blocks of a volume's data or snapshot virtual LU, in one buffer.
    pub async fn read(
        &self,
        volume: u32,
        target: pb::VirtualLu,
        lba: u64,
        blocks: u64,
    ) -> Result<Vec<u8>, ClientError> {
        let doing = || format!("reading volume {volume} at LBA {lba}");
        let mut stream = self
            .inner
            .clone()
            .read(pb::VolumeReadRequest {
                volume,
                target: target as i32,
                lba,
                blocks,
            })
            .await
            .map_err(|s| self.error(doing(), &s))?
            .into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| self.error(doing(), &s))?
        {
            data.extend_from_slice(&chunk.data);
        }
        Ok(data)
    }

    /// Writes whole blocks to a volume's data or snapshot virtual LU
    /// through the snapshot manager; answers the blocks written.
    pub async fn write(
        &self,
        volume: u32,
        target: pb::VirtualLu,
        lba: u64,
        data: Vec<u8>,
    ) -> Result<u64, ClientError> {
        Ok(self
            .inner
            .clone()
            .write(pb::VolumeWriteRequest {
                volume,
                target: target as i32,
                lba,
                data,
            })
            .await
            .map_err(|s| self.error(format!("writing volume {volume} at LBA {lba}"), &s))?
            .into_inner()
            .blocks_written)
    }

    /// The generated client, for tests that must send what this client
    /// never would.
    pub fn raw(&self) -> DbServiceClient<Channel> {
        self.inner.clone()
    }
}
