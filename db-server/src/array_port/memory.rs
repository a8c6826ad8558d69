//! An array in memory, for the unit tests of the snapshot manager and the
//! in-process nemesis (compiled only for tests and the `testing` feature).

use super::{ArrayPort, BoxFuture, ClientError, PairInfo};
use splitmirror_proto::client::ErrorKind;

/// An array in memory with one mirror pair per entry of `pairs`, for unit
/// tests of the snapshot manager. Writes and copies can be made to fail, to
/// stand in for an array that is down.
pub struct MemoryArray {
    pairs: Vec<PairInfo>,
    lus: std::sync::Mutex<std::collections::BTreeMap<u32, Vec<u8>>>,
    /// While set, every write fails as if the array were unreachable.
    pub fail_writes: std::sync::atomic::AtomicBool,
    /// While set, every `CopyRange` fails as if the array were unreachable.
    pub fail_copies: std::sync::atomic::AtomicBool,
}

impl MemoryArray {
    /// Origin and mate of every pair, all zeros.
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

    fn failure(what: &str) -> ClientError {
        ClientError::local(
            ErrorKind::Unavailable,
            "array",
            "memory",
            what,
            "the test array is down",
        )
    }
}

impl ArrayPort for MemoryArray {
    fn list_pairs(&self) -> BoxFuture<'_, Result<Vec<PairInfo>, ClientError>> {
        Box::pin(async move { Ok(self.pairs.clone()) })
    }

    fn read(&self, lu: u32, lba: u64, blocks: u64) -> BoxFuture<'_, Result<Vec<u8>, ClientError>> {
        Box::pin(async move {
            let side = self.sides(lu)[0];
            let bs = self.block_size(lu);
            let lus = self.lus.lock().expect("memory array");
            let start = (lba * bs) as usize;
            Ok(lus[&side][start..start + (blocks * bs) as usize].to_vec())
        })
    }

    fn write(&self, lu: u32, lba: u64, data: Vec<u8>) -> BoxFuture<'_, Result<(), ClientError>> {
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
    ) -> BoxFuture<'_, Result<(), ClientError>> {
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

    fn flush(&self, _lu: u32) -> BoxFuture<'_, Result<(), ClientError>> {
        Box::pin(async { Ok(()) })
    }

    fn checksums(
        &self,
        lu: u32,
        lba: u64,
        blocks: u64,
        chunk_blocks: u64,
    ) -> BoxFuture<'_, Result<Vec<[u8; 32]>, ClientError>> {
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
