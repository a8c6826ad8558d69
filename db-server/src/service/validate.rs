//! Every request of `splitmirror.db.v1`, checked in one place before any
//! side effect: one function per request kind turns the decoded message
//! into a checked value, and the handlers act only on those values (the
//! [`Db`] operations take them), so that no request reaches the gate, the
//! journal or the array unchecked.
//!
//! What is checked, in the order a caller sees the refusals (the order
//! and the codes are the wire contract the tests hold):
//! - a virtual LU named (`VIRTUAL_LU_UNSPECIFIED` is not defaulted to the
//!   data LU: a request that forgets its target must not touch the volume);
//! - a write's size under the array's request limit
//!   ([`MAX_ARRAY_REQUEST_BYTES`], `RESOURCE_EXHAUSTED` with a reason);
//! - run ids by the rules every node shares
//!   ([`validate_run_id`]);
//! - the volume exists, the data is a positive whole number of its blocks,
//!   the range lies inside it;
//! - a suspend lease under the cap;
//! - a restore's backup id (not empty, one short line) and expected image
//!   digest (none, or 32 bytes).
//!
//! `Status` and `Resume` carry nothing to check. What depends on the
//! pair's mode (a snapshot held or not) is decided under the mode's lock
//! by the manager, not here: a check here would be stale by then.

use std::ops::Range;
use std::time::Duration;

use splitmirror_proto::db::v1 as pb;
use splitmirror_proto::node::MAX_ARRAY_REQUEST_BYTES;
use splitmirror_proto::run_id::validate_run_id;

use crate::db::Db;
use crate::error::DbError;
use crate::lu_status::VirtualLu;
use crate::manager::PairRef;

/// `WatchStatus` never sends more often than this.
pub const MIN_WATCH_INTERVAL: Duration = Duration::from_millis(50);
/// `WatchStatus` without an interval sends this often.
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// Proof that a value came out of this module's checks: only this module
/// can make one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked(());

/// A checked `AcquireSnapshot`: an existing volume and a valid run id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireSnapshot {
    pub volume: u32,
    /// Which of the volume's mates (counted from 1; 1 for the data LU).
    pub mate: u32,
    pub run_id: String,
    /// The method asked for; `None`: db-server's `--snapshot-method`.
    pub method: Option<crate::manager::SnapshotMethod>,
    /// A writable split snapshot (never with copy-on-write).
    pub writable: bool,
    pub checked: Checked,
}

/// A checked `DeleteSnapshot`: a valid run id (or none, with `force`) and
/// an existing volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteSnapshot {
    pub volume: u32,
    /// Which of the volume's mates (counted from 1; 1 for the data LU).
    pub mate: u32,
    pub run_id: String,
    pub force: bool,
    pub checked: Checked,
}

/// A checked `Suspend`: the lease it gets, under the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Suspend {
    pub lease: Duration,
    pub checked: Checked,
}

/// A checked volume `Read`: a target, an existing volume, a range inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRead {
    pub volume: u32,
    /// Which of the volume's mates (counted from 1; 1 for the data LU).
    pub mate: u32,
    pub target: VirtualLu,
    pub blocks: Range<u64>,
    pub block_size_bytes: u32,
    pub checked: Checked,
}

/// A checked volume `Write`: a target, at most the array's request limit,
/// whole blocks of an existing volume, inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeWrite {
    pub volume: u32,
    /// Which of the volume's mates (counted from 1; 1 for the data LU).
    pub mate: u32,
    pub target: VirtualLu,
    pub lba: u64,
    pub data: Vec<u8>,
    pub checked: Checked,
}

/// A checked `GetSnapshot`: an existing volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetSnapshot {
    pub volume: u32,
    /// Which of the volume's mates (counted from 1; 1 for the data LU).
    pub mate: u32,
    pub checked: Checked,
}

/// A checked `BeginRestore`: an existing volume, a valid run id, a backup
/// id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginRestore {
    pub volume: u32,
    pub run_id: String,
    pub backup_id: String,
    pub checked: Checked,
}

/// A checked `EndRestore`: an existing volume, a valid run id, and no
/// image digest or one of 32 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndRestore {
    pub volume: u32,
    pub run_id: String,
    pub abandon: bool,
    pub expected_image_digest: Option<[u8; 32]>,
    pub checked: Checked,
}

/// A checked `RestoreSnapshot`: an existing volume and a valid run id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreSnapshot {
    pub volume: u32,
    /// Which of the volume's mates (counted from 1; 1 for the data LU).
    pub mate: u32,
    pub run_id: String,
    pub checked: Checked,
}

