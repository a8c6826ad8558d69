//! The snapshot's owner (db-server), behind a small trait so that the job
//! logic holds no gRPC types. The array knows nothing of snapshots ([0050]):
//! only db-server can say whether the mate LU a backup reads is frozen, so a
//! frozen backup asks it before the first read and after the last one.
//! It also owns a volume's restore: a restore writes a volume only while
//! db-server reports it offline for that run ([`VolumeOwner`]).

use std::time::Duration;

use splitmirror_proto::client::{ClientError, DbClient, ErrorKind};
use splitmirror_proto::db::v1 as pb;
use splitmirror_proto::security::Security;

pub use crate::manifest::SnapshotMethod;
use crate::source::{BoxFuture, DataStream};

/// How long the confirmation after the copy keeps retrying a db-server that
/// does not answer before the job fails (a restart of db-server keeps its
/// snapshots, so waiting for it can still save the copy).
pub const CONFIRM_DEADLINE: Duration = Duration::from_secs(30);

/// A snapshot, as a backup request names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRef {
    pub volume: u32,
    pub holder_run_id: String,
    /// Which of the volume's mates was split, counted from 1 ([0020]: a
    /// mirror LU may have up to three); never 0 (the request's 0 is 1).
    pub mate: u32,
}

/// A mate as the wire counts it: 0 (unset, or an older peer) is mate 1.
pub fn mate_or_first(mate: u32) -> u32 {
    mate.max(1)
}

/// " (mate N)" for a mate other than the first, "" for mate 1: messages
/// about a volume with one mate read as they always did.
pub fn of_mate(mate: u32) -> String {
    match mate_or_first(mate) {
        1 => String::new(),
        mate => format!(" (mate {mate})"),
    }
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
    /// Which of the volume's mates it froze, counted from 1 (a db-server
    /// older than several mates answers 0, read as 1).
    pub mate: u32,
    /// Split: the mate LU is the frozen image (read it from the array).
    /// Copy-on-write: the image is the snapshot virtual LU, read through
    /// db-server ([`SnapshotOwner::read_snapshot`]); the mate goes on
    /// being written.
    pub method: SnapshotMethod,
    /// Acquired writable: its holder may write the mate while it is held,
    /// so the mate is no frozen image and no backup may copy it.
    pub writable: bool,
}

/// What a failed question to db-server means for a backup, decided from
/// the error's [`ErrorKind`] alone (never from its text) in
/// [`OwnerFailure::of`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerFailure {
    /// db-server does not know the volume (`NOT_FOUND`, reason
    /// `unknown-volume`). Not retryable.
    UnknownVolume,
    /// The volume holds no snapshot (`FAILED_PRECONDITION`, reason
    /// `no-snapshot`, the only refusal of that code `GetSnapshot` makes), so
    /// nothing freezes the LU. Not retryable until a snapshot is acquired.
    NoSnapshot,
    /// db-server did not answer, or is starting or stopping: a transient
    /// kind ([`ErrorKind::is_transient`]). Retryable.
    Unavailable,
    /// db-server failed the question (`INTERNAL`: its journal or array) or
    /// refused it for a reason that is not about the snapshot. Not
    /// retryable as it is.
    Failed,
}

impl OwnerFailure {
    /// The one mapping from a failed `GetSnapshot` to what it means here.
    pub fn of(error: &ClientError) -> Self {
        match error.kind {
            ErrorKind::NotFound => Self::UnknownVolume,
            ErrorKind::FailedPrecondition => Self::NoSnapshot,
            ErrorKind::Unavailable | ErrorKind::DeadlineExceeded | ErrorKind::Broken => {
                Self::Unavailable
            }
            ErrorKind::InvalidArgument
            | ErrorKind::OutOfRange
            | ErrorKind::ResourceExhausted
            | ErrorKind::AlreadyExists
            | ErrorKind::Aborted
            | ErrorKind::PermissionDenied
            | ErrorKind::DataLoss
            | ErrorKind::Internal => Self::Failed,
        }
    }
}

