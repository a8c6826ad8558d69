//! The snapshot manager's view of the disk array: a small trait, so that the
//! manager holds no gRPC types and a simulator can stand in for the array,
//! and its gRPC implementation over `splitmirror.array.v1`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use splitmirror_proto::array::v1 as pb;
use splitmirror_proto::array::v1::array_service_client::ArrayServiceClient;
use splitmirror_proto::node;
use tonic::transport::Channel;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One row of the mirroring definition table as the db-server copies it
/// (1108) from the array's mode-sense pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairInfo {
    pub mirror_lu: u32,
    pub origin_lu: u32,
    pub mate_lu: u32,
    pub block_size_bytes: u32,
    pub block_count: u64,
}

/// A failed array call. Whether it changed anything is unknown to the
/// caller, which is why a failed write leaves its range recorded.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct PortError {
    pub unavailable: bool,
    pub message: String,
}

pub trait ArrayPort: Send + Sync + 'static {
    /// The mirror pairs the array defines.
    fn list_pairs(&self) -> BoxFuture<'_, Result<Vec<PairInfo>, PortError>>;
    fn read(&self, lu: u32, lba: u64, blocks: u64) -> BoxFuture<'_, Result<Vec<u8>, PortError>>;
    fn write(&self, lu: u32, lba: u64, data: Vec<u8>) -> BoxFuture<'_, Result<(), PortError>>;
    /// `CopyRange` inside the array (the offload of claim 4).
    fn copy_range(
        &self,
        src_lu: u32,
        dst_lu: u32,
        lba: u64,
        blocks: u64,
    ) -> BoxFuture<'_, Result<(), PortError>>;
    fn flush(&self, lu: u32) -> BoxFuture<'_, Result<(), PortError>>;
    /// BLAKE3 digests of each `chunk_blocks`-block chunk of a range.
    fn checksums(
        &self,
        lu: u32,
        lba: u64,
        blocks: u64,
        chunk_blocks: u64,
    ) -> BoxFuture<'_, Result<Vec<[u8; 32]>, PortError>>;
    /// Data bytes this port has sent to and received from the array.
    fn traffic(&self) -> Traffic {
        Traffic::default()
    }
}

/// Data bytes that crossed the network between db-server and the array
/// (payloads only; framing is not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub write_calls: u64,
    pub copy_calls: u64,
}

/// The array reached over gRPC.
#[derive(Clone)]
pub struct GrpcArray {
    client: ArrayServiceClient<Channel>,
    url: String,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    write_calls: AtomicU64,
    copy_calls: AtomicU64,
}

impl GrpcArray {
    /// A client that connects lazily and reconnects after the array restarts.
    pub fn new(url: &str) -> Result<Self, String> {
        let channel = node::channel(url)?;
        Ok(Self {
            client: ArrayServiceClient::new(channel)
                .max_decoding_message_size(node::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(node::MAX_MESSAGE_BYTES),
            url: url.to_string(),
            counters: Arc::default(),
        })
    }

    fn error(&self, doing: String, status: tonic::Status) -> PortError {
        PortError {
            unavailable: matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
            ),
            message: format!("{doing} on the array at {}: {}", self.url, status.message()),
        }
    }
}

