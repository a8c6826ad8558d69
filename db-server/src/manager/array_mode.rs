//! The first embodiment (issue 19, [0016]-[0048]): the array keeps each
//! pair's mode in its mirroring management table and enforces it, and
//! db-server sets it with `ModeSelect` (`--array-mode stateful`) instead of
//! re-routing writes. db-server still keeps the update location table, the
//! journal and the resync; the journal says which mode the array must hold,
//! and at start-up the array is made to agree with it.

/// Who keeps a pair's mode (`--array-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArrayModeKeeping {
    /// db-server keeps the mode and routes every write; the array enforces
    /// nothing (the stateless array of the second and third embodiments).
    #[default]
    Stateless,
    /// The array keeps the mode (`ModeSelect`) and enforces it on every
    /// request; db-server writes the mirror LU in every mode.
    Stateful,
}

impl std::fmt::Display for ArrayModeKeeping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ArrayModeKeeping::Stateless => "stateless",
            ArrayModeKeeping::Stateful => "stateful",
        })
    }
}

/// An `--array-mode` that is neither `stateless` nor `stateful`.
#[derive(Debug, thiserror::Error)]
#[error("unknown array mode {0:?}: expected stateless or stateful")]
pub struct UnknownArrayModeKeeping(String);

impl std::str::FromStr for ArrayModeKeeping {
    type Err = UnknownArrayModeKeeping;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stateless" => Ok(ArrayModeKeeping::Stateless),
            "stateful" => Ok(ArrayModeKeeping::Stateful),
            other => Err(UnknownArrayModeKeeping(other.to_string())),
        }
    }
}

use super::{SnapshotManager, Volume};
use crate::array_port::ArrayMirrorMode;
use crate::error::DbError;
use crate::lu_status::PairState;

/// What db-server knows of the array's mode for one pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum KnownArrayMode {
    Known(ArrayMirrorMode),
    /// The last `ModeSelect` failed, so the array may hold the old mode or
    /// the new one: every Read and Write of the volume first sets it again,
    /// and is refused while that fails.
    Unknown(String),
}

impl KnownArrayMode {
    /// For Status: the mode, or why it is unknown.
    pub(super) fn describe(&self) -> String {
        match self {
            KnownArrayMode::Known(mode) => mode.to_string(),
            KnownArrayMode::Unknown(why) => format!("unknown: {why}"),
        }
    }
}

/// The mode a stateful array must hold while the pair is in `state`.
pub(super) fn stateful_mode(state: &PairState) -> ArrayMirrorMode {
    match state {
        // A copy-on-write snapshot never splits; a restore from a backup
        // writes the mirror LU, both sides.
        PairState::Synchronized | PairState::CowSnapshot { .. } | PairState::Restoring { .. } => {
            ArrayMirrorMode::Synchronized
        }
        PairState::Snapshot { writable, .. } => ArrayMirrorMode::Snapshot {
            mate_writable: *writable,
        },
        PairState::Resynchronizing => ArrayMirrorMode::Resynchronizing,
        // The reverse resync copies the frozen mate onto the origin: the
        // mate stays readable and unwritable.
        PairState::RestoringToSnapshot { .. } => ArrayMirrorMode::Snapshot {
            mate_writable: false,
        },
    }
}

impl SnapshotManager {
    /// Whether the array keeps the modes (`--array-mode stateful`).
    pub(super) fn stateful(&self) -> bool {
        self.config.array_mode == ArrayModeKeeping::Stateful
    }

    /// The mode the array must hold for a pair in `state`: host-managed
    /// when db-server keeps the modes.
    pub(super) fn array_mode_for(&self, state: &PairState) -> ArrayMirrorMode {
        if self.stateful() {
            stateful_mode(state)
        } else {
            ArrayMirrorMode::HostManaged
        }
    }

    /// Sets the array's mode of `vol` to what `state` needs (`ModeSelect`),
    /// unless the array is known to hold it, and remembers the outcome:
    /// unknown after a failure. Nothing to do when stateless.
    pub(super) async fn follow_array_mode(
        &self,
        vol: &Volume,
        state: &PairState,
        purpose: &str,
    ) -> Result<(), DbError> {
        if !self.stateful() {
            return Ok(());
        }
        let mode = stateful_mode(state);
        if vol.inner().array_mode == KnownArrayMode::Known(mode) {
            return Ok(());
        }
        self.select_array_mode(vol, mode, purpose).await
    }

