//! The mirroring disk array: real LUs, mirror LUs over them, and the
//! operations the SAN offers. Plain Rust: the gRPC service adapts to this.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use splitmirror_proto::pace::{PaceConfig, PaceController};
use splitmirror_proto::range_lock::{LockMode, RangeGuard, RangeLock};
use splitmirror_proto::security::Caller;

use crate::access::{Access, AccessTable};
use crate::config::{ArrayConfig, LuId};
use crate::error::ArrayError;
use crate::modes::{ModeTable, Op, Route, least_busy};
#[cfg(any(test, feature = "testing"))]
use crate::storage::MemoryStorage;
use crate::storage::{FileStorage, LuStorage};
use crate::validate::{self, ValidChecksum, ValidCopy, ValidFlush, ValidRead, ValidWrite};

/// The largest payload one request may carry (a write's data, a copy or
/// checksum chunk). Larger transfers are split by the client or streamed.
/// One number for the whole workspace, so that db-server refuses what the
/// array would refuse before sending it.
pub const MAX_REQUEST_BYTES: u64 = splitmirror_proto::node::MAX_ARRAY_REQUEST_BYTES;

/// Bulk transfers (reads, copies and checksums of at least
/// `BULK_MIN_BYTES`) run at most this many at a time. Without the limit a
/// backup's read-ahead puts a dozen 1 MiB reads on the blocking threads at
/// once, and the database's 4 KiB writes wait for CPU behind them.
const BULK_IO_SLOTS: usize = 2;
const BULK_MIN_BYTES: u64 = 256 << 10;

/// Copies and checksums work in chunks of this many bytes at most, each
/// under its own range lock, so that a long copy does not block writes to
/// the whole range for its whole duration.
const COPY_CHUNK_BYTES: u64 = 1 << 20;

/// What an LU is, as `ListLus` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LuKind {
    /// A mirror LU: its origin and its mates, mate 1 first.
    Mirror {
        origin: LuId,
        mates: Vec<LuId>,
    },
    Origin,
    Mate,
    Plain,
}

/// One row of `ListLus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuInfo {
    pub id: LuId,
    pub kind: LuKind,
    pub block_size_bytes: u32,
    pub block_count: u64,
}

/// An LU as one caller sees it: its description and the access the caller
/// has through it (see [`Array::visible`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Visible<'a> {
    pub info: &'a LuInfo,
    /// Never [`Access::None`]: such an LU is not visible.
    pub access: Access,
    /// For a mirror LU whose origin or mate grant is lower than the rest:
    /// that side (the first such, origin first, then mates in order).
    pub through: Option<LuId>,
}

/// The Fig. 11 mode-sense page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeSensePage {
    /// Set for a mirror LU: its origin and mate 1.
    pub pair: Option<(LuId, LuId)>,
    pub block_size_bytes: u32,
    pub block_count: u64,
}

/// Behaviour switches for tests that must show their checker can fail.
/// Without the `testing` feature it has no fields: a production array
/// cannot be told to break itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct ArrayTestHooks {
    /// Lets writes and copies of the same blocks interleave.
    #[cfg(any(test, feature = "testing"))]
    pub disable_range_lock: bool,
}

impl ArrayTestHooks {
    /// The range lock each real LU gets: the real one, unless a test asked
    /// for none.
    fn range_lock(&self) -> RangeLock {
        #[cfg(any(test, feature = "testing"))]
        if self.disable_range_lock {
            return RangeLock::disabled_for_tests();
        }
        RangeLock::new()
    }
}

/// A real LU: storage plus the bookkeeping of requests on it.
struct RealLu {
    storage: Arc<dyn LuStorage>,
    lock: RangeLock,
    /// Requests in flight (reads, writes and checksums), to send mirror
    /// reads to the least busy real LU.
    in_flight: AtomicU64,
}

enum Lu {
    Real(RealLu),
    Mirror { origin: LuId, mates: Vec<LuId> },
}

struct LuEntry {
    info: LuInfo,
    lu: Lu,
}

/// The array. Cheap to share behind an `Arc`; every method takes `&self`.
///
/// The I/O methods take only `Valid…` requests, which [`crate::validate`]
/// alone makes: the range, size and access checks all happen there.
pub struct Array {
    lus: BTreeMap<LuId, LuEntry>,
    access: AccessTable,
    /// The mirroring management table (Fig. 2): each pair's mode, enforced
    /// on every request under the pair's gate (see [`crate::modes`]).
    modes: ModeTable,
    bulk_io: tokio::sync::Semaphore,
    /// The adaptive pace of every bulk transfer (see ARCHITECTURE.md,
    /// "Background pace"): fed the latency of each foreground request.
    pace: PaceController,
}

