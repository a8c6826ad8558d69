//! What can go wrong inside the array, and the gRPC code each case gets.

use crate::config::LuId;

/// A failed array operation. The service maps each variant to one gRPC
/// code (`service.rs`); none is retryable as it is except `Io`, which may
/// clear once the disk does.
#[derive(Debug, thiserror::Error)]
pub enum ArrayError {
    /// The request names an LU the array does not define (`NOT_FOUND`).
    #[error("LU {0} does not exist")]
    UnknownLu(LuId),
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
}