    /// [`Self::follow_array_mode`] after a state change that is journaled
    /// already and is not undone: a failure (logged) leaves the array's
    /// mode unknown, and the next Read, Write or resync step sets it again
    /// before it relies on it.
    pub(super) async fn try_follow_array_mode(
        &self,
        vol: &Volume,
        state: &PairState,
        purpose: &str,
    ) {
        let _ = self.follow_array_mode(vol, state, purpose).await;
    }

    /// `ModeSelect` of `vol`'s mirror LU to `mode`, remembered.
    async fn select_array_mode(
        &self,
        vol: &Volume,
        mode: ArrayMirrorMode,
        purpose: &str,
    ) -> Result<(), DbError> {
        let result = self.array.mode_select(&vol.pair, mode, purpose).await;
        vol.inner().array_mode = match &result {
            Ok(()) => KnownArrayMode::Known(mode),
            Err(error) => KnownArrayMode::Unknown(format!(
                "setting {mode} failed ({}); Read and Write set it again first",
                error.kind
            )),
        };
        match result {
            Ok(()) => {
                tracing::info!(volume = vol.volume(), %mode, purpose, "array mode set");
                Ok(())
            }
            Err(error) => {
                tracing::warn!(
                    volume = vol.volume(),
                    %mode,
                    purpose,
                    "setting the array's mode failed: {error}"
                );
                Err(error.into())
            }
        }
    }

    /// Before a Read or Write of `vol` is routed (under the mode gate, so
    /// the state cannot change): the array must be known to hold the
    /// state's mode. After a `ModeSelect` whose outcome is unknown it is
    /// set again here, and the request is refused while that fails — the
    /// array might still split writes the journal says are mirrored, or
    /// mirror writes onto a frozen mate.
    pub(super) async fn ensure_array_mode(&self, vol: &Volume) -> Result<(), DbError> {
        let state = {
            let inner = vol.inner();
            if !matches!(inner.array_mode, KnownArrayMode::Unknown(_)) {
                return Ok(());
            }
            inner.state.clone()
        };
        self.follow_array_mode(
            vol,
            &state,
            "repairing a mode change whose outcome was unknown",
        )
        .await
    }