impl ArrayPort for GrpcArray {
    fn list_pairs(&self) -> BoxFuture<'_, Result<Vec<PairInfo>, PortError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let lus = client
                .list_lus(pb::ListLusRequest {})
                .await
                .map_err(|s| self.error("listing LUs".into(), s))?
                .into_inner()
                .lus;
            let mut pairs = Vec::new();
            for lu in lus.iter().filter(|lu| lu.kind() == pb::LuKind::Mirror) {
                // The mode-sense page is the patent's way to learn the pair
                // ([0054]); ListLus already says it, but the page is the
                // contract.
                let page = client
                    .mode_sense(pb::ModeSenseRequest { lu: lu.id })
                    .await
                    .map_err(|s| self.error(format!("mode sense of LU {}", lu.id), s))?
                    .into_inner();
                if let (pb::LuKind::Mirror, Some(origin_lu), Some(mate_lu)) =
                    (page.kind(), page.origin_lu, page.mate_lu)
                {
                    pairs.push(PairInfo {
                        mirror_lu: lu.id,
                        origin_lu,
                        mate_lu,
                        block_size_bytes: page.block_size_bytes,
                        block_count: page.block_count,
                    });
                }
            }
            Ok(pairs)
        })
    }

    fn read(&self, lu: u32, lba: u64, blocks: u64) -> BoxFuture<'_, Result<Vec<u8>, PortError>> {
        Box::pin(async move {
            let doing = || format!("reading LU {lu} at LBA {lba}");
            let mut stream = self
                .client
                .clone()
                .read(pb::ReadRequest { lu, lba, blocks })
                .await
                .map_err(|s| self.error(doing(), s))?
                .into_inner();
            let mut data = Vec::new();
            while let Some(chunk) = stream.message().await.map_err(|s| self.error(doing(), s))? {
                self.counters
                    .bytes_received
                    .fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
                if data.is_empty() {
                    data = chunk.data;
                } else {
                    data.extend_from_slice(&chunk.data);
                }
            }
            Ok(data)
        })
    }

    fn write(&self, lu: u32, lba: u64, data: Vec<u8>) -> BoxFuture<'_, Result<(), PortError>> {
        Box::pin(async move {
            self.counters.write_calls.fetch_add(1, Ordering::Relaxed);
            self.counters
                .bytes_sent
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            self.client
                .clone()
                .write(pb::WriteRequest {
                    lu,
                    lba,
                    data,
                    fua: false,
                })
                .await
                .map_err(|s| self.error(format!("writing LU {lu} at LBA {lba}"), s))?;
            Ok(())
        })
    }

    fn copy_range(
        &self,
        src_lu: u32,
        dst_lu: u32,
        lba: u64,
        blocks: u64,
    ) -> BoxFuture<'_, Result<(), PortError>> {
        Box::pin(async move {
            self.counters.copy_calls.fetch_add(1, Ordering::Relaxed);
            self.client
                .clone()
                .copy_range(pb::CopyRangeRequest {
                    src_lu,
                    dst_lu,
                    lba,
                    blocks,
                })
                .await
                .map_err(|s| {
                    self.error(
                        format!("copying LU {src_lu} to LU {dst_lu} at LBA {lba}"),
                        s,
                    )
                })?;
            Ok(())
        })
    }

    fn flush(&self, lu: u32) -> BoxFuture<'_, Result<(), PortError>> {
        Box::pin(async move {
            self.client
                .clone()
                .flush(pb::FlushRequest { lu })
                .await
                .map_err(|s| self.error(format!("flushing LU {lu}"), s))?;
            Ok(())
        })
    }

    fn checksums(
        &self,
        lu: u32,
        lba: u64,
        blocks: u64,
        chunk_blocks: u64,
    ) -> BoxFuture<'_, Result<Vec<[u8; 32]>, PortError>> {
        Box::pin(async move {
            let doing = || format!("checksumming LU {lu} at LBA {lba}");
            let digests = self
                .client
                .clone()
                .checksum_range(pb::ChecksumRangeRequest {
                    lu,
                    lba,
                    blocks,
                    chunk_blocks,
                })
                .await
                .map_err(|s| self.error(doing(), s))?
                .into_inner()
                .digests;
            digests
                .iter()
                .map(|d| <[u8; 32]>::try_from(d.as_slice()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| PortError {
                    unavailable: false,
                    message: format!("{}: the array answered a malformed digest", doing()),
                })
        })
    }

    fn traffic(&self) -> Traffic {
        Traffic {
            bytes_sent: self.counters.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.counters.bytes_received.load(Ordering::Relaxed),
            write_calls: self.counters.write_calls.load(Ordering::Relaxed),
            copy_calls: self.counters.copy_calls.load(Ordering::Relaxed),
        }
    }
}

/// An array in memory with one mirror pair per entry of `pairs`, for unit
/// tests of the snapshot manager. Writes and copies can be made to fail, to
/// stand in for an array that is down.
pub struct MemoryArray {
    pairs: Vec<PairInfo>,
    lus: std::sync::Mutex<std::collections::BTreeMap<u32, Vec<u8>>>,
    pub fail_writes: std::sync::atomic::AtomicBool,
    pub fail_copies: std::sync::atomic::AtomicBool,
}

