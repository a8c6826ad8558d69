//! An array in memory, for the unit tests of the snapshot manager and the
//! in-process nemesis (compiled only for tests and the `testing` feature).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{
    Access, ArrayMirrorMode, ArrayPort, BoxFuture, ClientError, LuPage, OwnAccess, PairInfo,
};
use splitmirror_proto::client::ErrorKind;

/// An array in memory with one mirror pair per entry of `pairs`, for unit
/// tests of the snapshot manager. Writes and copies can be made to fail, to
/// stand in for an array that is down.
///
/// With an identity ([`MemoryArray::with_identity`]) it masks as the real
/// array does for db-server: an LU set to [`OwnAccess::Read`] refuses
/// writes and copies into it (a write to a mirror LU whose side is
/// read-only too), and every `SetAccess` is recorded in order.
pub struct MemoryArray {
    pairs: Vec<PairInfo>,
    /// Plain LUs (in no mirror): id → (block size, block count).
    plain: std::collections::BTreeMap<u32, (u32, u64)>,
    lus: std::sync::Mutex<std::collections::BTreeMap<u32, Vec<u8>>>,
    /// While set, every write fails as if the array were unreachable.
    pub fail_writes: AtomicBool,
    /// While set, every `CopyRange` fails as if the array were unreachable.
    pub fail_copies: AtomicBool,
    /// While set, every read fails as if the array were unreachable.
    pub fail_reads: AtomicBool,
    /// While set, every `SetAccess` fails as if the array were unreachable
    /// (and changes nothing).
    pub fail_set_access: AtomicBool,
    /// Writes and copies refused because their destination was read-only.
    pub refused_writes: AtomicU64,
    /// While set, every read and write yields to the runtime before it
    /// takes effect, as a real array's round trip does: so that racing
    /// tasks interleave between a caller's array calls.
    pub yield_calls: AtomicBool,
    identity: Option<String>,
    /// The LUs set read-only for the identity (absent = configured).
    read_only: std::sync::Mutex<std::collections::BTreeSet<u32>>,
    grants: std::sync::Mutex<Vec<GrantCall>>,
    /// Every `SetAccess` for another identity that took effect, in order.
    other_grants: std::sync::Mutex<Vec<OtherGrantCall>>,
    /// Every `CopyRange` made, in order.
    copies: std::sync::Mutex<Vec<CopyCall>>,
    /// The mirroring management table: (mirror LU, mate LU) → mode (absent
    /// = host-managed), enforced as array-node enforces it (a write to the
    /// mirror LU of a Snapshot pair lands on the origin alone; a write to a
    /// mate its mode forbids is refused).
    modes: std::sync::Mutex<std::collections::BTreeMap<(u32, u32), ArrayMirrorMode>>,
    /// While set, every `ModeSelect` fails as if the array were unreachable
    /// (and changes nothing).
    pub fail_mode_select: AtomicBool,
    /// Requests the mode refused.
    pub refused_by_mode: AtomicU64,
}

/// One `SetAccess` for another identity the memory array was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherGrantCall {
    pub identity: String,
    pub lu: u32,
    pub access: Option<Access>,
    pub purpose: String,
}

/// One `CopyRange` the memory array made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyCall {
    pub src_lu: u32,
    pub dst_lu: u32,
    pub lba: u64,
    pub blocks: u64,
    /// The copy's guaranteed rate (`--resync-min-rate`).
    pub min_bytes_per_s: Option<u64>,
}

