//! The place the ledger runs in: it can be stopped (a restore takes its
//! volume offline) and opened again on the restored volume, which redoes
//! and checks it as at start — a ledger that fails its check is refused and
//! the slot stays stopped, saying why in `Status`.
//!
//! Each opening runs its workers under its own child of the node's
//! cancellation token and its own task tracker, so that a stop ends them
//! and waits for them (every transaction in flight has then answered)
//! without touching the rest of the node; the node's tracker waits for
//! each opening's tracker, so shutdown still waits for every worker.

use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::DbError;
use crate::gate::QuiesceGate;
use crate::ledger::{Ledger, LedgerConfig, LedgerStatus};
use crate::manager::SnapshotManager;

pub struct LedgerSlot {
    /// `None`: db-server runs no ledger (`--no-ledger`).
    config: Option<LedgerConfig>,
    manager: Arc<SnapshotManager>,
    gate: Arc<QuiesceGate>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    state: Mutex<SlotState>,
    /// One open or stop at a time.
    changing: tokio::sync::Mutex<()>,
}

enum SlotState {
    Running(Running),
    /// Not running: why, and the last status of the ledger that ran (its
    /// sequence is the one it stopped at), if one did.
    Stopped {
        reason: String,
        last: Option<LedgerStatus>,
    },
}

struct Running {
    ledger: Arc<Ledger>,
    cancel: CancellationToken,
    workers: TaskTracker,
}

/// What opening the ledger came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reopened {
    /// Running at this sequence.
    Running { sequence: u64 },
    /// Not running, and why (the volume holds no valid ledger, or one that
    /// fails its check; or the array failed).
    Refused { reason: String },
    /// db-server runs no ledger on this volume.
    NotHere,
}

/// How many times an open is tried while the array's answers are
/// transient (about 15 s with the standard backoff).
pub const OPEN_RETRIES: u32 = 10;

impl LedgerSlot {
    /// A slot, stopped until [`LedgerSlot::open`].
    pub fn new(
        config: Option<LedgerConfig>,
        manager: Arc<SnapshotManager>,
        gate: Arc<QuiesceGate>,
        cancel: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            config,
            manager,
            gate,
            cancel,
            tasks,
            state: Mutex::new(SlotState::Stopped {
                reason: "not opened yet".into(),
                last: None,
            }),
            changing: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().expect("ledger slot poisoned")
    }

    /// The volume the ledger lives on, if db-server runs one.
    pub fn volume(&self) -> Option<u32> {
        self.config.as_ref().map(|c| c.volume)
    }

    /// The running ledger, if it runs.
    pub fn running(&self) -> Option<Arc<Ledger>> {
        match &*self.state() {
            SlotState::Running(running) => Some(running.ledger.clone()),
            SlotState::Stopped { .. } => None,
        }
    }

    /// The running ledger's sequence, or the one it stopped at (0 when no
    /// ledger ever ran).
    pub fn sequence(&self) -> u64 {
        match &*self.state() {
            SlotState::Running(running) => running.ledger.sequence(),
            SlotState::Stopped { last, .. } => last.as_ref().map_or(0, |l| l.sequence),
        }
    }

    /// Opens the ledger (redo and check, see [`Ledger::open`]) and starts
    /// its workers, unless it runs already. A refusal leaves the slot
    /// stopped with the refusal as its reason, and is answered.
    pub async fn open(&self) -> Result<u64, DbError> {
        let Some(config) = &self.config else {
            return Ok(0);
        };
        let _changing = self.changing.lock().await;
        if let Some(ledger) = self.running() {
            return Ok(ledger.sequence());
        }
        match self.open_retrying_transient(config).await {
            Ok(ledger) => {
                // The sequence the volume holds, read before the workers
                // start: the first of them may commit at once.
                let sequence = ledger.sequence();
                let cancel = self.cancel.child_token();
                let workers = TaskTracker::new();
                ledger.start_workload(config, cancel.clone(), &workers);
                workers.close();
                // The node's shutdown waits for these workers too.
                let waited = workers.clone();
                self.tasks.spawn(async move { waited.wait().await });
                *self.state() = SlotState::Running(Running {
                    ledger,
                    cancel,
                    workers,
                });
                tracing::info!(
                    volume = config.volume,
                    sequence,
                    "the ledger runs at sequence {sequence}"
                );
                Ok(sequence)
            }
            Err(error) => {
                let reason = format!("the ledger did not open: {error}");
                tracing::error!(volume = config.volume, "{reason}");
                if let SlotState::Stopped { reason: now, .. } = &mut *self.state() {
                    *now = reason;
                }
                Err(error)
            }
        }
    }

