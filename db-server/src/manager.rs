//! The snapshot management program (1517): per mirror pair, the LU status
//! table (Fig. 10) and the update location table (Fig. 3), the write path of
//! Fig. 5, acquire and delete. The background resync of Fig. 7 is in
//! the submodule `resync` (`manager/resync.rs`), which works on the same
//! volumes; the restores (from a backup, and the reverse resync to a held
//! snapshot) in the submodule `restore` (`manager/restore.rs`).
//!
//! Three locks, each for one reason:
//! - `Volume::mode_gate` (async RwLock): a write holds it shared from the
//!   moment it is routed until the array answers; a mode change holds it
//!   exclusively. So no write routed under the old mode lands after the
//!   change — otherwise a write routed to the mirror LU just before an
//!   acquire would reach the frozen mate.
//! - `Volume::blocks` (range lock): writes hold their blocks shared, the
//!   resync holds the range it copies exclusively. That makes "re-check what
//!   is still recorded → copy → remove" atomic against writes to the same
//!   blocks (the widened step-1004 race of DESIGN.md §3).
//! - `Volume::inner` (std mutex, never held across an await): the tables.
//!
//! A volume may have up to three mates ([0020]): each (volume, mate) is a
//! pair with its own [`Volume`] — state, update location table, resync,
//! journal records, mate access and array mode — so that each mate is
//! split, backed up and resynchronized on its own. A write to the data
//! virtual LU concerns every pair of its volume: it holds each pair's mode
//! gate and blocks (in mate order) and is recorded in the table of every
//! split pair. Several mates need the stateful array (`--array-mode
//! stateful`): only an array that holds each pair's mode can send one write
//! of the mirror LU to the origin and the synchronized mates alone.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use splitmirror_proto::pace::RateLimit;
use splitmirror_proto::range_lock::{LockMode, RangeLock};
use tokio::sync::{Notify, RwLock};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::array_port::{ArrayPort, OwnAccess, PairInfo};
use crate::crash;
use crate::error::DbError;
use crate::journal::{DurableVolume, Journal, PairKey};
use crate::lu_status::{Mode, PairState, Routing, VirtualLu, new_snapshot_id};
use crate::update_location_table::UpdateLocationTable;

mod array_mode;
mod cow;
mod restore;
mod resync;
#[cfg(test)]
mod several_mates_tests;
use array_mode::KnownArrayMode;
pub use array_mode::{ArrayModeKeeping, UnknownArrayModeKeeping};
use cow::CowImage;
pub use cow::{SaveArea, SaveAreaStatus, SnapshotMethod, UnknownSnapshotMethod};
pub use restore::{BeganRestore, BeginDecision, EndedRestore, RestoreStatus, ReverseOutcome};
pub use resync::{ResyncMethod, ResyncProgress, UnknownResyncMethod};

/// Behaviour switches for tests that must show their checker can fail.
/// Compiled only for tests and the `testing` feature: a production build
/// cannot be broken this way.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, Copy, Default)]
pub struct ManagerTestHooks {
    /// The resync copies the range it picked without taking the range lock
    /// and without re-checking what is still recorded.
    pub resync_skips_recheck: bool,
    /// Writes in Snapshot mode are not recorded in the update location
    /// table, so the resync never copies them.
    pub forget_snapshot_writes: bool,
    /// The write intent is journaled after the array write instead of
    /// before it (breaks durability rule 1).
    pub journal_intent_after_write: bool,
    /// A write under a copy-on-write snapshot does not save the blocks'
    /// pre-update data: the snapshot reads the new data from the mate.
    pub skip_cow_save: bool,
}

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub resync_method: ResyncMethod,
    /// The largest range one resync step copies under one range lock.
    pub resync_chunk_bytes: u64,
    /// Caps the resync's copy rate (bytes per second), so that a large
    /// resync leaves the database its share of CPU and disk; `None` = as
    /// fast as it goes.
    pub resync_max_bytes_per_s: Option<u64>,
    /// The rate the resync's copies are guaranteed however busy the
    /// foreground (`--resync-min-rate`), sent with each `CopyRange`; `None`:
    /// the array's own minimum (array-node `--background-min-rate`).
    pub resync_min_bytes_per_s: Option<u64>,
    /// Mirror by the host instead of the array: a write to the mirror LU is
    /// sent twice, to origin and mate (the prior art of [0006]/[0009]).
    /// Only for the benchmark that measures what array mirroring saves.
    pub host_mirroring: bool,
    /// The identity the array lets write a volume's LUs for a restore from
    /// a backup (`--restore-writer`, the backup server's): db-server sets
    /// its grant at BeginRestore and withdraws it at EndRestore. Unused
    /// when the array masks nothing.
    pub restore_writer: String,
    /// The method of an AcquireSnapshot that names none
    /// (`--snapshot-method`).
    pub snapshot_method: SnapshotMethod,
    /// Each volume's save area for copy-on-write snapshots: volume (mirror
    /// LU) → a plain LU of the array (`--save-area VOLUME=LU`).
    pub save_areas: BTreeMap<u32, u32>,
    /// Who keeps the pairs' modes (`--array-mode`): db-server (stateless,
    /// the default) or the array (stateful, `ModeSelect`).
    pub array_mode: ArrayModeKeeping,
    /// Switches that break the manager on purpose (tests only).
    #[cfg(any(test, feature = "testing"))]
    pub hooks: ManagerTestHooks,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            resync_method: ResyncMethod::Offload,
            resync_chunk_bytes: 1 << 20,
            resync_max_bytes_per_s: None,
            resync_min_bytes_per_s: None,
            host_mirroring: false,
            restore_writer: splitmirror_proto::security::role::BACKUP.to_string(),
            snapshot_method: SnapshotMethod::Split,
            save_areas: BTreeMap::new(),
            array_mode: ArrayModeKeeping::Stateless,
            #[cfg(any(test, feature = "testing"))]
            hooks: ManagerTestHooks::default(),
        }
    }
}

impl ManagerConfig {
    /// Whether a write in Snapshot mode is recorded in the update location
    /// table: always, unless a test hook breaks it.
    fn records_snapshot_writes(&self) -> bool {
        #[cfg(any(test, feature = "testing"))]
        if self.hooks.forget_snapshot_writes {
            return false;
        }
        true
    }

    /// Whether a write's intent is journaled before the array write
    /// (durability rule 1): always, unless a test hook breaks it.
    fn journals_intent_first(&self) -> bool {
        #[cfg(any(test, feature = "testing"))]
        if self.hooks.journal_intent_after_write {
            return false;
        }
        true
    }

    /// Whether a write under a copy-on-write snapshot skips saving the
    /// pre-update data: never, unless a test hook breaks it.
    fn skips_cow_save(&self) -> bool {
        #[cfg(any(test, feature = "testing"))]
        if self.hooks.skip_cow_save {
            return true;
        }
        false
    }

    /// Whether the resync copies without the range lock and the re-check:
    /// never, unless a test hook breaks it.
    fn resync_skips_recheck(&self) -> bool {
        #[cfg(any(test, feature = "testing"))]
        if self.hooks.resync_skips_recheck {
            return true;
        }
        false
    }
}

/// The most mates a mirror LU may have ([0020]: "treble or more"; the
/// array's configuration allows three).
pub const MAX_MATES: u32 = 3;

/// One pair of a volume: the volume (its mirror LU) and which of its mates,
/// counted from 1 in the array's order. A bare volume number means its
/// first mate, the only one of a single-mate volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PairRef {
    pub volume: u32,
    pub mate: u32,
}

impl PairRef {
    /// `mate` counted from 1; 0 (unset on the wire) means 1.
    pub fn new(volume: u32, mate: u32) -> Self {
        Self {
            volume,
            mate: mate.max(1),
        }
    }
}

impl From<u32> for PairRef {
    fn from(volume: u32) -> Self {
        Self::new(volume, 1)
    }
}

/// Everything `Status` reports about one pair (one per mate of a volume).
#[derive(Debug, Clone)]
pub struct VolumeStatus {
    pub volume: u32,
    /// Which of the volume's mates, counted from 1.
    pub mate: u32,
    pub pair: PairInfo,
    pub routing: Routing,
    pub holder: Option<String>,
    pub dirty_ranges: Vec<Range<u64>>,
    pub dirty_blocks: u64,
    pub resync: ResyncProgress,
    pub full_resync_reason: Option<String>,
    /// The restore that holds the volume offline, if one does.
    pub restore: Option<RestoreStatus>,
    /// The method of the snapshot held, if one is.
    pub snapshot_method: Option<SnapshotMethod>,
    /// The volume's save area (`--save-area`), if it has one.
    pub save_area: Option<SaveAreaStatus>,
    /// Why the copy-on-write snapshot held (or held before a restart) was
    /// invalidated, until its holder deletes it.
    pub snapshot_invalidated_reason: Option<String>,
    /// The held split snapshot was acquired writable.
    pub snapshot_writable: bool,
    /// With a stateful array (`--array-mode stateful`): the pair's mode in
    /// the array's table as db-server last set it, or why it is unknown.
    /// `None` when db-server keeps the modes.
    pub array_mode: Option<String>,
}

/// The snapshot a volume holds: who acquired it, the ledger sequence at
/// the split, the id of that acquire (never repeated), and the pair whose
/// mate LU is the frozen image (its LU number and size), so that no caller
/// reads the pair again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldSnapshot {
    pub holder: String,
    pub ledger_sequence: u64,
    pub snapshot_id: u64,
    pub pair: PairInfo,
    /// Split (the mate is the frozen image) or copy-on-write (the image is
    /// read through db-server: the save area over the mate).
    pub method: SnapshotMethod,
    /// Acquired writable: the mate may change while held (not frozen).
    pub writable: bool,
}

