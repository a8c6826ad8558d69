//! Where a backup reads from: the array, behind a small trait so that the
//! job logic holds no gRPC types.

use std::future::Future;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use splitmirror_proto::array::v1 as pb;
use splitmirror_proto::array::v1::array_service_client::ArrayServiceClient;
use splitmirror_proto::node;
use tonic::transport::Channel;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
pub type DataStream = Pin<Box<dyn Stream<Item = Result<Vec<u8>, SourceError>> + Send>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceErrorKind {
    NotFound,
    Unavailable,
    Other,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    pub kind: SourceErrorKind,
    pub message: String,
}

/// An LU's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub block_size_bytes: u32,
    pub block_count: u64,
}

pub trait LuSource: Send + Sync + 'static {
    /// Where the data comes from, for the manifest.
    fn describe(&self) -> String;
    fn geometry(&self, lu: u32) -> BoxFuture<'_, Result<Geometry, SourceError>>;
    /// The blocks of a range, in order.
    fn read(
        &self,
        lu: u32,
        lba: u64,
        blocks: u64,
    ) -> BoxFuture<'_, Result<DataStream, SourceError>>;
}

/// The array over gRPC.
pub struct GrpcSource {
    client: ArrayServiceClient<Channel>,
    url: String,
}

impl GrpcSource {
    pub fn new(url: &str) -> Result<Self, String> {
        Ok(Self {
            client: ArrayServiceClient::new(node::channel(url)?)
                .max_decoding_message_size(node::MAX_MESSAGE_BYTES),
            url: url.to_string(),
        })
    }
}

fn source_error(url: &str, doing: &str, status: &tonic::Status) -> SourceError {
    let kind = match status.code() {
        tonic::Code::NotFound => SourceErrorKind::NotFound,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
            SourceErrorKind::Unavailable
        }
        _ => SourceErrorKind::Other,
    };
    SourceError {
        kind,
        message: format!(
            "{doing} on the array at {url}: {:?}: {}",
            status.code(),
            status.message()
        ),
    }
}

impl LuSource for GrpcSource {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn geometry(&self, lu: u32) -> BoxFuture<'_, Result<Geometry, SourceError>> {
        Box::pin(async move {
            let page = self
                .client
                .clone()
                .mode_sense(pb::ModeSenseRequest { lu })
                .await
                .map_err(|s| source_error(&self.url, &format!("mode sense of LU {lu}"), &s))?
                .into_inner();
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
    ) -> BoxFuture<'_, Result<DataStream, SourceError>> {
        Box::pin(async move {
            let doing = format!("reading LU {lu} at LBA {lba}");
            let stream = self
                .client
                .clone()
                .read(pb::ReadRequest { lu, lba, blocks })
                .await
                .map_err(|s| source_error(&self.url, &doing, &s))?
                .into_inner();
            let url = self.url.clone();
            let stream = stream.map(move |chunk| {
                chunk
                    .map(|c| c.data)
                    .map_err(|s| source_error(&url, &doing, &s))
            });
            Ok(Box::pin(stream) as DataStream)
        })
    }
}
