//! Where a backup reads from and a restore writes to: the array, behind
//! two small traits ([`LuSource`] for reads and digests, [`LuTarget`] for
//! what an LU is, writes and flushes) so that the job logic holds no gRPC
//! types. The gRPC side is the shared typed [`ArrayClient`]; its
//! [`ClientError`] (with an [`ErrorKind`] decided from the gRPC code in one
//! place) is the error of every source and target.
//!
//! [`ErrorKind`]: splitmirror_proto::client::ErrorKind

use std::future::Future;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use splitmirror_proto::array::v1 as pb;
use splitmirror_proto::client::{ArrayClient, ClientError, ErrorKind};
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

/// The writes of one write stream, in order: the LBA of each and its whole
/// blocks.
pub type WriteMessages = Pin<Box<dyn Stream<Item = (u64, Vec<u8>)> + Send>>;

/// What an LU is, as the array's mode-sense page says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LuRole {
    /// A mirror LU: a write lands on its origin and its mate.
    Mirror {
        origin_lu: u32,
        mate_lu: u32,
    },
    /// The origin or the mate of a pair (written through its mirror LU or
    /// by db-server's resync only).
    Origin,
    Mate,
    /// An LU of no pair.
    Plain,
}

/// An LU's page: what it is and its geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuPage {
    pub role: LuRole,
    pub geometry: Geometry,
}

/// An LU a restore writes. Errors are the typed client's, as for
/// [`LuSource`].
pub trait LuTarget: Send + Sync + 'static {
    /// What the LU is (a mirror LU names its origin and mate) and its
    /// geometry.
    fn page(&self, lu: u32) -> BoxFuture<'_, Result<LuPage, ClientError>>;
    /// Writes `writes` on one stream; answers the blocks the array wrote.
    /// A stream that ends early writes what it carried.
    fn write_stream(
        &self,
        lu: u32,
        writes: WriteMessages,
    ) -> BoxFuture<'_, Result<u64, ClientError>>;
    /// Makes every acknowledged write to the LU durable (both sides of a
    /// mirror LU).
    fn flush(&self, lu: u32) -> BoxFuture<'_, Result<(), ClientError>>;
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

impl LuTarget for GrpcSource {
    fn page(&self, lu: u32) -> BoxFuture<'_, Result<LuPage, ClientError>> {
        Box::pin(async move {
            let page = self.array.mode_sense(lu).await?;
            let role = match (page.kind, page.origin_lu, page.mate_lu) {
                (pb::LuKind::Mirror, Some(origin_lu), Some(mate_lu)) => {
                    LuRole::Mirror { origin_lu, mate_lu }
                }
                (pb::LuKind::Origin, _, _) => LuRole::Origin,
                (pb::LuKind::Mate, _, _) => LuRole::Mate,
                (pb::LuKind::Plain, _, _) => LuRole::Plain,
                (pb::LuKind::Mirror | pb::LuKind::Unspecified, _, _) => {
                    return Err(ClientError::local(
                        ErrorKind::Internal,
                        "array",
                        self.array.target(),
                        format!("mode sense of LU {lu}"),
                        format!(
                            "the array answered kind {:?} without a pair for LU {lu}",
                            page.kind
                        ),
                    ));
                }
            };
            Ok(LuPage {
                role,
                geometry: Geometry {
                    block_size_bytes: page.block_size_bytes,
                    block_count: page.block_count,
                },
            })
        })
    }

    fn write_stream(
        &self,
        lu: u32,
        writes: WriteMessages,
    ) -> BoxFuture<'_, Result<u64, ClientError>> {
        Box::pin(async move {
            // The typed client has no WriteStream call yet: the generated
            // client is called here, and its status turned into the same
            // ClientError (kind from the code, reason from the metadata).
            // Messages are forwarded through a small channel: tonic's
            // streaming request needs a stream the compiler can prove Send
            // for every lifetime, which a mapped boxed stream is not.
            let (sender, receiver) = tokio::sync::mpsc::channel(2);
            let forward = async move {
                let mut writes = writes;
                while let Some((lba, data)) = writes.next().await {
                    let request = pb::WriteRequest {
                        lu,
                        lba,
                        data,
                        fua: false,
                    };
                    if sender.send(request).await.is_err() {
                        break;
                    }
                }
            };
            let requests = tokio_stream::wrappers::ReceiverStream::new(receiver);
            let mut raw = self.array.raw();
            let call = raw.write_stream(tonic::Request::new(requests));
            let ((), answer) = tokio::join!(forward, call);
            match answer {
                Ok(answer) => Ok(answer.into_inner().blocks_written),
                Err(status) => Err(ClientError::from_status(
                    "array",
                    self.array.target(),
                    format!("writing LU {lu} on a write stream"),
                    &status,
                )),
            }
        })
    }

    fn flush(&self, lu: u32) -> BoxFuture<'_, Result<(), ClientError>> {
        Box::pin(async move { self.array.flush(lu).await })
    }
}