/// Why the LU a backup copies is not known to be frozen by the snapshot it
/// names. None is retryable as it is: the caller must name the snapshot
/// that freezes the LU (before the copy), or the copy is not frozen (after).
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotFrozen {
    /// Before the copy: the volume holds no snapshot.
    #[error(
        "cannot confirm that LU {lu} is frozen by the snapshot of volume {volume} held by run {holder_run_id:?}: {cause}"
    )]
    NoSnapshot {
        volume: u32,
        holder_run_id: String,
        lu: u32,
        cause: Box<ClientError>,
    },
    /// Before the copy: another run holds the snapshot.
    #[error("the snapshot of volume {volume} is held by run {held_by:?}, not by run {wanted:?}")]
    OtherHolder {
        volume: u32,
        held_by: String,
        wanted: String,
    },
    /// Before the copy: the snapshot freezes another LU than the one named.
    #[error("the snapshot of volume {volume}{} freezes mate LU {mate_lu}, not LU {lu}", of_mate(*mate))]
    OtherLu {
        volume: u32,
        mate: u32,
        mate_lu: u32,
        lu: u32,
    },
    /// Before the copy: db-server answered for another mate than the one
    /// asked about (a db-server that does not know several mates answers
    /// mate 1 whatever it is asked).
    #[error(
        "asked for the snapshot of mate {wanted} of volume {volume}, db-server answered for mate {answered}"
    )]
    OtherMate {
        volume: u32,
        wanted: u32,
        answered: u32,
    },
    /// Before the copy: db-server gives no snapshot id, so a snapshot
    /// deleted and acquired again during the copy could not be told apart.
    #[error(
        "db-server names no snapshot id for the snapshot of volume {volume} held by run {holder_run_id:?}, so it cannot confirm after the copy that the snapshot was not replaced"
    )]
    NoSnapshotId { volume: u32, holder_run_id: String },
    /// Before the copy: the snapshot was acquired writable, so its holder
    /// may write the mate during the copy.
    #[error(
        "the snapshot of volume {volume} held by run {holder_run_id:?} is writable: its mate (LU {mate_lu}) is not a frozen image, so it is not backed up; back up a snapshot acquired read-only"
    )]
    Writable {
        volume: u32,
        holder_run_id: String,
        mate_lu: u32,
    },
    /// Before the copy: db-server and the array disagree on the LU's size.
    #[error(
        "db-server says the mate of volume {volume} has {owner_block_count} blocks, the array says LU {lu} has {array_block_count}"
    )]
    SizeDiffers {
        volume: u32,
        lu: u32,
        owner_block_count: u64,
        array_block_count: u64,
    },
    /// After the copy: the snapshot is gone (or the volume is).
    #[error(
        "the snapshot of volume {volume} held by run {holder_run_id:?} was deleted during the copy ({cause})"
    )]
    Deleted {
        volume: u32,
        holder_run_id: String,
        cause: Box<ClientError>,
    },
    /// After the copy: another run holds the volume's snapshot now.
    #[error(
        "the snapshot of volume {volume} was released during the copy: it is now held by run {held_by:?}"
    )]
    Released { volume: u32, held_by: String },
    /// After the copy: the same run holds a snapshot, but not the one
    /// confirmed before (another id, sequence or mate).
    #[error(
        "the snapshot of volume {volume} held by run {holder_run_id:?} was deleted and acquired again during the copy (snapshot {snapshot_id_before:016x} before, {snapshot_id_after:016x} after; ledger sequence {ledger_sequence_before} before, {ledger_sequence_after} after)"
    )]
    Replaced {
        volume: u32,
        holder_run_id: String,
        snapshot_id_before: u64,
        snapshot_id_after: u64,
        ledger_sequence_before: u64,
        ledger_sequence_after: u64,
    },
}

