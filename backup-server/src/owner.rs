//! The snapshot's owner (db-server), behind a small trait so that the job
//! logic holds no gRPC types. The array knows nothing of snapshots ([0050]):
//! only db-server can say whether the mate LU a backup reads is frozen, so a
//! frozen backup asks it before the first read and after the last one.

use std::time::Duration;

use splitmirror_proto::db::v1 as pb;
use splitmirror_proto::db::v1::db_service_client::DbServiceClient;
use splitmirror_proto::node;
use tonic::transport::Channel;

use crate::source::BoxFuture;

/// How long the confirmation after the copy keeps retrying a db-server that
/// does not answer before the job fails (a restart of db-server keeps its
/// snapshots, so waiting for it can still save the copy).
pub const CONFIRM_DEADLINE: Duration = Duration::from_secs(30);

/// A snapshot, as a backup request names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRef {
    pub volume: u32,
    pub holder_run_id: String,
}

/// What db-server answers about the snapshot a volume holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldSnapshot {
    pub volume: u32,
    pub holder_run_id: String,
    pub mate_lu: u32,
    pub ledger_sequence: u64,
    pub block_size_bytes: u32,
    pub block_count: u64,
    /// The acquire's id: unlike holder and sequence, never repeated by a
    /// later acquire (0: a db-server that does not name its snapshots).
    pub snapshot_id: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerErrorKind {
    /// db-server does not know the volume.
    UnknownVolume,
    /// The volume holds no snapshot.
    NoSnapshot,
    /// db-server did not answer; a retry may help.
    Unavailable,
    Other,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct OwnerError {
    pub kind: OwnerErrorKind,
    pub message: String,
}

pub trait SnapshotOwner: Send + Sync + 'static {
    /// Where the owner is, for messages.
    fn describe(&self) -> String;
    /// The snapshot `volume` holds now.
    fn snapshot(&self, volume: u32) -> BoxFuture<'_, Result<HeldSnapshot, OwnerError>>;
}

/// Checks that `held` is the snapshot `wanted` names and that its mate is
/// the LU being copied; answers why not.
pub fn check_held(wanted: &SnapshotRef, lu: u32, held: &HeldSnapshot) -> Result<(), String> {
    if held.holder_run_id != wanted.holder_run_id {
        return Err(format!(
            "the snapshot of volume {} is held by run {:?}, not by run {:?}",
            wanted.volume, held.holder_run_id, wanted.holder_run_id
        ));
    }
    if held.mate_lu != lu {
        return Err(format!(
            "the snapshot of volume {} freezes mate LU {}, not LU {lu}",
            wanted.volume, held.mate_lu
        ));
    }
    // Without an id, a snapshot deleted and acquired again by the same run
    // during the copy could not be told from the one confirmed before.
    if held.snapshot_id == 0 {
        return Err(format!(
            "db-server names no snapshot id for the snapshot of volume {} held by run {:?}, so it cannot confirm after the copy that the snapshot was not replaced",
            wanted.volume, held.holder_run_id
        ));
    }
    Ok(())
}

/// Checks, after the copy, that the snapshot is still the one confirmed
/// before it: the same holder and the same snapshot id. The id is what
/// counts: holder and ledger sequence repeat when the same run id acquires
/// again after a forced delete (a normal retry) while the ledger is off or
/// idle, and the mate was resynced in between all the same.
pub fn check_unchanged(before: &HeldSnapshot, now: &HeldSnapshot) -> Result<(), String> {
    if now.holder_run_id != before.holder_run_id {
        return Err(format!(
            "the snapshot of volume {} was released during the copy: it is now held by run {:?}",
            before.volume, now.holder_run_id
        ));
    }
    if now.snapshot_id != before.snapshot_id
        || now.ledger_sequence != before.ledger_sequence
        || now.mate_lu != before.mate_lu
    {
        return Err(format!(
            "the snapshot of volume {} held by run {:?} was deleted and acquired again during the copy (snapshot {:016x} before, {:016x} after; ledger sequence {} before, {} after)",
            before.volume,
            before.holder_run_id,
            before.snapshot_id,
            now.snapshot_id,
            before.ledger_sequence,
            now.ledger_sequence
        ));
    }
    Ok(())
}

