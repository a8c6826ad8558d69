//! The copy-on-write snapshot (issue 20; the fourth embodiment of the seed,
//! [0072]-[0078]): the pair is not split. While the snapshot is held, a
//! write to the data virtual LU first saves the pre-update data of every
//! block it overwrites for the first time to the volume's save area (a
//! plain LU of the array, `--save-area VOLUME=LU`), records block → slot in
//! an in-memory map, and then writes the mirror LU as when Synchronized.
//! The snapshot virtual LU reads saved blocks from the save area and the
//! rest from the mate ([0076]).
//!
//! Locks: a write under a copy-on-write snapshot holds its blocks
//! exclusively (save, map, write are one step); a snapshot read holds them
//! shared, so it never sees a block written but not yet mapped.
//!
//! The map is not journaled: a restart invalidates the snapshot
//! ([`RESTART_REASON`]), and so does a save area that fills up. An
//! invalidated snapshot's reads are refused with the reason; its holder's
//! delete succeeds, and the database never stops for either.

use std::collections::BTreeMap;
use std::ops::Range;

use splitmirror_proto::array::v1::LuKind;
use splitmirror_proto::range_lock::LockMode;

use super::{
    AcquireOutcome, DeleteOutcome, ManagerConfig, PairState, SnapshotManager, Volume,
    new_snapshot_id,
};
use crate::array_port::{ArrayPort, PairInfo};
use crate::crash;
use crate::error::DbError;

/// Why a restart invalidates a held copy-on-write snapshot.
pub const RESTART_REASON: &str = "db-server restarted while the copy-on-write snapshot was held: \
     its save-area map is not kept across restarts";

/// How a snapshot is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotMethod {
    /// The pair is split: the mate LU is the frozen image, writes go to
    /// the origin alone and are resynced after the delete.
    #[default]
    Split,
    /// Copy-on-write: the pair stays mirrored; pre-update data is saved to
    /// the save area; nothing to resync after the delete.
    Cow,
}

impl std::fmt::Display for SnapshotMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SnapshotMethod::Split => "split",
            SnapshotMethod::Cow => "cow",
        })
    }
}

/// A `--snapshot-method` that is neither `split` nor `cow`.
#[derive(Debug, thiserror::Error)]
#[error("unknown snapshot method {0:?}: expected split or cow")]
pub struct UnknownSnapshotMethod(String);

impl std::str::FromStr for SnapshotMethod {
    type Err = UnknownSnapshotMethod;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "split" => Ok(SnapshotMethod::Split),
            "cow" => Ok(SnapshotMethod::Cow),
            other => Err(UnknownSnapshotMethod(other.to_string())),
        }
    }
}

/// A volume's save area: a plain LU of the array, as many slots as it has
/// blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveArea {
    pub lu: u32,
    pub capacity_blocks: u64,
}

/// A save area as `Status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveAreaStatus {
    pub lu: u32,
    pub capacity_blocks: u64,
    /// Slots filled by the snapshot held (or by the last one, until it is
    /// deleted).
    pub used_blocks: u64,
}

/// A volume's copy-on-write image, in memory only.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) enum CowImage {
    /// No copy-on-write snapshot.
    #[default]
    None,
    /// Held and valid: saved block → its save-area slot; the next free
    /// slot (slots are handed out in order and never reused while held).
    Held {
        slots: BTreeMap<u64, u64>,
        next_slot: u64,
    },
    /// The image is gone; `holder` may still delete it. Kept while the
    /// pair is in CowSnapshot (save area full) and, after a restart, while
    /// it is Synchronized, until the holder deletes or another acquire.
    Invalidated {
        holder: String,
        reason: String,
        used_blocks: u64,
    },
}

impl CowImage {
    /// Refuses with the reason when the image is invalidated.
    pub(super) fn check_valid(&self, volume: u32) -> Result<(), DbError> {
        match self {
            CowImage::Invalidated { holder, reason, .. } => Err(DbError::SnapshotInvalidated {
                volume,
                holder: holder.clone(),
                reason: reason.clone(),
            }),
            _ => Ok(()),
        }
    }

    pub(super) fn invalidated_holder(&self) -> Option<&str> {
        match self {
            CowImage::Invalidated { holder, .. } => Some(holder),
            _ => None,
        }
    }

