//! The gRPC adapter: converts `splitmirror.array.v1` requests into calls on
//! the [`Array`] core and its errors into status codes.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use splitmirror_proto::array::v1 as pb;
use splitmirror_proto::array::v1::array_service_server::ArrayService;
use splitmirror_proto::reason::Reason;
use splitmirror_proto::telemetry;
use tonic::{Request, Response, Status, Streaming};

use crate::array::{Array, LuInfo, LuKind, MAX_REQUEST_BYTES};
use crate::error::ArrayError;

/// A read is streamed in chunks of this size, with this many chunks read
/// ahead of the one being sent.
const READ_CHUNK_BYTES: u64 = 1 << 20;
const READ_AHEAD_CHUNKS: usize = 4;

pub struct ArrayGrpc {
    array: Arc<Array>,
}

impl ArrayGrpc {
    pub fn new(array: Arc<Array>) -> Self {
        Self { array }
    }
}

impl From<ArrayError> for Status {
    fn from(error: ArrayError) -> Self {
        let message = error.to_string();
        match error {
            ArrayError::UnknownLu(_) => Status::not_found(message),
            ArrayError::InvalidArgument(_) => Status::invalid_argument(message),
            ArrayError::OutOfRange(_) => Reason::BeyondEnd.attach(Status::out_of_range(message)),
            ArrayError::TooLarge { .. } => Status::resource_exhausted(message),
            ArrayError::Io { .. } => Status::internal(message),
        }
    }
}

/// The classification byte of the Fig. 11 page: a mirror LU, or any other.
const FIG11_MIRROR_LU: u32 = 0;
const FIG11_OTHER_LU: u32 = 1;

fn lu_kind_to_pb(kind: &LuKind) -> pb::LuKind {
    match kind {
        LuKind::Mirror { .. } => pb::LuKind::Mirror,
        LuKind::Origin => pb::LuKind::Origin,
        LuKind::Mate => pb::LuKind::Mate,
        LuKind::Plain => pb::LuKind::Plain,
    }
}