    /// [`Ledger::open`], tried again while the array's answer is transient
    /// (unreachable for a moment: a restart, a broken connection), for up
    /// to [`OPEN_RETRIES`] tries. Opening redoes the log, which is
    /// idempotent, so a try cut short is safe to repeat. A ledger left
    /// stopped by one dropped connection would stop the database until the
    /// next restart.
    async fn open_retrying_transient(&self, config: &LedgerConfig) -> Result<Arc<Ledger>, DbError> {
        let mut backoff = splitmirror_proto::client::Backoff::standard();
        let mut tries = 1;
        loop {
            match Ledger::open(self.manager.clone(), self.gate.clone(), config).await {
                Err(DbError::Array(error)) if error.is_transient() && tries < OPEN_RETRIES => {
                    let wait = backoff.next_wait();
                    tracing::warn!(
                        volume = config.volume,
                        "opening the ledger: {error}; trying again in {wait:?}"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = self.cancel.cancelled() => return Err(DbError::Array(error)),
                    }
                    tries += 1;
                }
                result => return result,
            }
        }
    }

    /// [`LedgerSlot::open`] for a caller that reports the outcome rather
    /// than failing with it.
    pub async fn reopen(&self, volume: u32) -> Reopened {
        if self.volume() != Some(volume) {
            return Reopened::NotHere;
        }
        match self.open().await {
            Ok(sequence) => Reopened::Running { sequence },
            Err(error) => Reopened::Refused {
                reason: error.to_string(),
            },
        }
    }

    /// Keeps the slot stopped for `reason` without opening the ledger
    /// (start-up finds its volume offline for a restore).
    pub fn keep_stopped(&self, reason: String) {
        tracing::warn!(volume = ?self.volume(), "the ledger stays stopped: {reason}");
        if let SlotState::Stopped { reason: now, .. } = &mut *self.state() {
            *now = reason;
        }
    }

    /// Stops the ledger if it runs: no transaction starts after this, and
    /// it answers once every worker (so every transaction in flight) has
    /// ended. Answers the sequence it stopped at, or `None` if it did not
    /// run.
    pub async fn stop(&self, reason: String) -> Option<u64> {
        let _changing = self.changing.lock().await;
        let running = {
            let mut state = self.state();
            let last = match &mut *state {
                SlotState::Stopped { reason: now, .. } => {
                    *now = reason;
                    return None;
                }
                // Meanwhile `Status` shows the sequence it is stopping at.
                SlotState::Running(running) => Some(running.ledger.status()),
            };
            let stopped = SlotState::Stopped {
                reason: reason.clone(),
                last,
            };
            match std::mem::replace(&mut *state, stopped) {
                SlotState::Running(running) => running,
                SlotState::Stopped { .. } => return None,
            }
        };
        running.cancel.cancel();
        running.workers.wait().await;
        let last = running.ledger.status();
        let sequence = last.sequence;
        tracing::info!(
            volume = last.volume,
            sequence,
            "the ledger stopped at sequence {sequence}: {reason}"
        );
        *self.state() = SlotState::Stopped {
            reason,
            last: Some(last),
        };
        Some(sequence)
    }

    /// The ledger's `Status`: the running ledger's, or the last one with
    /// `running` false and the reason it stopped. `None` without a ledger.
    pub fn status(&self) -> Option<LedgerStatus> {
        let config = self.config.as_ref()?;
        Some(match &*self.state() {
            SlotState::Running(running) => running.ledger.status(),
            SlotState::Stopped { reason, last } => {
                let mut status = last.clone().unwrap_or_else(|| LedgerStatus {
                    volume: config.volume,
                    ..LedgerStatus::default()
                });
                status.running = false;
                status.stopped = Some(reason.clone());
                status
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::*;
    use crate::array_port::{MemoryArray, PairInfo};
    use crate::manager::ManagerConfig;

    const PAIR: PairInfo = PairInfo {
        mirror_lu: 0,
        origin_lu: 1,
        mate_lu: 2,
        block_size_bytes: 512,
        block_count: 4096,
    };

    #[tokio::test]
    async fn an_open_outlasts_an_array_that_is_unreachable_for_a_moment() {
        let array = Arc::new(MemoryArray::new(vec![PAIR]));
        let (cancel, tasks) = (CancellationToken::new(), TaskTracker::new());
        let manager = SnapshotManager::start(
            array.clone(),
            vec![PAIR],
            None,
            ManagerConfig::default(),
            cancel.clone(),
            tasks.clone(),
        )
        .await
        .expect("start");
        let gate = Arc::new(QuiesceGate::new(tasks.clone()));
        let config = LedgerConfig {
            volume: 0,
            accounts: 16,
            target_tps: 0,
            workers: 1,
            ..LedgerConfig::default()
        };
        let slot = LedgerSlot::new(Some(config), manager, gate, cancel.clone(), tasks);
        array.fail_reads.store(true, Ordering::SeqCst);
        let healed = array.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            healed.fail_reads.store(false, Ordering::SeqCst);
        });
        slot.open()
            .await
            .expect("opened once the array answered again");
        assert!(slot.running().is_some());
        cancel.cancel();
    }
}