pub trait SnapshotOwner: Send + Sync + 'static {
    /// Where the owner is, for messages.
    fn describe(&self) -> String;
    /// The snapshot of `volume`'s mate `mate` (counted from 1) now. What a
    /// failure means is [`OwnerFailure::of`] it.
    fn snapshot(&self, volume: u32, mate: u32) -> BoxFuture<'_, Result<HeldSnapshot, ClientError>>;
    /// The blocks of a range of the snapshot virtual LU of `volume`'s mate
    /// `mate`, in order,
    /// as db-server serves them (a copy-on-write snapshot: saved blocks
    /// from the save area, the rest from the mate). A snapshot invalidated
    /// meanwhile is refused with reason `snapshot-invalidated`.
    fn read_snapshot(
        &self,
        volume: u32,
        mate: u32,
        lba: u64,
        blocks: u64,
    ) -> BoxFuture<'_, Result<DataStream, ClientError>>;
}

/// Checks that `held` is the snapshot `wanted` names (holder and mate)
/// and that its mate is the LU being copied; answers why not.
pub fn check_held(wanted: &SnapshotRef, lu: u32, held: &HeldSnapshot) -> Result<(), NotFrozen> {
    if mate_or_first(held.mate) != mate_or_first(wanted.mate) {
        return Err(NotFrozen::OtherMate {
            volume: wanted.volume,
            wanted: mate_or_first(wanted.mate),
            answered: mate_or_first(held.mate),
        });
    }
    if held.holder_run_id != wanted.holder_run_id {
        return Err(NotFrozen::OtherHolder {
            volume: wanted.volume,
            held_by: held.holder_run_id.clone(),
            wanted: wanted.holder_run_id.clone(),
        });
    }
    if held.mate_lu != lu {
        return Err(NotFrozen::OtherLu {
            volume: wanted.volume,
            mate: wanted.mate,
            mate_lu: held.mate_lu,
            lu,
        });
    }
    // A writable snapshot's mate may change under the copy: nothing to
    // confirm after it could tell.
    if held.writable {
        return Err(NotFrozen::Writable {
            volume: wanted.volume,
            holder_run_id: held.holder_run_id.clone(),
            mate_lu: held.mate_lu,
        });
    }
    // Without an id, a snapshot deleted and acquired again by the same run
    // during the copy could not be told from the one confirmed before.
    if held.snapshot_id == 0 {
        return Err(NotFrozen::NoSnapshotId {
            volume: wanted.volume,
            holder_run_id: held.holder_run_id.clone(),
        });
    }
    Ok(())
}

/// Checks, after the copy, that the snapshot is still the one confirmed
/// before it: the same holder and the same snapshot id. The id is what
/// counts: holder and ledger sequence repeat when the same run id acquires
/// again after a forced delete (a normal retry) while the ledger is off or
/// idle, and the mate was resynced in between all the same.
pub fn check_unchanged(before: &HeldSnapshot, now: &HeldSnapshot) -> Result<(), NotFrozen> {
    if now.holder_run_id != before.holder_run_id {
        return Err(NotFrozen::Released {
            volume: before.volume,
            held_by: now.holder_run_id.clone(),
        });
    }
    if now.snapshot_id != before.snapshot_id
        || now.ledger_sequence != before.ledger_sequence
        || now.mate_lu != before.mate_lu
        || mate_or_first(now.mate) != mate_or_first(before.mate)
        || now.method != before.method
        || now.writable != before.writable
    {
        return Err(NotFrozen::Replaced {
            volume: before.volume,
            holder_run_id: before.holder_run_id.clone(),
            snapshot_id_before: before.snapshot_id,
            snapshot_id_after: now.snapshot_id,
            ledger_sequence_before: before.ledger_sequence,
            ledger_sequence_after: now.ledger_sequence,
        });
    }
    Ok(())
}