    pub(super) fn invalidated_reason(&self) -> Option<String> {
        match self {
            CowImage::Invalidated { reason, .. } => Some(reason.clone()),
            _ => None,
        }
    }

    pub(super) fn used_blocks(&self) -> u64 {
        match self {
            CowImage::None => 0,
            CowImage::Held { next_slot, .. } => *next_slot,
            CowImage::Invalidated { used_blocks, .. } => *used_blocks,
        }
    }
}

/// Checks `--save-area` and `--snapshot-method` against the array at
/// start-up: each save area names a volume the array defines and a plain
/// LU (in no mirror) of the volume's block size, no LU serves two volumes,
/// and a default method of `cow` has a save area for every volume.
pub(super) async fn check_save_areas(
    array: &dyn ArrayPort,
    pairs: &[PairInfo],
    config: &ManagerConfig,
) -> Result<BTreeMap<u32, SaveArea>, DbError> {
    let mut areas = BTreeMap::new();
    let mut used_by: BTreeMap<u32, u32> = BTreeMap::new();
    for (&volume, &lu) in &config.save_areas {
        let flag = format!("--save-area {volume}={lu}");
        let Some(pair) = pairs.iter().find(|p| p.mirror_lu == volume) else {
            return Err(DbError::SaveAreaConfig(format!(
                "{flag}: the array defines no volume (mirror LU) {volume}"
            )));
        };
        if let Some(other) = used_by.insert(lu, volume) {
            return Err(DbError::SaveAreaConfig(format!(
                "{flag}: LU {lu} is already the save area of volume {other}"
            )));
        }
        let page = array.lu_page(lu).await.map_err(|error| {
            DbError::SaveAreaConfig(format!("{flag}: the array has no LU {lu} usable: {error}"))
        })?;
        if page.kind != LuKind::Plain {
            return Err(DbError::SaveAreaConfig(format!(
                "{flag}: LU {lu} is a {:?} LU; a save area must be a plain LU in no mirror",
                page.kind
            )));
        }
        if page.block_size_bytes != pair.block_size_bytes {
            return Err(DbError::SaveAreaConfig(format!(
                "{flag}: LU {lu} has {}-byte blocks, volume {volume} {}-byte blocks; they must match",
                page.block_size_bytes, pair.block_size_bytes
            )));
        }
        if page.block_count == 0 {
            return Err(DbError::SaveAreaConfig(format!("{flag}: LU {lu} is empty")));
        }
        areas.insert(
            volume,
            SaveArea {
                lu,
                capacity_blocks: page.block_count,
            },
        );
    }
    if config.snapshot_method == SnapshotMethod::Cow
        && let Some(pair) = pairs.iter().find(|p| !areas.contains_key(&p.mirror_lu))
    {
        return Err(DbError::SaveAreaConfig(format!(
            "--snapshot-method cow: volume {} has no save area (add --save-area {}=LU)",
            pair.mirror_lu, pair.mirror_lu
        )));
    }
    for (volume, area) in &areas {
        tracing::info!(
            volume,
            save_area_lu = area.lu,
            capacity_blocks = area.capacity_blocks,
            "copy-on-write save area"
        );
    }
    Ok(areas)
}

/// Contiguous runs of the sorted blocks in `blocks`, each with its index
/// in `blocks`.
fn runs(blocks: &[u64]) -> Vec<(usize, Range<u64>)> {
    let mut runs: Vec<(usize, Range<u64>)> = Vec::new();
    for (i, &block) in blocks.iter().enumerate() {
        match runs.last_mut() {
            Some((_, run)) if run.end == block => run.end += 1,
            _ => runs.push((i, block..block + 1)),
        }
    }
    runs
}

