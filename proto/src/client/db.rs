//! The typed client of `splitmirror.db.v1.DbService`.

use crate::telemetry::TracedChannel;
use futures_util::StreamExt;

use super::{AnswerStream, ClientError, ErrorKind, Peer};
use crate::db::v1 as pb;
use crate::db::v1::db_service_client::DbServiceClient;
use crate::node;
use crate::security::{Security, role};

/// db-server over gRPC: the snapshot manager, the gate and the ledger's
/// status. Cloning is cheap; the connection is made at the first call and
/// remade after db-server restarts.
#[derive(Clone)]
pub struct DbClient {
    inner: DbServiceClient<TracedChannel>,
    peer: Peer,
}

impl DbClient {
    /// A client of db-server at `target`. Fails only for an address that
    /// cannot be parsed.
    pub fn new(target: &str, security: &Security) -> Result<Self, ClientError> {
        let (peer, channel) = Peer::connect("db-server", role::DB, target, security)?;
        let inner = DbServiceClient::new(channel)
            .max_decoding_message_size(node::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(node::MAX_MESSAGE_BYTES);
        Ok(Self { inner, peer })
    }

    /// The address this client calls.
    pub fn target(&self) -> &str {
        &self.peer.target
    }

    /// Takes a snapshot of `volume` for run `run_id` (idempotent per run)
    /// by the server's default method.
    pub async fn acquire_snapshot(
        &self,
        volume: u32,
        run_id: &str,
    ) -> Result<pb::AcquireSnapshotResponse, ClientError> {
        self.acquire_snapshot_by(volume, run_id, pb::SnapshotMethod::Unspecified)
            .await
    }

    /// Takes a snapshot of `volume` for run `run_id` by `method`
    /// (`Unspecified`: the server's default).
    pub async fn acquire_snapshot_by(
        &self,
        volume: u32,
        run_id: &str,
        method: pb::SnapshotMethod,
    ) -> Result<pb::AcquireSnapshotResponse, ClientError> {
        let request = pb::AcquireSnapshotRequest {
            volume,
            run_id: run_id.to_string(),
            method: method.into(),
            ..Default::default()
        };
        self.acquire_snapshot_with(request).await
    }

    /// Takes a snapshot as `request` says (method, writable).
    pub async fn acquire_snapshot_with(
        &self,
        request: pb::AcquireSnapshotRequest,
    ) -> Result<pb::AcquireSnapshotResponse, ClientError> {
        let volume = request.volume;
        let answer = self.inner.clone().acquire_snapshot(request).await;
        self.peer.answer(answer, || {
            format!("acquiring a snapshot of volume {volume}")
        })
    }

    /// Deletes the snapshot `run_id` holds on `volume` and starts the
    /// resync; `force` deletes whoever holds it.
    pub async fn delete_snapshot(
        &self,
        volume: u32,
        run_id: &str,
        force: bool,
    ) -> Result<pb::DeleteSnapshotResponse, ClientError> {
        self.delete_snapshot_of(volume, 1, run_id, force).await
    }

    /// [`delete_snapshot`](Self::delete_snapshot) of the volume's mate
    /// `mate` (counted from 1).
    pub async fn delete_snapshot_of(
        &self,
        volume: u32,
        mate: u32,
        run_id: &str,
        force: bool,
    ) -> Result<pb::DeleteSnapshotResponse, ClientError> {
        let request = pb::DeleteSnapshotRequest {
            volume,
            run_id: run_id.to_string(),
            force,
            mate,
        };
        let answer = self.inner.clone().delete_snapshot(request).await;
        self.peer.answer(answer, || {
            format!("deleting the snapshot of volume {volume}{}", of_mate(mate))
        })
    }

    /// Takes `volume` offline for the restore run `run_id` of `backup_id`
    /// (idempotent per run).
    pub async fn begin_restore(
        &self,
        volume: u32,
        run_id: &str,
        backup_id: &str,
    ) -> Result<pb::BeginRestoreResponse, ClientError> {
        let request = pb::BeginRestoreRequest {
            volume,
            run_id: run_id.to_string(),
            backup_id: backup_id.to_string(),
        };
        let answer = self.inner.clone().begin_restore(request).await;
        self.peer.answer(answer, || {
            format!("taking volume {volume} offline for restore run {run_id}")
        })
    }

    /// Ends the restore run `run_id` of `volume`: checks the volume (against
    /// `expected_image_digest` when given) and brings it back online; with
    /// `abandon`, gives the restore up.
    pub async fn end_restore(
        &self,
        volume: u32,
        run_id: &str,
        abandon: bool,
        expected_image_digest: Option<Vec<u8>>,
    ) -> Result<pb::EndRestoreResponse, ClientError> {
        let request = pb::EndRestoreRequest {
            volume,
            run_id: run_id.to_string(),
            abandon,
            expected_image_digest: expected_image_digest.unwrap_or_default(),
        };
        let answer = self.inner.clone().end_restore(request).await;
        self.peer.answer(answer, || {
            let verb = if abandon { "abandoning" } else { "ending" };
            format!("{verb} restore run {run_id} of volume {volume}")
        })
    }

    /// Puts `volume` back to the frozen mate of the snapshot `run_id`
    /// holds (the reverse resync), and answers when done.
    pub async fn restore_snapshot(
        &self,
        volume: u32,
        run_id: &str,
    ) -> Result<pb::RestoreSnapshotResponse, ClientError> {
        self.restore_snapshot_of(volume, 1, run_id).await
    }

    /// [`restore_snapshot`](Self::restore_snapshot) from the volume's mate
    /// `mate` (counted from 1).
    pub async fn restore_snapshot_of(
        &self,
        volume: u32,
        mate: u32,
        run_id: &str,
    ) -> Result<pb::RestoreSnapshotResponse, ClientError> {
        let request = pb::RestoreSnapshotRequest {
            volume,
            run_id: run_id.to_string(),
            mate,
        };
        let answer = self.inner.clone().restore_snapshot(request).await;
        self.peer.answer(answer, || {
            format!("restoring volume {volume} to the snapshot of run {run_id}")
        })
    }

    /// Who holds the snapshot of `volume`, and what it froze.
    pub async fn get_snapshot(&self, volume: u32) -> Result<pb::GetSnapshotResponse, ClientError> {
        self.get_snapshot_of(volume, 1).await
    }

    /// [`get_snapshot`](Self::get_snapshot) of the volume's mate `mate`
    /// (counted from 1).
    pub async fn get_snapshot_of(
        &self,
        volume: u32,
        mate: u32,
    ) -> Result<pb::GetSnapshotResponse, ClientError> {
        let request = pb::GetSnapshotRequest { volume, mate };
        let answer = self.inner.clone().get_snapshot(request).await;
        self.peer.answer(answer, || {
            format!(
                "asking for the snapshot of volume {volume}{}",
                of_mate(mate)
            )
        })
    }

    /// Every volume's modes, the ledger, the gate, the journal.
    pub async fn status(
        &self,
        include_latency_histogram: bool,
    ) -> Result<pb::StatusResponse, ClientError> {
        let request = pb::StatusRequest {
            include_latency_histogram,
        };
        let answer = self.inner.clone().status(request).await;
        self.peer.answer(answer, || "asking for status".into())
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
                    ErrorKind::NotFound,
                    self.peer.node,
                    &self.peer.target,
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
    ) -> Result<AnswerStream<pb::StatusResponse>, ClientError> {
        let request = pb::WatchStatusRequest {
            interval_ms,
            include_latency_histogram,
        };
        let answer = self.inner.clone().watch_status(request).await;
        let stream = self.peer.answer(answer, || "watching status".into())?;
        Ok(self.peer.stream(stream, "watching status".into()))
    }

    /// Closes the write gate for at most `lease_ms` (renewed by calling
    /// again).
    pub async fn suspend(&self, lease_ms: u32) -> Result<pb::SuspendResponse, ClientError> {
        let answer = self
            .inner
            .clone()
            .suspend(pb::SuspendRequest { lease_ms })
            .await;
        self.peer
            .answer(answer, || "suspending the database".into())
    }

    /// Opens the write gate.
    pub async fn resume(&self) -> Result<pb::ResumeResponse, ClientError> {
        let answer = self.inner.clone().resume(pb::ResumeRequest {}).await;
        self.peer.answer(answer, || "resuming the database".into())
    }

    /// Blocks of a volume's data or snapshot virtual LU, in one buffer.
    pub async fn read(
        &self,
        volume: u32,
        target: pb::VirtualLu,
        lba: u64,
        blocks: u64,
    ) -> Result<Vec<u8>, ClientError> {
        self.read_mate(volume, target, 0, lba, blocks).await
    }

    /// [`read`](Self::read) of the snapshot virtual LU of the volume's mate
    /// `mate` (counted from 1; 0 with the data LU).
    pub async fn read_mate(
        &self,
        volume: u32,
        target: pb::VirtualLu,
        mate: u32,
        lba: u64,
        blocks: u64,
    ) -> Result<Vec<u8>, ClientError> {
        let doing = || format!("reading volume {volume}{} at LBA {lba}", of_mate(mate));
        let request = pb::VolumeReadRequest {
            volume,
            target: target as i32,
            lba,
            blocks,
            mate,
        };
        let answer = self.inner.clone().read(request).await;
        let mut stream = self.peer.stream(self.peer.answer(answer, doing)?, doing());
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            data.extend_from_slice(&chunk?.data);
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
        self.write_mate(volume, target, 0, lba, data).await
    }

    /// [`write`](Self::write) to the snapshot virtual LU of the volume's
    /// mate `mate` (counted from 1; 0 with the data LU).
    pub async fn write_mate(
        &self,
        volume: u32,
        target: pb::VirtualLu,
        mate: u32,
        lba: u64,
        data: Vec<u8>,
    ) -> Result<u64, ClientError> {
        let request = pb::VolumeWriteRequest {
            volume,
            target: target as i32,
            lba,
            data,
            mate,
        };
        let answer = self.inner.clone().write(request).await;
        let written = self.peer.answer(answer, || {
            format!("writing volume {volume}{} at LBA {lba}", of_mate(mate))
        })?;
        Ok(written.blocks_written)
    }

    /// The generated client, for tests that must send what this client
    /// never would.
    pub fn raw(&self) -> DbServiceClient<TracedChannel> {
        self.inner.clone()
    }
}

/// " (mate N)" for a mate after the first, for the text of a failure.
fn of_mate(mate: u32) -> String {
    match mate {
        0 | 1 => String::new(),
        mate => format!(" (mate {mate})"),
    }
}