/// What db-server reports of a volume's restore (`VolumeStatus.restore`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreHold {
    pub kind: RestoreHoldKind,
    pub run_id: String,
    /// The backup being restored (from a backup only; may be empty).
    pub backup_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreHoldKind {
    /// Offline for a restore from a backup (BeginRestore … EndRestore).
    FromBackup,
    /// Being put back to its held snapshot's frozen mate.
    ToSnapshot,
    /// A kind this version does not know (a newer db-server).
    Other,
}

/// db-server as the owner of a volume's restore.
pub trait VolumeOwner: Send + Sync + 'static {
    /// Where the owner is, for messages.
    fn describe(&self) -> String;
    /// The restore `volume` is offline for, if any. An unknown volume is
    /// `NOT_FOUND`; what a failure means is [`OwnerFailure::of`] it.
    fn restore_hold(&self, volume: u32) -> BoxFuture<'_, Result<Option<RestoreHold>, ClientError>>;
    /// What `lu` is in the owner's pairs ("a mirror", "an origin", "a
    /// mate"), or `None` when it belongs to no pair. The array hides a
    /// pair's mirror and origin from the backup server, so only the owner
    /// can say that a `to_lu` the array answers NOT_FOUND is a pair's LU.
    fn pair_role(&self, lu: u32) -> BoxFuture<'_, Result<Option<&'static str>, ClientError>>;
}

/// db-server over gRPC: a thin adapter over [`DbClient`].
pub struct GrpcOwner {
    db: DbClient,
}

impl GrpcOwner {
    /// An owner at `url`. Fails only for an address that cannot be parsed;
    /// the connection is made at the first question.
    pub fn new(url: &str, security: &Security) -> Result<Self, ClientError> {
        Ok(Self {
            db: DbClient::new(url, security)?,
        })
    }
}

impl SnapshotOwner for GrpcOwner {
    fn describe(&self) -> String {
        self.db.target().to_string()
    }

    fn snapshot(&self, volume: u32, mate: u32) -> BoxFuture<'_, Result<HeldSnapshot, ClientError>> {
        Box::pin(async move {
            let answer = self.db.get_snapshot_of(volume, mate).await?;
            let method = answer.method();
            Ok(HeldSnapshot {
                volume: answer.volume,
                holder_run_id: answer.holder_run_id,
                mate_lu: answer.mate_lu,
                ledger_sequence: answer.ledger_sequence,
                block_size_bytes: answer.block_size_bytes,
                block_count: answer.block_count,
                snapshot_id: answer.snapshot_id,
                mate: mate_or_first(answer.mate),
                // A db-server older than copy-on-write answers no method:
                // its snapshots split.
                method: match method {
                    pb::SnapshotMethod::Cow => SnapshotMethod::Cow,
                    pb::SnapshotMethod::Split | pb::SnapshotMethod::Unspecified => {
                        SnapshotMethod::Split
                    }
                },
                writable: answer.writable,
            })
        })
    }

    fn read_snapshot(
        &self,
        volume: u32,
        mate: u32,
        lba: u64,
        blocks: u64,
    ) -> BoxFuture<'_, Result<DataStream, ClientError>> {
        Box::pin(async move {
            let doing = move || {
                format!(
                    "reading the snapshot of volume {volume}{} at LBA {lba}",
                    of_mate(mate)
                )
            };
            let request = pb::VolumeReadRequest {
                volume,
                target: pb::VirtualLu::Snapshot.into(),
                lba,
                blocks,
                mate,
            };
            let stream = match self.db.raw().read(request).await {
                Ok(answer) => answer.into_inner(),
                Err(status) => {
                    return Err(ClientError::from_status(
                        "db-server",
                        self.db.target(),
                        doing(),
                        &status,
                    ));
                }
            };
            let target = self.db.target().to_string();
            let data: DataStream = Box::pin(futures_util::StreamExt::map(stream, move |chunk| {
                chunk.map(|c| c.data).map_err(|status| {
                    ClientError::from_status("db-server", &target, doing(), &status)
                })
            }));
            Ok(data)
        })
    }
}

