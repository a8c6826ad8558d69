//! Where a backup reads from: the array, behind a small trait so that the
//! job logic holds no gRPC types. The gRPC side is the shared typed
//! [`ArrayClient`]; its [`ClientError`] (with an [`ErrorKind`] decided from
//! the gRPC code in one place) is the error of every source.
//!
//! [`ErrorKind`]: splitmirror_proto::client::ErrorKind

use std::future::Future;
use std::pin::Pin;

use futures_util::Stream;
use splitmirror_proto::client::{ArrayClient, ClientError};
use splitmirror_proto::security::Security;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The blocks of a read, in order.
pub type DataStream = Pin<Box<dyn Stream<Item = Result<Vec<u8>, ClientError>> + Send>>;

/// An LU's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub block_size_bytes: u32,
    pub block_count: u64,
}

/// A source of LU blocks. Errors are the typed client's: a transient one
/// ([`ClientError::is_transient`]) means the array did not answer.
pub trait LuSource: Send + Sync + 'static {
    /// Where the data comes from, for the manifest.
    fn describe(&self) -> String;
    fn geometry(&self, lu: u32) -> BoxFuture<'_, Result<Geometry, ClientError>>;
    /// The blocks of a range, in order.
    fn read(
        &self,
        lu: u32,
        lba: u64,
        blocks: u64,
    ) -> BoxFuture<'_, Result<DataStream, ClientError>>;
    /// The BLAKE3 digest of each `chunk_blocks`-block chunk of a range,
    /// computed by the array without sending the data.
    fn checksums(
        &self,
        lu: u32,
        lba: u64,
        blocks: u64,
        chunk_blocks: u64,
    ) -> BoxFuture<'_, Result<Vec<[u8; 32]>, ClientError>>;
}

/// The array over gRPC: a thin adapter over [`ArrayClient`].
pub struct GrpcSource {
    array: ArrayClient,
}

impl GrpcSource {
    /// A source reading from the array at `url`. Fails only for an address
    /// that cannot be parsed; the connection is made at the first read.
    pub fn new(url: &str, security: &Security) -> Result<Self, ClientError> {
        Ok(Self {
            array: ArrayClient::new(url, security)?,
        })
    }
}

impl LuSource for GrpcSource {
    fn describe(&self) -> String {
        self.array.target().to_string()
    }

    fn geometry(&self, lu: u32) -> BoxFuture<'_, Result<Geometry, ClientError>> {
        Box::pin(async move {
            let page = self.array.mode_sense(lu).await?;
            Ok(Geometry {
                block_size_bytes: page.block_size_bytes,
                block_count: page.block_count,
            })
        })
    }

    fn read(
        &self,
        lu: u32,
        lba: u64,
        blocks: u64,
    ) -> BoxFuture<'_, Result<DataStream, ClientError>> {
        Box::pin(async move { self.array.read_stream(lu, lba, blocks).await })
    }

    fn checksums(
        &self,
        lu: u32,
        lba: u64,
        blocks: u64,
        chunk_blocks: u64,
    ) -> BoxFuture<'_, Result<Vec<[u8; 32]>, ClientError>> {
        Box::pin(async move { self.array.checksums(lu, lba, blocks, chunk_blocks).await })
    }
}