/// One `SetAccess` the memory array was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantCall {
    pub lu: u32,
    pub access: OwnAccess,
    pub purpose: String,
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
            plain: Default::default(),
            lus: std::sync::Mutex::new(lus),
            fail_writes: Default::default(),
            fail_copies: Default::default(),
            fail_reads: Default::default(),
            fail_set_access: Default::default(),
            refused_writes: Default::default(),
            yield_calls: Default::default(),
            identity: None,
            read_only: Default::default(),
            grants: Default::default(),
            other_grants: Default::default(),
            copies: Default::default(),
            modes: Default::default(),
            fail_mode_select: Default::default(),
            refused_by_mode: Default::default(),
        }
    }

    /// The mode of `mirror_lu`'s first pair (its mate 1) in the mirroring
    /// management table.
    pub fn mode_of(&self, mirror_lu: u32) -> ArrayMirrorMode {
        let first_mate_lu = self
            .pairs
            .iter()
            .find(|p| p.mirror_lu == mirror_lu)
            .map_or(u32::MAX, |p| p.mate_lu);
        self.mode_of_pair(mirror_lu, first_mate_lu)
    }

    /// The mode of the pair (`mirror_lu`, `mate_lu`).
    pub fn mode_of_pair(&self, mirror_lu: u32, mate_lu: u32) -> ArrayMirrorMode {
        self.modes
            .lock()
            .expect("modes")
            .get(&(mirror_lu, mate_lu))
            .copied()
            .unwrap_or(ArrayMirrorMode::HostManaged)
    }

    /// Sets the mode of `mirror_lu`'s first pair behind db-server's back
    /// (another host, or a crash between db-server's journal and its
    /// `ModeSelect`).
    pub fn force_mode(&self, mirror_lu: u32, mode: ArrayMirrorMode) {
        if let Some(pair) = self.pairs.iter().find(|p| p.mirror_lu == mirror_lu) {
            self.force_pair_mode(pair, mode);
        }
    }

    /// Sets the mode of one pair behind db-server's back.
    pub fn force_pair_mode(&self, pair: &PairInfo, mode: ArrayMirrorMode) {
        self.modes
            .lock()
            .expect("modes")
            .insert((pair.mirror_lu, pair.mate_lu), mode);
    }

    /// The pair `lu` belongs to (a mate's own pair; for a mirror LU or an
    /// origin, its first pair) and its mode.
    fn pair_mode(&self, lu: u32) -> Option<(&PairInfo, ArrayMirrorMode)> {
        let pair = self.pairs.iter().find(|p| p.mate_lu == lu).or_else(|| {
            self.pairs
                .iter()
                .find(|p| [p.mirror_lu, p.origin_lu].contains(&lu))
        })?;
        Some((pair, self.mode_of_pair(pair.mirror_lu, pair.mate_lu)))
    }

    /// The mode's rule for a read (`write` false) or write of `lu`, as in
    /// the comment of `rpc ModeSelect`; `resync_copy` for the array's own
    /// origin → mate copy.
    fn check_mode(&self, lu: u32, write: bool, resync_copy: bool) -> Result<(), ClientError> {
        let Some((pair, mode)) = self.pair_mode(lu) else {
            return Ok(());
        };
        if lu != pair.mate_lu {
            return Ok(());
        }
        let allowed = match mode {
            ArrayMirrorMode::HostManaged => true,
            ArrayMirrorMode::Synchronized => !write,
            ArrayMirrorMode::Snapshot { mate_writable } => !write || mate_writable,
            ArrayMirrorMode::Resynchronizing => resync_copy,
        };
        if allowed {
            return Ok(());
        }
        self.refused_by_mode.fetch_add(1, Ordering::SeqCst);
        Err(ClientError::local(
            ErrorKind::FailedPrecondition,
            "array",
            "memory",
            if write { "write" } else { "read" },
            format!("mate LU {lu} of mirror LU {} is {mode}", pair.mirror_lu),
        ))
    }

    /// Every `SetAccess` for another identity that took effect so far, in
    /// order.
    pub fn other_grants(&self) -> Vec<OtherGrantCall> {
        self.other_grants.lock().expect("other grants").clone()
    }

    /// `identity`'s access to `lu` as last set (`None`: none set).
    pub fn access_of(&self, identity: &str, lu: u32) -> Option<Access> {
        self.other_grants()
            .iter()
            .rev()
            .find(|g| g.identity == identity && g.lu == lu)
            .and_then(|g| g.access)
    }

    /// Every `CopyRange` made so far, in order.
    pub fn copies(&self) -> Vec<CopyCall> {
        self.copies.lock().expect("copies").clone()
    }

    /// Overwrites bytes of a real LU behind everyone's back (a corruption,
    /// or a restore's writes in a test).
    pub fn overwrite(&self, lu: u32, offset_bytes: usize, data: &[u8]) {
        let mut lus = self.lus.lock().expect("memory array");
        let bytes = lus.get_mut(&lu).expect("a real LU");
        bytes[offset_bytes..offset_bytes + data.len()].copy_from_slice(data);
    }

    /// The same array with a plain LU `lu` (in no mirror, all zeros) of
    /// `block_count` blocks of `block_size_bytes`: a save area.
    pub fn with_plain_lu(mut self, lu: u32, block_size_bytes: u32, block_count: u64) -> Self {
        self.plain.insert(lu, (block_size_bytes, block_count));
        self.lus.get_mut().expect("memory array").insert(
            lu,
            vec![0; (block_count * u64::from(block_size_bytes)) as usize],
        );
        self
    }

    /// The same array, masking for `identity` (as a TLS array does).
    pub fn with_identity(mut self, identity: &str) -> Self {
        self.identity = Some(identity.to_string());
        self
    }

    /// Every `SetAccess` asked for so far, in order (those
    /// `fail_set_access` refused included).
    pub fn grants(&self) -> Vec<GrantCall> {
        self.grants.lock().expect("grants").clone()
    }

    /// Whether `lu` is read-only for the identity now.
    pub fn is_read_only(&self, lu: u32) -> bool {
        self.read_only.lock().expect("read only").contains(&lu)
    }

    /// Refuses a write into `lu` (any side of it) while it is read-only.
    fn check_writable(&self, lu: u32, what: &str) -> Result<(), ClientError> {
        let read_only = self.read_only.lock().expect("read only");
        if self.sides(lu).iter().any(|side| read_only.contains(side)) {
            self.refused_writes.fetch_add(1, Ordering::SeqCst);
            return Err(ClientError::local(
                ErrorKind::PermissionDenied,
                "array",
                "memory",
                what,
                format!("LU {lu} is read-only for this identity"),
            ));
        }
        Ok(())
    }

    /// The bytes of a real LU.
    pub fn lu(&self, lu: u32) -> Vec<u8> {
        self.lus.lock().expect("memory array")[&lu].clone()
    }

    /// The real LUs a write to `lu` lands on: for a mirror LU, the origin
    /// and every mate whose pair's mode does not split it (the first is
    /// where a read of it is served).
    fn sides(&self, lu: u32) -> Vec<u32> {
        let pairs: Vec<&PairInfo> = self.pairs.iter().filter(|p| p.mirror_lu == lu).collect();
        let Some(first) = pairs.first() else {
            return vec![lu];
        };
        let mut sides = vec![first.origin_lu];
        for pair in pairs {
            if !matches!(
                self.mode_of_pair(lu, pair.mate_lu),
                ArrayMirrorMode::Snapshot { .. }
            ) {
                sides.push(pair.mate_lu);
            }
        }
        sides
    }

    fn block_size(&self, lu: u32) -> u64 {
        if let Some((block_size_bytes, _)) = self.plain.get(&lu) {
            return u64::from(*block_size_bytes);
        }
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

    fn lu_page(&self, lu: u32) -> BoxFuture<'_, Result<LuPage, ClientError>> {
        use splitmirror_proto::array::v1::LuKind;
        Box::pin(async move {
            let page = |kind, block_size_bytes, block_count, sides: Option<(u32, u32)>| LuPage {
                lu,
                kind,
                block_size_bytes,
                block_count,
                origin_lu: sides.map(|s| s.0),
                mate_lu: sides.map(|s| s.1),
                mirror_mode: splitmirror_proto::array::v1::MirrorMode::Unspecified,
                mate_writable: false,
                mates: Vec::new(),
            };
            if let Some((block_size_bytes, block_count)) = self.plain.get(&lu) {
                return Ok(page(LuKind::Plain, *block_size_bytes, *block_count, None));
            }
            for p in &self.pairs {
                let kind = if lu == p.mirror_lu {
                    LuKind::Mirror
                } else if lu == p.origin_lu {
                    LuKind::Origin
                } else if lu == p.mate_lu {
                    LuKind::Mate
                } else {
                    continue;
                };
                let sides = (kind == LuKind::Mirror).then_some((p.origin_lu, p.mate_lu));
                let mut pair_page = page(kind, p.block_size_bytes, p.block_count, sides);
                (pair_page.mirror_mode, pair_page.mate_writable) =
                    self.mode_of_pair(p.mirror_lu, p.mate_lu).to_pb();
                pair_page.mates = self
                    .pairs
                    .iter()
                    .filter(|other| other.mirror_lu == p.mirror_lu)
                    .map(|other| {
                        let (mode, mate_writable) =
                            self.mode_of_pair(other.mirror_lu, other.mate_lu).to_pb();
                        splitmirror_proto::array::v1::MatePair {
                            mate_lu: other.mate_lu,
                            mode: mode.into(),
                            mate_writable,
                        }
                    })
                    .collect();
                return Ok(pair_page);
            }
            Err(ClientError::local(
                ErrorKind::NotFound,
                "array",
                "memory",
                format!("mode sense of LU {lu}"),
                format!("LU {lu} does not exist"),
            ))
        })
    }

    fn read(&self, lu: u32, lba: u64, blocks: u64) -> BoxFuture<'_, Result<Vec<u8>, ClientError>> {
        Box::pin(async move {
            if self.yield_calls.load(Ordering::Relaxed) {
                tokio::task::yield_now().await;
            }
            if self.fail_reads.load(Ordering::SeqCst) {
                return Err(Self::failure("read"));
            }
            self.check_mode(lu, false, false)?;
            let side = self.sides(lu)[0];
            let bs = self.block_size(lu);
            let lus = self.lus.lock().expect("memory array");
            let start = (lba * bs) as usize;
            Ok(lus[&side][start..start + (blocks * bs) as usize].to_vec())
        })
    }

    fn write(&self, lu: u32, lba: u64, data: Vec<u8>) -> BoxFuture<'_, Result<(), ClientError>> {
        Box::pin(async move {
            if self.yield_calls.load(Ordering::Relaxed) {
                tokio::task::yield_now().await;
            }
            if self.fail_writes.load(Ordering::SeqCst) {
                return Err(Self::failure("write"));
            }
            self.check_writable(lu, "write")?;
            self.check_mode(lu, true, false)?;
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
        self.copy_range_guaranteed(src_lu, dst_lu, lba, blocks, None)
    }

    fn copy_range_guaranteed(
        &self,
        src_lu: u32,
        dst_lu: u32,
        lba: u64,
        blocks: u64,
        min_bytes_per_s: Option<u64>,
    ) -> BoxFuture<'_, Result<(), ClientError>> {
        Box::pin(async move {
            if self.fail_copies.load(Ordering::SeqCst) {
                return Err(Self::failure("copy"));
            }
            self.check_writable(dst_lu, "copy")?;
            let resync_copy = self
                .pair_mode(dst_lu)
                .is_some_and(|(p, _)| (p.origin_lu, p.mate_lu) == (src_lu, dst_lu));
            self.check_mode(src_lu, false, false)?;
            self.check_mode(dst_lu, true, resync_copy)?;
            let bs = self.block_size(src_lu);
            let (start, end) = ((lba * bs) as usize, ((lba + blocks) * bs) as usize);
            let mut lus = self.lus.lock().expect("memory array");
            let data = lus[&src_lu][start..end].to_vec();
            self.copies.lock().expect("copies").push(CopyCall {
                src_lu,
                dst_lu,
                lba,
                blocks,
                min_bytes_per_s,
            });
            if let Some(bytes) = lus.get_mut(&dst_lu) {
                bytes[start..end].copy_from_slice(&data);
            }
            Ok(())
        })
    }

    fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    fn set_own_access(
        &self,
        lu: u32,
        access: OwnAccess,
        purpose: &str,
    ) -> BoxFuture<'_, Result<(), ClientError>> {
        let call = GrantCall {
            lu,
            access,
            purpose: purpose.to_string(),
        };
        Box::pin(async move {
            assert!(
                self.identity.is_some(),
                "SetAccess asked of an array that masks nothing"
            );
            self.grants.lock().expect("grants").push(call);
            if self.fail_set_access.load(Ordering::SeqCst) {
                return Err(Self::failure("set access"));
            }
            let mut read_only = self.read_only.lock().expect("read only");
            match access {
                OwnAccess::Read => read_only.insert(lu),
                OwnAccess::Configured => read_only.remove(&lu),
            };
            Ok(())
        })
    }

    fn set_access(
        &self,
        identity: &str,
        lu: u32,
        access: Option<Access>,
        purpose: &str,
    ) -> BoxFuture<'_, Result<(), ClientError>> {
        let call = OtherGrantCall {
            identity: identity.to_string(),
            lu,
            access,
            purpose: purpose.to_string(),
        };
        Box::pin(async move {
            assert!(
                self.identity.is_some(),
                "SetAccess asked of an array that masks nothing"
            );
            if self.fail_set_access.load(Ordering::SeqCst) {
                return Err(Self::failure("set access"));
            }
            self.other_grants.lock().expect("other grants").push(call);
            Ok(())
        })
    }

    fn mode_select(
        &self,
        pair: &PairInfo,
        mode: ArrayMirrorMode,
        _purpose: &str,
    ) -> BoxFuture<'_, Result<(), ClientError>> {
        let pair = *pair;
        Box::pin(async move {
            if self.fail_mode_select.load(Ordering::SeqCst) {
                return Err(Self::failure("mode select"));
            }
            self.force_pair_mode(&pair, mode);
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