impl VolumeOwner for GrpcOwner {
    fn describe(&self) -> String {
        self.db.target().to_string()
    }

    fn restore_hold(&self, volume: u32) -> BoxFuture<'_, Result<Option<RestoreHold>, ClientError>> {
        Box::pin(async move {
            let status = self.db.volume_status(volume).await?;
            Ok(status.restore.map(|restore| RestoreHold {
                kind: match restore.kind() {
                    pb::RestoreKind::FromBackup => RestoreHoldKind::FromBackup,
                    pb::RestoreKind::ToSnapshot => RestoreHoldKind::ToSnapshot,
                    pb::RestoreKind::Unspecified => RestoreHoldKind::Other,
                },
                run_id: restore.run_id,
                backup_id: restore.backup_id,
            }))
        })
    }

    fn pair_role(&self, lu: u32) -> BoxFuture<'_, Result<Option<&'static str>, ClientError>> {
        Box::pin(async move {
            let status = self.db.status(false).await?;
            Ok(status.volumes.iter().find_map(|v| {
                if v.mirror_lu == lu {
                    Some("a mirror")
                } else if v.origin_lu == lu {
                    Some("an origin")
                } else if v.mate_lu == lu {
                    Some("a mate")
                } else {
                    None
                }
            }))
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
            mate: 1,
            method: SnapshotMethod::Split,
            writable: false,
        }
    }

    #[test]
    fn a_snapshot_must_be_held_by_the_named_run_and_freeze_the_copied_lu() {
        let wanted = SnapshotRef {
            volume: 0,
            holder_run_id: "run-1".into(),
            mate: 1,
        };
        assert!(check_held(&wanted, 2, &held("run-1", 2, 7)).is_ok());
        let other = check_held(&wanted, 2, &held("run-2", 2, 7));
        assert!(
            matches!(&other, Err(NotFrozen::OtherHolder { held_by, .. }) if held_by == "run-2"),
            "{other:?}"
        );
        assert!(matches!(
            check_held(&wanted, 1, &held("run-1", 2, 7)),
            Err(NotFrozen::OtherLu {
                volume: 0,
                mate: 1,
                mate_lu: 2,
                lu: 1
            })
        ));
        let nameless = HeldSnapshot {
            snapshot_id: 0,
            ..held("run-1", 2, 7)
        };
        assert!(matches!(
            check_held(&wanted, 2, &nameless),
            Err(NotFrozen::NoSnapshotId { .. })
        ));
    }

    #[test]
    fn the_copied_lu_must_be_the_mate_lu_of_the_mate_named() {
        // Volume 0 has mates LU 2, 5 and 6; run-1 split mate 3 (LU 6).
        let wanted = SnapshotRef {
            volume: 0,
            holder_run_id: "run-1".into(),
            mate: 3,
        };
        let of_mate_3 = HeldSnapshot {
            mate: 3,
            ..held("run-1", 6, 7)
        };
        assert!(check_held(&wanted, 6, &of_mate_3).is_ok());
        // Mate 1's LU is not the one mate 3's snapshot freezes.
        let why = check_held(&wanted, 2, &of_mate_3).expect_err("mate 1's LU");
        assert!(
            matches!(
                why,
                NotFrozen::OtherLu {
                    volume: 0,
                    mate: 3,
                    mate_lu: 6,
                    lu: 2
                }
            ),
            "{why:?}"
        );
        assert_eq!(
            why.to_string(),
            "the snapshot of volume 0 (mate 3) freezes mate LU 6, not LU 2"
        );
        // A db-server that knows one mate answers for mate 1 (0 on the
        // wire, read as 1) whatever it is asked: not mate 3's snapshot.
        let why = check_held(&wanted, 2, &held("run-1", 2, 7)).expect_err("mate 1's answer");
        assert!(
            matches!(
                why,
                NotFrozen::OtherMate {
                    volume: 0,
                    wanted: 3,
                    answered: 1
                }
            ),
            "{why:?}"
        );
        let old_answer = HeldSnapshot {
            mate: 0,
            ..held("run-1", 2, 7)
        };
        let first = SnapshotRef {
            mate: 1,
            ..wanted.clone()
        };
        assert!(check_held(&first, 2, &old_answer).is_ok(), "0 is mate 1");
        // After the copy, another mate's answer is another snapshot.
        assert!(matches!(
            check_unchanged(
                &of_mate_3,
                &HeldSnapshot {
                    mate: 2,
                    ..of_mate_3.clone()
                }
            ),
            Err(NotFrozen::Replaced { .. })
        ));
    }

    #[test]
    fn a_writable_snapshot_is_not_frozen_and_is_refused_before_the_copy() {
        let wanted = SnapshotRef {
            volume: 0,
            holder_run_id: "run-1".into(),
            mate: 1,
        };
        let writable = HeldSnapshot {
            writable: true,
            ..held("run-1", 2, 7)
        };
        let why = check_held(&wanted, 2, &writable).expect_err("writable");
        assert!(
            matches!(&why, NotFrozen::Writable { volume: 0, holder_run_id, mate_lu: 2 } if holder_run_id == "run-1"),
            "{why:?}"
        );
        let text = why.to_string();
        assert!(
            text.contains(
                "held by run \"run-1\" is writable: its mate (LU 2) is not a frozen image"
            ),
            "{text}"
        );
        // Another holder or LU is still said first: that is the mistake.
        assert!(matches!(
            check_held(
                &wanted,
                2,
                &HeldSnapshot {
                    writable: true,
                    ..held("run-2", 2, 7)
                }
            ),
            Err(NotFrozen::OtherHolder { .. })
        ));
        // A snapshot that became writable after the check is another one.
        assert!(matches!(
            check_unchanged(&held("run-1", 2, 7), &writable),
            Err(NotFrozen::Replaced { .. })
        ));
    }

    #[test]
    fn a_snapshot_acquired_again_is_not_the_one_confirmed_before() {
        let before = held("run-1", 2, 7);
        assert!(check_unchanged(&before, &before.clone()).is_ok());
        assert!(matches!(
            check_unchanged(&before, &held("run-2", 2, 7)),
            Err(NotFrozen::Released { .. })
        ));
        assert!(matches!(
            check_unchanged(&before, &held("run-1", 2, 9)),
            Err(NotFrozen::Replaced { .. })
        ));
        // Same run, same sequence (ledger off or idle), new acquire.
        let again = HeldSnapshot {
            snapshot_id: 0xdef,
            ..held("run-1", 2, 7)
        };
        let why = check_unchanged(&before, &again).expect_err("acquired again");
        assert!(
            matches!(
                why,
                NotFrozen::Replaced {
                    snapshot_id_before: 0xabc,
                    snapshot_id_after: 0xdef,
                    ..
                }
            ),
            "{why}"
        );
    }

    #[test]
    fn what_a_failed_question_means_comes_from_the_code_not_the_text() {
        let failure = |status: tonic::Status| {
            OwnerFailure::of(&ClientError::from_status(
                "db-server",
                "x:1",
                "asking",
                &status,
            ))
        };
        assert_eq!(
            failure(tonic::Status::not_found("anything")),
            OwnerFailure::UnknownVolume
        );
        assert_eq!(
            failure(tonic::Status::failed_precondition("anything")),
            OwnerFailure::NoSnapshot
        );
        assert_eq!(
            failure(tonic::Status::unavailable("no snapshot")),
            OwnerFailure::Unavailable
        );
        assert_eq!(
            failure(tonic::Status::internal("unknown volume")),
            OwnerFailure::Failed
        );
        assert_eq!(
            failure(tonic::Status::invalid_argument("no snapshot")),
            OwnerFailure::Failed
        );
    }
}
