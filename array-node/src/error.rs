//! What can go wrong inside the array, and the gRPC code each case gets.

use crate::access::{Access, AccessFileError};
use crate::config::LuId;
use crate::modes::{MirrorMode, ModesFileError, Side};

/// A failed array operation. The service maps each variant to one gRPC
/// code (`service.rs`); none is retryable as it is except `Io`, which may
/// clear once the disk does.
#[derive(Debug, thiserror::Error)]
pub enum ArrayError {
    /// The request names an LU the array does not define, or one the
    /// caller has no access to (`NOT_FOUND`). One variant for both, so that
    /// a masked LU answers exactly as a missing one and masking does not
    /// reveal which LUs exist.
    #[error("LU {0} does not exist")]
    UnknownLu(LuId),
    /// The caller sees the LU but the request needs more access than it
    /// has (`PERMISSION_DENIED`): a write to a read-only LU, or to a mirror
    /// LU whose origin or mate is read-only for the caller (`through`).
    #[error(
        "{identity} has {has} access to LU {lu}{}; this request needs {needs} access",
        through_side(*.through)
    )]
    PermissionDenied {
        identity: String,
        lu: LuId,
        has: Access,
        needs: Access,
        /// The side of a mirror LU whose grant limits the access.
        through: Option<LuId>,
    },
    /// `SetAccess` or `ModeSelect` from an identity other than the owner
    /// of the pairs (`PERMISSION_DENIED`).
    #[error("{identity} may not change {what}: only the owner of the array's pairs, {owner}, may")]
    NotOwner {
        identity: String,
        owner: String,
        /// What the call changes ("LUN masking", …).
        what: &'static str,
    },
    /// The pair's mode in the mirroring management table refuses the
    /// request (`FAILED_PRECONDITION`, reason `mirror-mode`): a write
    /// naming the mate of a Synchronized pair or of a read-only Snapshot, a
    /// read or write naming the mate of a Resynchronizing pair. Not
    /// retryable until the pair's owner changes the mode.
    #[error("LU {lu} is the {side} of mirror LU {mirror}, whose mode is {mode}: {refused}")]
    MirrorMode {
        lu: LuId,
        side: Side,
        mirror: LuId,
        mode: MirrorMode,
        /// What is refused, and what to do instead.
        refused: &'static str,
    },
    /// The request is malformed: no blocks, data that is not whole blocks,
    /// a copy between LUs of different sizes (`INVALID_ARGUMENT`).
    #[error("{0}")]
    InvalidArgument(String),
    /// The block range runs past the end of the LU (`OUT_OF_RANGE`).
    #[error("{0}")]
    OutOfRange(String),
    /// The request carries more than the per-request limit
    /// (`RESOURCE_EXHAUSTED`); the caller must split it.
    #[error("request of {bytes} bytes is over the limit of {limit_bytes} bytes")]
    TooLarge { bytes: u64, limit_bytes: u64 },
    /// The LU's file failed to read, write or sync (`INTERNAL`): a disk
    /// error or a full filesystem.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// How a [`ArrayError::PermissionDenied`] names the side that limits it.
fn through_side(through: Option<LuId>) -> String {
    through.map_or_else(String::new, |side| {
        format!(" (its grant on LU {side}, a side of this mirror LU, limits it)")
    })
}

impl ArrayError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Why an array node could not start ([`crate::spawn`]). Neither is
/// retryable as it is: the listener or the data directory must be fixed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The listener's own address could not be read: the socket is
    /// unusable.
    #[error("reading the listener's address: {0}")]
    ListenerAddress(#[source] std::io::Error),
    /// The configuration is invalid or an LU file could not be opened or
    /// created (a missing directory, no permission, a full disk).
    #[error("opening the LUs: {0}")]
    OpenLus(#[source] ArrayError),
    /// The file of LUN masking set by `SetAccess` is unreadable or damaged.
    #[error("loading the LUN masking: {0}")]
    Access(#[source] AccessFileError),
    /// The file of the mirroring management table set by `ModeSelect`
    /// (`modes.json`) is unreadable or damaged.
    #[error("loading the mirroring management table: {0}")]
    Modes(#[source] ModesFileError),
    /// The server stack could not be built (the certificate or key is
    /// unusable for TLS).
    #[error("{0}")]
    Serve(#[source] splitmirror_proto::node::NodeError),
}
