//! The LU status table (Fig. 10): for each pair, where the data virtual LU
//! and the snapshot virtual LU read and write, and in which mode.

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
    Snapshot {
        holder: String,
        ledger_sequence: u64,
    },
    Resynchronizing,
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
            PairState::Resynchronizing => Routing {
                data_mode: Mode::Resynchronizing,
                data_read_lu: pair.origin_lu,
                data_write_lu: pair.mirror_lu,
                snapshot_mode: Mode::Undefined,
                snapshot_lu: None,
            },
        }
    }

    pub fn holder(&self) -> Option<&str> {
        match self {
            PairState::Snapshot { holder, .. } => Some(holder),
            _ => None,
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
    }
}