/// db-server over gRPC.
pub struct GrpcOwner {
    client: DbServiceClient<Channel>,
    url: String,
}

impl GrpcOwner {
    pub fn new(url: &str) -> Result<Self, String> {
        Ok(Self {
            client: DbServiceClient::new(node::channel(url)?),
            url: url.to_string(),
        })
    }
}

impl SnapshotOwner for GrpcOwner {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn snapshot(&self, volume: u32) -> BoxFuture<'_, Result<HeldSnapshot, OwnerError>> {
        Box::pin(async move {
            let answer = self
                .client
                .clone()
                .get_snapshot(pb::GetSnapshotRequest { volume })
                .await
                .map_err(|status| {
                    let kind = match status.code() {
                        tonic::Code::NotFound => OwnerErrorKind::UnknownVolume,
                        tonic::Code::FailedPrecondition => OwnerErrorKind::NoSnapshot,
                        tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Unknown => OwnerErrorKind::Unavailable,
                        _ => OwnerErrorKind::Other,
                    };
                    OwnerError {
                        kind,
                        message: format!(
                            "asking db-server at {} for the snapshot of volume {volume}: {:?}: {}",
                            self.url,
                            status.code(),
                            status.message()
                        ),
                    }
                })?
                .into_inner();
            Ok(HeldSnapshot {
                volume: answer.volume,
                holder_run_id: answer.holder_run_id,
                mate_lu: answer.mate_lu,
                ledger_sequence: answer.ledger_sequence,
                block_size_bytes: answer.block_size_bytes,
                block_count: answer.block_count,
                snapshot_id: answer.snapshot_id,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(holder: &str, mate_lu: u32, ledger_sequence: u64) -> HeldSnapshot {
        HeldSnapshot {
            volume: 0,
            holder_run_id: holder.into(),
            mate_lu,
            ledger_sequence,
            block_size_bytes: 4096,
            block_count: 256,
            snapshot_id: 0xabc,
        }
    }

    #[test]
    fn a_snapshot_must_be_held_by_the_named_run_and_freeze_the_copied_lu() {
        let wanted = SnapshotRef {
            volume: 0,
            holder_run_id: "run-1".into(),
        };
        assert_eq!(check_held(&wanted, 2, &held("run-1", 2, 7)), Ok(()));
        let other = check_held(&wanted, 2, &held("run-2", 2, 7)).expect_err("other holder");
        assert!(other.contains("run-2"), "{other}");
        let origin = check_held(&wanted, 1, &held("run-1", 2, 7)).expect_err("origin LU");
        assert!(origin.contains("mate LU 2, not LU 1"), "{origin}");
        let nameless = HeldSnapshot {
            snapshot_id: 0,
            ..held("run-1", 2, 7)
        };
        let nameless = check_held(&wanted, 2, &nameless).expect_err("no id");
        assert!(nameless.contains("no snapshot id"), "{nameless}");
    }

    #[test]
    fn a_snapshot_acquired_again_is_not_the_one_confirmed_before() {
        let before = held("run-1", 2, 7);
        assert_eq!(check_unchanged(&before, &before.clone()), Ok(()));
        assert!(check_unchanged(&before, &held("run-2", 2, 7)).is_err());
        assert!(check_unchanged(&before, &held("run-1", 2, 9)).is_err());
        // Same run, same sequence (ledger off or idle), new acquire.
        let again = HeldSnapshot {
            snapshot_id: 0xdef,
            ..held("run-1", 2, 7)
        };
        let why = check_unchanged(&before, &again).expect_err("acquired again");
        assert!(why.contains("deleted and acquired again"), "{why}");
    }
}
