//! What can go wrong in the snapshot manager and the database.
//!
//! Each variant says its cause and whether the same call can succeed if
//! tried again; `service.rs` maps each to one gRPC code and, where a caller
//! must tell refusals of one code apart, a
//! [`Reason`](splitmirror_proto::reason::Reason).

use std::time::Duration;

use splitmirror_proto::client::ClientError;

use crate::journal::JournalError;
use crate::ledger::LedgerError;
use crate::lu_status::{Mode, VirtualLu};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The caller named a volume (mirror LU) the array does not define.
    /// Not retryable.
    #[error("volume {0} does not exist")]
    UnknownVolume(u32),
    /// The request is malformed (zero blocks, data that is not whole
    /// blocks, a transfer between one account). Not retryable; the caller's
    /// fault.
    #[error("{0}")]
    InvalidArgument(String),
    /// A block range past the end of the volume. Not retryable.
    #[error("{0}")]
    OutOfRange(String),
    /// The pair is in another mode than the call needs (an acquire while a
    /// snapshot is held or the pair resynchronizes, a delete while
    /// Synchronized). Retryable only once the mode changes: waiting helps
    /// for `Resynchronizing`, not for a snapshot another run holds.
    #[error("cannot {action} volume {volume}: it is in {mode:?} mode")]
    WrongMode {
        volume: u32,
        action: &'static str,
        mode: Mode,
    },
    /// The virtual LU has no destination in this mode: the snapshot LU
    /// while no snapshot is acquired. Not retryable until one is.
    #[error("the {target:?} virtual LU of volume {volume} is Undefined (no snapshot is acquired)")]
    Undefined { volume: u32, target: VirtualLu },
    /// A write to the snapshot virtual LU while the array masks the frozen
    /// mate read-only (every TLS cluster): the mate under a snapshot may
    /// only be read, by db-server too. Refused before anything is recorded
    /// or sent. Not retryable.
    #[error(
        "the snapshot of volume {volume} is read-only: the array masks its mate LU {mate_lu} read-only while the snapshot is held"
    )]
    SnapshotReadOnly { volume: u32, mate_lu: u32 },
    /// A write to the snapshot virtual LU of a copy-on-write snapshot: its
    /// image is the mate plus the save area, which only db-server's write
    /// path fills. Not retryable.
    #[error(
        "the copy-on-write snapshot of volume {volume} is read-only: only the data virtual LU takes writes"
    )]
    CowSnapshotReadOnly { volume: u32 },
    /// The copy-on-write snapshot's image is gone: its save area filled up,
    /// or db-server restarted while it was held (`reason` says which). Its
    /// reads are refused; the holder's delete succeeds. Not retryable: take
    /// a new snapshot.
    #[error(
        "the copy-on-write snapshot of volume {volume} (run {holder}) is invalidated: {reason}"
    )]
    SnapshotInvalidated {
        volume: u32,
        holder: String,
        reason: String,
    },
    /// A copy-on-write snapshot was asked of a volume without a save area
    /// (`--save-area VOLUME=LU`). Not retryable as configured.
    #[error(
        "volume {volume} has no save area: a copy-on-write snapshot needs one (db-server --save-area {volume}=LU)"
    )]
    NoSaveArea { volume: u32 },
    /// `--save-area` or `--snapshot-method` names something the array does
    /// not have as needed (checked at start-up). Not retryable as
    /// configured.
    #[error("{0}")]
    SaveAreaConfig(String),
    /// Another run holds the snapshot and the delete was not forced. Not
    /// retryable as it is.
    #[error(
        "the snapshot of volume {volume} is held by run {holder}; deleting it from run {requester} needs --force"
    )]
    HeldByOther {
        volume: u32,
        holder: String,
        requester: String,
    },
    /// Transactions were still in flight when the quiesce timed out.
    /// Retryable.
    #[error("the database did not quiesce: transactions still in flight after {timeout:?}")]
    QuiesceTimeout { timeout: Duration },
    /// The pair was not Synchronized within the time waited for it (its
    /// resync is still running, or the array keeps failing). Retryable.
    #[error("volume {volume} not synchronized after {timeout:?}")]
    NotSynchronized { volume: u32, timeout: Duration },
    /// An array call failed. Retryable when the array was unreachable
    /// ([`ClientError::is_transient`]); otherwise the array failed, which
    /// is not the caller's fault and not retryable as it is.
    #[error("the array failed: {0}")]
    Array(#[from] ClientError),
    /// The journal could not record a state change or an intent; nothing
    /// took effect. Retryable only once the disk is fixed.
    #[error("the journal failed: {0}")]
    Journal(#[from] JournalError),
    /// The ledger database refused or failed (see [`LedgerError`]).
    #[error("the ledger: {0}")]
    Ledger(#[from] LedgerError),
    /// db-server is stopping. Retry against the restarted server.
    #[error("db-server is shutting down")]
    ShuttingDown,
    /// A suspend asked for a lease over the cap (DESIGN §3: a lost console
    /// must never freeze the database for long). Retrying the same request
    /// cannot help; a shorter lease renewed in time can.
    #[error(
        "a suspend lease of {lease_ms} ms is over this db-server's cap of {max_lease_ms} ms (--max-suspend-lease); ask for at most {max_lease_ms} ms and renew it with another Suspend before it runs out"
    )]
    LeaseOverCap { lease_ms: u64, max_lease_ms: u64 },
    /// A write larger than the array takes in one request: refused before
    /// anything is recorded or sent. Retrying cannot help; splitting can.
    #[error(
        "a write of {bytes} bytes is over the limit of {limit_bytes} bytes per write (the array's request limit); split it"
    )]
    TooLarge { bytes: u64, limit_bytes: u64 },
    /// The volume is offline for a restore: every Read and Write of it
    /// (data or snapshot virtual LU) is refused until the restore ends.
    /// Retryable after waiting (EndRestore, or the reverse resync's end).
    #[error(
        "volume {volume} is offline: {}",
        match backup_id {
            Some(backup) => format!("restore run {run_id} of backup {backup}"),
            None => format!("run {run_id} restores it to its snapshot"),
        }
    )]
    Restoring {
        volume: u32,
        run_id: String,
        /// The backup being restored; `None` for a reverse resync.
        backup_id: Option<String>,
    },
    /// Another run's restore holds the volume (or a snapshot or a restore
    /// is asked of it while a restore runs). Not retryable until that
    /// restore ends or is abandoned.
    #[error("cannot {action} volume {volume}: restore run {holder} holds it")]
    RestoreHeld {
        volume: u32,
        action: &'static str,
        holder: String,
    },
    /// EndRestore by a run that neither restores the volume nor ended its
    /// restore. Not retryable as it is.
    #[error("volume {volume} is not being restored by run {run_id} (it is in {mode:?} mode)")]
    NotRestoring {
        volume: u32,
        run_id: String,
        mode: Mode,
    },
    /// EndRestore found origin and mate different, or not the expected
    /// image: the volume stays offline. Not retryable as it is: run the
    /// restore again (or abandon it).
    #[error("the restore of volume {volume} is incomplete: {why}")]
    RestoreIncomplete {
        volume: u32,
        /// The first 1 MiB chunk where origin and mate differ, if they do.
        first_differing_chunk: Option<u64>,
        why: String,
    },
    /// The run id is not one a run could have (empty, too long, not
    /// printable ASCII). Not retryable; the caller's fault.
    #[error("{0}")]
    InvalidRunId(#[from] splitmirror_proto::run_id::RunIdError),
}