impl SnapshotManager {
    /// Acquires a copy-on-write snapshot (Synchronized → CowSnapshot): only
    /// a journal record, under the mode gate (so no write routed before it
    /// lands after it unsaved). The caller quiesced the database.
    pub(super) async fn acquire_cow(
        &self,
        vol: &Volume,
        run_id: &str,
        ledger_sequence: u64,
    ) -> Result<AcquireOutcome, DbError> {
        let volume = vol.volume();
        let _mode = vol.mode_gate.write().await;
        if let Some(retried) = vol.check_acquirable(run_id)? {
            return Ok(retried);
        }
        if vol.save_area.is_none() {
            return Err(DbError::NoSaveArea { volume });
        }
        let snapshot_id = new_snapshot_id();
        let state = PairState::CowSnapshot {
            holder: run_id.to_string(),
            ledger_sequence,
            snapshot_id,
        };
        // Durability rule 2: durable before it takes effect.
        self.journal_state(&vol.pair, &state).await?;
        crash::point("acquire.after_journal");
        let mut inner = vol.inner();
        let snapshot = vol.held_snapshot(&state).expect("held");
        inner.state = state;
        inner.last_deleted_by = None;
        inner.cow = CowImage::Held {
            slots: BTreeMap::new(),
            next_slot: 0,
        };
        tracing::info!(
            volume,
            run_id,
            snapshot_id,
            "copy-on-write snapshot acquired"
        );
        Ok(AcquireOutcome {
            already_held: false,
            snapshot,
        })
    }

    /// Deletes a copy-on-write snapshot (CowSnapshot → Synchronized): the
    /// map is dropped, nothing is resynced. Only if a mirror write failed
    /// meanwhile (its range recorded) does the pair resynchronize that
    /// range. The caller holds the mode gate and checked the holder.
    pub(super) async fn delete_cow(
        &self,
        vol: &Volume,
        run_id: &str,
    ) -> Result<DeleteOutcome, DbError> {
        let volume = vol.volume();
        let state = if vol.inner().table.is_empty() {
            PairState::Synchronized
        } else {
            PairState::Resynchronizing
        };
        self.journal_state(&vol.pair, &state).await?;
        crash::point("delete.after_journal");
        self.try_follow_array_mode(vol, &state, "copy-on-write snapshot deleted")
            .await;
        let mut inner = vol.inner();
        let resync = state == PairState::Resynchronizing;
        inner.state = state;
        inner.cow = CowImage::None;
        inner.last_deleted_by = Some(run_id.to_string());
        let outcome = DeleteOutcome {
            ranges_to_resync: inner.table.range_count() as u64,
            blocks_to_resync: inner.table.block_count(),
            already_deleted: false,
        };
        drop(inner);
        if resync {
            vol.resync_wakeup.notify_one();
        }
        tracing::info!(
            volume,
            run_id,
            ranges = outcome.ranges_to_resync,
            "copy-on-write snapshot deleted"
        );
        Ok(outcome)
    }

    /// Saves the pre-update data of the blocks of `range` not saved yet
    /// (read from the mirror LU) to the next free save-area slots and maps
    /// them, before a write to the data virtual LU under a copy-on-write
    /// snapshot. The caller holds `range` exclusively. A save area too
    /// small invalidates the snapshot and the write goes on; a failed
    /// array call fails the write before it is sent.
    pub(super) async fn save_before_write(
        &self,
        vol: &Volume,
        range: Range<u64>,
    ) -> Result<(), DbError> {
        let Some(area) = vol.save_area else {
            return Ok(());
        };
        let (unsaved, first_slot) = {
            let mut inner = vol.inner();
            let holder = inner.state.holder().unwrap_or_default().to_string();
            let CowImage::Held { slots, next_slot } = &mut inner.cow else {
                return Ok(());
            };
            let unsaved: Vec<u64> = range.filter(|b| !slots.contains_key(b)).collect();
            if unsaved.is_empty() || self.config.skips_cow_save() {
                return Ok(());
            }
            let needed = unsaved.len() as u64;
            if *next_slot + needed > area.capacity_blocks {
                let used_blocks = *next_slot;
                let reason = format!(
                    "the save area (LU {}, {} blocks) filled up after {used_blocks} blocks were saved",
                    area.lu, area.capacity_blocks
                );
                tracing::warn!(
                    volume = vol.volume(),
                    holder,
                    "copy-on-write snapshot invalidated: {reason}; the database goes on"
                );
                inner.cow = CowImage::Invalidated {
                    holder,
                    reason,
                    used_blocks,
                };
                return Ok(());
            }
            let first = *next_slot;
            *next_slot += needed;
            (unsaved, first)
        };
        let block_bytes = vol.pair.block_size_bytes as usize;
        let mut saved = Vec::with_capacity(unsaved.len() * block_bytes);
        for (_, run) in runs(&unsaved) {
            let data = self
                .array
                .read(vol.pair.mirror_lu, run.start, run.end - run.start)
                .await?;
            saved.extend_from_slice(&data);
        }
        self.array.write(area.lu, first_slot, saved).await?;
        crash::point("cow.after_save");
        if let CowImage::Held { slots, .. } = &mut vol.inner().cow {
            for (i, block) in unsaved.into_iter().enumerate() {
                slots.insert(block, first_slot + i as u64);
            }
        }
        Ok(())
    }

