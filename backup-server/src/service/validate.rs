//! Every request of `splitmirror.backup.v1`, checked in one place before
//! any side effect: one function per request kind turns the decoded
//! message into a checked value, and the handlers act only on those
//! values, so that nothing reaches the array, db-server or the store
//! unchecked.
//!
//! What is checked, in the order a caller sees the refusals (all
//! `INVALID_ARGUMENT`): a start names a snapshot or asks for a live copy
//! (not both, not neither); its run id and the snapshot's holder run id
//! follow the run id rules every node shares ([`validate_run_id`]); a
//! backup id is one the store could hold (hex and dashes, at most 64
//! bytes), so that it can never name a path outside the store.
//! `ListBackups` carries nothing to check. A restore names exactly one
//! target (a volume or a plain LU), a run id by the same rules, and a
//! backup id as above. What needs the array or db-server (the LU exists,
//! the snapshot is held, the volume is offline for the restore) is asked
//! when the backup or the restore starts.

use splitmirror_proto::backup::v1 as pb;
use splitmirror_proto::run_id::validate_run_id;

use crate::backups::{BackupError, StartRequest, Wanted};
use crate::owner::{SnapshotRef, mate_or_first};
use crate::prune::Retention;
use crate::restore::{RestoreError, RestoreRequest, Target};
use crate::store::ChunkStore;

/// Proof that a value came out of this module's checks: only this module
/// can make one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked(());

impl Checked {
    /// For the cores' unit tests, which build requests without a wire
    /// message.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        Checked(())
    }
}

/// A checked backup id (`GetBackup`, `WatchBackup`, `CancelBackup`,
/// `VerifyBackup`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupId {
    pub id: String,
    pub checked: Checked,
}

pub fn start_backup(request: pb::StartBackupRequest) -> Result<StartRequest, BackupError> {
    let wanted = match (request.snapshot, request.live) {
        (Some(s), false) => Wanted::Snapshot(SnapshotRef {
            volume: s.volume,
            holder_run_id: s.holder_run_id,
            mate: mate_or_first(s.mate),
        }),
        (None, true) => Wanted::Live,
        (Some(_), true) => {
            return Err(BackupError::Malformed(
                "name a snapshot or ask for a live backup, not both".into(),
            ));
        }
        (None, false) => {
            return Err(BackupError::Malformed(format!(
                "LU {} would be copied while it may be written: name the snapshot that freezes it (snapshot: volume and holder_run_id), or set live to copy it unfrozen",
                request.lu
            )));
        }
    };
    // The same rule as db-server's holders: no blank run id, no control
    // characters, a bounded length.
    validate_run_id(&request.run_id).map_err(|source| BackupError::BadRunId {
        field: "run_id",
        source,
    })?;
    if let Wanted::Snapshot(wanted) = &wanted {
        validate_run_id(&wanted.holder_run_id).map_err(|source| BackupError::BadRunId {
            field: "the snapshot's holder_run_id",
            source,
        })?;
    }
    Ok(StartRequest {
        run_id: request.run_id,
        lu: request.lu,
        expected_block_count: request.expected_block_count,
        label: request.label,
        max_bytes_per_s: request.max_bytes_per_s,
        wanted,
        verify_read: request.verify_read,
        checked: Checked(()),
    })
}

/// `StartRestore`: a valid run id, a backup id the store could hold, and
/// exactly one target.
pub fn start_restore(request: pb::StartRestoreRequest) -> Result<RestoreRequest, RestoreError> {
    validate_run_id(&request.run_id).map_err(RestoreError::BadRunId)?;
    ChunkStore::check_id(&request.backup_id)
        .map_err(|_| RestoreError::BadBackupId(request.backup_id.clone()))?;
    let target = match (request.volume, request.to_lu) {
        (Some(volume), None) => Target::Volume(volume),
        (None, Some(lu)) => Target::PlainLu(lu),
        (Some(_), Some(_)) => {
            return Err(RestoreError::Malformed(
                "name one target: a volume (offline for this run by BeginRestore) or to_lu (a plain LU), not both".into(),
            ));
        }
        (None, None) => {
            return Err(RestoreError::Malformed(
                "name the target: a volume (offline for this run by BeginRestore) or to_lu (a plain LU)".into(),
            ));
        }
    };
    if request.max_bytes_per_s == Some(0) {
        return Err(RestoreError::Malformed(
            "max_bytes_per_s must be positive (unset for no cap)".into(),
        ));
    }
    Ok(RestoreRequest {
        run_id: request.run_id,
        backup_id: request.backup_id,
        target,
        max_bytes_per_s: request.max_bytes_per_s,
        checked: Checked(()),
    })
}

