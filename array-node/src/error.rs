//! What can go wrong inside the array, and the gRPC code each case gets.

use crate::config::LuId;

#[derive(Debug, thiserror::Error)]
pub enum ArrayError {
    #[error("LU {0} does not exist")]
    UnknownLu(LuId),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("request of {bytes} bytes is over the limit of {limit_bytes} bytes")]
    TooLarge { bytes: u64, limit_bytes: u64 },
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
