//! What can go wrong in the snapshot manager and the database.

use crate::array_port::PortError;
use crate::lu_status::{Mode, VirtualLu};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("volume {0} does not exist")]
    UnknownVolume(u32),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("cannot {action} volume {volume}: it is in {mode:?} mode")]
    WrongMode {
        volume: u32,
        action: &'static str,
        mode: Mode,
    },
    #[error("the {target:?} virtual LU of volume {volume} is Undefined (no snapshot is acquired)")]
    Undefined { volume: u32, target: VirtualLu },
    #[error(
        "the snapshot of volume {volume} is held by run {holder}; deleting it from run {requester} needs --force"
    )]
    HeldByOther {
        volume: u32,
        holder: String,
        requester: String,
    },
    #[error("the database did not quiesce: {0}")]
    QuiesceTimeout(String),
    #[error("the array failed: {0}")]
    Array(#[from] PortError),
    #[error("the journal failed: {0}")]
    Journal(String),
    #[error("the ledger: {0}")]
    Ledger(String),
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
    #[error("{0}")]
    InvalidRunId(#[from] splitmirror_proto::run_id::RunIdError),
}