/// The run id of `WatchRestore`.
pub fn restore_run_id(run_id: String) -> Result<String, RestoreError> {
    validate_run_id(&run_id).map_err(RestoreError::BadRunId)?;
    Ok(run_id)
}

/// A checked `PruneBackups`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prune {
    pub volume: u32,
    pub retention: Retention,
    pub dry_run: bool,
    pub checked: Checked,
}

/// A prune keeps something: at least one rule, and `keep_last` at least 1.
pub fn prune_backups(request: pb::PruneBackupsRequest) -> Result<Prune, BackupError> {
    if request.keep_last.is_none() && request.keep_within_s.is_none() {
        return Err(BackupError::BadRetention(
            "say what to keep: keep_last, keep_within_s, or both".into(),
        ));
    }
    if request.keep_last == Some(0) {
        return Err(BackupError::BadRetention(
            "keep_last must be at least 1 (to remove every backup of a volume, remove them by hand)"
                .into(),
        ));
    }
    Ok(Prune {
        volume: request.volume,
        retention: Retention {
            keep_last: request.keep_last,
            keep_within: request.keep_within_s.map(std::time::Duration::from_secs),
        },
        dry_run: request.dry_run,
        checked: Checked(()),
    })
}

/// The backup id of `GetBackup`, `WatchBackup`, `CancelBackup` and
/// `VerifyBackup`.
pub fn backup_id(id: String) -> Result<BackupId, BackupError> {
    ChunkStore::check_id(&id)?;
    Ok(BackupId {
        id,
        checked: Checked(()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(
        snapshot: Option<pb::SnapshotRef>,
        live: bool,
        run_id: &str,
    ) -> pb::StartBackupRequest {
        pb::StartBackupRequest {
            run_id: run_id.into(),
            lu: 2,
            snapshot,
            live,
            ..Default::default()
        }
    }

    fn snapshot(holder_run_id: &str) -> Option<pb::SnapshotRef> {
        Some(pb::SnapshotRef {
            mate: 0,
            volume: 0,
            holder_run_id: holder_run_id.into(),
        })
    }

    #[test]
    fn a_start_names_a_snapshot_or_live_and_valid_run_ids() {
        let code = |request| {
            start_backup(request)
                .map(drop)
                .map_err(|e| tonic::Status::from(e).code())
        };
        assert_eq!(code(start(snapshot("run-1"), false, "run-1")), Ok(()));
        assert_eq!(code(start(None, true, "run-1")), Ok(()));
        for refused in [
            start(snapshot("run-1"), true, "run-1"),
            start(None, false, "run-1"),
            start(None, true, ""),
            start(None, true, "a\nb"),
            start(snapshot(" "), false, "run-1"),
        ] {
            assert_eq!(
                code(refused.clone()),
                Err(tonic::Code::InvalidArgument),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn a_restore_names_exactly_one_target_and_valid_ids() {
        let request = |volume, to_lu, run_id: &str, backup_id: &str| pb::StartRestoreRequest {
            run_id: run_id.into(),
            backup_id: backup_id.into(),
            volume,
            to_lu,
            max_bytes_per_s: None,
        };
        let id = "0190d3c4-0000-7000-8000-000000000000";
        let target = |r| start_restore(r).map(|r| r.target);
        assert_eq!(
            target(request(Some(0), None, "r", id)).ok(),
            Some(Target::Volume(0))
        );
        assert_eq!(
            target(request(None, Some(6), "r", id)).ok(),
            Some(Target::PlainLu(6))
        );
        for refused in [
            request(Some(0), Some(6), "r", id),
            request(None, None, "r", id),
            request(Some(0), None, "", id),
            request(Some(0), None, "a\tb", id),
            request(Some(0), None, "r", "../x"),
            request(Some(0), None, "r", ""),
            pb::StartRestoreRequest {
                max_bytes_per_s: Some(0),
                ..request(Some(0), None, "r", id)
            },
        ] {
            let code = start_restore(refused.clone()).map_err(|e| tonic::Status::from(e).code());
            assert_eq!(
                code.err(),
                Some(tonic::Code::InvalidArgument),
                "{refused:?}"
            );
        }
        assert!(restore_run_id(String::new()).is_err());
    }

    #[test]
    fn a_backup_id_cannot_name_a_path() {
        assert!(backup_id("0190d3c4-0000-7000-8000-000000000000".into()).is_ok());
        for bad in ["", "../etc", "a/b", &"a".repeat(65)] {
            let refused = backup_id(bad.to_string()).expect_err(bad);
            assert_eq!(
                tonic::Status::from(refused).code(),
                tonic::Code::InvalidArgument,
                "{bad:?}"
            );
        }
    }
}