impl Array {
    /// Opens (creating where missing) `lu<ID>.img` for each real LU in
    /// `data_dir`, masked by `access` (see [`AccessTable::open`]), in the
    /// modes of `modes` (see [`ModeTable::open`]).
    pub fn open(
        config: &ArrayConfig,
        data_dir: &Path,
        hooks: ArrayTestHooks,
        access: AccessTable,
        modes: ModeTable,
    ) -> Result<Self, ArrayError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| ArrayError::io(format!("creating {}", data_dir.display()), e))?;
        Self::build(config, hooks, access, modes, |id, size_bytes| {
            let path = data_dir.join(format!("lu{id}.img"));
            let storage = FileStorage::open_or_create(&path, size_bytes)
                .map_err(|e| ArrayError::io(format!("opening {}", path.display()), e))?;
            Ok(Arc::new(storage) as Arc<dyn LuStorage>)
        })
    }

    /// An array whose LUs live in memory, for unit tests.
    #[cfg(any(test, feature = "testing"))]
    /// Its LUN masking is the configured one, set grants kept in memory;
    /// its modes too (every mirror LU HostManaged until selected).
    pub fn in_memory(config: &ArrayConfig) -> Result<Self, ArrayError> {
        let access = AccessTable::in_memory(config);
        let modes = ModeTable::in_memory(config);
        Self::build(
            config,
            ArrayTestHooks::default(),
            access,
            modes,
            |_, size_bytes| {
                let size = usize::try_from(size_bytes)
                    .map_err(|_| ArrayError::InvalidArgument("LU too large for memory".into()))?;
                Ok(Arc::new(MemoryStorage::new(size)) as Arc<dyn LuStorage>)
            },
        )
    }

    fn build(
        config: &ArrayConfig,
        hooks: ArrayTestHooks,
        access: AccessTable,
        modes: ModeTable,
        mut open: impl FnMut(LuId, u64) -> Result<Arc<dyn LuStorage>, ArrayError>,
    ) -> Result<Self, ArrayError> {
        config
            .validate()
            .map_err(|e| ArrayError::InvalidArgument(e.to_string()))?;
        let mut lus = BTreeMap::new();
        for lu in &config.lus {
            // One row per pair: an origin is in each of its mirror's rows.
            let kind = if config.mirrors.iter().any(|m| m.origin == lu.id) {
                LuKind::Origin
            } else if config.mirrors.iter().any(|m| m.mate == lu.id) {
                LuKind::Mate
            } else {
                LuKind::Plain
            };
            let size_bytes = lu.block_count * u64::from(lu.block_size_bytes);
            let real = RealLu {
                storage: open(lu.id, size_bytes)?,
                lock: hooks.range_lock(),
                in_flight: AtomicU64::new(0),
            };
            let info = LuInfo {
                id: lu.id,
                kind,
                block_size_bytes: lu.block_size_bytes,
                block_count: lu.block_count,
            };
            lus.insert(
                lu.id,
                LuEntry {
                    info,
                    lu: Lu::Real(real),
                },
            );
        }
        for m in config.mirror_lus() {
            let origin = &lus[&m.origin].info;
            let info = LuInfo {
                id: m.mirror,
                kind: LuKind::Mirror {
                    origin: m.origin,
                    mates: m.mates.clone(),
                },
                block_size_bytes: origin.block_size_bytes,
                block_count: origin.block_count,
            };
            let lu = Lu::Mirror {
                origin: m.origin,
                mates: m.mates,
            };
            lus.insert(m.mirror, LuEntry { info, lu });
        }
        Ok(Self {
            lus,
            access,
            modes,
            bulk_io: tokio::sync::Semaphore::new(BULK_IO_SLOTS),
            pace: PaceController::new(PaceConfig::default(), tokio::time::Instant::now()),
        })
    }

    /// The array with `pace` instead of the default one.
    pub fn with_pace(mut self, pace: PaceController) -> Self {
        self.pace = pace;
        self
    }

    /// The adaptive pace of background copies.
    pub fn pace(&self) -> &PaceController {
        &self.pace
    }

    /// The grants of LUN masking.
    pub fn access(&self) -> &AccessTable {
        &self.access
    }

    /// The mirroring management table.
    pub fn modes(&self) -> &ModeTable {
        &self.modes
    }

    /// Every LU `caller` sees, in id order.
    pub fn list_lus(&self, caller: &Caller) -> Vec<Visible<'_>> {
        self.lus
            .keys()
            .filter_map(|&lu| self.visible(caller, lu).ok())
            .collect()
    }

    /// `lu` as `caller` sees it: the least of its grants on the LU and, for
    /// a mirror LU, on its origin and every mate (a write may land on all
    /// of them and a read may come from any). `UnknownLu` when the LU does not exist
    /// or that access is none: the same answer, so that masking does not
    /// reveal the LU.
    pub fn visible(&self, caller: &Caller, lu: LuId) -> Result<Visible<'_>, ArrayError> {
        let entry = self.entry(lu)?;
        let mut access = self.access.access(caller, lu);
        let mut through = None;
        if let Lu::Mirror { origin, mates } = &entry.lu {
            for &side in std::iter::once(origin).chain(mates) {
                let side_access = self.access.access(caller, side);
                if side_access < access {
                    access = side_access;
                    through = Some(side);
                }
            }
        }
        if access == Access::None {
            return Err(ArrayError::UnknownLu(lu));
        }
        Ok(Visible {
            info: &entry.info,
            access,
            through,
        })
    }

    /// The Fig. 11 page of an LU (validated with
    /// [`validate::mode_sense`]).
    pub fn mode_sense(info: &LuInfo) -> ModeSensePage {
        let pair = match &info.kind {
            LuKind::Mirror { origin, mates } => Some((*origin, mates[0])),
            _ => None,
        };
        ModeSensePage {
            pair,
            block_size_bytes: info.block_size_bytes,
            block_count: info.block_count,
        }
    }

    /// Reads a validated range in one buffer (at most one request's cap:
    /// larger reads are streamed in [`ValidRead::chunks`]). A read of a
    /// mirror LU is served by the least busy of the origin and the mates
    /// its pairs' modes let it read ([0058], [`crate::modes::Route`]); the
    /// pair's mode may refuse a read naming a mate ([`crate::modes`]),
    /// checked under the pair's gate before anything is read.
    pub async fn read(&self, read: &ValidRead) -> Result<Vec<u8>, ArrayError> {
        let started = tokio::time::Instant::now();
        let (lu, lba, blocks) = (read.lu(), read.lba(), read.blocks());
        let bytes = read.bytes();
        validate::check_request_size(bytes)?;
        let block_size_bytes = read.block_size_bytes();
        self.pace_bulk(bytes, None).await;
        let _admission = self.modes.enter(&[lu]).await;
        let source = self.read_source(lu, &self.modes.route(lu, Op::Read)?)?;
        let real = self.real(source)?;
        let _busy = InFlight::enter(&real.in_flight);
        let _guard = real.lock.lock(lba..lba + blocks, LockMode::Shared).await;
        let _slot = self.bulk_slot(bytes).await;
        let mut buf = vec![0u8; bytes as usize];
        let storage = real.storage.clone();
        let bulk = is_bulk(bytes);
        let buf = blocking(move || {
            if bulk {
                storage.read_bulk_at(&mut buf, lba * block_size_bytes)?;
            } else {
                storage.read_at(&mut buf, lba * block_size_bytes)?;
            }
            Ok(buf)
        })
        .await
        .map_err(|e| ArrayError::io(format!("reading LU {source} at LBA {lba}"), e))?;
        self.record_foreground(bytes, started);
        Ok(buf)
    }

    /// Writes a validated write. A write to a mirror LU lands concurrently
    /// on the origin and every mate whose pair takes it (not a Snapshot
    /// pair's) and returns when all of them hold it ([0058]); a pair's mode
    /// may refuse a write naming its mate ([`crate::modes`]). The modes are
    /// checked, and the write routed and done, under the gates of the pairs
    /// (shared, in mate order), so that a `ModeSelect` waits for it. With `fua`, the data is durable
    /// before this returns. Answers the blocks written.
    pub async fn write(&self, write: ValidWrite) -> Result<u64, ArrayError> {
        let started = tokio::time::Instant::now();
        let (lu, lba, blocks, fua) = (write.lu(), write.lba(), write.blocks(), write.fua());
        let offset_bytes = lba * write.block_size_bytes();
        let mate_denied = write.mate_denied().cloned();
        let data = write.into_data();
        let bytes = data.len() as u64;
        // A restore's bulk writes are background work like a copy's.
        self.pace_bulk(bytes, None).await;
        let _admission = self.modes.enter(&[lu]).await;
        let targets = self.targets(lu, &self.modes.route(lu, Op::Write)?)?;
        self.check_mate_denied(lu, &targets, mate_denied.as_ref())?;
        let _busy: Vec<InFlight<'_>> = targets
            .iter()
            .map(|&target| {
                self.real(target)
                    .map(|real| InFlight::enter(&real.in_flight))
            })
            .collect::<Result<_, _>>()?;
        let _guards = self.lock_all(&targets, lba..lba + blocks).await?;
        let bulk = is_bulk(data.len() as u64);
        let data = Arc::new(data);
        // spawn_blocking starts each write at once, so origin and mate are
        // written concurrently; the loop below only collects the outcomes.
        let mut writes = Vec::with_capacity(targets.len());
        for &target in &targets {
            let storage = self.real(target)?.storage.clone();
            let data = data.clone();
            let write = tokio::task::spawn_blocking(move || {
                if bulk {
                    storage.write_bulk_at(&data, offset_bytes)?;
                } else {
                    storage.write_at(&data, offset_bytes)?;
                }
                if fua {
                    storage.sync_data()?;
                }
                Ok::<_, std::io::Error>(())
            });
            writes.push((target, write));
        }
        for (target, write) in writes {
            write
                .await
                .map_err(|e| std::io::Error::other(format!("I/O task failed: {e}")))
                .and_then(|result| result)
                .map_err(|e| ArrayError::io(format!("writing LU {target} at LBA {lba}"), e))?;
        }
        self.record_foreground(bytes, started);
        Ok(blocks)
    }

    /// Copies a validated range from one LU to another inside the array
    /// (the offload of [0049]); each chunk is read and written under one
    /// range lock, so it never interleaves with a write to those blocks.
    /// Each chunk is routed (or refused) in the modes of the pairs of
    /// source and destination under their gates
    /// ([`ModeTable::copy_routes`]): a mode changed during a long copy
    /// applies from the next chunk, and a refusal there ends the copy with
    /// the chunks before it copied.
    pub async fn copy_range(&self, copy: &ValidCopy) -> Result<u64, ArrayError> {
        let (src, dst, lba, blocks) = (copy.src(), copy.dst(), copy.lba(), copy.blocks());
        let block_size_bytes = copy.block_size_bytes();
        let chunk_blocks = (COPY_CHUNK_BYTES / block_size_bytes).max(1);
        // No larger than the copy: a resync of a database's scattered small
        // writes copies many ranges of a few blocks, and zeroing a whole
        // chunk's buffer for each was most of their cost.
        let mut buf = vec![0u8; (chunk_blocks.min(blocks) * block_size_bytes) as usize];
        let mut done_blocks = 0;
        while done_blocks < blocks {
            let chunk_lba = lba + done_blocks;
            let n = chunk_blocks.min(blocks - done_blocks);
            let range = chunk_lba..chunk_lba + n;
            // Paced before the range lock: a copy waiting for its turn must
            // not hold up the foreground writes to its blocks.
            self.pace_bulk(n * block_size_bytes, copy.min_bytes_per_s())
                .await;
            let _admission = self.modes.enter(&[src, dst]).await;
            let (src_route, dst_route) = self.modes.copy_routes(src, dst)?;
            let source = self.read_source(src, &src_route)?;
            let targets = self.targets(dst, &dst_route)?;
            self.check_mate_denied(dst, &targets, copy.dst_mate_denied())?;
            let mut locked = targets.clone();
            locked.push(source);
            // Every LU involved is locked in id order, so copies and mirror
            // writes never wait on each other in a cycle.
            locked.sort_unstable();
            let _guards = self.lock_modes(&locked, &targets, range).await?;
            let _slot = self.bulk_slot(n * block_size_bytes).await;
            let len = (n * block_size_bytes) as usize;
            let offset_bytes = chunk_lba * block_size_bytes;
            let src_storage = self.real(source)?.storage.clone();
            let dst_storages: Vec<_> = targets
                .iter()
                .map(|&t| self.real(t).map(|r| r.storage.clone()))
                .collect::<Result<_, _>>()?;
            let mut chunk = std::mem::take(&mut buf);
            let bulk = is_bulk(len as u64);
            chunk = blocking(move || {
                if bulk {
                    src_storage.read_bulk_at(&mut chunk[..len], offset_bytes)?;
                    for dst in &dst_storages {
                        dst.write_bulk_at(&chunk[..len], offset_bytes)?;
                    }
                } else {
                    src_storage.read_at(&mut chunk[..len], offset_bytes)?;
                    for dst in &dst_storages {
                        dst.write_at(&chunk[..len], offset_bytes)?;
                    }
                }
                Ok(chunk)
            })
            .await
            .map_err(|e| {
                ArrayError::io(
                    format!("copying LU {src} to LU {dst} at LBA {chunk_lba}"),
                    e,
                )
            })?;
            buf = chunk;
            done_blocks += n;
        }
        Ok(blocks)
    }

    /// BLAKE3 digests of each `chunk_blocks`-block chunk of a validated
    /// range, in order; the last chunk may be shorter.
    pub async fn checksum_range(
        &self,
        checksum: &ValidChecksum,
    ) -> Result<Vec<[u8; 32]>, ArrayError> {
        let (lu, lba, blocks) = (checksum.lu(), checksum.lba(), checksum.blocks());
        let chunk_blocks = checksum.chunk_blocks();
        let block_size_bytes = checksum.block_size_bytes();
        let chunk_bytes = chunk_blocks * block_size_bytes;
        let mut digests = Vec::with_capacity(blocks.div_ceil(chunk_blocks) as usize);
        let mut buf = vec![0u8; chunk_bytes as usize];
        let mut done_blocks = 0;
        while done_blocks < blocks {
            let chunk_lba = lba + done_blocks;
            let n = chunk_blocks.min(blocks - done_blocks);
            self.pace_bulk(n * block_size_bytes, None).await;
            // Never refused; a mirror LU's chunk is read where a read
            // would be in the pair's mode.
            let _admission = self.modes.enter(&[lu]).await;
            let source = self.read_source(lu, &self.modes.route(lu, Op::Checksum)?)?;
            let real = self.real(source)?;
            let _busy = InFlight::enter(&real.in_flight);
            let _guard = real
                .lock
                .lock(chunk_lba..chunk_lba + n, LockMode::Shared)
                .await;
            let len = (n * block_size_bytes) as usize;
            let _slot = self.bulk_slot(len as u64).await;
            let storage = real.storage.clone();
            let mut chunk = std::mem::take(&mut buf);
            let (chunk, digest) = blocking(move || {
                let offset_bytes = chunk_lba * block_size_bytes;
                // A hole reads as zeros: hash zeros without reading, so that
                // comparing two sparse LUs costs no disk I/O.
                if storage.is_hole(offset_bytes, len as u64)? {
                    return Ok((chunk, zeros_digest(len)));
                }
                if is_bulk(len as u64) {
                    storage.read_bulk_at(&mut chunk[..len], offset_bytes)?;
                } else {
                    storage.read_at(&mut chunk[..len], offset_bytes)?;
                }
                let digest = *blake3::hash(&chunk[..len]).as_bytes();
                Ok((chunk, digest))
            })
            .await
            .map_err(|e| ArrayError::io(format!("checksumming LU {lu} at LBA {chunk_lba}"), e))?;
            buf = chunk;
            digests.push(digest);
            done_blocks += n;
        }
        Ok(digests)
    }

    /// Makes every acknowledged write to the LU (the origin and every mate
    /// of a mirror LU, whatever the pairs' modes: a flush changes no data)
    /// durable.
    pub async fn flush(&self, flush: &ValidFlush) -> Result<(), ArrayError> {
        let lu = flush.lu();
        let targets = match &self.entry(lu)?.lu {
            Lu::Real(_) => vec![lu],
            Lu::Mirror { origin, mates } => std::iter::once(*origin).chain(mates.clone()).collect(),
        };
        for target in targets {
            let storage = self.real(target)?.storage.clone();
            blocking(move || storage.sync_data())
                .await
                .map_err(|e| ArrayError::io(format!("flushing LU {target}"), e))?;
        }
        Ok(())
    }

    /// Waits for the adaptive pace to let a transfer of `bytes` go, if it
    /// is bulk work (never longer than its bytes take at `min_bytes_per_s`,
    /// a copy's own guarantee). Called before the range lock is taken, and
    /// so before [`Self::bulk_slot`]: a transfer waiting for its turn holds
    /// neither blocks nor a slot.
    async fn pace_bulk(&self, bytes: u64, min_bytes_per_s: Option<u64>) {
        if is_bulk(bytes) {
            self.pace.wait(bytes, min_bytes_per_s).await;
        }
    }

    /// Tells the pace how long a foreground (not bulk) request took, from
    /// its arrival in the array to its answer: lock waits and queueing
    /// behind background work included, as the host sees them.
    fn record_foreground(&self, bytes: u64, started: tokio::time::Instant) {
        if !is_bulk(bytes) {
            let now = tokio::time::Instant::now();
            self.pace.record_foreground(now - started, now);
        }
    }

    /// A bulk I/O slot for a transfer of `bytes`; small transfers need none.
    async fn bulk_slot(&self, bytes: u64) -> Option<tokio::sync::SemaphorePermit<'_>> {
        if !is_bulk(bytes) {
            return None;
        }
        // The semaphore is never closed, so acquiring only waits.
        self.bulk_io.acquire().await.ok()
    }

    fn entry(&self, lu: LuId) -> Result<&LuEntry, ArrayError> {
        self.lus.get(&lu).ok_or(ArrayError::UnknownLu(lu))
    }

    fn real(&self, lu: LuId) -> Result<&RealLu, ArrayError> {
        match &self.entry(lu)?.lu {
            Lu::Real(real) => Ok(real),
            Lu::Mirror { .. } => Err(ArrayError::InvalidArgument(format!(
                "LU {lu} is a mirror LU, not a real one"
            ))),
        }
    }

    /// The real LUs a request on `lu` routed as `route` (by the pairs'
    /// modes, [`ModeTable::route`]) lands on, in id order: for a read, the
    /// least busy of the candidates ([`crate::modes::least_busy`]). A real
    /// LU is itself whatever the route.
    fn targets(&self, lu: LuId, route: &Route) -> Result<Vec<LuId>, ArrayError> {
        match (&self.entry(lu)?.lu, route) {
            (Lu::Real(_), _) | (Lu::Mirror { .. }, Route::Named) => Ok(vec![lu]),
            (Lu::Mirror { .. }, Route::LeastBusyOf(candidates)) => {
                let busy = |id| {
                    self.real(id)
                        .map(|r| r.in_flight.load(Ordering::Relaxed))
                        .unwrap_or(u64::MAX)
                };
                let source = least_busy(candidates, busy).ok_or_else(|| {
                    ArrayError::InvalidArgument(format!("mirror LU {lu}: no LU to read"))
                })?;
                Ok(vec![source])
            }
            (Lu::Mirror { .. }, Route::AllOf(lus)) => {
                let mut targets = lus.clone();
                targets.sort_unstable();
                Ok(targets)
            }
        }
    }

    /// Refuses a write to mirror LU `lu` accepted while it went around the
    /// mates a caller may not write, now that the pairs' modes send it to
    /// `targets` with one of those mates among them.
    fn check_mate_denied(
        &self,
        lu: LuId,
        targets: &[LuId],
        denied: Option<&validate::MateDenied>,
    ) -> Result<(), ArrayError> {
        match denied {
            Some(denied) => denied.check(lu, targets),
            None => Ok(()),
        }
    }

    /// The real LU a read of `lu` routed as `route` is served from.
    fn read_source(&self, lu: LuId, route: &Route) -> Result<LuId, ArrayError> {
        let route = match route {
            // A read needs one LU: a route to several reads any of them.
            Route::AllOf(lus) => Route::LeastBusyOf(lus.clone()),
            other => other.clone(),
        };
        Ok(self.targets(lu, &route)?[0])
    }

    /// Locks `range` exclusively on each of `lus` (sorted by id).
    async fn lock_all(
        &self,
        lus: &[LuId],
        range: Range<u64>,
    ) -> Result<Vec<RangeGuard<'_>>, ArrayError> {
        self.lock_modes(lus, lus, range).await
    }

    /// Locks `range` on each of `lus` (sorted by id): exclusively on those
    /// in `exclusive`, shared on the others.
    async fn lock_modes(
        &self,
        lus: &[LuId],
        exclusive: &[LuId],
        range: Range<u64>,
    ) -> Result<Vec<RangeGuard<'_>>, ArrayError> {
        let mut guards = Vec::with_capacity(lus.len());
        for &lu in lus {
            let mode = if exclusive.contains(&lu) {
                LockMode::Exclusive
            } else {
                LockMode::Shared
            };
            guards.push(self.real(lu)?.lock.lock(range.clone(), mode).await);
        }
        Ok(guards)
    }
}