    /// Reads the copy-on-write snapshot's image of `range`: the mate, with
    /// the saved blocks from the save area laid over it, under the mode
    /// gate and the blocks held shared.
    pub(super) async fn read_cow_snapshot(
        &self,
        vol: &Volume,
        range: Range<u64>,
    ) -> Result<Vec<u8>, DbError> {
        let volume = vol.volume();
        let _mode = vol.mode_gate.read().await;
        let _blocks = vol.blocks.lock(range.clone(), LockMode::Shared).await;
        let saved: Vec<(u64, u64)> = {
            let inner = vol.inner();
            if !matches!(inner.state, PairState::CowSnapshot { .. }) {
                inner.cow.check_valid(volume)?;
                return Err(DbError::Undefined {
                    volume,
                    target: crate::lu_status::VirtualLu::Snapshot,
                });
            }
            match &inner.cow {
                CowImage::Held { slots, .. } => slots
                    .range(range.clone())
                    .map(|(&block, &slot)| (block, slot))
                    .collect(),
                other => {
                    other.check_valid(volume)?;
                    return Err(DbError::Undefined {
                        volume,
                        target: crate::lu_status::VirtualLu::Snapshot,
                    });
                }
            }
        };
        let area = vol.save_area.ok_or(DbError::NoSaveArea { volume })?;
        let block_bytes = vol.pair.block_size_bytes as usize;
        let mut data = self
            .array
            .read(vol.pair.mate_lu, range.start, range.end - range.start)
            .await?;
        // Runs of blocks whose slots are consecutive too: one read each.
        let mut i = 0;
        while i < saved.len() {
            let (block, slot) = saved[i];
            let mut n = 1;
            while i + n < saved.len() && saved[i + n] == (block + n as u64, slot + n as u64) {
                n += 1;
            }
            let image = self.array.read(area.lu, slot, n as u64).await?;
            let at = (block - range.start) as usize * block_bytes;
            data[at..at + image.len()].copy_from_slice(&image);
            i += n;
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::array_port::MemoryArray;
    use crate::journal::Journal;
    use crate::lu_status::{Mode, VirtualLu};
    use crate::manager::ManagerTestHooks;

    const PAIR: PairInfo = PairInfo {
        mirror_lu: 0,
        origin_lu: 1,
        mate_lu: 2,
        block_size_bytes: 512,
        block_count: 64,
    };
    const SAVE_LU: u32 = 9;
    const BLOCK: usize = 512;

    fn config(hooks: ManagerTestHooks) -> ManagerConfig {
        ManagerConfig {
            save_areas: BTreeMap::from([(PAIR.mirror_lu, SAVE_LU)]),
            hooks,
            ..ManagerConfig::default()
        }
    }

    /// A manager (no journal) over a memory array with a save area of
    /// `save_blocks` blocks.
    async fn start(
        save_blocks: u64,
        hooks: ManagerTestHooks,
    ) -> (Arc<SnapshotManager>, Arc<MemoryArray>) {
        let array = Arc::new(MemoryArray::new(vec![PAIR]).with_plain_lu(SAVE_LU, 512, save_blocks));
        let manager = SnapshotManager::start(
            array.clone(),
            vec![PAIR],
            None,
            config(hooks),
            CancellationToken::new(),
            TaskTracker::new(),
        )
        .await
        .expect("start");
        (manager, array)
    }

    /// Block `block` filled with a byte that names it and `version`.
    fn block_data(block: u64, version: u8) -> Vec<u8> {
        vec![(block as u8).wrapping_mul(7) ^ version; BLOCK]
    }

    /// Writes every block of the volume (version 1) and answers the image.
    async fn fill(manager: &SnapshotManager) -> Vec<u8> {
        let mut image = Vec::new();
        for block in 0..PAIR.block_count {
            image.extend(block_data(block, 1));
        }
        manager
            .write(0, VirtualLu::Data, 0, image.clone())
            .await
            .expect("fill");
        image
    }

    async fn read_all(manager: &SnapshotManager, target: VirtualLu) -> Result<Vec<u8>, DbError> {
        manager.read(0, target, 0, PAIR.block_count).await
    }

    #[tokio::test]
    async fn a_cow_snapshot_reads_the_image_at_the_acquire_and_needs_no_resync() {
        let (manager, array) = start(64, ManagerTestHooks::default()).await;
        let image = fill(&manager).await;
        let acquired = manager
            .acquire_by(0, "run-a", 7, SnapshotMethod::Cow)
            .await
            .expect("acquire");
        assert!(!acquired.already_held);
        assert_eq!(acquired.snapshot.method, SnapshotMethod::Cow);
        assert_eq!(acquired.snapshot.pair.mate_lu, PAIR.mate_lu);
        let status = &manager.status()[0];
        assert_eq!(status.routing.data_mode, Mode::Synchronized, "not split");
        assert_eq!(status.routing.snapshot_mode, Mode::Snapshot);
        assert_eq!(status.snapshot_method, Some(SnapshotMethod::Cow));
        assert_eq!(status.holder.as_deref(), Some("run-a"));

        let mut data = image.clone();
        for (lba, blocks, version) in [(3u64, 2u64, 2u8), (10, 1, 2), (3, 1, 3), (60, 4, 2)] {
            let mut new = Vec::new();
            for block in lba..lba + blocks {
                new.extend(block_data(block, version));
            }
            let at = lba as usize * BLOCK;
            data[at..at + new.len()].copy_from_slice(&new);
            manager
                .write(0, VirtualLu::Data, lba, new)
                .await
                .expect("write");
            assert_eq!(array.lu(1), array.lu(2), "origin == mate throughout");
            assert_eq!(
                read_all(&manager, VirtualLu::Snapshot).await.expect("read"),
                image
            );
            assert_eq!(
                read_all(&manager, VirtualLu::Data).await.expect("read"),
                data
            );
        }
        // A read of a few blocks, saved and not, at an offset.
        assert_eq!(
            manager
                .read(0, VirtualLu::Snapshot, 2, 3)
                .await
                .expect("read"),
            image[2 * BLOCK..5 * BLOCK]
        );
        let status = &manager.status()[0];
        assert_eq!(
            status.save_area,
            Some(SaveAreaStatus {
                lu: SAVE_LU,
                capacity_blocks: 64,
                used_blocks: 7
            }),
            "blocks 3, 4, 10, 60..64 saved once each"
        );
        assert!(status.dirty_ranges.is_empty(), "nothing recorded");

        // Read-only, and held: refusals change nothing.
        assert!(matches!(
            manager
                .write(0, VirtualLu::Snapshot, 0, vec![0; BLOCK])
                .await,
            Err(DbError::CowSnapshotReadOnly { volume: 0 })
        ));
        assert!(matches!(
            manager
                .acquire_by(0, "run-b", 8, SnapshotMethod::Split)
                .await,
            Err(DbError::WrongMode {
                mode: Mode::Snapshot,
                ..
            })
        ));
        assert!(
            manager
                .acquire_by(0, "run-a", 9, SnapshotMethod::Split)
                .await
                .expect("retry")
                .already_held,
            "a retry answers the held snapshot"
        );
        assert!(matches!(
            manager.check_restore_snapshot(0, "run-a"),
            Err(DbError::WrongMode { .. })
        ));
        assert!(matches!(
            manager.delete(0, "run-b", false).await,
            Err(DbError::HeldByOther { .. })
        ));

        let deleted = manager.delete(0, "run-a", false).await.expect("delete");
        assert_eq!((deleted.ranges_to_resync, deleted.blocks_to_resync), (0, 0));
        let status = &manager.status()[0];
        assert_eq!(status.routing.data_mode, Mode::Synchronized, "no resync");
        assert_eq!(status.snapshot_method, None);
        assert_eq!(status.save_area.map(|a| a.used_blocks), Some(0));
        assert!(matches!(
            read_all(&manager, VirtualLu::Snapshot).await,
            Err(DbError::Undefined { .. })
        ));
        assert!(
            manager
                .delete(0, "run-a", false)
                .await
                .expect("retried delete")
                .already_deleted
        );
        assert_eq!(array.lu(1), array.lu(2));
    }

    #[tokio::test]
    async fn a_full_save_area_invalidates_the_snapshot_and_the_database_goes_on() {
        let (manager, array) = start(4, ManagerTestHooks::default()).await;
        let image = fill(&manager).await;
        manager
            .acquire_by(0, "run-a", 7, SnapshotMethod::Cow)
            .await
            .expect("acquire");
        manager
            .write(0, VirtualLu::Data, 0, vec![5; 3 * BLOCK])
            .await
            .expect("3 blocks saved");
        assert_eq!(
            manager
                .read(0, VirtualLu::Snapshot, 0, 4)
                .await
                .expect("read"),
            image[..4 * BLOCK]
        );
        manager
            .write(0, VirtualLu::Data, 10, vec![6; 2 * BLOCK])
            .await
            .expect("the write goes on though the save area is full");
        let reason = "the save area (LU 9, 4 blocks) filled up after 3 blocks were saved";
        let status = &manager.status()[0];
        assert_eq!(status.snapshot_invalidated_reason.as_deref(), Some(reason));
        assert_eq!(status.holder.as_deref(), Some("run-a"), "still held");
        assert_eq!(
            &read_all(&manager, VirtualLu::Data).await.expect("read")[10 * BLOCK..12 * BLOCK],
            &[6; 2 * BLOCK]
        );
        manager
            .write(0, VirtualLu::Data, 20, vec![7; BLOCK])
            .await
            .expect("later writes work too");
        assert_eq!(array.lu(1), array.lu(2));
        let refused = manager
            .read(0, VirtualLu::Snapshot, 0, 1)
            .await
            .expect_err("invalidated");
        assert!(
            matches!(&refused, DbError::SnapshotInvalidated { reason: r, .. } if r == reason),
            "{refused}"
        );
        let status = tonic::Status::from(refused);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            splitmirror_proto::reason::reason(&status),
            Some(splitmirror_proto::reason::Reason::SnapshotInvalidated)
        );
        assert!(manager.check_snapshot_valid(0).is_err());
        let deleted = manager.delete(0, "run-a", false).await.expect("delete");
        assert_eq!(deleted.ranges_to_resync, 0);
        let status = &manager.status()[0];
        assert_eq!(status.routing.data_mode, Mode::Synchronized);
        assert_eq!(status.snapshot_invalidated_reason, None);
        manager
            .check_snapshot_valid(0)
            .expect("nothing invalidated now");
    }

    #[tokio::test]
    async fn a_restart_invalidates_a_held_cow_snapshot_and_its_holder_deletes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let array = Arc::new(MemoryArray::new(vec![PAIR]).with_plain_lu(SAVE_LU, 512, 64));
        let open = |array: Arc<MemoryArray>, cancel: CancellationToken| {
            let journal = Journal::open(dir.path(), 4096).expect("journal");
            SnapshotManager::start(
                array,
                vec![PAIR],
                Some(journal),
                config(ManagerTestHooks::default()),
                cancel,
                TaskTracker::new(),
            )
        };
        let cancel = CancellationToken::new();
        let manager = open(array.clone(), cancel.clone()).await.expect("start");
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("synchronized");
        fill(&manager).await;
        manager
            .acquire_by(0, "run-a", 7, SnapshotMethod::Cow)
            .await
            .expect("acquire");
        manager
            .write(0, VirtualLu::Data, 5, vec![9; BLOCK])
            .await
            .expect("write");
        cancel.cancel();
        manager.close_journal();
        drop(manager);

        let manager = open(array.clone(), CancellationToken::new())
            .await
            .expect("restart");
        let status = &manager.status()[0];
        assert_eq!(status.routing.data_mode, Mode::Synchronized, "never split");
        assert_eq!(status.snapshot_method, None);
        assert_eq!(
            status.snapshot_invalidated_reason.as_deref(),
            Some(RESTART_REASON)
        );
        let refused = read_all(&manager, VirtualLu::Snapshot)
            .await
            .expect_err("invalidated");
        assert!(
            matches!(&refused, DbError::SnapshotInvalidated { holder, reason, .. }
                if holder == "run-a" && reason == RESTART_REASON),
            "{refused}"
        );
        assert!(matches!(
            manager.delete(0, "run-b", false).await,
            Err(DbError::WrongMode { .. })
        ));
        let deleted = manager.delete(0, "run-a", false).await.expect("delete");
        assert_eq!(
            (deleted.ranges_to_resync, deleted.already_deleted),
            (0, false)
        );
        assert_eq!(manager.status()[0].snapshot_invalidated_reason, None);
        assert!(matches!(
            read_all(&manager, VirtualLu::Snapshot).await,
            Err(DbError::Undefined { .. })
        ));
        manager
            .acquire_by(0, "run-c", 8, SnapshotMethod::Cow)
            .await
            .expect("a new snapshot after the restart");
    }