    /// At start-up, before anything is served: makes the array's mode of
    /// every pair agree with the journal (the journal wins: it is the
    /// record every state change was made durable in before it took
    /// effect). One disagreement is evidence of lost writes rather than of
    /// an interrupted step: the array held a pair in SNAPSHOT while the
    /// journal holds neither a snapshot nor a resync (it can follow only
    /// from an acquire undone after its `ModeSelect`, or from another host
    /// setting the mode), so writes may have reached the origin alone
    /// without being recorded: the whole volume is compared. A stateless
    /// db-server hands every pair back to HOST_MANAGED the same way.
    pub(super) async fn reconcile_array_modes(&self) -> Result<(), DbError> {
        for vol in self.volumes.values() {
            // The mate's page gives its own pair's mode (a mirror LU's
            // page gives its first mate's).
            let found = match self.array.lu_page(vol.pair.mate_lu).await {
                Ok(page) => ArrayMirrorMode::of_page(&page),
                Err(error) if self.stateful() => return Err(error.into()),
                Err(error) => {
                    // A stateless db-server needs no mode from the array;
                    // an array that cannot say keeps none.
                    tracing::debug!(
                        volume = vol.volume(),
                        "reading the array's mode at start-up: {error}"
                    );
                    vol.inner().array_mode = KnownArrayMode::Known(ArrayMirrorMode::HostManaged);
                    continue;
                }
            };
            // An array that reports no mode keeps none: host-managed.
            let found = found.or((!self.stateful()).then_some(ArrayMirrorMode::HostManaged));
            let state = vol.inner().state.clone();
            let split_unrecorded = matches!(found, Some(ArrayMirrorMode::Snapshot { .. }))
                && matches!(
                    state,
                    PairState::Synchronized
                        | PairState::CowSnapshot { .. }
                        | PairState::Restoring { .. }
                );
            let state = if split_unrecorded {
                let reason = format!(
                    "the array held the pair in {} while the journal holds no snapshot: writes \
                     may have reached the origin alone",
                    found.expect("matched")
                );
                tracing::warn!(
                    volume = vol.volume(),
                    "{reason}; resynchronizing the whole volume"
                );
                if let Some(journal) = &self.journal {
                    journal
                        .record_state(&vol.pair, &PairState::Resynchronizing, true)
                        .await?;
                }
                let mut inner = vol.inner();
                inner.state = PairState::Resynchronizing;
                inner.full_resync_pending = true;
                inner.full_resync_reason = Some(reason);
                PairState::Resynchronizing
            } else {
                state
            };
            let wanted = self.array_mode_for(&state);
            if found == Some(wanted) {
                vol.inner().array_mode = KnownArrayMode::Known(wanted);
                continue;
            }
            tracing::info!(
                volume = vol.volume(),
                found = found.map_or("no mode".to_string(), |m| m.to_string()),
                %wanted,
                "making the array's mode agree with the journal"
            );
            self.select_array_mode(vol, wanted, "start-up: the journal's mode")
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::array_port::{MemoryArray, PairInfo};
    use crate::lu_status::VirtualLu;
    use crate::manager::{ManagerConfig, SnapshotMethod};

    const PAIR: PairInfo = PairInfo {
        mirror_lu: 0,
        origin_lu: 1,
        mate_lu: 2,
        block_size_bytes: 512,
        block_count: 64,
    };
    const SNAPSHOT: ArrayMirrorMode = ArrayMirrorMode::Snapshot {
        mate_writable: false,
    };

    async fn start_on(
        array: Arc<MemoryArray>,
        keeping: ArrayModeKeeping,
    ) -> Result<Arc<SnapshotManager>, DbError> {
        SnapshotManager::start(
            array,
            vec![PAIR],
            None,
            ManagerConfig {
                array_mode: keeping,
                ..ManagerConfig::default()
            },
            CancellationToken::new(),
            TaskTracker::new(),
        )
        .await
    }

    async fn stateful() -> (Arc<SnapshotManager>, Arc<MemoryArray>) {
        let array = Arc::new(MemoryArray::new(vec![PAIR]));
        let manager = start_on(array.clone(), ArrayModeKeeping::Stateful)
            .await
            .expect("start");
        (manager, array)
    }

    fn block(lu: &[u8], lba: usize) -> &[u8] {
        &lu[lba * 512..(lba + 1) * 512]
    }

    #[tokio::test]
    async fn the_array_splits_the_pair_and_db_server_writes_the_mirror_lu() {
        let (manager, array) = stateful().await;
        assert_eq!(
            array.mode_of(0),
            ArrayMirrorMode::Synchronized,
            "set at start"
        );
        manager.acquire(0, "run-a", 7).await.expect("acquire");
        assert_eq!(array.mode_of(0), SNAPSHOT);
        let status = &manager.status()[0];
        assert_eq!(
            status.routing.data_write_lu, 0,
            "the mirror LU, not the origin"
        );
        assert_eq!(status.array_mode.as_deref(), Some("SNAPSHOT"));
        manager
            .write(0, VirtualLu::Data, 8, vec![2; 1024])
            .await
            .expect("write");
        assert_eq!(block(&array.lu(1), 8), &[2; 512][..], "origin written");
        assert_eq!(block(&array.lu(2), 8), &[0; 512][..], "mate frozen");
        assert_eq!(manager.status()[0].dirty_ranges, vec![8..10]);
        // Not writable: refused before anything is recorded.
        assert!(matches!(
            manager
                .write(0, VirtualLu::Snapshot, 20, vec![3; 512])
                .await,
            Err(DbError::SnapshotReadOnly { .. })
        ));
        manager.delete(0, "run-a", false).await.expect("delete");
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("resync");
        assert_eq!(array.mode_of(0), ArrayMirrorMode::Synchronized);
        assert_eq!(array.lu(1), array.lu(2), "origin == mate after the resync");
        assert_eq!(array.refused_by_mode.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_writable_snapshot_records_the_mates_writes_and_undoes_them() {
        let (manager, array) = stateful().await;
        manager
            .acquire_with(0, "run-w", 1, SnapshotMethod::Split, true)
            .await
            .expect("acquire");
        assert_eq!(
            array.mode_of(0),
            ArrayMirrorMode::Snapshot {
                mate_writable: true
            }
        );
        assert!(manager.status()[0].snapshot_writable);
        manager
            .write(0, VirtualLu::Snapshot, 20, vec![3; 512])
            .await
            .expect("a writable snapshot takes writes");
        assert_eq!(block(&array.lu(2), 20), &[3; 512][..]);
        assert_eq!(manager.status()[0].dirty_ranges, vec![20..21]);
        manager.delete(0, "run-w", false).await.expect("delete");
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("resync");
        assert_eq!(
            block(&array.lu(2), 20),
            &[0; 512][..],
            "undone by the resync"
        );
        assert!(matches!(
            manager
                .acquire_with(0, "run-c", 1, SnapshotMethod::Cow, true)
                .await,
            Err(DbError::InvalidArgument(_))
        ));
    }

    #[tokio::test]
    async fn a_refused_mode_select_undoes_the_acquire_and_holds_writes_until_repaired() {
        let (manager, array) = stateful().await;
        array.fail_mode_select.store(true, Ordering::SeqCst);
        assert!(manager.acquire(0, "run-a", 0).await.is_err());
        let status = &manager.status()[0];
        assert!(status.holder.is_none(), "nothing held");
        assert!(
            status
                .array_mode
                .as_deref()
                .is_some_and(|m| m.starts_with("unknown")),
            "{:?}",
            status.array_mode
        );
        // While the array's mode is unknown, nothing is written.
        assert!(
            manager
                .write(0, VirtualLu::Data, 0, vec![1; 512])
                .await
                .is_err()
        );
        assert_eq!(array.lu(1), vec![0; 64 * 512], "nothing reached the origin");
        array.fail_mode_select.store(false, Ordering::SeqCst);
        manager
            .write(0, VirtualLu::Data, 0, vec![1; 512])
            .await
            .expect("the mode is set again first");
        assert_eq!(array.mode_of(0), ArrayMirrorMode::Synchronized);
        assert_eq!(array.lu(1), array.lu(2), "mirrored");
    }

    #[tokio::test]
    async fn the_start_makes_the_array_agree_and_compares_an_unrecorded_split() {
        // The array says SNAPSHOT, and no journal holds a snapshot: writes
        // may have reached the origin alone. The whole volume is compared.
        let array = Arc::new(MemoryArray::new(vec![PAIR]));
        array.force_mode(0, SNAPSHOT);
        array.overwrite(1, 5 * 512, &[9; 512]);
        let manager = start_on(array.clone(), ArrayModeKeeping::Stateful)
            .await
            .expect("start");
        let status = &manager.status()[0];
        assert!(
            status
                .full_resync_reason
                .as_deref()
                .is_some_and(|r| r.contains("SNAPSHOT")),
            "{status:?}"
        );
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("resync");
        assert_eq!(array.lu(1), array.lu(2), "the unrecorded write is copied");
        assert_eq!(array.mode_of(0), ArrayMirrorMode::Synchronized);

        // A stateless db-server hands the pair back to the host.
        array.force_mode(0, ArrayMirrorMode::Synchronized);
        let _stateless = start_on(array.clone(), ArrayModeKeeping::Stateless)
            .await
            .expect("start");
        assert_eq!(array.mode_of(0), ArrayMirrorMode::HostManaged);
    }

    #[tokio::test]
    async fn a_stateful_start_fails_when_the_array_keeps_no_modes() {
        let array = Arc::new(MemoryArray::new(vec![PAIR]));
        array.fail_mode_select.store(true, Ordering::SeqCst);
        assert!(
            start_on(array, ArrayModeKeeping::Stateful).await.is_err(),
            "a stateful db-server must not run on an array it cannot set"
        );
    }
}