/// What an acquire did: split the pair now, or found it held by the same
/// run id (a retry); either way the snapshot held afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireOutcome {
    pub already_held: bool,
    pub snapshot: HeldSnapshot,
}

/// The answer to a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeleteOutcome {
    pub ranges_to_resync: u64,
    pub blocks_to_resync: u64,
    pub already_deleted: bool,
}

struct VolumeInner {
    state: PairState,
    table: UpdateLocationTable,
    /// The run id of the last delete, so that a retried delete is answered
    /// rather than refused.
    last_deleted_by: Option<String>,
    resync: ResyncProgress,
    full_resync_reason: Option<String>,
    /// The whole volume must be compared (and differing chunks copied)
    /// before the pair may be Synchronized: no journal said where origin and
    /// mate may differ ([0045]).
    full_resync_pending: bool,
    /// The whole-volume resync is for a pair the journal never saw: normal
    /// on first start, so only a difference found is worth a warning.
    full_resync_new_pair: bool,
    /// The trace of the delete that asked for the next resync pass.
    resync_parent: splitmirror_proto::telemetry::TraceParent,
    /// What the array is known to let db-server do with the mate LU
    /// (LUN masking; always `Configured` when the array masks nothing).
    mate_access: MateAccess,
    /// The last restore from a backup that ended (or was abandoned) on
    /// this volume, so that a retried EndRestore is answered rather than
    /// refused (in memory only, like `last_deleted_by`).
    last_restore_ended: Option<(String, EndedRestore)>,
    /// The last reverse resync that completed, for a retried
    /// RestoreSnapshot (in memory only).
    last_reverse: Option<(String, ReverseOutcome)>,
    /// The reverse resync's progress: blocks copied mate → origin, of the
    /// blocks recorded.
    reverse_blocks: (u64, u64),
    /// Chunks the last whole-volume compare found different and copied
    /// (what an abandoned restore reports).
    compare_copied_chunks: Option<u64>,
    /// The copy-on-write snapshot's save-area map, or why it is gone (in
    /// memory only).
    cow: CowImage,
    /// The array's mode of the pair as far as db-server knows (stateful:
    /// set by the last `ModeSelect`; stateless: host-managed).
    array_mode: KnownArrayMode,
}

/// db-server's access to a pair's mate LU as far as it knows: set by the
/// last `SetAccess` that succeeded, unknown after one that failed (it may
/// or may not have taken effect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MateAccess {
    Known(OwnAccess),
    Unknown,
}

/// One pair: a volume's mirror LU with one of its mates (see the module
/// comment).
struct Volume {
    pair: PairInfo,
    /// Which of the volume's mates, counted from 1.
    mate: u32,
    /// Where a copy-on-write snapshot saves pre-update data, if configured.
    save_area: Option<SaveArea>,
    mode_gate: RwLock<()>,
    blocks: RangeLock,
    inner: Mutex<VolumeInner>,
    resync_wakeup: Notify,
}

impl Volume {
    fn inner(&self) -> MutexGuard<'_, VolumeInner> {
        self.inner.lock().expect("volume state poisoned")
    }

    fn volume(&self) -> u32 {
        self.pair.mirror_lu
    }

    /// The snapshot `state` holds, if it holds one.
    fn held_snapshot(&self, state: &PairState) -> Option<HeldSnapshot> {
        let (holder, ledger_sequence, snapshot_id, method, writable) = match state {
            PairState::Snapshot {
                holder,
                ledger_sequence,
                snapshot_id,
                writable,
            } => (
                holder,
                ledger_sequence,
                snapshot_id,
                SnapshotMethod::Split,
                *writable,
            ),
            PairState::CowSnapshot {
                holder,
                ledger_sequence,
                snapshot_id,
            } => (
                holder,
                ledger_sequence,
                snapshot_id,
                SnapshotMethod::Cow,
                false,
            ),
            _ => return None,
        };
        Some(HeldSnapshot {
            holder: holder.clone(),
            ledger_sequence: *ledger_sequence,
            snapshot_id: *snapshot_id,
            pair: self.pair,
            method,
            writable,
        })
    }

    /// Whether `run_id` may acquire a snapshot of this volume now, by
    /// either method: `Ok(None)` from Synchronized; the snapshot held when
    /// `run_id` holds one already (a retry, whatever its method); refused
    /// otherwise (a restore, another holder, a resync).
    fn check_acquirable(&self, run_id: &str) -> Result<Option<AcquireOutcome>, DbError> {
        let volume = self.volume();
        let inner = self.inner();
        match &inner.state {
            PairState::Synchronized => {
                debug_assert!(
                    inner.table.is_empty(),
                    "a Synchronized pair has no recorded ranges"
                );
                Ok(None)
            }
            PairState::Snapshot { holder, .. } | PairState::CowSnapshot { holder, .. }
                if holder == run_id =>
            {
                Ok(Some(AcquireOutcome {
                    already_held: true,
                    snapshot: self.held_snapshot(&inner.state).expect("held"),
                }))
            }
            PairState::Restoring { run_id: holder, .. }
            | PairState::RestoringToSnapshot { holder, .. } => Err(DbError::RestoreHeld {
                volume,
                action: "acquire a snapshot of",
                holder: holder.clone(),
            }),
            other => Err(DbError::WrongMode {
                volume,
                action: "acquire a snapshot of",
                mode: other.refusal_mode(&self.pair),
            }),
        }
    }

    fn check_write(&self, lba: u64, data_bytes: usize) -> Result<Range<u64>, DbError> {
        let block_size_bytes = self.pair.block_size_bytes as usize;
        if data_bytes == 0 || !data_bytes.is_multiple_of(block_size_bytes) {
            return Err(DbError::InvalidArgument(format!(
                "{data_bytes} bytes of data is not a positive whole number of {block_size_bytes}-byte blocks"
            )));
        }
        self.check_range(lba, (data_bytes / block_size_bytes) as u64)
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<Range<u64>, DbError> {
        if blocks == 0 {
            return Err(DbError::InvalidArgument("zero blocks requested".into()));
        }
        match lba.checked_add(blocks) {
            Some(end) if end <= self.pair.block_count => Ok(lba..end),
            _ => Err(DbError::OutOfRange(format!(
                "{blocks} blocks at LBA {lba} run past the end of volume {} ({} blocks)",
                self.volume(),
                self.pair.block_count
            ))),
        }
    }
}

/// How long Status waits for the array's pace before leaving it out.
pub const PACE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(300);

/// The pace of a resync's copies: the array's adaptive rate, at most
/// `--resync-max-rate`, at least `--resync-min-rate`.
#[derive(Debug, Clone, PartialEq)]
pub struct ResyncPace {
    /// The array's report (its figures and its reason).
    pub array: splitmirror_proto::pace::PaceReport,
    /// The rate a resync's copies go at now; `None`: unlimited.
    pub rate_bytes_per_s: Option<u64>,
    /// `--resync-max-rate` is below the array's rate.
    pub capped: bool,
    pub resync_min_bytes_per_s: Option<u64>,
    pub resync_max_bytes_per_s: Option<u64>,
}

impl ResyncPace {
    pub fn new(
        array: splitmirror_proto::pace::PaceReport,
        resync_min_bytes_per_s: Option<u64>,
        resync_max_bytes_per_s: Option<u64>,
    ) -> Self {
        let capped = match (resync_max_bytes_per_s, array.rate_bytes_per_s) {
            (Some(max), Some(rate)) => max < rate,
            (Some(_), None) => true,
            (None, _) => false,
        };
        let mut rate_bytes_per_s = if capped {
            resync_max_bytes_per_s
        } else {
            array.rate_bytes_per_s
        };
        // The cap wins over the minimum (see `guaranteed_min_bytes_per_s`).
        let min = resync_min_bytes_per_s
            .map(|min| resync_max_bytes_per_s.map_or(min, |max| min.min(max)));
        if let (Some(min), Some(rate)) = (min, rate_bytes_per_s) {
            rate_bytes_per_s = Some(rate.max(min));
        }
        Self {
            array,
            rate_bytes_per_s,
            capped,
            resync_min_bytes_per_s,
            resync_max_bytes_per_s,
        }
    }

    /// What a resync is guaranteed: `--resync-min-rate` (or the array's own
    /// minimum), but never more than `--resync-max-rate` — the operator's
    /// cap wins; the minimum only bounds how far the adaptive pace slows
    /// the copies.
    pub fn guaranteed_min_bytes_per_s(&self) -> u64 {
        let min = self
            .resync_min_bytes_per_s
            .unwrap_or(self.array.min_bytes_per_s);
        self.resync_max_bytes_per_s.map_or(min, |max| min.min(max))
    }
}