/// The longest backup id accepted (a backup server's ids are far shorter).
pub const MAX_BACKUP_ID_BYTES: usize = 128;

/// A checked `WatchStatus`: the interval it sends at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchStatus {
    pub interval: Duration,
    pub include_latency_histogram: bool,
    pub checked: Checked,
}

pub fn acquire_snapshot(
    db: &Db,
    request: pb::AcquireSnapshotRequest,
) -> Result<AcquireSnapshot, DbError> {
    validate_run_id(&request.run_id)?;
    let mate = checked_mate(db, request.volume, request.mate)?;
    let method = match pb::SnapshotMethod::try_from(request.method) {
        Ok(pb::SnapshotMethod::Unspecified) => None,
        Ok(pb::SnapshotMethod::Split) => Some(crate::manager::SnapshotMethod::Split),
        Ok(pb::SnapshotMethod::Cow) => Some(crate::manager::SnapshotMethod::Cow),
        Err(_) => {
            return Err(DbError::InvalidArgument(format!(
                "unknown snapshot method {}: expected SNAPSHOT_METHOD_SPLIT, SNAPSHOT_METHOD_COW \
                 or unset (the server's --snapshot-method)",
                request.method
            )));
        }
    };
    if request.writable && method == Some(crate::manager::SnapshotMethod::Cow) {
        return Err(DbError::InvalidArgument(
            "writable with SNAPSHOT_METHOD_COW: a copy-on-write snapshot is read-only".into(),
        ));
    }
    Ok(AcquireSnapshot {
        volume: request.volume,
        mate,
        run_id: request.run_id,
        method,
        writable: request.writable,
        checked: Checked(()),
    })
}

pub fn delete_snapshot(
    db: &Db,
    request: pb::DeleteSnapshotRequest,
) -> Result<DeleteSnapshot, DbError> {
    // A forced delete needs no holder's name; any name given must be one a
    // holder could have.
    if request.run_id.is_empty() {
        if !request.force {
            return Err(DbError::InvalidArgument(
                "run_id must not be empty (or set force)".into(),
            ));
        }
    } else {
        validate_run_id(&request.run_id)?;
    }
    let mate = checked_mate(db, request.volume, request.mate)?;
    Ok(DeleteSnapshot {
        volume: request.volume,
        mate,
        run_id: request.run_id,
        force: request.force,
        checked: Checked(()),
    })
}

pub fn suspend(db: &Db, request: pb::SuspendRequest) -> Result<Suspend, DbError> {
    let asked = match request.lease_ms {
        0 => None,
        ms => Some(Duration::from_millis(u64::from(ms))),
    };
    Ok(Suspend {
        lease: db.gate.lease_for(asked)?,
        checked: Checked(()),
    })
}

pub fn read(db: &Db, request: pb::VolumeReadRequest) -> Result<VolumeRead, DbError> {
    let target = target(request.target)?;
    let mate = target_mate(db, request.volume, target, request.mate)?;
    let blocks = db
        .manager
        .check_range(request.volume, request.lba, request.blocks)?;
    Ok(VolumeRead {
        volume: request.volume,
        mate,
        target,
        blocks,
        block_size_bytes: db.manager.pair(request.volume)?.block_size_bytes,
        checked: Checked(()),
    })
}

pub fn write(db: &Db, request: pb::VolumeWriteRequest) -> Result<VolumeWrite, DbError> {
    let target = target(request.target)?;
    let mate = target_mate(db, request.volume, target, request.mate)?;
    // Sent, a write the array refuses for its size would look like a write
    // whose outcome is unknown: its range would stay recorded and be
    // resynced for nothing.
    let bytes = request.data.len() as u64;
    if bytes > MAX_ARRAY_REQUEST_BYTES {
        return Err(DbError::TooLarge {
            bytes,
            limit_bytes: MAX_ARRAY_REQUEST_BYTES,
        });
    }
    db.manager
        .check_write(request.volume, request.lba, request.data.len())?;
    Ok(VolumeWrite {
        volume: request.volume,
        mate,
        target,
        lba: request.lba,
        data: request.data,
        checked: Checked(()),
    })
}

pub fn get_snapshot(db: &Db, request: pb::GetSnapshotRequest) -> Result<GetSnapshot, DbError> {
    let mate = checked_mate(db, request.volume, request.mate)?;
    Ok(GetSnapshot {
        volume: request.volume,
        mate,
        checked: Checked(()),
    })
}