fn lu_info_to_pb(info: LuInfo) -> pb::LuInfo {
    let (origin_lu, mate_lu) = match info.kind {
        LuKind::Mirror { origin, mate } => (Some(origin), Some(mate)),
        LuKind::Origin | LuKind::Mate | LuKind::Plain => (None, None),
    };
    pb::LuInfo {
        id: info.id,
        kind: lu_kind_to_pb(&info.kind).into(),
        block_size_bytes: info.block_size_bytes,
        block_count: info.block_count,
        origin_lu,
        mate_lu,
    }
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<pb::ReadChunk, Status>> + Send>>;

#[tonic::async_trait]
impl ArrayService for ArrayGrpc {
    async fn list_lus(
        &self,
        _request: Request<pb::ListLusRequest>,
    ) -> Result<Response<pb::ListLusResponse>, Status> {
        let lus = self
            .array
            .list_lus()
            .into_iter()
            .map(lu_info_to_pb)
            .collect();
        Ok(Response::new(pb::ListLusResponse { lus }))
    }

    async fn mode_sense(
        &self,
        request: Request<pb::ModeSenseRequest>,
    ) -> Result<Response<pb::ModeSenseResponse>, Status> {
        let lu = request.into_inner().lu;
        let page = self.array.mode_sense(lu)?;
        // The same kind ListLus answers; the page itself only knows mirror
        // or not.
        let kind = lu_kind_to_pb(&self.array.lu_info(lu)?.kind);
        let (fig11_classification, origin_lu, mate_lu) = match page.pair {
            Some((origin, mate)) => (FIG11_MIRROR_LU, Some(origin), Some(mate)),
            None => (FIG11_OTHER_LU, None, None),
        };
        Ok(Response::new(pb::ModeSenseResponse {
            kind: kind.into(),
            fig11_classification,
            origin_lu,
            mate_lu,
            block_size_bytes: page.block_size_bytes,
            block_count: page.block_count,
        }))
    }

    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let pb::ReadRequest { lu, lba, blocks } = request.into_inner();
        telemetry::record_blocks(lu, lba, blocks, None);
        // The whole range is checked before the first byte is sent.
        self.array.check_read(lu, lba, blocks)?;
        let block_size_bytes = u64::from(self.array.lu_info(lu)?.block_size_bytes);
        let chunk_blocks = (READ_CHUNK_BYTES / block_size_bytes).max(1);
        let array = self.array.clone();
        let chunks = (0..blocks.div_ceil(chunk_blocks)).map(move |index| {
            let chunk_lba = lba + index * chunk_blocks;
            let n = chunk_blocks.min(lba + blocks - chunk_lba);
            (chunk_lba, n)
        });
        let stream = futures_util::stream::iter(chunks)
            .map(move |(chunk_lba, n)| {
                let array = array.clone();
                async move {
                    let data = array.read(lu, chunk_lba, n).await?;
                    Ok(pb::ReadChunk {
                        lba: chunk_lba,
                        data,
                    })
                }
            })
            .buffered(READ_AHEAD_CHUNKS);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn write(
        &self,
        request: Request<pb::WriteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let pb::WriteRequest { lu, lba, data, fua } = request.into_inner();
        let bytes = data.len() as u64;
        let blocks_written = self.array.write(lu, lba, data, fua).await?;
        telemetry::record_blocks(lu, lba, blocks_written, Some(bytes));
        telemetry::record_array_write(bytes);
        Ok(Response::new(pb::WriteResponse { blocks_written }))
    }

    async fn write_stream(
        &self,
        request: Request<Streaming<pb::WriteRequest>>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let mut stream = request.into_inner();
        let mut blocks_written = 0;
        while let Some(message) = stream.message().await? {
            let pb::WriteRequest { lu, lba, data, fua } = message;
            let bytes = data.len() as u64;
            blocks_written += self.array.write(lu, lba, data, fua).await?;
            telemetry::record_array_write(bytes);
        }
        Ok(Response::new(pb::WriteResponse { blocks_written }))
    }

    async fn copy_range(
        &self,
        request: Request<pb::CopyRangeRequest>,
    ) -> Result<Response<pb::CopyRangeResponse>, Status> {
        let pb::CopyRangeRequest {
            src_lu,
            dst_lu,
            lba,
            blocks,
        } = request.into_inner();
        telemetry::record_blocks(dst_lu, lba, blocks, None);
        let blocks_copied = self.array.copy_range(src_lu, dst_lu, lba, blocks).await?;
        Ok(Response::new(pb::CopyRangeResponse { blocks_copied }))
    }

    async fn checksum_range(
        &self,
        request: Request<pb::ChecksumRangeRequest>,
    ) -> Result<Response<pb::ChecksumRangeResponse>, Status> {
        let pb::ChecksumRangeRequest {
            lu,
            lba,
            blocks,
            chunk_blocks,
        } = request.into_inner();
        telemetry::record_blocks(lu, lba, blocks, None);
        let digests = self
            .array
            .checksum_range(lu, lba, blocks, chunk_blocks)
            .await?
            .into_iter()
            .map(|digest| digest.to_vec())
            .collect();
        Ok(Response::new(pb::ChecksumRangeResponse { digests }))
    }

    async fn flush(
        &self,
        request: Request<pb::FlushRequest>,
    ) -> Result<Response<pb::FlushResponse>, Status> {
        self.array.flush(request.into_inner().lu).await?;
        Ok(Response::new(pb::FlushResponse {}))
    }
}

/// The decoding limit of the service: a little over the largest request the
/// array accepts, so that an oversized write reaches the array's own check
/// and gets `RESOURCE_EXHAUSTED` with a reason.
pub const MAX_DECODING_BYTES: usize = (MAX_REQUEST_BYTES as usize) * 2;
