//! The database server as a whole: the snapshot manager, the quiesce gate
//! and the ledger, and the operations that need more than one of them
//! (`AcquireSnapshot` = suspend → acquire → resume, [0068]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::DbError;
use crate::gate::{GateStatus, QUIESCE_TIMEOUT, QuiesceGate, Suspended};
use crate::ledger::{Ledger, LedgerStatus};
use crate::manager::{DeleteOutcome, HeldSnapshot, SnapshotManager, VolumeStatus};
use crate::service::validate;

/// The answer to `AcquireSnapshot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcquiredSnapshot {
    pub volume: u32,
    pub mate_lu: u32,
    pub freeze_window_us: u64,
    pub ledger_sequence: u64,
    pub already_held: bool,
    pub block_size_bytes: u32,
    pub block_count: u64,
    /// The acquire's id (a retry answers the first acquire's).
    pub snapshot_id: u64,
}

/// Everything `Status` reports.
#[derive(Debug, Clone)]
pub struct DbStatus {
    pub volumes: Vec<VolumeStatus>,
    pub ledger: Option<LedgerStatus>,
    pub gate: GateStatus,
    pub journal: Option<crate::journal::JournalStats>,
    pub traffic: crate::array_port::Traffic,
}

pub struct Db {
    pub manager: Arc<SnapshotManager>,
    pub gate: Arc<QuiesceGate>,
    pub ledger: Option<Arc<Ledger>>,
    /// The freeze window of each volume's last acquire, repeated to a
    /// retried acquire with the same run id.
    freeze_windows: Mutex<BTreeMap<u32, (String, u64)>>,
}

impl Db {
    pub fn new(
        manager: Arc<SnapshotManager>,
        gate: Arc<QuiesceGate>,
        ledger: Option<Arc<Ledger>>,
    ) -> Self {
        Self {
            manager,
            gate,
            ledger,
            freeze_windows: Mutex::new(BTreeMap::new()),
        }
    }

    /// Quiesces the database, splits the pair, resumes, and reports the
    /// freeze window (gate closing → gate open) and the ledger sequence at
    /// the snapshot. A retry with the same run id answers the same snapshot.
    pub async fn acquire_snapshot(
        &self,
        request: &validate::AcquireSnapshot,
    ) -> Result<AcquiredSnapshot, DbError> {
        let (volume, run_id) = (request.volume, request.run_id.as_str());
        let answer = |freeze_window_us, held: HeldSnapshot, already_held| AcquiredSnapshot {
            volume,
            mate_lu: held.pair.mate_lu,
            freeze_window_us,
            ledger_sequence: held.ledger_sequence,
            already_held,
            block_size_bytes: held.pair.block_size_bytes,
            block_count: held.pair.block_count,
            snapshot_id: held.snapshot_id,
        };
        // A retry: the sequence and the id come from the pair's state
        // (journaled, so they survive a restart); the freeze window from
        // memory, if known.
        if let Some(held) = self.manager.snapshot_of(volume)?
            && held.holder == run_id
        {
            let freeze_window_us = self.original_freeze_window_us(volume, run_id);
            return Ok(answer(freeze_window_us, held, true));
        }
        // Held from reading the sequence until the split is done: under an
        // operator's suspend this is a hold on its closed gate, which a
        // lease running out or a resume meanwhile does not reopen.
        let quiesced = tracing::Instrument::instrument(
            self.gate.quiesce(QUIESCE_TIMEOUT),
            tracing::info_span!("quiesce", volume),
        )
        .await?;
        let ledger_sequence = self.ledger.as_ref().map_or(0, |l| l.sequence());
        let result = tracing::Instrument::instrument(
            self.manager.acquire(volume, run_id, ledger_sequence),
            tracing::info_span!("split", volume, run_id, ledger_sequence),
        )
        .await;
        let freeze_window_us = quiesced.elapsed_us();
        drop(quiesced);
        let outcome = result?;
        if outcome.already_held {
            // A concurrent retry got there first: answer its snapshot.
            let freeze_window_us = self.original_freeze_window_us(volume, run_id);
            return Ok(answer(freeze_window_us, outcome.snapshot, true));
        }
        self.freeze_windows
            .lock()
            .expect("freeze windows poisoned")
            .insert(volume, (run_id.to_string(), freeze_window_us));
        splitmirror_proto::telemetry::record_freeze_window(Duration::from_micros(freeze_window_us));
        tracing::info!(
            volume,
            run_id,
            freeze_window_us,
            ledger_sequence,
            snapshot_id = outcome.snapshot.snapshot_id,
            "snapshot acquired"
        );
        let answer = answer(freeze_window_us, outcome.snapshot, false);
        Ok(answer)
    }

    /// The freeze window of the acquire that `run_id` made, if this process
    /// saw it (0 after a restart).
    fn original_freeze_window_us(&self, volume: u32, run_id: &str) -> u64 {
        self.freeze_windows
            .lock()
            .expect("freeze windows poisoned")
            .get(&volume)
            .filter(|(holder, _)| holder == run_id)
            .map_or(0, |(_, us)| *us)
    }

    pub async fn delete_snapshot(
        &self,
        request: &validate::DeleteSnapshot,
    ) -> Result<DeleteOutcome, DbError> {
        self.manager
            .delete(request.volume, &request.run_id, request.force)
            .await
    }

    /// Writes through the snapshot manager (a write the array would refuse
    /// for its size never gets here, see [`validate::write`]).
    pub async fn write(&self, request: validate::VolumeWrite) -> Result<u64, DbError> {
        self.manager
            .write(request.volume, request.target, request.lba, request.data)
            .await
    }

    /// Suspends the database (or renews the suspend's lease, see
    /// [`QuiesceGate::suspend`]) and answers the lease in force and the
    /// ledger sequence.
    pub async fn suspend(&self, request: validate::Suspend) -> Result<(Suspended, u64), DbError> {
        let suspended = self.gate.suspend(Some(request.lease)).await?;
        Ok((suspended, self.ledger.as_ref().map_or(0, |l| l.sequence())))
    }

    pub async fn resume(&self) -> Option<Duration> {
        self.gate.resume().await
    }

    pub fn status(&self) -> DbStatus {
        DbStatus {
            volumes: self.manager.status(),
            ledger: self.ledger.as_ref().map(|l| l.status()),
            gate: self.gate.status(),
            journal: self.manager.journal_stats(),
            traffic: self.manager.traffic(),
        }
    }
}