    /// The seed of a randomised test: `SPLITMIRROR_SEED` replays one, else
    /// a fresh one; printed either way.
    fn seed(test: &str) -> u64 {
        let seed = match std::env::var("SPLITMIRROR_SEED") {
            Ok(text) => text.parse().expect("SPLITMIRROR_SEED must be a u64"),
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64,
        };
        eprintln!("{test}: seed {seed} (replay with SPLITMIRROR_SEED={seed})");
        seed
    }

    /// Writers and snapshot readers race on the same blocks of a volume
    /// under a copy-on-write snapshot, each op drawn from `seed`; every
    /// snapshot read must equal the image at the acquire, and origin must
    /// equal mate at the end. Answers the first mismatch.
    async fn race(seed: u64, hooks: ManagerTestHooks) -> Result<u64, String> {
        let (manager, array) = start(64, hooks).await;
        array
            .yield_calls
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut image = vec![0u8; PAIR.block_count as usize * BLOCK];
        rng.fill(&mut image[..]);
        manager
            .write(0, VirtualLu::Data, 0, image.clone())
            .await
            .map_err(|e| e.to_string())?;
        manager
            .acquire_by(0, "model", 1, SnapshotMethod::Cow)
            .await
            .map_err(|e| e.to_string())?;
        let image = Arc::new(image);
        let steps = rng.random_range(100..300);
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..6u64 {
            let manager = manager.clone();
            let image = image.clone();
            let mut rng = SmallRng::seed_from_u64(seed ^ (task + 1).wrapping_mul(0x9E37_79B9));
            let writer = task % 2 == 0;
            tasks.spawn(async move {
                let mut reads = 0u64;
                for _ in 0..steps {
                    // A small hot range, so that writers and readers meet.
                    let lba = rng.random_range(0..PAIR.block_count - 4);
                    let blocks = rng.random_range(1..=4u64);
                    if writer {
                        let mut data = vec![0u8; blocks as usize * BLOCK];
                        rng.fill(&mut data[..]);
                        manager
                            .write(0, VirtualLu::Data, lba, data)
                            .await
                            .map_err(|e| e.to_string())?;
                    } else {
                        let read = manager
                            .read(0, VirtualLu::Snapshot, lba, blocks)
                            .await
                            .map_err(|e| e.to_string())?;
                        let at = lba as usize * BLOCK;
                        if read[..] != image[at..at + read.len()] {
                            return Err(format!(
                                "snapshot read of {blocks} blocks at LBA {lba} differs from the image at the acquire"
                            ));
                        }
                        reads += 1;
                    }
                    if rng.random_bool(0.3) {
                        tokio::task::yield_now().await;
                    }
                }
                Ok(reads)
            });
        }
        let mut reads = 0;
        while let Some(joined) = tasks.join_next().await {
            reads += joined.map_err(|e| e.to_string())??;
        }
        let whole = manager
            .read(0, VirtualLu::Snapshot, 0, PAIR.block_count)
            .await
            .map_err(|e| e.to_string())?;
        if whole[..] != image[..] {
            return Err("the whole snapshot differs from the image at the acquire".into());
        }
        if array.lu(1) != array.lu(2) {
            return Err("origin and mate differ under a copy-on-write snapshot".into());
        }
        let deleted = manager
            .delete(0, "model", false)
            .await
            .map_err(|e| e.to_string())?;
        if deleted.ranges_to_resync != 0 {
            return Err(format!("{} ranges to resync", deleted.ranges_to_resync));
        }
        Ok(reads)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_writers_never_change_what_cow_snapshot_reads_see() {
        let seed = seed("racing_writers_never_change_what_cow_snapshot_reads_see");
        for round in 0..5 {
            let reads = race(seed.wrapping_add(round), ManagerTestHooks::default())
                .await
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: {e}"));
            eprintln!("seed {seed} round {round}: {reads} snapshot reads matched the model");
        }
    }

    /// The canary: a write that does not save the pre-update data must be
    /// caught by the same checker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn canary_a_cow_write_that_saves_nothing_is_caught() {
        let seed = seed("canary_a_cow_write_that_saves_nothing_is_caught");
        let hooks = ManagerTestHooks {
            skip_cow_save: true,
            ..ManagerTestHooks::default()
        };
        let caught = race(seed, hooks).await.expect_err("the checker must fail");
        eprintln!("seed {seed}: caught as expected: {caught}");
    }