/// Whether a transfer of `bytes` is bulk work: paced, limited to
/// [`BULK_IO_SLOTS`] at a time, and done without filling the page cache.
fn is_bulk(bytes: u64) -> bool {
    bytes >= BULK_MIN_BYTES
}

/// The BLAKE3 digest of `len` zero bytes, computed once per length.
fn zeros_digest(len: usize) -> [u8; 32] {
    static CACHE: std::sync::Mutex<BTreeMap<usize, [u8; 32]>> =
        std::sync::Mutex::new(BTreeMap::new());
    let mut cache = CACHE.lock().expect("zero digest cache poisoned");
    *cache
        .entry(len)
        .or_insert_with(|| *blake3::hash(&vec![0u8; len]).as_bytes())
}

/// Runs blocking file I/O off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| std::io::Error::other(format!("I/O task failed: {e}")))?
}

/// Counts a request as in flight on an LU while alive.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use splitmirror_proto::array::v1 as pb;

    use super::*;
    use crate::config::DEFAULT_LU_SIZE_BYTES;
    use crate::test_ops::{self, ANYONE};

    fn array() -> Array {
        let config = ArrayConfig::default_pairs(1 << 20).expect("config");
        Array::in_memory(&config).expect("array")
    }

    fn block(fill: u8) -> Vec<u8> {
        vec![fill; 4096]
    }

    #[tokio::test]
    async fn mirror_write_lands_on_origin_and_mate() {
        let array = array();
        test_ops::write(&array, &ANYONE, 0, 3, block(7))
            .await
            .expect("write");
        for lu in [1, 2, 0] {
            let read = test_ops::read(&array, &ANYONE, lu, 3, 1).await;
            assert_eq!(read.expect("read"), block(7), "LU {lu}");
        }
    }

    #[tokio::test]
    async fn origin_write_leaves_mate_alone_until_copied() {
        let array = array();
        test_ops::write(&array, &ANYONE, 1, 0, block(9))
            .await
            .expect("write");
        let mate = test_ops::read(&array, &ANYONE, 2, 0, 1).await;
        assert_eq!(mate.expect("mate"), block(0));
        test_ops::copy_range(&array, &ANYONE, 1, 2, 0, 256)
            .await
            .expect("copy");
        let mate = test_ops::read(&array, &ANYONE, 2, 0, 1).await;
        assert_eq!(mate.expect("mate"), block(9));
        let origin = test_ops::checksums(&array, &ANYONE, 1, 0, 256, 16).await;
        let mate = test_ops::checksums(&array, &ANYONE, 2, 0, 256, 16).await;
        let origin = origin.expect("sum");
        assert_eq!(origin, mate.expect("sum"));
        assert_eq!(origin.len(), 16);
    }

    #[tokio::test]
    async fn validation() {
        let array = array();
        let n = 256;
        let read = |lu, lba, blocks| {
            crate::validate::read(&array, &ANYONE, &pb::ReadRequest { lu, lba, blocks })
        };
        assert!(matches!(read(0, n, 1), Err(ArrayError::OutOfRange(_))));
        assert!(matches!(read(0, n - 1, 2), Err(ArrayError::OutOfRange(_))));
        assert!(matches!(
            read(0, 1, u64::MAX),
            Err(ArrayError::OutOfRange(_))
        ));
        assert!(matches!(read(0, 0, 0), Err(ArrayError::InvalidArgument(_))));
        assert!(matches!(read(42, 0, 1), Err(ArrayError::UnknownLu(42))));
        assert!(read(0, n - 1, 1).is_ok());
        let odd = test_ops::write(&array, &ANYONE, 0, 0, vec![1; 100]).await;
        assert!(matches!(odd, Err(ArrayError::InvalidArgument(_))));
        let empty = test_ops::write(&array, &ANYONE, 0, 0, Vec::new()).await;
        assert!(matches!(empty, Err(ArrayError::InvalidArgument(_))));
        let large =
            Array::in_memory(&ArrayConfig::default_pairs(DEFAULT_LU_SIZE_BYTES).expect("c"))
                .expect("array");
        let huge = vec![0; (MAX_REQUEST_BYTES + 4096) as usize];
        let huge = test_ops::write(&large, &ANYONE, 0, 0, huge).await;
        assert!(matches!(huge, Err(ArrayError::TooLarge { .. })));
    }

    #[tokio::test]
    async fn mode_sense_reports_the_pair() {
        let array = array();
        let sense = |lu| Array::mode_sense(array.visible(&ANYONE, lu).expect("visible").info);
        assert_eq!(sense(0).pair, Some((1, 2)));
        assert_eq!(sense(2).pair, None);
        for (src, dst) in [(0, 1), (0, 2), (1, 0), (2, 0)] {
            let copy = test_ops::copy_range(&array, &ANYONE, src, dst, 0, 1).await;
            assert!(
                matches!(copy, Err(ArrayError::InvalidArgument(ref m)) if m.contains("share")),
                "{src} -> {dst}: {copy:?}"
            );
        }
    }

    // ---- The pair's mode (the mirroring management table), every cell:
    // mode × request × target, validated after the ModeSelect and (the
    // race) validated before it and run after. ----

    /// The modes of pair 0 the cells are run in, in the order of the
    /// expectation rows.
    const MODES: [(pb::MirrorMode, bool); 5] = [
        (pb::MirrorMode::HostManaged, false),
        (pb::MirrorMode::Synchronized, false),
        (pb::MirrorMode::Snapshot, false),
        (pb::MirrorMode::Snapshot, true),
        (pb::MirrorMode::Resynchronizing, false),
    ];

    /// Each real LU's fill before the request: origin 1, mate 2 of pair 0,
    /// origin 4, mate 5 of pair 3 (HostManaged throughout).
    const FILLS: [(LuId, u8); 4] = [(1, 0x11), (2, 0x22), (4, 0x44), (5, 0x55)];
    /// What a write writes.
    const WRITTEN: u8 = 0x33;

    #[derive(Debug, Clone, Copy)]
    enum Req {
        Read(LuId),
        Write(LuId),
        Copy(LuId, LuId),
        Checksum(LuId),
    }

    /// What a request must do, written out by hand from the comment of `rpc
    /// ModeSelect` (not computed by the code under test).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Expect {
        /// FAILED_PRECONDITION mirror-mode, nothing changed.
        Refused,
        /// Read (or checksummed) the block of this fill.
        Reads(u8),
        /// These real LUs now hold this fill; the others are unchanged.
        Lands(&'static [LuId], u8),
    }

    use Expect::{Lands, Reads, Refused};

    /// One row per request, one column per mode of [`MODES`]
    /// (HostManaged, Synchronized, Snapshot, Snapshot mate-writable,
    /// Resynchronizing). The origin (LU 1) is made busier than the mate
    /// before each request, so that a read "from either side" reads the
    /// mate and one "from the origin alone" shows it.
    const CELLS: [(Req, [Expect; 5]); 14] = [
        (
            Req::Read(0),
            [
                Reads(0x22),
                Reads(0x22),
                Reads(0x11),
                Reads(0x11),
                Reads(0x11),
            ],
        ),
        (Req::Read(1), [Reads(0x11); 5]),
        (
            Req::Read(2),
            [Reads(0x22), Reads(0x22), Reads(0x22), Reads(0x22), Refused],
        ),
        (
            Req::Write(0),
            [
                Lands(&[1, 2], WRITTEN),
                Lands(&[1, 2], WRITTEN),
                Lands(&[1], WRITTEN),
                Lands(&[1], WRITTEN),
                Lands(&[1, 2], WRITTEN),
            ],
        ),
        (Req::Write(1), [Lands(&[1], WRITTEN); 5]),
        (
            Req::Write(2),
            [
                Lands(&[2], WRITTEN),
                Refused,
                Refused,
                Lands(&[2], WRITTEN),
                Refused,
            ],
        ),
        // The resync copy: allowed while resynchronizing (and wherever the
        // mate is writable).
        (
            Req::Copy(1, 2),
            [
                Lands(&[2], 0x11),
                Refused,
                Refused,
                Lands(&[2], 0x11),
                Lands(&[2], 0x11),
            ],
        ),
        // The reverse resync of a restore: mate readable, origin free.
        (
            Req::Copy(2, 1),
            [
                Lands(&[1], 0x22),
                Lands(&[1], 0x22),
                Lands(&[1], 0x22),
                Lands(&[1], 0x22),
                Refused,
            ],
        ),
        (
            Req::Copy(0, 3),
            [
                Lands(&[4, 5], 0x22),
                Lands(&[4, 5], 0x22),
                Lands(&[4, 5], 0x11),
                Lands(&[4, 5], 0x11),
                Lands(&[4, 5], 0x11),
            ],
        ),
        (
            Req::Copy(3, 0),
            [
                Lands(&[1, 2], 0x44),
                Lands(&[1, 2], 0x44),
                Lands(&[1], 0x44),
                Lands(&[1], 0x44),
                Lands(&[1, 2], 0x44),
            ],
        ),
        // Another pair's origin to this mate is no resync.
        (
            Req::Copy(4, 2),
            [
                Lands(&[2], 0x44),
                Refused,
                Refused,
                Lands(&[2], 0x44),
                Refused,
            ],
        ),
        (
            Req::Copy(2, 4),
            [
                Lands(&[4], 0x22),
                Lands(&[4], 0x22),
                Lands(&[4], 0x22),
                Lands(&[4], 0x22),
                Refused,
            ],
        ),
        (Req::Checksum(2), [Reads(0x22); 5]),
        (
            Req::Checksum(0),
            [
                Reads(0x22),
                Reads(0x22),
                Reads(0x11),
                Reads(0x11),
                Reads(0x11),
            ],
        ),
    ];

    /// A request validated, ready for the core.
    enum Prepared {
        Read(ValidRead),
        Write(ValidWrite),
        Copy(ValidCopy),
        Checksum(ValidChecksum),
    }

    fn prepare(array: &Array, req: Req) -> Result<Prepared, ArrayError> {
        Ok(match req {
            Req::Read(lu) => Prepared::Read(validate::read(
                array,
                &ANYONE,
                &pb::ReadRequest {
                    lu,
                    lba: 0,
                    blocks: 1,
                },
            )?),
            Req::Write(lu) => Prepared::Write(validate::write(
                array,
                &ANYONE,
                pb::WriteRequest {
                    lu,
                    lba: 0,
                    data: block(WRITTEN),
                    fua: false,
                },
            )?),
            Req::Copy(src_lu, dst_lu) => Prepared::Copy(validate::copy_range(
                array,
                &ANYONE,
                &pb::CopyRangeRequest {
                    src_lu,
                    dst_lu,
                    lba: 0,
                    blocks: 1,
                    min_bytes_per_s: None,
                },
            )?),
            Req::Checksum(lu) => Prepared::Checksum(validate::checksum_range(
                array,
                &ANYONE,
                &pb::ChecksumRangeRequest {
                    lu,
                    lba: 0,
                    blocks: 1,
                    chunk_blocks: 1,
                },
            )?),
        })
    }

    /// Runs a validated request with the origin of pair 0 made the busier
    /// side; answers the fill it read, if it reads.
    async fn run(array: &Array, prepared: Prepared) -> Result<Option<u8>, ArrayError> {
        let busy = InFlight::enter(&array.real(1).expect("origin").in_flight);
        let outcome = match prepared {
            Prepared::Read(read) => array.read(&read).await.map(|data| Some(data[0])),
            Prepared::Write(write) => array.write(write).await.map(|_| None),
            Prepared::Copy(copy) => array.copy_range(&copy).await.map(|_| None),
            Prepared::Checksum(checksum) => {
                let digests = array.checksum_range(&checksum).await?;
                let fill = FILLS
                    .iter()
                    .map(|&(_, fill)| fill)
                    .find(|&fill| digests == vec![*blake3::hash(&block(fill)).as_bytes()]);
                Ok(Some(fill.expect("the checksum of one of the fills")))
            }
        };
        drop(busy);
        outcome
    }

    /// The first byte of block 0 of a real LU, read from its storage.
    fn raw(array: &Array, lu: LuId) -> u8 {
        let mut buf = block(0);
        array
            .real(lu)
            .expect("real")
            .storage
            .read_at(&mut buf, 0)
            .expect("read");
        assert!(buf.iter().all(|&b| b == buf[0]), "LU {lu} holds one fill");
        buf[0]
    }

    async fn cell(mode_index: usize, req: Req, validated_before: bool) -> Result<(), String> {
        let array = array_of(16 * 4096);
        for (lu, fill) in FILLS {
            test_ops::write(&array, &ANYONE, lu, 0, block(fill))
                .await
                .expect("fill");
        }
        let early = validated_before.then(|| prepare(&array, req).expect("HostManaged allows all"));
        let (mode, mate_writable) = MODES[mode_index];
        test_ops::mode_select(&array, &ANYONE, 0, mode, mate_writable)
            .await
            .expect("mode select");
        let outcome = match early {
            Some(prepared) => run(&array, prepared).await,
            None => match prepare(&array, req) {
                Ok(prepared) => run(&array, prepared).await,
                Err(error) => Err(error),
            },
        };
        let landed: Vec<(LuId, u8)> = FILLS.iter().map(|&(lu, _)| (lu, raw(&array, lu))).collect();
        let expected = CELLS
            .iter()
            .find(|(r, _)| format!("{r:?}") == format!("{req:?}"))
            .expect("a row")
            .1[mode_index];
        let unchanged: Vec<(LuId, u8)> = FILLS.to_vec();
        let fail = |what: String| {
            Err(format!(
                "{req:?} in {} (mate_writable {mate_writable}), validated {}: {what}",
                mode.as_str_name(),
                if validated_before {
                    "before the ModeSelect"
                } else {
                    "after it"
                }
            ))
        };
        match (expected, outcome) {
            (
                Refused,
                Err(ArrayError::MirrorMode {
                    mirror: 0,
                    mode: held,
                    ..
                }),
            ) => {
                if held.name() != mode.as_str_name().trim_start_matches("MIRROR_MODE_") {
                    return fail(format!("refused naming mode {held}"));
                }
                if landed != unchanged {
                    return fail(format!("refused but changed {landed:x?}"));
                }
            }
            (Reads(fill), Ok(Some(read))) => {
                if read != fill || landed != unchanged {
                    return fail(format!(
                        "read {read:#x}, expected {fill:#x}; LUs {landed:x?}"
                    ));
                }
            }
            (Lands(lus, fill), Ok(None)) => {
                let want: Vec<(LuId, u8)> = FILLS
                    .iter()
                    .map(|&(lu, old)| (lu, if lus.contains(&lu) { fill } else { old }))
                    .collect();
                if landed != want {
                    return fail(format!("LUs hold {landed:x?}, expected {want:x?}"));
                }
            }
            (expected, outcome) => return fail(format!("expected {expected:?}, got {outcome:?}")),
        }
        Ok(())
    }

    fn array_of(lu_size_bytes: u64) -> Array {
        let config = ArrayConfig::default_pairs(lu_size_bytes).expect("config");
        Array::in_memory(&config).expect("array")
    }

    #[tokio::test]
    async fn every_cell_of_mode_by_request_by_target_answers_as_the_contract_says() {
        let mut failures = Vec::new();
        let mut cells = 0;
        for (req, _) in CELLS {
            for mode_index in 0..MODES.len() {
                for validated_before in [false, true] {
                    cells += 1;
                    if let Err(failure) = cell(mode_index, req, validated_before).await {
                        failures.push(failure);
                    }
                }
            }
        }
        println!("{cells} cells, {} failed", failures.len());
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        assert_eq!(cells, 140);
    }

    #[tokio::test]
    async fn a_refusal_names_the_lu_the_mode_and_what_is_refused() {
        let array = array_of(16 * 4096);
        test_ops::mode_select(&array, &ANYONE, 0, pb::MirrorMode::Resynchronizing, false)
            .await
            .expect("mode select");
        let error = test_ops::read(&array, &ANYONE, 2, 0, 1)
            .await
            .expect_err("refused");
        let message = error.to_string();
        assert_eq!(
            message,
            "LU 2 is the mate of mirror LU 0, whose mode is RESYNCHRONIZING: a read naming the \
             mate is refused while the pair resynchronizes (its blocks are being copied from \
             the origin; read the mirror LU)"
        );
        test_ops::mode_select(&array, &ANYONE, 0, pb::MirrorMode::Snapshot, false)
            .await
            .expect("mode select");
        let error = test_ops::write(&array, &ANYONE, 2, 0, block(1))
            .await
            .expect_err("refused");
        assert!(
            error.to_string().contains("SNAPSHOT (mate read-only)")
                && error.to_string().contains("read-only snapshot"),
            "{error}"
        );
        // Pair 3 keeps its own mode.
        test_ops::write(&array, &ANYONE, 5, 0, block(1))
            .await
            .expect("the other pair is HostManaged");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mode_change_waits_for_the_mirror_write_in_flight() {
        let array = Arc::new(array_of(16 * 4096));
        // A write to the mirror LU, held up inside the array by a range
        // lock on the mate: it has been routed (both sides) and waits.
        let mate_lock = array
            .real(2)
            .expect("mate")
            .lock
            .lock(0..1, LockMode::Exclusive)
            .await;
        let write = {
            let array = array.clone();
            tokio::spawn(async move { test_ops::write(&array, &ANYONE, 0, 0, block(7)).await })
        };
        // Until the write holds the pair's gate, the split could go first.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !array.modes().gate_is_held(0, 2) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the mirror write never entered its pair's gate"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let split = {
            let array = array.clone();
            tokio::spawn(async move {
                test_ops::mode_select(&array, &ANYONE, 0, pb::MirrorMode::Snapshot, false).await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            !split.is_finished(),
            "the split answered with a write in flight"
        );
        assert_eq!(
            array.modes().mode(0),
            Some(crate::modes::MirrorMode::HostManaged)
        );
        drop(mate_lock);
        write.await.expect("task").expect("write");
        let (previous, now) = split.await.expect("task").expect("split");
        assert_eq!(previous, crate::modes::MirrorMode::HostManaged);
        assert_eq!(
            now,
            crate::modes::MirrorMode::Snapshot {
                mate_writable: false
            }
        );
        // The write routed before the split landed on both sides before the
        // split answered; the next one lands on the origin alone.
        assert_eq!((raw(&array, 1), raw(&array, 2)), (7, 7));
        test_ops::write(&array, &ANYONE, 0, 0, block(8))
            .await
            .expect("write");
        assert_eq!((raw(&array, 1), raw(&array, 2)), (8, 7));
    }
    // ---- A mirror LU with three mates: each pair in its own mode. ----

    /// Mirror LU 0 = origin 1 + mates 2, 3 and 4 (16 blocks of 4096 bytes
    /// each), every real LU filled with its own id.
    async fn three_mates() -> Array {
        let lu = |id| format!("[[lu]]\nid = {id}\nblock_size_bytes = 4096\nblock_count = 16\n");
        let text = (1..=4).map(lu).collect::<String>()
            + "[[mirror]]\nmirror = 0\norigin = 1\nmates = [2, 3, 4]\n";
        let config = ArrayConfig::from_toml(&text).expect("config");
        let array = Array::in_memory(&config).expect("array");
        for lu in 1..=4 {
            test_ops::write(&array, &ANYONE, lu, 0, block(lu as u8))
                .await
                .expect("fill");
        }
        array
    }

    /// Mate 1 SNAPSHOT (read-only unless `mate_1_writable`), mate 2
    /// SYNCHRONIZED, mate 3 RESYNCHRONIZING.
    async fn mixed_modes(array: &Array, mate_1_writable: bool) {
        for (mate, mode, writable) in [
            (2, pb::MirrorMode::Snapshot, mate_1_writable),
            (3, pb::MirrorMode::Synchronized, false),
            (4, pb::MirrorMode::Resynchronizing, false),
        ] {
            test_ops::mode_select_mate(array, &ANYONE, 0, Some(mate), mode, writable)
                .await
                .expect("mode select");
        }
    }

    fn raw_all(array: &Array) -> Vec<u8> {
        (1..=4).map(|lu| raw(array, lu)).collect()
    }

    #[tokio::test]
    async fn three_mates_in_mixed_modes_route_each_request_by_its_pair() {
        let array = three_mates().await;
        mixed_modes(&array, false).await;
        // A mirror write lands on the origin, mate 2 and mate 3, not mate 1.
        test_ops::write(&array, &ANYONE, 0, 0, block(9))
            .await
            .expect("mirror write");
        assert_eq!(raw_all(&array), vec![9, 2, 9, 9]);
        // A write naming mate 1 (a read-only snapshot) is refused; naming
        // mate 2 (synchronized) or mate 3 (resynchronizing) too.
        for mate in [2, 3, 4] {
            let error = test_ops::write(&array, &ANYONE, mate, 0, block(7))
                .await
                .expect_err("refused");
            assert!(
                matches!(error, ArrayError::MirrorMode { lu, mirror: 0, .. } if lu == mate),
                "mate LU {mate}: {error}"
            );
        }
        // Mate 1 is readable (a snapshot); mate 3 is not (resynchronizing).
        let read = test_ops::read(&array, &ANYONE, 2, 0, 1).await;
        assert_eq!(read.expect("mate 1")[0], 2);
        let error = test_ops::read(&array, &ANYONE, 4, 0, 1)
            .await
            .expect_err("refused");
        assert!(
            matches!(
                error,
                ArrayError::MirrorMode {
                    lu: 4,
                    mode: crate::modes::MirrorMode::Resynchronizing,
                    ..
                }
            ),
            "{error}"
        );
        // The resync copy of pair 3 (origin -> mate 3) is allowed; a copy
        // origin -> mate 1 is not (a read-only snapshot); the reverse
        // resync mate 1 -> origin is.
        test_ops::write(&array, &ANYONE, 1, 0, block(5))
            .await
            .expect("origin write");
        test_ops::copy_range(&array, &ANYONE, 1, 4, 0, 1)
            .await
            .expect("resync copy");
        assert_eq!(raw_all(&array), vec![5, 2, 9, 5]);
        let refused = test_ops::copy_range(&array, &ANYONE, 1, 2, 0, 1).await;
        assert!(
            matches!(refused, Err(ArrayError::MirrorMode { lu: 2, .. })),
            "{refused:?}"
        );
        test_ops::copy_range(&array, &ANYONE, 2, 1, 0, 1)
            .await
            .expect("reverse resync");
        assert_eq!(raw_all(&array), vec![2, 2, 9, 5]);
        // A writable snapshot's mate may be written, and a mirror write
        // still leaves it alone.
        mixed_modes(&array, true).await;
        test_ops::write(&array, &ANYONE, 2, 0, block(6))
            .await
            .expect("writable mate 1");
        test_ops::write(&array, &ANYONE, 0, 0, block(8))
            .await
            .expect("mirror write");
        assert_eq!(raw_all(&array), vec![8, 6, 8, 8]);
    }

    #[tokio::test]
    async fn a_mirror_read_never_comes_from_a_snapshot_or_resynchronizing_mate() {
        let array = three_mates().await;
        mixed_modes(&array, false).await;
        // Each real LU holds its own id, so a read says where it came from.
        // However busy the origin and mate 2 are made, the read comes from
        // one of them.
        for (origin_busy, mate_2_busy, expected) in [(0, 0, 1), (3, 0, 3), (0, 2, 1), (5, 4, 3)] {
            let origin = array.real(1).expect("origin");
            let mate_2 = array.real(3).expect("mate 2");
            let _busy: Vec<_> = (0..origin_busy)
                .map(|_| InFlight::enter(&origin.in_flight))
                .chain((0..mate_2_busy).map(|_| InFlight::enter(&mate_2.in_flight)))
                .collect();
            let read = test_ops::read(&array, &ANYONE, 0, 0, 1)
                .await
                .expect("read");
            assert_eq!(
                read[0], expected,
                "origin {origin_busy} busy, mate 2 {mate_2_busy} busy"
            );
            let digests = test_ops::checksums(&array, &ANYONE, 0, 0, 1, 1)
                .await
                .expect("checksum");
            assert_eq!(
                digests,
                vec![*blake3::hash(&block(expected)).as_bytes()],
                "a checksum reads where a read would"
            );
        }
        // With every pair synchronized, the least busy of all four; mate 1
        // and mate 3 are read once the others are busier.
        for mate in [2, 4] {
            test_ops::mode_select_mate(
                &array,
                &ANYONE,
                0,
                Some(mate),
                pb::MirrorMode::Synchronized,
                false,
            )
            .await
            .expect("mode select");
        }
        test_ops::write(&array, &ANYONE, 3, 0, block(3))
            .await
            .expect_err("a synchronized mate is not written by name");
        for lu in [2, 4] {
            let real = array.real(lu).expect("real");
            real.storage.write_at(&block(lu as u8), 0).expect("tag");
        }
        let busy_but = |free: LuId| {
            (1..=4)
                .filter(|&lu| lu != free)
                .map(|lu| InFlight::enter(&array.real(lu).expect("real").in_flight))
                .collect::<Vec<_>>()
        };
        for free in [1, 2, 3, 4] {
            let _busy = busy_but(free);
            let read = test_ops::read(&array, &ANYONE, 0, 0, 1)
                .await
                .expect("read");
            assert_eq!(read[0], free as u8, "only LU {free} idle");
        }
        // All pairs HostManaged again: a mirror LU with several mates reads
        // the origin alone (a mate the host manages may be split).
        for mate in [2, 3, 4] {
            test_ops::mode_select_mate(
                &array,
                &ANYONE,
                0,
                Some(mate),
                pb::MirrorMode::HostManaged,
                false,
            )
            .await
            .expect("mode select");
        }
        let _busy = busy_but(3);
        let read = test_ops::read(&array, &ANYONE, 0, 0, 1)
            .await
            .expect("read");
        assert_eq!(read[0], 1, "host-managed mates are not read");
    }

    #[tokio::test]
    async fn mode_select_names_one_of_the_mirror_lus_mates() {
        let array = three_mates().await;
        let select = |lu, mate_lu| {
            validate::mode_select(
                &array,
                &ANYONE,
                &pb::ModeSelectRequest {
                    lu,
                    mode: pb::MirrorMode::Synchronized.into(),
                    mate_writable: false,
                    purpose: String::new(),
                    mate_lu,
                },
            )
        };
        for (lu, mate_lu, expected) in [
            (
                0,
                None,
                "mirror LU 0 has 3 mates (LUs 2, 3 and 4): ModeSelect names the pair with mate_lu",
            ),
            (
                0,
                Some(1),
                "LU 1 is no mate of mirror LU 0 (its mates: LUs 2, 3 and 4)",
            ),
            (0, Some(0), "LU 0 is no mate of mirror LU 0"),
            (0, Some(9), "LU 9 is no mate of mirror LU 0"),
            (
                3,
                Some(3),
                "LU 3 is the mate of mirror LU 0: ModeSelect names the mirror LU",
            ),
        ] {
            match select(lu, mate_lu) {
                Err(ArrayError::InvalidArgument(message)) => {
                    assert!(message.contains(expected), "{lu} {mate_lu:?}: {message}")
                }
                other => panic!("LU {lu} mate {mate_lu:?}: {other:?}"),
            }
        }
        let change = select(0, Some(3)).expect("mate 2");
        assert_eq!((change.mirror, change.mate), (0, 3));
        // A mirror LU with one mate: unset is that mate, and naming it works.
        let single = array_of(16 * 4096);
        for mate_lu in [None, Some(2)] {
            let answer = test_ops::mode_select_mate(
                &single,
                &ANYONE,
                0,
                mate_lu,
                pb::MirrorMode::Synchronized,
                false,
            )
            .await
            .expect("the only mate");
            assert_eq!(answer.1, crate::modes::MirrorMode::Synchronized);
        }
        let error = test_ops::mode_select_mate(
            &single,
            &ANYONE,
            0,
            Some(5),
            pb::MirrorMode::Synchronized,
            false,
        )
        .await
        .expect_err("mate of another mirror");
        assert!(
            error
                .to_string()
                .contains("LU 5 is no mate of mirror LU 0 (its mates: LUs 2)"),
            "{error}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mode_change_of_one_pair_waits_for_the_mirror_write_holding_its_gate() {
        let array = Arc::new(three_mates().await);
        // A mirror write held up by a range lock on mate 3: it holds the
        // gates of all three pairs.
        let mate_3_lock = array
            .real(4)
            .expect("mate 3")
            .lock
            .lock(0..1, LockMode::Exclusive)
            .await;
        let write = {
            let array = array.clone();
            tokio::spawn(async move { test_ops::write(&array, &ANYONE, 0, 0, block(7)).await })
        };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !(2..=4).all(|mate| array.modes().gate_is_held(0, mate)) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the mirror write never entered every pair's gate"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let split = {
            let array = array.clone();
            tokio::spawn(async move {
                test_ops::mode_select_mate(
                    &array,
                    &ANYONE,
                    0,
                    Some(3),
                    pb::MirrorMode::Snapshot,
                    false,
                )
                .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            !split.is_finished(),
            "the split answered with a write in flight"
        );
        drop(mate_3_lock);
        write.await.expect("task").expect("write");
        split.await.expect("task").expect("split");
        assert_eq!(raw_all(&array), vec![7, 7, 7, 7]);
        test_ops::write(&array, &ANYONE, 0, 0, block(8))
            .await
            .expect("write");
        assert_eq!(raw_all(&array), vec![8, 8, 7, 8]);
    }
}