impl MemoryArray {
    pub fn new(pairs: Vec<PairInfo>) -> Self {
        let mut lus = std::collections::BTreeMap::new();
        for pair in &pairs {
            let bytes = (pair.block_count * u64::from(pair.block_size_bytes)) as usize;
            lus.insert(pair.origin_lu, vec![0; bytes]);
            lus.insert(pair.mate_lu, vec![0; bytes]);
        }
        Self {
            pairs,
            lus: std::sync::Mutex::new(lus),
            fail_writes: Default::default(),
            fail_copies: Default::default(),
        }
    }

    /// The bytes of a real LU.
    pub fn lu(&self, lu: u32) -> Vec<u8> {
        self.lus.lock().expect("memory array")[&lu].clone()
    }

    fn sides(&self, lu: u32) -> Vec<u32> {
        match self.pairs.iter().find(|p| p.mirror_lu == lu) {
            Some(pair) => vec![pair.origin_lu, pair.mate_lu],
            None => vec![lu],
        }
    }

    fn block_size(&self, lu: u32) -> u64 {
        self.pairs
            .iter()
            .find(|p| [p.mirror_lu, p.origin_lu, p.mate_lu].contains(&lu))
            .map_or(4096, |p| u64::from(p.block_size_bytes))
    }

    fn failure(what: &str) -> PortError {
        PortError {
            unavailable: true,
            message: format!("{what} failed (the test array is down)"),
        }
    }
}

impl ArrayPort for MemoryArray {
    fn list_pairs(&self) -> BoxFuture<'_, Result<Vec<PairInfo>, PortError>> {
        Box::pin(async move { Ok(self.pairs.clone()) })
    }

    fn read(&self, lu: u32, lba: u64, blocks: u64) -> BoxFuture<'_, Result<Vec<u8>, PortError>> {
        Box::pin(async move {
            let side = self.sides(lu)[0];
            let bs = self.block_size(lu);
            let lus = self.lus.lock().expect("memory array");
            let start = (lba * bs) as usize;
            Ok(lus[&side][start..start + (blocks * bs) as usize].to_vec())
        })
    }

    fn write(&self, lu: u32, lba: u64, data: Vec<u8>) -> BoxFuture<'_, Result<(), PortError>> {
        Box::pin(async move {
            if self.fail_writes.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(Self::failure("write"));
            }
            let start = (lba * self.block_size(lu)) as usize;
            let mut lus = self.lus.lock().expect("memory array");
            for side in self.sides(lu) {
                if let Some(bytes) = lus.get_mut(&side) {
                    bytes[start..start + data.len()].copy_from_slice(&data);
                }
            }
            Ok(())
        })
    }

    fn copy_range(
        &self,
        src_lu: u32,
        dst_lu: u32,
        lba: u64,
        blocks: u64,
    ) -> BoxFuture<'_, Result<(), PortError>> {
        Box::pin(async move {
            if self.fail_copies.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(Self::failure("copy"));
            }
            let bs = self.block_size(src_lu);
            let (start, end) = ((lba * bs) as usize, ((lba + blocks) * bs) as usize);
            let mut lus = self.lus.lock().expect("memory array");
            let data = lus[&src_lu][start..end].to_vec();
            if let Some(bytes) = lus.get_mut(&dst_lu) {
                bytes[start..end].copy_from_slice(&data);
            }
            Ok(())
        })
    }

    fn flush(&self, _lu: u32) -> BoxFuture<'_, Result<(), PortError>> {
        Box::pin(async { Ok(()) })
    }

    fn checksums(
        &self,
        lu: u32,
        lba: u64,
        blocks: u64,
        chunk_blocks: u64,
    ) -> BoxFuture<'_, Result<Vec<[u8; 32]>, PortError>> {
        Box::pin(async move {
            let bs = self.block_size(lu);
            let lus = self.lus.lock().expect("memory array");
            let bytes = &lus[&lu][(lba * bs) as usize..((lba + blocks) * bs) as usize];
            Ok(bytes
                .chunks((chunk_blocks * bs) as usize)
                .map(|c| *blake3::hash(c).as_bytes())
                .collect())
        })
    }
}
