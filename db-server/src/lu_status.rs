//! The LU status table (Fig. 10): for each pair, where the data virtual LU
//! and the snapshot virtual LU read and write, and in which mode — and the
//! two states of a restore (issue 17), in which the volume serves nothing.

use crate::array_port::PairInfo;

/// A virtual LU's mode, as the patent names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Synchronized,
    Snapshot,
    Resynchronizing,
    Undefined,
}

/// The state of one pair, from which every row of the table follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairState {
    Synchronized,
    /// The pair is split; `holder` is the run id that acquired it, and
    /// `ledger_sequence` the database's sequence at the split (kept so that
    /// a retried acquire after a restart answers the same snapshot).
    /// `snapshot_id` names this acquire alone (random, non-zero, journaled):
    /// the holder and the sequence can repeat — the same run id acquires
    /// again after a forced delete, the sequence stands still while the
    /// database is idle or has no ledger — so a backup compares the id to
    /// know that the mate was not resynced while it read.
    /// `writable`: acquired writable (AcquireSnapshotRequest.writable): the
    /// snapshot virtual LU (the mate) may be written while it is held, and
    /// those writes are recorded and resynced like the origin's.
    Snapshot {
        holder: String,
        ledger_sequence: u64,
        snapshot_id: u64,
        writable: bool,
    },
    Resynchronizing,
    /// A copy-on-write snapshot is held (issue 20, the fourth embodiment,
    /// [0072]-[0078]): the pair is NOT split — writes still go to the
    /// mirror LU, both sides — but before a block is first overwritten its
    /// pre-update data is saved to the volume's save area (`--save-area`).
    /// The snapshot virtual LU reads saved blocks from the save area and
    /// the rest from the mate. The block → slot map lives in memory only:
    /// a restart finds this state in the journal and invalidates the
    /// snapshot (the pair is Synchronized, it never split). Fields as in
    /// `Snapshot`.
    CowSnapshot {
        holder: String,
        ledger_sequence: u64,
        snapshot_id: u64,
    },
    /// Offline for the restore run `run_id` of backup `backup_id`
    /// (BeginRestore … EndRestore): the backup server writes the mirror LU,
    /// db-server serves no Read or Write of the volume.
    Restoring {
        run_id: String,
        backup_id: String,
    },
    /// Offline while the held snapshot's frozen mate is copied back onto
    /// the origin (RestoreSnapshot, the reverse resync). The snapshot's
    /// fields are kept, and so are the journaled intents (the update
    /// location table): they are the ranges the copy must cover, again
    /// after a crash.
    RestoringToSnapshot {
        holder: String,
        ledger_sequence: u64,
        snapshot_id: u64,
    },
}

/// What a restore state says about the restore, for refusals and `Status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreKind {
    FromBackup {
        backup_id: String,
    },
    ToSnapshot {
        ledger_sequence: u64,
        snapshot_id: u64,
    },
}

/// A new snapshot id: 64 random bits, never 0 (0 means "none" on the wire).
/// The std hasher's keys come from the operating system's randomness once
/// per process and move on with every `RandomState`, and the clock and a
/// counter are mixed in, so ids do not repeat across acquires or restarts.
pub fn new_snapshot_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    loop {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(now_ns);
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.write_u32(std::process::id());
        let id = hasher.finish();
        if id != 0 {
            return id;
        }
    }
}

/// Which virtual LU of a pair a request addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtualLu {
    Data,
    Snapshot,
}

/// One pair's rows of Fig. 10.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routing {
    pub data_mode: Mode,
    pub data_read_lu: u32,
    pub data_write_lu: u32,
    pub snapshot_mode: Mode,
    /// READ and WRITE destination of the snapshot virtual LU, if defined.
    pub snapshot_lu: Option<u32>,
}

impl PairState {
    /// The table of DESIGN.md §3:
    ///
    /// | state | data READ | data WRITE | data mode | snapshot |
    /// |---|---|---|---|---|
    /// | synchronized | m | m | Synchronized | Undefined |
    /// | snapshot | o | o | Snapshot | t, Snapshot |
    /// | resynchronizing | o | m | Resynchronizing | Undefined |
    /// | copy-on-write snapshot | m | m | Synchronized | save area + t, Snapshot |
    /// | restoring (either kind) | refused | refused | Undefined | Undefined |
    ///
    /// A restoring volume's read and write LUs are shown as its mirror LU
    /// (what the restore writes), but the manager refuses every Read and
    /// Write before routing one.
    pub fn routing(&self, pair: &PairInfo) -> Routing {
        match self {
            PairState::Synchronized => Routing {
                data_mode: Mode::Synchronized,
                data_read_lu: pair.mirror_lu,
                data_write_lu: pair.mirror_lu,
                snapshot_mode: Mode::Undefined,
                snapshot_lu: None,
            },
            PairState::Snapshot { .. } => Routing {
                data_mode: Mode::Snapshot,
                data_read_lu: pair.origin_lu,
                data_write_lu: pair.origin_lu,
                snapshot_mode: Mode::Snapshot,
                snapshot_lu: Some(pair.mate_lu),
            },
            // The snapshot LU shown is the mate: blocks not yet saved are
            // read from it; saved ones from the save area.
            PairState::CowSnapshot { .. } => Routing {
                data_mode: Mode::Synchronized,
                data_read_lu: pair.mirror_lu,
                data_write_lu: pair.mirror_lu,
                snapshot_mode: Mode::Snapshot,
                snapshot_lu: Some(pair.mate_lu),
            },
            PairState::Resynchronizing => Routing {
                data_mode: Mode::Resynchronizing,
                data_read_lu: pair.origin_lu,
                data_write_lu: pair.mirror_lu,
                snapshot_mode: Mode::Undefined,
                snapshot_lu: None,
            },
            PairState::Restoring { .. } | PairState::RestoringToSnapshot { .. } => Routing {
                data_mode: Mode::Undefined,
                data_read_lu: pair.mirror_lu,
                data_write_lu: pair.mirror_lu,
                snapshot_mode: Mode::Undefined,
                snapshot_lu: None,
            },
        }
    }