    #[tokio::test]
    async fn save_areas_are_checked_at_start_up() {
        let array = Arc::new(
            MemoryArray::new(vec![PAIR])
                .with_plain_lu(SAVE_LU, 512, 8)
                .with_plain_lu(10, 4096, 8),
        );
        let started = |save_areas: Vec<(u32, u32)>, snapshot_method| {
            let config = ManagerConfig {
                save_areas: save_areas.into_iter().collect(),
                snapshot_method,
                ..ManagerConfig::default()
            };
            let array = array.clone();
            async move {
                SnapshotManager::start(
                    array,
                    vec![PAIR],
                    None,
                    config,
                    CancellationToken::new(),
                    TaskTracker::new(),
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
            }
        };
        let refused = |text: Result<(), String>, needle: &str| {
            let text = text.expect_err("refused");
            assert!(text.contains(needle), "{text}");
        };
        refused(
            started(vec![(0, 2)], SnapshotMethod::Split).await,
            "plain LU",
        );
        refused(
            started(vec![(0, 10)], SnapshotMethod::Split).await,
            "4096-byte",
        );
        refused(
            started(vec![(0, 11)], SnapshotMethod::Split).await,
            "no LU 11",
        );
        refused(
            started(vec![(3, SAVE_LU)], SnapshotMethod::Split).await,
            "no volume",
        );
        refused(
            started(vec![], SnapshotMethod::Cow).await,
            "--snapshot-method cow: volume 0 has no save area",
        );
        started(vec![(0, SAVE_LU)], SnapshotMethod::Cow)
            .await
            .expect("valid");
        // Without a save area a copy-on-write acquire is refused.
        let (manager, _) = {
            let array = Arc::new(MemoryArray::new(vec![PAIR]));
            let manager = SnapshotManager::start(
                array.clone(),
                vec![PAIR],
                None,
                ManagerConfig::default(),
                CancellationToken::new(),
                TaskTracker::new(),
            )
            .await
            .expect("start");
            (manager, array)
        };
        assert!(matches!(
            manager.acquire_by(0, "r", 0, SnapshotMethod::Cow).await,
            Err(DbError::NoSaveArea { volume: 0 })
        ));
    }

    #[test]
    fn runs_of_blocks() {
        assert_eq!(
            runs(&[1, 2, 3, 7, 9, 10]),
            vec![(0, 1..4), (3, 7..8), (4, 9..11)]
        );
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn snapshot_methods_parse() {
        assert_eq!(
            "cow".parse::<SnapshotMethod>().ok(),
            Some(SnapshotMethod::Cow)
        );
        assert_eq!(
            "split".parse::<SnapshotMethod>().ok(),
            Some(SnapshotMethod::Split)
        );
        assert!("mirror".parse::<SnapshotMethod>().is_err());
    }
}