pub fn begin_restore(db: &Db, request: pb::BeginRestoreRequest) -> Result<BeginRestore, DbError> {
    validate_run_id(&request.run_id)?;
    let backup_id = request.backup_id;
    if backup_id.trim().is_empty() {
        return Err(DbError::InvalidArgument(
            "backup_id must name the backup being restored".into(),
        ));
    }
    if backup_id.len() > MAX_BACKUP_ID_BYTES || backup_id.chars().any(char::is_control) {
        return Err(DbError::InvalidArgument(format!(
            "backup_id must be one line of at most {MAX_BACKUP_ID_BYTES} bytes"
        )));
    }
    db.manager.pair(request.volume)?;
    Ok(BeginRestore {
        volume: request.volume,
        run_id: request.run_id,
        backup_id,
        checked: Checked(()),
    })
}

pub fn end_restore(db: &Db, request: pb::EndRestoreRequest) -> Result<EndRestore, DbError> {
    validate_run_id(&request.run_id)?;
    let expected_image_digest = match request.expected_image_digest.len() {
        0 => None,
        _ => Some(
            <[u8; 32]>::try_from(request.expected_image_digest.as_slice()).map_err(|_| {
                DbError::InvalidArgument(format!(
                    "expected_image_digest is {} bytes; a BLAKE3 digest is 32 (or send none)",
                    request.expected_image_digest.len()
                ))
            })?,
        ),
    };
    db.manager.pair(request.volume)?;
    Ok(EndRestore {
        volume: request.volume,
        run_id: request.run_id,
        abandon: request.abandon,
        expected_image_digest,
        checked: Checked(()),
    })
}

pub fn restore_snapshot(
    db: &Db,
    request: pb::RestoreSnapshotRequest,
) -> Result<RestoreSnapshot, DbError> {
    validate_run_id(&request.run_id)?;
    let mate = checked_mate(db, request.volume, request.mate)?;
    Ok(RestoreSnapshot {
        volume: request.volume,
        mate,
        run_id: request.run_id,
        checked: Checked(()),
    })
}

/// `mate` of an existing volume, counted from 1 (0, unset, means 1): an
/// unknown volume is NOT_FOUND, a mate it does not have a bad argument.
fn checked_mate(db: &Db, volume: u32, mate: u32) -> Result<u32, DbError> {
    let pair = PairRef::new(volume, mate);
    db.manager.pair(pair)?;
    Ok(pair.mate)
}

/// The mate a Read or Write names: any of the volume's with the snapshot
/// LU; none (0) with the data LU, which is the volume's whatever its mates.
fn target_mate(db: &Db, volume: u32, target: VirtualLu, mate: u32) -> Result<u32, DbError> {
    match (target, mate) {
        (VirtualLu::Snapshot, mate) => checked_mate(db, volume, mate),
        (VirtualLu::Data, 0) => checked_mate(db, volume, 1),
        (VirtualLu::Data, mate) => Err(DbError::InvalidArgument(format!(
            "mate {mate} with VIRTUAL_LU_DATA: a mate names a snapshot; the data LU is the \
             volume's (send mate 0)"
        ))),
    }
}

pub fn watch_status(request: pb::WatchStatusRequest) -> WatchStatus {
    let interval = match request.interval_ms {
        0 => DEFAULT_WATCH_INTERVAL,
        ms => Duration::from_millis(u64::from(ms)).max(MIN_WATCH_INTERVAL),
    };
    WatchStatus {
        interval,
        include_latency_histogram: request.include_latency_histogram,
        checked: Checked(()),
    }
}

/// The virtual LU a request names; an unspecified or unknown one is
/// refused, never defaulted.
pub fn target(target: i32) -> Result<VirtualLu, DbError> {
    match pb::VirtualLu::try_from(target) {
        Ok(pb::VirtualLu::Data) => Ok(VirtualLu::Data),
        Ok(pb::VirtualLu::Snapshot) => Ok(VirtualLu::Snapshot),
        Ok(pb::VirtualLu::Unspecified) => Err(DbError::InvalidArgument(
            "target is VIRTUAL_LU_UNSPECIFIED: name VIRTUAL_LU_DATA or VIRTUAL_LU_SNAPSHOT".into(),
        )),
        Err(_) => Err(DbError::InvalidArgument(format!(
            "unknown virtual LU {target}"
        ))),
    }
}