    /// The restore that holds the volume, if one does: its run id and kind.
    pub fn restore(&self) -> Option<(&str, RestoreKind)> {
        match self {
            PairState::Restoring { run_id, backup_id } => Some((
                run_id,
                RestoreKind::FromBackup {
                    backup_id: backup_id.clone(),
                },
            )),
            PairState::RestoringToSnapshot {
                holder,
                ledger_sequence,
                snapshot_id,
            } => Some((
                holder,
                RestoreKind::ToSnapshot {
                    ledger_sequence: *ledger_sequence,
                    snapshot_id: *snapshot_id,
                },
            )),
            _ => None,
        }
    }

    /// Whether the journaled intents stay with this state (they are the
    /// ranges where origin and mate may differ, still to be copied).
    pub fn keeps_intents(&self) -> bool {
        matches!(
            self,
            PairState::Resynchronizing | PairState::RestoringToSnapshot { .. }
        )
    }

    /// The snapshot id of the acquire that split the pair, if split.
    pub fn snapshot_id(&self) -> Option<u64> {
        match self {
            PairState::Snapshot { snapshot_id, .. }
            | PairState::CowSnapshot { snapshot_id, .. } => Some(*snapshot_id),
            _ => None,
        }
    }

    /// The run that holds a snapshot (split or copy-on-write), if one is
    /// held.
    pub fn holder(&self) -> Option<&str> {
        match self {
            PairState::Snapshot { holder, .. } | PairState::CowSnapshot { holder, .. } => {
                Some(holder)
            }
            _ => None,
        }
    }

    /// The mode a refusal names: a held copy-on-write snapshot refuses as
    /// a held snapshot does (its data mode stays Synchronized).
    pub fn refusal_mode(&self, pair: &PairInfo) -> Mode {
        match self {
            PairState::CowSnapshot { .. } => Mode::Snapshot,
            other => other.routing(pair).data_mode,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAIR: PairInfo = PairInfo {
        mirror_lu: 0,
        origin_lu: 1,
        mate_lu: 2,
        block_size_bytes: 4096,
        block_count: 16,
    };

    #[test]
    fn fig_10_rows() {
        let synced = PairState::Synchronized.routing(&PAIR);
        assert_eq!((synced.data_read_lu, synced.data_write_lu), (0, 0));
        assert_eq!(synced.snapshot_mode, Mode::Undefined);
        let split = PairState::Snapshot {
            holder: "run".into(),
            ledger_sequence: 7,
            snapshot_id: 1,
            writable: false,
        }
        .routing(&PAIR);
        assert_eq!((split.data_read_lu, split.data_write_lu), (1, 1));
        assert_eq!(
            (split.snapshot_mode, split.snapshot_lu),
            (Mode::Snapshot, Some(2))
        );
        let resync = PairState::Resynchronizing.routing(&PAIR);
        assert_eq!((resync.data_read_lu, resync.data_write_lu), (1, 0));
        assert_eq!(resync.data_mode, Mode::Resynchronizing);
        assert_eq!(resync.snapshot_lu, None);
        for restoring in [
            PairState::Restoring {
                run_id: "r".into(),
                backup_id: "b".into(),
            },
            PairState::RestoringToSnapshot {
                holder: "r".into(),
                ledger_sequence: 7,
                snapshot_id: 1,
            },
        ] {
            let routing = restoring.routing(&PAIR);
            assert_eq!(routing.data_mode, Mode::Undefined);
            assert_eq!(
                (routing.snapshot_mode, routing.snapshot_lu),
                (Mode::Undefined, None)
            );
            assert_eq!(restoring.restore().map(|(run, _)| run), Some("r"));
            assert_eq!(restoring.holder(), None, "no snapshot to back up");
        }
    }

    #[test]
    fn snapshot_ids_are_non_zero_and_do_not_repeat() {
        let ids: std::collections::HashSet<u64> = (0..1000).map(|_| new_snapshot_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(!ids.contains(&0));
    }
}
