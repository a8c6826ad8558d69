//! The database server as a whole: the snapshot manager, the quiesce gate
//! and the ledger, and the operations that need more than one of them
//! (`AcquireSnapshot` = suspend → acquire → resume, [0068]; the restores,
//! which stop the ledger on their volume, change the pair's state and open
//! the ledger again on what the volume holds afterwards).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::DbError;
use crate::gate::{GateStatus, QUIESCE_TIMEOUT, QuiesceGate, Suspended};
use crate::ledger::LedgerStatus;
use crate::ledger_slot::{LedgerSlot, Reopened};
use crate::manager::{
    BeganRestore, BeginDecision, DeleteOutcome, EndedRestore, HeldSnapshot, PairRef,
    ReverseOutcome, SnapshotManager, VolumeStatus,
};
use crate::service::validate;

/// The answer to `AcquireSnapshot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcquiredSnapshot {
    pub volume: u32,
    /// Which of the volume's mates was split (counted from 1).
    pub mate: u32,
    pub mate_lu: u32,
    pub freeze_window_us: u64,
    pub ledger_sequence: u64,
    pub already_held: bool,
    pub block_size_bytes: u32,
    pub block_count: u64,
    /// The acquire's id (a retry answers the first acquire's).
    pub snapshot_id: u64,
    /// The method of the snapshot held (a retry answers the held one's).
    pub method: crate::manager::SnapshotMethod,
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

/// The answer to `BeginRestore`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreBegun {
    pub began: BeganRestore,
    /// The ledger's sequence when this call stopped it.
    pub ledger_sequence_stopped: Option<u64>,
}

/// The ledger after a restore: running at a sequence, or why not.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LedgerAfterRestore {
    pub running: bool,
    pub sequence: Option<u64>,
    /// Why it did not open (empty when it runs, or when db-server runs no
    /// ledger on the volume).
    pub error: String,
}

impl From<Reopened> for LedgerAfterRestore {
    fn from(reopened: Reopened) -> Self {
        match reopened {
            Reopened::Running { sequence } => Self {
                running: true,
                sequence: Some(sequence),
                error: String::new(),
            },
            Reopened::Refused { reason } => Self {
                running: false,
                sequence: None,
                error: reason,
            },
            Reopened::NotHere => Self::default(),
        }
    }
}

/// The answer to `EndRestore`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreEnded {
    pub ended: EndedRestore,
    pub ledger: LedgerAfterRestore,
}

/// The answer to `RestoreSnapshot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRestored {
    pub outcome: ReverseOutcome,
    pub ledger: LedgerAfterRestore,
}

/// How long an abandoning EndRestore waits for the whole-volume resync it
/// started before answering what it copied so far.
pub const ABANDON_RESYNC_WAIT: Duration = Duration::from_secs(10);

pub struct Db {
    pub manager: Arc<SnapshotManager>,
    pub gate: Arc<QuiesceGate>,
    pub ledger: LedgerSlot,
    /// The freeze window of each volume's last acquire, repeated to a
    /// retried acquire with the same run id.
    freeze_windows: Mutex<BTreeMap<PairRef, (String, u64)>>,
    /// One restore call at a time: each stops and opens the ledger around
    /// a change of a pair's state.
    restores: tokio::sync::Mutex<()>,
}