/// The snapshot manager. Shared behind an `Arc`.
pub struct SnapshotManager {
    array: Arc<dyn ArrayPort>,
    /// Whether the array masks LUs by db-server's identity (every TLS
    /// cluster): then the mate of a held snapshot is set read-only.
    masking: bool,
    /// `None` runs without crash safety (benchmarks only).
    journal: Option<Arc<Journal>>,
    /// Every pair, by (volume, mate): a volume's pairs are next to each
    /// other, mate 1 first.
    volumes: BTreeMap<PairRef, Arc<Volume>>,
    config: ManagerConfig,
    /// Paces every volume's resync copies together (the reverse resync's
    /// too).
    resync_pace: Option<RateLimit>,
    /// The identity a restore lets write the pair's LUs (`None` when the
    /// array masks nothing).
    restore_writer: Option<String>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl SnapshotManager {
    /// Builds the manager over the pairs the array reported, restores each
    /// pair's state from what the journal replayed, and starts one resync
    /// task per volume (idle until there is something to copy).
    ///
    /// A pair the journal knows comes back as it was: a snapshot is still
    /// acquired with its recorded regions; an interrupted resync goes on. A
    /// pair it does not know may differ anywhere, so it is resynchronized
    /// whole before it is reported Synchronized — by comparing digests chunk
    /// by chunk and copying what differs, which is how a fresh array (all
    /// zeros on both sides) is known to need no copy.
    ///
    /// A pair a usable journal has no record of is a new pair (first start
    /// on this array): logged at INFO. A journal deleted since cannot be told
    /// apart from that at start, so the compare warns if it finds the two
    /// sides differ. An unusable journal, or a record that names another
    /// origin, mate or size, is a lost journal: logged at WARN at once.
    pub async fn start(
        array: Arc<dyn ArrayPort>,
        pairs: Vec<PairInfo>,
        journal: Option<(Arc<Journal>, BTreeMap<PairKey, DurableVolume>)>,
        config: ManagerConfig,
        cancel: CancellationToken,
        tasks: TaskTracker,
    ) -> Result<Arc<Self>, DbError> {
        let (journal, durable) = match journal {
            Some((journal, durable)) => (Some(journal), durable),
            None => {
                tracing::warn!("running without a journal: a crash may lose snapshot differences");
                (None, BTreeMap::new())
            }
        };
        if config.array_mode == ArrayModeKeeping::Stateful {
            if config.resync_method == ResyncMethod::WriteBack {
                return Err(DbError::InvalidArgument(
                    "--array-mode stateful needs --resync offload: a stateful array refuses the \
                     host's writes to a mate while it resynchronizes"
                        .into(),
                ));
            }
            if config.host_mirroring {
                return Err(DbError::InvalidArgument(
                    "host mirroring writes the mate directly, which a stateful array refuses"
                        .into(),
                ));
            }
        }
        let mates = mate_numbers(&pairs)?;
        let pair_keys: Vec<PairKey> = pairs.iter().map(PairKey::of).collect();
        if let Some(several) = pairs.iter().zip(&mates).find(|(_, mate)| **mate > 1)
            && config.array_mode != ArrayModeKeeping::Stateful
        {
            return Err(DbError::InvalidArgument(format!(
                "mirror LU {} has several mates: they need --array-mode stateful (only an \
                 array that holds each pair's mode can send a write to the origin and the \
                 synchronized mates alone)",
                several.0.mirror_lu
            )));
        }
        let save_areas = cow::check_save_areas(array.as_ref(), &pairs, &config).await?;
        let mut volumes = BTreeMap::new();
        for (pair, mate) in pairs.into_iter().zip(mates) {
            let known = durable.get(&PairKey::of(&pair)).filter(|d| {
                (d.origin_lu, d.mate_lu, d.block_count)
                    == (pair.origin_lu, pair.mate_lu, pair.block_count)
            });
            let mut inner = VolumeInner {
                state: PairState::Synchronized,
                table: UpdateLocationTable::new(),
                last_deleted_by: None,
                resync: ResyncProgress::default(),
                full_resync_reason: None,
                full_resync_pending: false,
                full_resync_new_pair: false,
                resync_parent: Default::default(),
                mate_access: MateAccess::Unknown,
                last_restore_ended: None,
                last_reverse: None,
                reverse_blocks: (0, 0),
                compare_copied_chunks: None,
                cow: CowImage::None,
                array_mode: KnownArrayMode::Unknown("not read from the array yet".into()),
            };
            match (&journal, known) {
                (None, _) => {}
                (Some(journal), Some(d)) => {
                    inner.state = d.state.clone();
                    if let PairState::CowSnapshot { holder, .. } = &d.state {
                        // The save-area map was in memory: the image is gone.
                        // The pair never split, so it is Synchronized unless
                        // a write failed meanwhile (its range is recorded).
                        let state = if d.regions.is_empty() {
                            PairState::Synchronized
                        } else {
                            PairState::Resynchronizing
                        };
                        journal.record_state(&pair, &state, false).await?;
                        tracing::warn!(volume = pair.mirror_lu, holder, "{}", cow::RESTART_REASON);
                        inner.cow = CowImage::Invalidated {
                            holder: holder.clone(),
                            reason: cow::RESTART_REASON.to_string(),
                            used_blocks: 0,
                        };
                        inner.state = state;
                    }
                    for region in d.regions.iter() {
                        inner.table.insert(region.clone());
                    }
                    inner.last_restore_ended = d
                        .ended_restore
                        .clone()
                        .map(|run_id| (run_id, Self::ended_before_restart(&inner.state)));
                    if d.full_resync {
                        inner.full_resync_pending = true;
                        inner.full_resync_reason =
                            Some("a whole-volume resync was interrupted; starting it again".into());
                    }
                    tracing::info!(
                        volume = pair.mirror_lu,
                        state = ?inner.state,
                        recorded_blocks = inner.table.block_count(),
                        "restored from the journal"
                    );
                }
                (Some(journal), None) => {
                    // An unusable journal was set aside: whatever it said
                    // about this pair (a snapshot included) cannot be
                    // trusted, and the reason says where it was damaged.
                    let lost = match journal.unusable_reason() {
                        Some(why) => Some(format!("journal unusable: {why}")),
                        None if durable.contains_key(&PairKey::of(&pair))
                            || durable.keys().any(|key| {
                                key.volume == pair.mirror_lu && !pair_keys.contains(key)
                            }) =>
                        {
                            Some(
                            "the journal's record of this volume names another origin, mate or \
                             size"
                                .to_string(),
                            )
                        }
                        None => None,
                    };
                    let reason = match lost {
                        Some(lost) => {
                            let reason = format!("{lost}: origin and mate may differ anywhere");
                            tracing::warn!(
                                volume = pair.mirror_lu,
                                "{reason}; resynchronizing the whole volume"
                            );
                            reason
                        }
                        None => {
                            let reason = "new pair: comparing origin and mate (no usable \
                                          journal record for this volume)";
                            tracing::info!(volume = pair.mirror_lu, "{reason}");
                            inner.full_resync_new_pair = true;
                            reason.to_string()
                        }
                    };
                    journal
                        .record_state(&pair, &PairState::Resynchronizing, true)
                        .await?;
                    inner.state = PairState::Resynchronizing;
                    inner.full_resync_pending = true;
                    inner.full_resync_reason = Some(reason);
                }
            }
            let volume = Volume {
                pair,
                mate,
                save_area: save_areas.get(&pair.mirror_lu).copied(),
                mode_gate: RwLock::new(()),
                blocks: RangeLock::new(),
                inner: Mutex::new(inner),
                resync_wakeup: Notify::new(),
            };
            volumes.insert(PairRef::new(pair.mirror_lu, mate), Arc::new(volume));
        }
        let resync_pace = config.resync_max_bytes_per_s.map(RateLimit::new);
        let masking = array.identity().is_some();
        let restore_writer = match array.identity() {
            None => None,
            Some(own) if own == config.restore_writer => {
                tracing::warn!(
                    "the restore writer {own:?} is db-server's own identity: a restore sets no \
                     grant (db-server may write its pairs anyway)"
                );
                None
            }
            Some(_) => Some(config.restore_writer.clone()),
        };
        let manager = Arc::new(Self {
            masking,
            restore_writer,
            array,
            journal,
            volumes,
            resync_pace,
            config,
            cancel,
            tasks,
        });
        manager.reconcile_array_modes().await?;
        manager.reconcile_mate_access().await?;
        manager.reconcile_restore_access().await?;
        // A reverse resync a crash interrupted is finished before anything
        // is served from the volume (and before the ledger opens on it).
        manager.finish_interrupted_reverse_resyncs().await?;
        for volume in manager.volumes.values() {
            let manager = manager.clone();
            let volume = volume.clone();
            manager.tasks.clone().spawn(async move {
                manager.resync_loop(volume).await;
            });
        }
        Ok(manager)
    }

    /// Data bytes exchanged with the array so far.
    pub fn traffic(&self) -> crate::array_port::Traffic {
        self.array.traffic()
    }

    /// How fast a resync's copies may go now: the array's adaptive pace
    /// (asked with a timeout of [`PACE_TIMEOUT`]; `None` if it does not
    /// answer, or does not pace) within this server's resync limits.
    pub async fn background_pace(&self) -> Option<ResyncPace> {
        let array = match tokio::time::timeout(PACE_TIMEOUT, self.array.pace()).await {
            Ok(Ok(Some(report))) => report,
            Ok(Ok(None)) => return None,
            Ok(Err(error)) => {
                tracing::debug!("asking the array's pace: {error:#}");
                return None;
            }
            Err(_) => {
                tracing::debug!("asking the array's pace: no answer within {PACE_TIMEOUT:?}");
                return None;
            }
        };
        Some(ResyncPace::new(
            array,
            self.config.resync_min_bytes_per_s,
            self.config.resync_max_bytes_per_s,
        ))
    }

    /// The journal's counters, if there is a journal.
    pub fn journal_stats(&self) -> Option<crate::journal::JournalStats> {
        self.journal.as_ref().map(|j| j.stats())
    }

    /// Stops the journal thread (after the tasks that write it have ended).
    pub fn close_journal(&self) {
        if let Some(journal) = &self.journal {
            journal.close();
        }
    }

    /// Makes the array's masking of every mate agree with the journal, at
    /// start-up before anything is written: a held snapshot's mate
    /// read-only, every other mate as configured. So a crash between a
    /// `SetAccess` and the journal record it goes with (either order)
    /// leaves neither a held snapshot writable nor a resync unable to write
    /// the mate. A failure stops the start: an array that refuses db-server
    /// its own masking is misconfigured, better found now than at the
    /// first backup.
    async fn reconcile_mate_access(&self) -> Result<(), DbError> {
        if !self.masking {
            for vol in self.volumes.values() {
                vol.inner().mate_access = MateAccess::Known(OwnAccess::Configured);
            }
            return Ok(());
        }
        for vol in self.volumes.values() {
            // The mate stays frozen while a reverse resync copies it back.
            let holder = match &vol.inner().state {
                PairState::Snapshot { holder, .. }
                | PairState::RestoringToSnapshot { holder, .. } => Some(holder.clone()),
                _ => None,
            };
            match holder {
                Some(holder) => {
                    let purpose = format!("snapshot of run {holder} (restored at start-up)");
                    self.set_mate_access(vol, OwnAccess::Read, &purpose).await?;
                }
                None => {
                    self.set_mate_access(vol, OwnAccess::Configured, "no snapshot held")
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Asks the array for db-server's own `access` to the pair's mate and
    /// remembers the outcome (unknown after a failure). Nothing to do
    /// when the array masks nothing.
    async fn set_mate_access(
        &self,
        vol: &Volume,
        access: OwnAccess,
        purpose: &str,
    ) -> Result<(), DbError> {
        if !self.masking {
            return Ok(());
        }
        let result = self
            .array
            .set_own_access(vol.pair.mate_lu, access, purpose)
            .await;
        vol.inner().mate_access = match &result {
            Ok(()) => MateAccess::Known(access),
            Err(_) => MateAccess::Unknown,
        };
        match result {
            Ok(()) => {
                tracing::info!(
                    volume = vol.volume(),
                    mate_lu = vol.pair.mate_lu,
                    ?access,
                    purpose,
                    "mate access set"
                );
                Ok(())
            }
            Err(error) => {
                tracing::warn!(
                    volume = vol.volume(),
                    mate_lu = vol.pair.mate_lu,
                    ?access,
                    purpose,
                    "setting the mate's access failed: {error}"
                );
                Err(error.into())
            }
        }
    }

    /// [`Self::set_mate_access`] unless the array is known to hold `access`
    /// already (a retried acquire, a resync after a delete that set it).
    async fn ensure_mate_access(
        &self,
        vol: &Volume,
        access: OwnAccess,
        purpose: &str,
    ) -> Result<(), DbError> {
        if vol.inner().mate_access == MateAccess::Known(access) {
            return Ok(());
        }
        self.set_mate_access(vol, access, purpose).await
    }

    /// Undoes a `SetAccess` whose step failed afterwards, as far as the
    /// array lets it; a failure leaves the access unknown, which the next
    /// acquire, delete or resync step sets again.
    async fn undo_mate_access(&self, vol: &Volume, access: OwnAccess, purpose: &str) {
        if let Err(error) = self.set_mate_access(vol, access, purpose).await {
            tracing::error!(
                volume = vol.volume(),
                "undoing the mate's access after a failed mode change: {error}"
            );
        }
    }

    async fn journal_state(&self, pair: &PairInfo, state: &PairState) -> Result<(), DbError> {
        match &self.journal {
            Some(journal) => journal.record_state(pair, state, false).await,
            None => Ok(()),
        }
    }

    async fn journal_intent(&self, pair: &PairInfo, blocks: Range<u64>) -> Result<(), DbError> {
        match &self.journal {
            Some(journal) => journal.record_intent(pair, blocks).await,
            None => Ok(()),
        }
    }

    /// The rows of Fig. 10 for `pair` in `state`; with a stateful array
    /// the data virtual LU reads and writes the mirror LU in every mode
    /// (the array splits it), not the origin.
    fn routing(&self, pair: &PairInfo, state: &PairState) -> Routing {
        let mut routing = state.routing(pair);
        if self.stateful() {
            routing.data_read_lu = pair.mirror_lu;
            routing.data_write_lu = pair.mirror_lu;
        }
        routing
    }

    pub fn volume_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.volumes.keys().map(|key| key.volume).collect();
        ids.dedup();
        ids
    }

    /// The pair of `which` (a volume, or a volume and one of its mates).
    pub fn pair(&self, which: impl Into<PairRef>) -> Result<PairInfo, DbError> {
        Ok(self.volume(which)?.pair)
    }

    /// How many mates `volume` has.
    pub fn mate_count(&self, volume: u32) -> Result<u32, DbError> {
        match self.pairs_of(volume).len() as u32 {
            0 => Err(DbError::UnknownVolume(volume)),
            count => Ok(count),
        }
    }

    /// The pair of `which`: an unknown volume is NOT_FOUND, a mate the
    /// volume does not have is refused as a bad argument.
    fn volume(&self, which: impl Into<PairRef>) -> Result<&Arc<Volume>, DbError> {
        let which = which.into();
        if let Some(vol) = self.volumes.get(&which) {
            return Ok(vol);
        }
        let count = self.mate_count(which.volume)?;
        Err(DbError::InvalidArgument(format!(
            "volume {} has {count} mate{}: there is no mate {}",
            which.volume,
            if count == 1 { "" } else { "s" },
            which.mate
        )))
    }

    /// Every pair of `volume`, mate 1 first (empty for an unknown volume).
    fn pairs_of(&self, volume: u32) -> Vec<&Arc<Volume>> {
        self.volumes
            .range(PairRef::new(volume, 1)..=PairRef::new(volume, u32::MAX))
            .map(|(_, vol)| vol)
            .collect()
    }

    /// The blocks `lba..lba + blocks` of `volume`: an existing volume, at
    /// least one block, none past its end.
    pub fn check_range(&self, volume: u32, lba: u64, blocks: u64) -> Result<Range<u64>, DbError> {
        self.volume(volume)?.check_range(lba, blocks)
    }

    /// The blocks a write of `data_bytes` bytes at `lba` covers: an
    /// existing volume, a positive whole number of its blocks, none past
    /// its end.
    pub fn check_write(
        &self,
        volume: u32,
        lba: u64,
        data_bytes: usize,
    ) -> Result<Range<u64>, DbError> {
        self.volume(volume)?.check_write(lba, data_bytes)
    }

    /// Refuses at once, naming the restore, when the volume is offline for
    /// one (a streamed Read checks this before its first chunk, so that the
    /// refusal is the call's answer, not a failed stream).
    pub fn check_online(&self, volume: u32) -> Result<(), DbError> {
        self.volume(volume)?;
        for vol in self.pairs_of(volume) {
            refuse_if_restoring(volume, &vol.inner().state)?;
        }
        Ok(())
    }

    /// Reads from the READ destination of the virtual LU.
    pub async fn read(
        &self,
        which: impl Into<PairRef>,
        target: VirtualLu,
        lba: u64,
        blocks: u64,
    ) -> Result<Vec<u8>, DbError> {
        let which = which.into();
        let volume = which.volume;
        let vol = self.volume(which)?;
        let range = vol.check_range(lba, blocks)?;
        self.check_online(volume)?;
        // A copy-on-write snapshot is read through its map; an invalidated
        // one is refused with its reason.
        let cow_read = {
            let inner = vol.inner();
            if target == VirtualLu::Snapshot {
                inner.cow.check_valid(volume)?;
            }
            target == VirtualLu::Snapshot && matches!(inner.state, PairState::CowSnapshot { .. })
        };
        if cow_read {
            return self.read_cow_snapshot(vol, range).await;
        }
        // A stateful array routes by its own modes: the read holds the
        // mode gates shared so that the modes it relies on are the states'
        // (the data LU's read of the mirror LU may be served by the origin
        // or any synchronized mate, so it relies on every pair's).
        let relied_on = match target {
            VirtualLu::Data => self.pairs_of(volume),
            VirtualLu::Snapshot => vec![vol],
        };
        let mut _modes = Vec::new();
        if self.stateful() {
            for pair in &relied_on {
                _modes.push(pair.mode_gate.read().await);
            }
        }
        for pair in &relied_on {
            self.ensure_array_mode(pair).await?;
        }
        self.check_online(volume)?;
        let lu = {
            let inner = vol.inner();
            let routing = self.routing(&vol.pair, &inner.state);
            match target {
                VirtualLu::Data => routing.data_read_lu,
                VirtualLu::Snapshot => routing
                    .snapshot_lu
                    .ok_or(DbError::Undefined { volume, target })?,
            }
        };
        Ok(self.array.read(lu, lba, blocks).await?)
    }

    /// The write path of Fig. 5.
    ///
    /// - Snapshot mode: record the range, then write the WRITE destination
    ///   (origin for the data LU, mate for the snapshot LU).
    /// - Resynchronizing: write the mirror LU, and once the array has
    ///   acknowledged it (both sides hold it), remove the range.
    /// - Synchronized: write the mirror LU.
    ///
    /// A write to the data LU of a volume with several mates is one write
    /// of the mirror LU (the stateful array sends it to the origin and the
    /// mates whose pair takes it), and each pair plays its part of the
    /// above: recorded in every split pair's table, removed from every
    /// resynchronizing pair's. A write to a snapshot LU concerns its own
    /// pair alone.
    ///
    /// A write whose outcome is unknown leaves its range recorded, and the
    /// pair is not Synchronized until the range is copied.
    pub async fn write(
        &self,
        which: impl Into<PairRef>,
        target: VirtualLu,
        lba: u64,
        data: Vec<u8>,
    ) -> Result<u64, DbError> {
        let which = which.into();
        let volume = which.volume;
        let vol = self.volume(which)?;
        let range = vol.check_write(lba, data.len())?;
        let blocks = range.end - range.start;
        let pairs = match target {
            VirtualLu::Data => self.pairs_of(volume),
            VirtualLu::Snapshot => vec![vol],
        };
        // Every pair's gate and blocks, in mate order (a mode change takes
        // one pair's gate alone, so no two writers wait on each other).
        let mut _modes = Vec::with_capacity(pairs.len());
        for pair in &pairs {
            _modes.push(pair.mode_gate.read().await);
        }
        for pair in &pairs {
            self.ensure_array_mode(pair).await?;
        }
        // Under a copy-on-write snapshot (a single-mate volume) a write
        // holds its blocks exclusively: saving the pre-update data and
        // writing the new data is one step to the snapshot's readers (which
        // hold them shared) and to other writers of the same blocks. The
        // state cannot change while the mode gate is held.
        let cow_held = matches!(vol.inner().state, PairState::CowSnapshot { .. });
        let lock_mode = if cow_held {
            LockMode::Exclusive
        } else {
            LockMode::Shared
        };
        let mut _blocks = Vec::with_capacity(pairs.len());
        for pair in &pairs {
            _blocks.push(pair.blocks.lock(range.clone(), lock_mode).await);
        }
        let mut parts = Vec::with_capacity(pairs.len());
        for pair in &pairs {
            parts.push(self.route_write(pair, target, range.clone())?);
        }
        // Each pair's part names the same LU: the mirror LU for the data
        // LU (a volume with several mates has a stateful array), the mate
        // for its snapshot LU.
        let lu = parts[0].0;
        debug_assert!(parts.iter().all(|(part_lu, _)| *part_lu == lu));
        if cow_held {
            self.save_before_write(vol, range.clone()).await?;
        }
        // Durability rule 1: the range is durable before the write that
        // dirties it reaches the array.
        let dirtied: Vec<&Arc<Volume>> = pairs
            .iter()
            .zip(&parts)
            .filter(|(_, (_, mode))| *mode == Mode::Snapshot)
            .map(|(pair, _)| *pair)
            .collect();
        let intent_first = self.config.journals_intent_first();
        if intent_first {
            for pair in &dirtied {
                self.journal_intent(&pair.pair, range.clone()).await?;
            }
            if !dirtied.is_empty() {
                crash::point("write.after_intent");
            }
        }
        let written = self.write_lu(&vol.pair, lu, lba, data).await;
        crash::point("write.after_array");
        if !intent_first {
            for pair in &dirtied {
                self.journal_intent(&pair.pair, range.clone()).await?;
            }
        }
        match written {
            Ok(()) => {
                for (pair, (_, mode)) in pairs.iter().zip(&parts) {
                    if *mode == Mode::Resynchronizing {
                        pair.inner().table.remove(range.clone());
                    }
                }
                Ok(blocks)
            }
            Err(error) => {
                for pair in &pairs {
                    self.record_unknown_outcome(pair, range.clone(), &error)
                        .await;
                }
                Err(error.into())
            }
        }
    }

    /// Where one pair sends a write of `range` to `target`, and in which
    /// mode (Snapshot: `range` is recorded in its table now); refused when
    /// the pair's state forbids it.
    fn route_write(
        &self,
        vol: &Volume,
        target: VirtualLu,
        range: Range<u64>,
    ) -> Result<(u32, Mode), DbError> {
        let volume = vol.volume();
        let mut inner = vol.inner();
        refuse_if_restoring(volume, &inner.state)?;
        let routing = self.routing(&vol.pair, &inner.state);
        let record = self.config.records_snapshot_writes();
        match (target, &inner.state) {
            (VirtualLu::Data, PairState::Snapshot { .. }) => {
                if record {
                    inner.table.insert(range);
                }
                Ok((routing.data_write_lu, Mode::Snapshot))
            }
            (VirtualLu::Data, _) => Ok((routing.data_write_lu, routing.data_mode)),
            (VirtualLu::Snapshot, PairState::Snapshot { writable, .. })
                if !writable && (self.masking || self.stateful()) =>
            {
                // The array masks the frozen mate read-only (or its mode
                // refuses writes to it): refused here, before anything is
                // recorded or sent.
                Err(DbError::SnapshotReadOnly {
                    volume,
                    mate_lu: vol.pair.mate_lu,
                })
            }
            (VirtualLu::Snapshot, PairState::Snapshot { .. }) => {
                // Writes to the snapshot also make origin and mate differ.
                if record {
                    inner.table.insert(range);
                }
                Ok((vol.pair.mate_lu, Mode::Snapshot))
            }
            (VirtualLu::Snapshot, PairState::CowSnapshot { .. }) => {
                Err(DbError::CowSnapshotReadOnly { volume })
            }
            (VirtualLu::Snapshot, _) => Err(DbError::Undefined { volume, target }),
        }
    }

    /// A write whose outcome is unknown may have reached one side and not
    /// the other: its range stays recorded (and journaled), and a
    /// Synchronized pair becomes Resynchronizing until the range is copied.
    async fn record_unknown_outcome(
        &self,
        vol: &Volume,
        range: Range<u64>,
        error: &crate::array_port::ClientError,
    ) {
        let was_synchronized = {
            let mut inner = vol.inner();
            inner.table.insert(range.clone());
            inner.state == PairState::Synchronized
        };
        if let Err(e) = self.journal_intent(&vol.pair, range).await {
            tracing::error!(
                volume = vol.volume(),
                "journaling a failed write's range: {e}"
            );
        }
        if was_synchronized {
            tracing::warn!(
                volume = vol.volume(),
                "a write to the mirror LU failed; resynchronizing its range: {error}"
            );
            if let Err(e) = self
                .journal_state(&vol.pair, &PairState::Resynchronizing)
                .await
            {
                tracing::error!(
                    volume = vol.volume(),
                    "journaling the switch to Resynchronizing: {e}"
                );
            }
            {
                let mut inner = vol.inner();
                if inner.state == PairState::Synchronized {
                    inner.state = PairState::Resynchronizing;
                    inner.resync = ResyncProgress::default();
                }
            }
            self.try_follow_array_mode(vol, &PairState::Resynchronizing, "a write failed")
                .await;
        }
        vol.resync_wakeup.notify_one();
    }

    /// Splits the pair (Synchronized → Snapshot): from now on writes go to
    /// the origin alone and the mate LU is the frozen image, taken at
    /// `ledger_sequence`. Answers the snapshot held afterwards — the new one
    /// with its new id, or, when `run_id` already held it (a retry), that
    /// one — read under the mode gate so that no delete and re-acquire can
    /// slip in between.
    pub async fn acquire(
        &self,
        which: impl Into<PairRef>,
        run_id: &str,
        ledger_sequence: u64,
    ) -> Result<AcquireOutcome, DbError> {
        self.acquire_by(which, run_id, ledger_sequence, self.config.snapshot_method)
            .await
    }

    /// The method an acquire that names none uses (`--snapshot-method`).
    pub fn default_snapshot_method(&self) -> SnapshotMethod {
        self.config.snapshot_method
    }

    /// [`Self::acquire`] by `method`: a split (above), or a copy-on-write
    /// snapshot, which journals [`PairState::CowSnapshot`] and changes
    /// nothing at the array (no split, no masking). A retry answers the
    /// snapshot held, whatever its method.
    pub async fn acquire_by(
        &self,
        which: impl Into<PairRef>,
        run_id: &str,
        ledger_sequence: u64,
        method: SnapshotMethod,
    ) -> Result<AcquireOutcome, DbError> {
        self.acquire_with(which, run_id, ledger_sequence, method, false)
            .await
    }

    /// [`Self::acquire_by`], and `writable`: a split snapshot whose mate
    /// (the snapshot virtual LU) may be written while it is held — the
    /// mate is not masked read-only, a stateful array is told
    /// SNAPSHOT with the mate writable, and the writes are recorded and
    /// resynced like the origin's. Refused with copy-on-write.
    pub async fn acquire_with(
        &self,
        which: impl Into<PairRef>,
        run_id: &str,
        ledger_sequence: u64,
        method: SnapshotMethod,
        writable: bool,
    ) -> Result<AcquireOutcome, DbError> {
        let which = which.into();
        let (volume, mate) = (which.volume, which.mate);
        let vol = self.volume(which)?;
        if method == SnapshotMethod::Cow {
            let mates = self.mate_count(volume)?;
            if mates > 1 {
                return Err(DbError::InvalidArgument(format!(
                    "volume {volume} has {mates} mates: copy-on-write snapshots are built for a \
                     volume with one (split one of its mates instead)"
                )));
            }
            if writable {
                return Err(DbError::InvalidArgument(
                    "a copy-on-write snapshot cannot be writable (its image is the save area \
                     over the mate)"
                        .into(),
                ));
            }
            return self.acquire_cow(vol, run_id, ledger_sequence).await;
        }
        let _mode = vol.mode_gate.write().await;
        // Another mate's reverse resync holds the volume offline: its
        // origin is being rewritten.
        for other in self.pairs_of(volume) {
            if other.mate == mate {
                continue;
            }
            if let Some((holder, _)) = other.inner().state.restore() {
                return Err(DbError::RestoreHeld {
                    volume,
                    action: "acquire a snapshot of",
                    holder: holder.to_string(),
                });
            }
        }
        let purpose = format!("snapshot of run {run_id}");
        // The mate's access while held: read-only, unless writable.
        let held_access = |writable: bool| match writable {
            true => OwnAccess::Configured,
            false => OwnAccess::Read,
        };
        if let Some(retried) = vol.check_acquirable(run_id)? {
            if retried.snapshot.method == SnapshotMethod::Cow {
                // A copy-on-write snapshot masks nothing: nothing to repair.
                return Ok(retried);
            }
            // A retry also repairs a mate whose masking was lost (a
            // SetAccess that failed to be undone), and an array mode left
            // unknown.
            self.ensure_mate_access(vol, held_access(retried.snapshot.writable), &purpose)
                .await?;
            self.ensure_array_mode(vol).await?;
            return Ok(retried);
        }
        // The mate is masked read-only before the split is journaled: a
        // refusal leaves nothing to undo in the journal, and a crash
        // between the two is repaired at start-up (the journal decides).
        // The mode gate keeps every write out meanwhile, so no write to
        // the mirror LU meets the read-only mate.
        if let Err(error) = self
            .set_mate_access(vol, held_access(writable), &purpose)
            .await
        {
            self.undo_mate_access(vol, OwnAccess::Configured, "the acquire failed")
                .await;
            return Err(error);
        }
        // Durability rule 2: the mode change is durable before it takes
        // effect. The mode gate keeps every write out meanwhile.
        let snapshot_id = new_snapshot_id();
        let state = PairState::Snapshot {
            holder: run_id.to_string(),
            ledger_sequence,
            snapshot_id,
            writable,
        };
        if let Err(error) = self.journal_state(&vol.pair, &state).await {
            self.undo_mate_access(vol, OwnAccess::Configured, "the acquire failed")
                .await;
            return Err(error);
        }
        crash::point("acquire.after_journal");
        // A stateful array splits the pair now. If it does not, the acquire
        // is undone: the journal says Synchronized again (nothing was
        // written meanwhile: the mode gate is held) and the array is asked
        // for SYNCHRONIZED; if that fails too, its mode stays unknown and
        // every Read and Write sets it again first.
        if let Err(error) = self.follow_array_mode(vol, &state, &purpose).await {
            self.undo_split(vol, &purpose).await;
            return Err(error);
        }
        crash::point("acquire.after_mode_select");
        let mut inner = vol.inner();
        inner.state = state;
        inner.last_deleted_by = None;
        inner.cow = CowImage::None;
        tracing::info!(
            volume,
            mate,
            run_id,
            snapshot_id,
            writable,
            "snapshot acquired"
        );
        Ok(AcquireOutcome {
            already_held: false,
            snapshot: vol.held_snapshot(&inner.state).expect("held"),
        })
    }

    /// Undoes a split whose `ModeSelect` failed after its journal record:
    /// Synchronized journaled again, the array asked for SYNCHRONIZED, the
    /// mate's access as configured. Failures are logged: an unknown array
    /// mode is set again before the next Read or Write; a journal that
    /// cannot record refuses every further change.
    async fn undo_split(&self, vol: &Volume, purpose: &str) {
        let undo = format!("{purpose}: the array did not split the pair");
        if let Err(error) = self
            .journal_state(&vol.pair, &PairState::Synchronized)
            .await
        {
            tracing::error!(
                volume = vol.volume(),
                "journaling Synchronized after a failed split: {error}"
            );
        }
        self.try_follow_array_mode(vol, &PairState::Synchronized, &undo)
            .await;
        self.undo_mate_access(vol, OwnAccess::Configured, &undo)
            .await;
    }

    /// Releases the snapshot (Snapshot → Resynchronizing) and wakes the
    /// resync. Refused when another run holds the snapshot, unless `force`.
    pub async fn delete(
        &self,
        which: impl Into<PairRef>,
        run_id: &str,
        force: bool,
    ) -> Result<DeleteOutcome, DbError> {
        let which = which.into();
        let (volume, mate) = (which.volume, which.mate);
        let vol = self.volume(which)?;
        let _mode = vol.mode_gate.write().await;
        let cow_held_by = match &vol.inner().state {
            PairState::CowSnapshot { holder, .. } => Some(holder.clone()),
            _ => None,
        };
        if let Some(holder) = cow_held_by {
            if holder != run_id && !force {
                return Err(DbError::HeldByOther {
                    volume,
                    holder,
                    requester: run_id.to_string(),
                });
            }
            return self.delete_cow(vol, run_id).await;
        }
        let holder = {
            let mut inner = vol.inner();
            match &inner.state {
                // A copy-on-write snapshot a restart invalidated: the pair
                // never split, there is nothing to resync.
                _ if inner
                    .cow
                    .invalidated_holder()
                    .is_some_and(|h| h == run_id || force) =>
                {
                    inner.cow = CowImage::None;
                    inner.last_deleted_by = Some(run_id.to_string());
                    tracing::info!(volume, run_id, "invalidated copy-on-write snapshot deleted");
                    return Ok(DeleteOutcome {
                        ranges_to_resync: inner.table.range_count() as u64,
                        blocks_to_resync: inner.table.block_count(),
                        already_deleted: false,
                    });
                }
                PairState::Snapshot { holder, .. } => {
                    if holder != run_id && !force {
                        return Err(DbError::HeldByOther {
                            volume,
                            holder: holder.clone(),
                            requester: run_id.to_string(),
                        });
                    }
                    holder.clone()
                }
                PairState::Restoring { run_id: holder, .. }
                | PairState::RestoringToSnapshot { holder, .. } => {
                    return Err(DbError::RestoreHeld {
                        volume,
                        action: "delete the snapshot of",
                        holder: holder.clone(),
                    });
                }
                _ if inner.last_deleted_by.as_deref() == Some(run_id) => {
                    return Ok(DeleteOutcome {
                        ranges_to_resync: inner.table.range_count() as u64,
                        blocks_to_resync: inner.table.block_count(),
                        already_deleted: true,
                    });
                }
                other => {
                    return Err(DbError::WrongMode {
                        volume,
                        action: "delete the snapshot of",
                        mode: other.refusal_mode(&vol.pair),
                    });
                }
            }
        };
        // The mate is writable again before the pair resynchronizes: every
        // write to the mirror LU and every copy of the resync writes it. Set
        // before the journal record, so that a refusal leaves the snapshot
        // held and unchanged; a crash between the two is repaired at
        // start-up.
        let held_purpose = format!("snapshot of run {holder}");
        let purpose = format!("{held_purpose} deleted: resynchronizing");
        if let Err(error) = self
            .set_mate_access(vol, OwnAccess::Configured, &purpose)
            .await
        {
            self.undo_mate_access(vol, OwnAccess::Read, &held_purpose)
                .await;
            return Err(error);
        }
        if let Err(error) = self
            .journal_state(&vol.pair, &PairState::Resynchronizing)
            .await
        {
            self.undo_mate_access(vol, OwnAccess::Read, &held_purpose)
                .await;
            return Err(error);
        }
        crash::point("delete.after_journal");
        // The journal says Resynchronizing now and is not undone (undoing
        // would journal Snapshot, which drops the recorded ranges): if the
        // array does not take RESYNCHRONIZING, its mode stays unknown and
        // the resync and every Read and Write set it again first.
        self.try_follow_array_mode(vol, &PairState::Resynchronizing, &purpose)
            .await;
        crash::point("delete.after_mode_select");
        let mut inner = vol.inner();
        inner.state = PairState::Resynchronizing;
        inner.last_deleted_by = Some(run_id.to_string());
        inner.resync_parent = splitmirror_proto::telemetry::TraceParent::current();
        inner.resync = ResyncProgress {
            running: true,
            ranges_done: 0,
            bytes_done: 0,
            ranges_total: inner.table.range_count() as u64,
            bytes_total: inner.table.block_count() * u64::from(vol.pair.block_size_bytes),
        };
        let outcome = DeleteOutcome {
            ranges_to_resync: inner.table.range_count() as u64,
            blocks_to_resync: inner.table.block_count(),
            already_deleted: false,
        };
        drop(inner);
        vol.resync_wakeup.notify_one();
        tracing::info!(
            volume,
            mate,
            run_id,
            ranges = outcome.ranges_to_resync,
            blocks = outcome.blocks_to_resync,
            "snapshot deleted, resynchronizing"
        );
        Ok(outcome)
    }

    /// The snapshot the volume holds, if one is acquired.
    pub fn snapshot_of(&self, which: impl Into<PairRef>) -> Result<Option<HeldSnapshot>, DbError> {
        let vol = self.volume(which)?;
        Ok(vol.held_snapshot(&vol.inner().state))
    }

    /// Refuses, with the reason, when the volume's copy-on-write snapshot
    /// was invalidated (its save area filled up, or db-server restarted
    /// while it was held) and its holder has not deleted it yet.
    pub fn check_snapshot_valid(&self, which: impl Into<PairRef>) -> Result<(), DbError> {
        let which = which.into();
        self.volume(which)?.inner().cow.check_valid(which.volume)
    }

    /// The holder of the pair's snapshot, if one is acquired.
    pub fn holder(&self, which: impl Into<PairRef>) -> Result<Option<String>, DbError> {
        Ok(self
            .volume(which)?
            .inner()
            .state
            .holder()
            .map(str::to_string))
    }

    pub fn status(&self) -> Vec<VolumeStatus> {
        self.volumes
            .values()
            .map(|vol| {
                let inner = vol.inner();
                VolumeStatus {
                    volume: vol.volume(),
                    mate: vol.mate,
                    pair: vol.pair,
                    routing: self.routing(&vol.pair, &inner.state),
                    holder: inner.state.holder().map(str::to_string),
                    dirty_ranges: inner.table.ranges(),
                    dirty_blocks: inner.table.block_count(),
                    resync: inner.resync,
                    full_resync_reason: inner.full_resync_reason.clone(),
                    restore: self.restore_status(&inner),
                    snapshot_method: match inner.state {
                        PairState::Snapshot { .. } => Some(SnapshotMethod::Split),
                        PairState::CowSnapshot { .. } => Some(SnapshotMethod::Cow),
                        _ => None,
                    },
                    save_area: vol.save_area.map(|area| SaveAreaStatus {
                        lu: area.lu,
                        capacity_blocks: area.capacity_blocks,
                        used_blocks: inner.cow.used_blocks(),
                    }),
                    snapshot_invalidated_reason: inner.cow.invalidated_reason(),
                    snapshot_writable: matches!(
                        inner.state,
                        PairState::Snapshot { writable: true, .. }
                    ),
                    array_mode: self.stateful().then(|| inner.array_mode.describe()),
                }
            })
            .collect()
    }

    /// Waits (at most `timeout`) until every pair of the volume is
    /// Synchronized.
    pub async fn wait_synchronized(&self, volume: u32, timeout: Duration) -> Result<(), DbError> {
        self.volume(volume)?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self
                .pairs_of(volume)
                .iter()
                .all(|vol| vol.inner().state == PairState::Synchronized)
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(DbError::NotSynchronized { volume, timeout });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Writes one LU; with host mirroring, a write to the mirror LU goes to
    /// origin and mate as two concurrent writes instead.
    async fn write_lu(
        &self,
        pair: &PairInfo,
        lu: u32,
        lba: u64,
        data: Vec<u8>,
    ) -> Result<(), crate::array_port::ClientError> {
        if self.config.host_mirroring && lu == pair.mirror_lu {
            let (origin, mate) = tokio::join!(
                self.array.write(pair.origin_lu, lba, data.clone()),
                self.array.write(pair.mate_lu, lba, data)
            );
            return origin.and(mate);
        }
        self.array.write(lu, lba, data).await
    }
}

/// Every Read and Write of a restoring volume is refused, naming the
/// restore.
fn refuse_if_restoring(volume: u32, state: &PairState) -> Result<(), DbError> {
    match state {
        PairState::Restoring { run_id, backup_id } => Err(DbError::Restoring {
            volume,
            run_id: run_id.clone(),
            backup_id: Some(backup_id.clone()),
        }),
        PairState::RestoringToSnapshot { holder, .. } => Err(DbError::Restoring {
            volume,
            run_id: holder.clone(),
            backup_id: None,
        }),
        _ => Ok(()),
    }
}

/// Each pair's mate number: counted from 1 per mirror LU, in the order the
/// array lists them. More than [`MAX_MATES`] mates is refused.
fn mate_numbers(pairs: &[PairInfo]) -> Result<Vec<u32>, DbError> {
    let mut seen: BTreeMap<u32, u32> = BTreeMap::new();
    pairs
        .iter()
        .map(|pair| {
            let mate = seen.entry(pair.mirror_lu).or_default();
            *mate += 1;
            match *mate <= MAX_MATES {
                true => Ok(*mate),
                false => Err(DbError::InvalidArgument(format!(
                    "mirror LU {} has more than {MAX_MATES} mates",
                    pair.mirror_lu
                ))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::array_port::MemoryArray;

    #[test]
    fn a_resync_cap_below_the_minimum_wins_over_it() {
        const MIB: u64 = 1 << 20;
        let array = splitmirror_proto::pace::PaceReport {
            rate_bytes_per_s: None,
            reason: splitmirror_proto::pace::PaceReason::Idle,
            min_bytes_per_s: 16 * MIB,
            max_bytes_per_s: None,
            background_bytes_per_s: 0,
            foreground_requests_per_s: 0,
            foreground_latency_us: 0,
            baseline_latency_us: 0,
            why: "full speed — idle".into(),
        };
        // The array's minimum (16 MiB/s) above the cap (8 MB/s): capped.
        let capped = ResyncPace::new(array.clone(), None, Some(8_000_000));
        assert!(capped.capped);
        assert_eq!(capped.rate_bytes_per_s, Some(8_000_000));
        assert_eq!(capped.guaranteed_min_bytes_per_s(), 8_000_000);
        // --resync-min-rate above the cap: the cap still wins.
        let capped = ResyncPace::new(array.clone(), Some(32 * MIB), Some(8_000_000));
        assert_eq!(capped.rate_bytes_per_s, Some(8_000_000));
        assert_eq!(capped.guaranteed_min_bytes_per_s(), 8_000_000);
        // Yielding below the minimum: held at the minimum.
        let slow = splitmirror_proto::pace::PaceReport {
            rate_bytes_per_s: Some(MIB),
            reason: splitmirror_proto::pace::PaceReason::Minimum,
            ..array
        };
        let held = ResyncPace::new(slow, Some(32 * MIB), None);
        assert!(!held.capped);
        assert_eq!(held.rate_bytes_per_s, Some(32 * MIB));
        assert_eq!(held.guaranteed_min_bytes_per_s(), 32 * MIB);
    }

    const PAIR: PairInfo = PairInfo {
        mirror_lu: 0,
        origin_lu: 1,
        mate_lu: 2,
        block_size_bytes: 512,
        block_count: 64,
    };

    fn start() -> (Arc<SnapshotManager>, Arc<MemoryArray>) {
        let array = Arc::new(MemoryArray::new(vec![PAIR]));
        let manager = futures_util::FutureExt::now_or_never(SnapshotManager::start(
            array.clone(),
            vec![PAIR],
            None,
            ManagerConfig::default(),
            CancellationToken::new(),
            TaskTracker::new(),
        ))
        .expect("without a journal the start does not wait")
        .expect("start");
        (manager, array)
    }

    fn mode(manager: &SnapshotManager) -> Mode {
        manager.status()[0].routing.data_mode
    }

    #[tokio::test]
    async fn snapshot_writes_are_recorded_and_resynced() {
        let (manager, array) = start();
        manager
            .write(0, VirtualLu::Data, 0, vec![1; 512])
            .await
            .expect("write");
        assert_eq!(array.lu(1), array.lu(2));
        manager.acquire(0, "run-a", 0).await.expect("acquire");
        manager
            .write(0, VirtualLu::Data, 8, vec![2; 1024])
            .await
            .expect("write");
        manager
            .write(0, VirtualLu::Snapshot, 20, vec![3; 512])
            .await
            .expect("write");
        assert_eq!(manager.status()[0].dirty_ranges, vec![8..10, 20..21]);
        assert_eq!(&array.lu(2)[8 * 512..9 * 512], &[0; 512], "mate frozen");
        assert_eq!(&array.lu(2)[20 * 512..21 * 512], &[3; 512]);
        let deleted = manager.delete(0, "run-a", false).await.expect("delete");
        assert_eq!((deleted.ranges_to_resync, deleted.blocks_to_resync), (2, 3));
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("resync");
        assert_eq!(array.lu(1), array.lu(2), "origin == mate after resync");
        assert!(manager.status()[0].dirty_ranges.is_empty());
    }

    #[tokio::test]
    async fn every_forbidden_transition_fails_and_changes_nothing() {
        let (manager, array) = start();
        // Synchronized: delete is refused, the snapshot LU is Undefined.
        assert!(matches!(
            manager.delete(0, "run-a", false).await,
            Err(DbError::WrongMode { .. })
        ));
        assert!(matches!(
            manager.read(0, VirtualLu::Snapshot, 0, 1).await,
            Err(DbError::Undefined { .. })
        ));
        assert!(matches!(
            manager.write(0, VirtualLu::Snapshot, 0, vec![0; 512]).await,
            Err(DbError::Undefined { .. })
        ));
        assert_eq!(mode(&manager), Mode::Synchronized);

        // Snapshot: a second acquire (another run) is refused; a delete by
        // another run is refused unless forced; the same run's acquire is a
        // retry.
        manager.acquire(0, "run-a", 0).await.expect("acquire");
        assert!(matches!(
            manager.acquire(0, "run-b", 0).await,
            Err(DbError::WrongMode { .. })
        ));
        assert!(
            manager
                .acquire(0, "run-a", 0)
                .await
                .expect("retry")
                .already_held,
            "same run: already held"
        );
        assert!(matches!(
            manager.delete(0, "run-b", false).await,
            Err(DbError::HeldByOther { .. })
        ));
        assert_eq!(mode(&manager), Mode::Snapshot);
        assert_eq!(manager.holder(0).expect("holder").as_deref(), Some("run-a"));

        // Resynchronizing (held there by a failing copy): acquire and a
        // delete by another run are refused, the snapshot LU is Undefined;
        // the same run's delete is a retry.
        manager
            .write(0, VirtualLu::Data, 3, vec![9; 512])
            .await
            .expect("write");
        array.fail_copies.store(true, Ordering::SeqCst);
        manager
            .delete(0, "run-b", true)
            .await
            .expect("forced delete");
        assert_eq!(mode(&manager), Mode::Resynchronizing);
        assert!(matches!(
            manager.acquire(0, "run-c", 0).await,
            Err(DbError::WrongMode { .. })
        ));
        assert!(matches!(
            manager.delete(0, "run-c", false).await,
            Err(DbError::WrongMode { .. })
        ));
        assert!(
            manager
                .delete(0, "run-b", false)
                .await
                .expect("retry")
                .already_deleted
        );
        assert!(matches!(
            manager.read(0, VirtualLu::Snapshot, 0, 1).await,
            Err(DbError::Undefined { .. })
        ));
        assert_eq!(
            manager.status()[0].dirty_ranges,
            vec![3..4],
            "table unchanged"
        );
        array.fail_copies.store(false, Ordering::SeqCst);
        manager
            .wait_synchronized(0, Duration::from_secs(10))
            .await
            .expect("resync after the array came back");
        assert_eq!(array.lu(1), array.lu(2));
    }

    #[tokio::test]
    async fn a_failed_write_leaves_its_range_recorded() {
        let (manager, array) = start();
        array.fail_writes.store(true, Ordering::SeqCst);
        assert!(
            manager
                .write(0, VirtualLu::Data, 5, vec![1; 1024])
                .await
                .is_err()
        );
        let status = &manager.status()[0];
        assert_eq!(
            status.routing.data_mode,
            Mode::Resynchronizing,
            "not Synchronized"
        );
        assert_eq!(status.dirty_ranges, vec![5..7]);
        array.fail_writes.store(false, Ordering::SeqCst);
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("copied, then synchronized");
    }

    /// A manager over `array` (which masks for db-server), with a journal
    /// in `dir`, started and synchronized.
    async fn start_masked(
        array: Arc<MemoryArray>,
        dir: &std::path::Path,
        cancel: CancellationToken,
    ) -> Arc<SnapshotManager> {
        let journal = Journal::open(dir, 4096).expect("journal");
        let manager = SnapshotManager::start(
            array,
            vec![PAIR],
            Some(journal),
            ManagerConfig::default(),
            cancel,
            TaskTracker::new(),
        )
        .await
        .expect("start");
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("synchronized");
        manager
    }

    fn grant(access: OwnAccess, purpose: &str) -> crate::array_port::GrantCall {
        crate::array_port::GrantCall {
            lu: PAIR.mate_lu,
            access,
            purpose: purpose.to_string(),
        }
    }

    /// With masking, the mate of a held snapshot is read-only for db-server
    /// itself (set before the split takes effect), the snapshot virtual LU
    /// refuses writes before recording anything, and the delete gives the
    /// mate back before the resync copies into it: no copy is ever refused.
    #[tokio::test]
    async fn a_held_snapshot_masks_the_mate_until_its_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let array = Arc::new(MemoryArray::new(vec![PAIR]).with_identity("db-server"));
        let manager = start_masked(array.clone(), dir.path(), CancellationToken::new()).await;
        assert_eq!(
            array.grants(),
            vec![grant(OwnAccess::Configured, "no snapshot held")]
        );
        manager.acquire(0, "run-a", 0).await.expect("acquire");
        assert!(array.is_read_only(PAIR.mate_lu));
        // A retry changes nothing at the array: the access is known.
        assert!(
            manager
                .acquire(0, "run-a", 0)
                .await
                .expect("retry")
                .already_held
        );
        manager
            .write(0, VirtualLu::Data, 8, vec![2; 1024])
            .await
            .expect("a data write goes to the origin");
        let refused = manager
            .write(0, VirtualLu::Snapshot, 20, vec![3; 512])
            .await
            .expect_err("the snapshot is read-only");
        assert!(matches!(
            refused,
            DbError::SnapshotReadOnly {
                volume: 0,
                mate_lu: 2
            }
        ));
        assert_eq!(
            manager.status()[0].dirty_ranges,
            vec![8..10],
            "nothing recorded"
        );
        assert!(
            array.write(PAIR.mate_lu, 0, vec![9; 512]).await.is_err(),
            "the array refuses db-server a write to the frozen mate"
        );
        manager.delete(0, "run-a", false).await.expect("delete");
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("resync");
        assert_eq!(array.lu(1), array.lu(2), "origin == mate after resync");
        assert_eq!(array.refused_writes.load(Ordering::SeqCst), 1, "only ours");
        assert!(!array.is_read_only(PAIR.mate_lu));
        assert_eq!(
            array.grants(),
            vec![
                grant(OwnAccess::Configured, "no snapshot held"),
                grant(OwnAccess::Read, "snapshot of run run-a"),
                grant(
                    OwnAccess::Configured,
                    "snapshot of run run-a deleted: resynchronizing"
                ),
            ]
        );
    }

    /// A SetAccess the array refuses fails the acquire or the delete, and
    /// the pair stays as it was; once the array answers again both work.
    #[tokio::test]
    async fn a_refused_set_access_fails_the_mode_change_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let array = Arc::new(MemoryArray::new(vec![PAIR]).with_identity("db-server"));
        let manager = start_masked(array.clone(), dir.path(), CancellationToken::new()).await;
        array.fail_set_access.store(true, Ordering::SeqCst);
        assert!(matches!(
            manager.acquire(0, "run-a", 0).await,
            Err(DbError::Array(_))
        ));
        assert_eq!(mode(&manager), Mode::Synchronized);
        assert!(!array.is_read_only(PAIR.mate_lu));
        array.fail_set_access.store(false, Ordering::SeqCst);
        manager
            .write(0, VirtualLu::Data, 0, vec![1; 512])
            .await
            .expect("the mirror is writable");
        manager.acquire(0, "run-a", 0).await.expect("acquire");
        assert!(array.is_read_only(PAIR.mate_lu));

        array.fail_set_access.store(true, Ordering::SeqCst);
        assert!(matches!(
            manager.delete(0, "run-a", false).await,
            Err(DbError::Array(_))
        ));
        assert_eq!(mode(&manager), Mode::Snapshot, "still held");
        assert!(array.is_read_only(PAIR.mate_lu), "still frozen");
        array.fail_set_access.store(false, Ordering::SeqCst);
        manager.delete(0, "run-a", false).await.expect("delete");
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("resync");
        assert_eq!(array.lu(1), array.lu(2));
    }

    /// At start-up the journal decides: a crash after the SetAccess but
    /// before the journal record (or the other way round) leaves neither a
    /// held snapshot writable nor a synchronized mate read-only.
    #[tokio::test]
    async fn start_up_makes_the_arrays_masking_agree_with_the_journal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Arc::new(MemoryArray::new(vec![PAIR]).with_identity("db-server"));
        let cancel = CancellationToken::new();
        let manager = start_masked(first.clone(), dir.path(), cancel.clone()).await;
        manager.acquire(0, "run-a", 0).await.expect("acquire");
        cancel.cancel();
        manager.close_journal();
        drop(manager);

        // The journal holds the snapshot; this array never heard of it.
        let second = Arc::new(MemoryArray::new(vec![PAIR]).with_identity("db-server"));
        let cancel = CancellationToken::new();
        let manager = start_masked_held(second.clone(), dir.path(), cancel.clone()).await;
        assert!(
            second.is_read_only(PAIR.mate_lu),
            "the held snapshot's mate is frozen again"
        );
        assert_eq!(
            second.grants(),
            vec![grant(
                OwnAccess::Read,
                "snapshot of run run-a (restored at start-up)"
            )]
        );
        manager.delete(0, "run-a", false).await.expect("delete");
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("resync");
        cancel.cancel();
        manager.close_journal();
        drop(manager);

        // The journal says Synchronized; this array still masks the mate.
        let third = Arc::new(MemoryArray::new(vec![PAIR]).with_identity("db-server"));
        third
            .set_own_access(PAIR.mate_lu, OwnAccess::Read, "a crash before the journal")
            .await
            .expect("set");
        let manager = start_masked(third.clone(), dir.path(), CancellationToken::new()).await;
        assert!(
            !third.is_read_only(PAIR.mate_lu),
            "the mate is writable again"
        );
        manager
            .write(0, VirtualLu::Data, 0, vec![5; 512])
            .await
            .expect("a mirror write reaches both sides");
        assert_eq!(third.refused_writes.load(Ordering::SeqCst), 0);
    }

    /// Like [`start_masked`], for a journal that holds a snapshot (the pair
    /// is not synchronized).
    async fn start_masked_held(
        array: Arc<MemoryArray>,
        dir: &std::path::Path,
        cancel: CancellationToken,
    ) -> Arc<SnapshotManager> {
        let journal = Journal::open(dir, 4096).expect("journal");
        let manager = SnapshotManager::start(
            array,
            vec![PAIR],
            Some(journal),
            ManagerConfig::default(),
            cancel,
            TaskTracker::new(),
        )
        .await
        .expect("start");
        assert_eq!(mode(&manager), Mode::Snapshot);
        manager
    }

    /// An array that refuses db-server its own masking at start-up stops
    /// the start with the array's error.
    #[tokio::test]
    async fn an_array_that_refuses_masking_at_start_up_stops_the_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let array = Arc::new(MemoryArray::new(vec![PAIR]).with_identity("db-server"));
        array.fail_set_access.store(true, Ordering::SeqCst);
        let started = SnapshotManager::start(
            array,
            vec![PAIR],
            Some(Journal::open(dir.path(), 4096).expect("journal")),
            ManagerConfig::default(),
            CancellationToken::new(),
            TaskTracker::new(),
        )
        .await;
        assert!(matches!(started, Err(DbError::Array(_))));
    }

    #[tokio::test]
    async fn bad_requests() {
        let (manager, _) = start();
        assert!(matches!(
            manager.write(0, VirtualLu::Data, 64, vec![0; 512]).await,
            Err(DbError::OutOfRange(_))
        ));
        assert!(matches!(
            manager.write(0, VirtualLu::Data, 0, vec![0; 100]).await,
            Err(DbError::InvalidArgument(_))
        ));
        assert!(matches!(
            manager.read(0, VirtualLu::Data, 0, 0).await,
            Err(DbError::InvalidArgument(_))
        ));
        assert!(matches!(
            manager.read(7, VirtualLu::Data, 0, 1).await,
            Err(DbError::UnknownVolume(7))
        ));
    }
}