impl Db {
    pub fn new(manager: Arc<SnapshotManager>, gate: Arc<QuiesceGate>, ledger: LedgerSlot) -> Self {
        Self {
            manager,
            gate,
            ledger,
            freeze_windows: Mutex::new(BTreeMap::new()),
            restores: tokio::sync::Mutex::new(()),
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
        let pair = PairRef::new(volume, request.mate);
        let answer = |freeze_window_us, held: HeldSnapshot, already_held| AcquiredSnapshot {
            volume,
            mate: pair.mate,
            mate_lu: held.pair.mate_lu,
            freeze_window_us,
            ledger_sequence: held.ledger_sequence,
            already_held,
            block_size_bytes: held.pair.block_size_bytes,
            block_count: held.pair.block_count,
            snapshot_id: held.snapshot_id,
            method: held.method,
        };
        // A retry: the sequence and the id come from the pair's state
        // (journaled, so they survive a restart); the freeze window from
        // memory, if known.
        if let Some(held) = self.manager.snapshot_of(pair)?
            && held.holder == run_id
        {
            let freeze_window_us = self.original_freeze_window_us(pair, run_id);
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
        let ledger_sequence = self.ledger.sequence();
        let result = tracing::Instrument::instrument(
            self.manager.acquire_with(
                pair,
                run_id,
                ledger_sequence,
                request
                    .method
                    .unwrap_or_else(|| self.manager.default_snapshot_method()),
                request.writable,
            ),
            tracing::info_span!("split", volume, run_id, ledger_sequence),
        )
        .await;
        let freeze_window_us = quiesced.elapsed_us();
        drop(quiesced);
        let outcome = result?;
        if outcome.already_held {
            // A concurrent retry got there first: answer its snapshot.
            let freeze_window_us = self.original_freeze_window_us(pair, run_id);
            return Ok(answer(freeze_window_us, outcome.snapshot, true));
        }
        self.freeze_windows
            .lock()
            .expect("freeze windows poisoned")
            .insert(pair, (run_id.to_string(), freeze_window_us));
        splitmirror_proto::telemetry::record_freeze_window(Duration::from_micros(freeze_window_us));
        tracing::info!(
            volume,
            mate = pair.mate,
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
    fn original_freeze_window_us(&self, pair: PairRef, run_id: &str) -> u64 {
        self.freeze_windows
            .lock()
            .expect("freeze windows poisoned")
            .get(&pair)
            .filter(|(holder, _)| holder == run_id)
            .map_or(0, |(_, us)| *us)
    }

    pub async fn delete_snapshot(
        &self,
        request: &validate::DeleteSnapshot,
    ) -> Result<DeleteOutcome, DbError> {
        self.manager
            .delete(
                PairRef::new(request.volume, request.mate),
                &request.run_id,
                request.force,
            )
            .await
    }

    /// Writes through the snapshot manager (a write the array would refuse
    /// for its size never gets here, see [`validate::write`]).
    pub async fn write(&self, request: validate::VolumeWrite) -> Result<u64, DbError> {
        self.manager
            .write(
                PairRef::new(request.volume, request.mate),
                request.target,
                request.lba,
                request.data,
            )
            .await
    }

    /// Suspends the database (or renews the suspend's lease, see
    /// [`QuiesceGate::suspend`]) and answers the lease in force and the
    /// ledger sequence.
    pub async fn suspend(&self, request: validate::Suspend) -> Result<(Suspended, u64), DbError> {
        let suspended = self.gate.suspend(Some(request.lease)).await?;
        Ok((suspended, self.ledger.sequence()))
    }

    /// Takes the volume offline for a restore from a backup: refusals
    /// first (changing nothing), then the ledger stops if it runs there,
    /// then the manager journals Restoring and grants the writer access. A
    /// refusal found only under the mode gate reopens the ledger.
    pub async fn begin_restore(
        &self,
        request: &validate::BeginRestore,
    ) -> Result<RestoreBegun, DbError> {
        let (volume, run_id, backup_id) = (
            request.volume,
            request.run_id.as_str(),
            request.backup_id.as_str(),
        );
        let _restores = self.restores.lock().await;
        let decision = self.manager.check_begin_restore(volume, run_id)?;
        let ledger_sequence_stopped =
            if decision == BeginDecision::Begin && self.ledger.volume() == Some(volume) {
                self.ledger
                    .stop(format!(
                        "volume {volume} offline: restore run {run_id} of backup {backup_id}"
                    ))
                    .await
            } else {
                None
            };
        match self.manager.begin_restore(volume, run_id, backup_id).await {
            Ok(began) => Ok(RestoreBegun {
                began,
                ledger_sequence_stopped,
            }),
            Err(error) => {
                if ledger_sequence_stopped.is_some() && !self.manager.is_restoring(volume) {
                    self.ledger.reopen(volume).await;
                }
                Err(error)
            }
        }
    }

    /// Ends (or abandons) a restore from a backup, then opens the ledger
    /// on what the volume holds (also on a retry, in case the first call
    /// failed after the pair's state changed).
    pub async fn end_restore(
        &self,
        request: &validate::EndRestore,
    ) -> Result<RestoreEnded, DbError> {
        let volume = request.volume;
        let _restores = self.restores.lock().await;
        let mut ended = self
            .manager
            .end_restore(
                volume,
                &request.run_id,
                request.abandon,
                request.expected_image_digest,
            )
            .await?;
        let ledger = self.ledger.reopen(volume).await.into();
        if ended.abandoned && !ended.already_ended {
            ended.chunks_resynced = self
                .manager
                .wait_abandoned_resync(volume, ABANDON_RESYNC_WAIT)
                .await;
        }
        Ok(RestoreEnded { ended, ledger })
    }

    /// The reverse resync: refusals first, then the ledger stops if it
    /// runs on the volume, the manager copies the recorded ranges mate →
    /// origin, and the ledger opens again (at the snapshot's sequence).
    pub async fn restore_snapshot(
        &self,
        request: &validate::RestoreSnapshot,
    ) -> Result<SnapshotRestored, DbError> {
        let (volume, run_id) = (request.volume, request.run_id.as_str());
        let pair = PairRef::new(volume, request.mate);
        let _restores = self.restores.lock().await;
        if let Some(outcome) = self.manager.check_restore_snapshot(pair, run_id)? {
            let ledger = self.ledger.reopen(volume).await.into();
            return Ok(SnapshotRestored { outcome, ledger });
        }
        let stopped = if self.ledger.volume() == Some(volume) {
            self.ledger
                .stop(format!(
                    "volume {volume} offline: run {run_id} restores it to its snapshot"
                ))
                .await
        } else {
            None
        };
        match self.manager.restore_snapshot(pair, run_id).await {
            Ok(outcome) => {
                let ledger = self.ledger.reopen(volume).await.into();
                Ok(SnapshotRestored { outcome, ledger })
            }
            Err(error) => {
                if stopped.is_some() && !self.manager.is_restoring(volume) {
                    self.ledger.reopen(volume).await;
                }
                Err(error)
            }
        }
    }

    pub async fn resume(&self) -> Option<Duration> {
        self.gate.resume().await
    }

    pub fn status(&self) -> DbStatus {
        DbStatus {
            volumes: self.manager.status(),
            ledger: self.ledger.status(),
            gate: self.gate.status(),
            journal: self.manager.journal_stats(),
            traffic: self.manager.traffic(),
        }
    }
}

#[cfg(test)]
mod tests {
    use splitmirror_proto::db::v1 as pb;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::array_port::{MemoryArray, PairInfo};
    use crate::journal::Journal;
    use crate::ledger::LedgerConfig;
    use crate::ledger_format;
    use crate::lu_status::Mode;
    use crate::manager::ManagerConfig;

    /// Three 1 MiB chunks of 4 KiB blocks; the ledger takes the first 25.
    const PAIR: PairInfo = PairInfo {
        mirror_lu: 0,
        origin_lu: 1,
        mate_lu: 2,
        block_size_bytes: 4096,
        block_count: 768,
    };

    fn ledger_config() -> LedgerConfig {
        LedgerConfig {
            accounts: 8,
            initial_balance: 1_000,
            log_blocks: 16,
            workers: 2,
            target_tps: 2000,
            ..LedgerConfig::default()
        }
    }

    struct Node {
        db: Db,
        array: Arc<MemoryArray>,
        _dir: tempfile::TempDir,
    }

    /// A db-server's core over a masking memory array, its ledger running.
    async fn start() -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let array = Arc::new(MemoryArray::new(vec![PAIR]).with_identity("db-server"));
        let (cancel, tasks) = (CancellationToken::new(), TaskTracker::new());
        let manager = SnapshotManager::start(
            array.clone(),
            vec![PAIR],
            Some(Journal::open(dir.path(), 4096).expect("journal")),
            ManagerConfig::default(),
            cancel.clone(),
            tasks.clone(),
        )
        .await
        .expect("start");
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("synchronized");
        let gate = Arc::new(QuiesceGate::new(tasks.clone()));
        let ledger = LedgerSlot::new(
            Some(ledger_config()),
            manager.clone(),
            gate.clone(),
            cancel,
            tasks,
        );
        ledger.open().await.expect("ledger");
        Node {
            db: Db::new(manager, gate, ledger),
            array,
            _dir: dir,
        }
    }

    /// Waits until the ledger has committed past `sequence`.
    async fn ledger_past(db: &Db, sequence: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while db.ledger.sequence() <= sequence {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the ledger is stuck at {}",
                db.ledger.sequence()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn image_digest(image: &[u8]) -> Vec<u8> {
        let mut hasher = blake3::Hasher::new();
        for chunk in image.chunks(1 << 20) {
            hasher.update(blake3::hash(chunk).as_bytes());
        }
        hasher.finalize().as_bytes().to_vec()
    }

    fn begin(db: &Db, run_id: &str, backup_id: &str) -> validate::BeginRestore {
        validate::begin_restore(
            db,
            pb::BeginRestoreRequest {
                volume: 0,
                run_id: run_id.into(),
                backup_id: backup_id.into(),
            },
        )
        .expect("valid")
    }

    fn end(db: &Db, run_id: &str, abandon: bool, digest: Vec<u8>) -> validate::EndRestore {
        validate::end_restore(
            db,
            pb::EndRestoreRequest {
                volume: 0,
                run_id: run_id.into(),
                abandon,
                expected_image_digest: digest,
            },
        )
        .expect("valid")
    }

    /// A "backup": the frozen mate of a snapshot taken while the ledger
    /// ran, and the sequence it holds; the snapshot is deleted and the
    /// ledger goes on past it.
    async fn backup(node: &Node) -> (Vec<u8>, u64) {
        let db = &node.db;
        ledger_past(db, 20).await;
        let acquire = validate::acquire_snapshot(
            db,
            pb::AcquireSnapshotRequest {
                volume: 0,
                run_id: "backup-run".into(),
                ..Default::default()
            },
        )
        .expect("valid");
        let acquired = db.acquire_snapshot(&acquire).await.expect("acquire");
        let image = node.array.lu(2);
        let delete = validate::delete_snapshot(
            db,
            pb::DeleteSnapshotRequest {
                mate: 0,
                volume: 0,
                run_id: "backup-run".into(),
                force: false,
            },
        )
        .expect("valid");
        db.delete_snapshot(&delete).await.expect("delete");
        db.manager
            .wait_synchronized(0, Duration::from_secs(10))
            .await
            .expect("resync");
        ledger_past(db, acquired.ledger_sequence + 20).await;
        (image, acquired.ledger_sequence)
    }

    #[tokio::test]
    async fn end_restore_takes_no_image_digest_but_one_of_32_bytes() {
        let node = start().await;
        let refused = validate::end_restore(
            &node.db,
            pb::EndRestoreRequest {
                volume: 0,
                run_id: "restore-1".into(),
                abandon: false,
                expected_image_digest: vec![0; 31],
            },
        )
        .expect_err("31 bytes");
        assert!(matches!(refused, DbError::InvalidArgument(_)));
        assert_eq!(
            end(&node.db, "restore-1", false, vec![3; 32]).expected_image_digest,
            Some([3; 32])
        );
        assert_eq!(
            end(&node.db, "restore-1", false, Vec::new()).expected_image_digest,
            None
        );
        let blank = validate::begin_restore(
            &node.db,
            pb::BeginRestoreRequest {
                volume: 0,
                run_id: "restore-1".into(),
                backup_id: " ".into(),
            },
        );
        assert!(matches!(blank, Err(DbError::InvalidArgument(_))));
    }

    #[tokio::test]
    async fn a_restore_stops_the_ledger_and_reopens_it_at_the_backups_sequence() {
        let node = start().await;
        let db = &node.db;
        let (image, backup_sequence) = backup(&node).await;

        let begun = db
            .begin_restore(&begin(db, "restore-1", "backup-b"))
            .await
            .expect("begin");
        let stopped_at = begun.ledger_sequence_stopped.expect("the ledger stopped");
        assert!(stopped_at > backup_sequence);
        let status = db.status();
        let ledger = status.ledger.expect("ledger status");
        assert!(!ledger.running);
        assert_eq!(
            ledger.stopped.as_deref(),
            Some("volume 0 offline: restore run restore-1 of backup backup-b")
        );
        assert_eq!(ledger.sequence, stopped_at);
        assert_eq!(status.volumes[0].routing.data_mode, Mode::Undefined);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            db.ledger.sequence(),
            stopped_at,
            "no transaction after the stop"
        );
        let write = validate::write(
            db,
            pb::VolumeWriteRequest {
                mate: 0,
                volume: 0,
                target: pb::VirtualLu::Data.into(),
                lba: 100,
                data: vec![1; 4096],
            },
        )
        .expect("valid");
        assert!(matches!(
            db.write(write).await,
            Err(DbError::Restoring { .. })
        ));
        let retried = db
            .begin_restore(&begin(db, "restore-1", "backup-b"))
            .await
            .expect("retry");
        assert!(retried.began.already_restoring);
        assert_eq!(retried.ledger_sequence_stopped, None);

        // The wrong image: refused, still offline, the ledger stopped.
        let refused = db
            .end_restore(&end(db, "restore-1", false, image_digest(&image)))
            .await
            .expect_err("the volume does not hold the backup yet");
        assert!(
            matches!(refused, DbError::RestoreIncomplete { .. }),
            "{refused:?}"
        );
        assert!(db.ledger.running().is_none());

        // The backup server's writes, onto both sides.
        node.array.overwrite(1, 0, &image);
        node.array.overwrite(2, 0, &image);
        let ended = db
            .end_restore(&end(db, "restore-1", false, image_digest(&image)))
            .await
            .expect("end");
        assert!(ended.ended.image_digest_matches);
        assert_eq!(ended.ended.chunks_compared, 3);
        assert_eq!(
            ended.ledger,
            LedgerAfterRestore {
                running: true,
                sequence: Some(backup_sequence),
                error: String::new()
            }
        );
        assert_eq!(db.manager.status()[0].routing.data_mode, Mode::Synchronized);
        let report = ledger_format::verify_image(&node.array.lu(1), Some(backup_sequence));
        assert!(report.ok, "{:?}", report.violations);
        // The ledger goes on from the backup's sequence.
        ledger_past(db, backup_sequence + 5).await;
        let status = db.status().ledger.expect("ledger");
        assert!(status.running && status.stopped.is_none());
        db.manager
            .wait_synchronized(0, Duration::from_secs(1))
            .await
            .expect("nothing to resync");
    }

    /// Abandoned over a ledger the half restore damaged: the pair is
    /// resynchronized, and the ledger stays stopped saying why.
    #[tokio::test]
    async fn an_abandoned_restore_over_a_damaged_ledger_says_why_the_ledger_stays_stopped() {
        let node = start().await;
        let db = &node.db;
        ledger_past(db, 10).await;
        db.begin_restore(&begin(db, "restore-1", "backup-b"))
            .await
            .expect("begin");
        // The restore wrote over account 0's block on the origin only.
        node.array.overwrite(1, 4096, &[0xee; 64]);
        let ended = db
            .end_restore(&end(db, "restore-1", true, Vec::new()))
            .await
            .expect("abandon");
        assert!(ended.ended.abandoned);
        assert_eq!(ended.ended.chunks_resynced, 1);
        assert!(!ended.ledger.running);
        assert!(!ended.ledger.error.is_empty());
        assert_eq!(ended.ledger.sequence, None);
        let status = db.status().ledger.expect("ledger");
        assert!(!status.running);
        assert!(status.stopped.expect("a reason").contains("did not open"));
        assert_eq!(node.array.lu(1), node.array.lu(2), "origin == mate");
    }

    /// The reverse resync: the ledger stops, the recorded ranges are copied
    /// back, and the ledger reopens at the snapshot's sequence.
    #[tokio::test]
    async fn a_reverse_resync_reopens_the_ledger_at_the_snapshots_sequence() {
        let node = start().await;
        let db = &node.db;
        ledger_past(db, 10).await;
        let acquire = validate::acquire_snapshot(
            db,
            pb::AcquireSnapshotRequest {
                volume: 0,
                run_id: "run-a".into(),
                ..Default::default()
            },
        )
        .expect("valid");
        let acquired = db.acquire_snapshot(&acquire).await.expect("acquire");
        let frozen = node.array.lu(2);
        ledger_past(db, acquired.ledger_sequence + 20).await;
        let request = validate::restore_snapshot(
            db,
            pb::RestoreSnapshotRequest {
                mate: 0,
                volume: 0,
                run_id: "run-a".into(),
            },
        )
        .expect("valid");
        let restored = db.restore_snapshot(&request).await.expect("restore");
        assert_eq!(
            restored.outcome.snapshot_ledger_sequence,
            acquired.ledger_sequence
        );
        assert!(restored.outcome.blocks_copied > 0);
        let copied: u64 = node.array.copies().iter().map(|c| c.blocks).sum();
        assert_eq!(copied, restored.outcome.blocks_copied);
        assert!(
            node.array
                .copies()
                .iter()
                .all(|c| (c.src_lu, c.dst_lu) == (2, 1))
        );
        assert_eq!(
            restored.ledger,
            LedgerAfterRestore {
                running: true,
                sequence: Some(acquired.ledger_sequence),
                error: String::new()
            }
        );
        // The origin held the frozen image when the ledger reopened; the
        // ledger has written on since, through the mirror LU.
        let report = ledger_format::verify_image(&frozen, Some(acquired.ledger_sequence));
        assert!(report.ok, "{:?}", report.violations);
        ledger_past(db, acquired.ledger_sequence + 5).await;
        db.ledger.stop("test over".into()).await;
        assert_eq!(node.array.lu(1), node.array.lu(2), "origin == mate");
        let retried = db.restore_snapshot(&request).await.expect("retry");
        assert!(retried.outcome.already_restored);
    }
}
