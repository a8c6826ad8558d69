//! The quiesce gate of the database: transactions pass it one by one;
//! closing it stops new transactions and waits for those in flight.
//!
//! A manual suspend carries a lease: if no resume arrives in time the gate
//! reopens by itself, logs a warning and counts it, so that a lost console
//! never leaves the database frozen.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock, oneshot};
use tokio_util::task::TaskTracker;

use crate::error::DbError;

/// The lease of a suspend that does not say otherwise.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// How long closing the gate may wait for transactions in flight.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct QuiesceGate {
    lock: Arc<RwLock<()>>,
    manual: Mutex<Option<ManualSuspend>>,
    suspends: AtomicU64,
    lease_expiries: Arc<AtomicU64>,
    tasks: TaskTracker,
}

struct ManualSuspend {
    resume: oneshot::Sender<()>,
    ended: oneshot::Receiver<Duration>,
}

/// A transaction's pass through the gate, held for its whole duration.
pub type Pass = OwnedRwLockReadGuard<()>;

/// The gate closed with no transaction in flight; reopens when dropped.
pub struct Quiesced {
    _guard: Option<OwnedRwLockWriteGuard<()>>,
    closed_at: Instant,
}

impl Quiesced {
    /// Microseconds since the gate started closing.
    pub fn elapsed_us(&self) -> u64 {
        self.closed_at.elapsed().as_micros() as u64
    }
}

/// Counters for `Status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GateStatus {
    pub suspended: bool,
    pub suspends: u64,
    pub lease_expiries: u64,
}

impl QuiesceGate {
    pub fn new(tasks: TaskTracker) -> Self {
        Self {
            lock: Arc::new(RwLock::new(())),
            manual: Mutex::new(None),
            suspends: AtomicU64::new(0),
            lease_expiries: Arc::new(AtomicU64::new(0)),
            tasks,
        }
    }

    /// Waits for the gate to be open and passes it.
    pub async fn pass(&self) -> Pass {
        self.lock.clone().read_owned().await
    }

    /// Closes the gate and waits (at most `timeout`) for the transactions in
    /// flight. New transactions wait from the moment this is called. When an
    /// operator's suspend already holds the gate closed, the database is
    /// quiesced already and this answers at once.
    pub async fn quiesce(&self, timeout: Duration) -> Result<Quiesced, DbError> {
        let closed_at = Instant::now();
        if self.is_manually_suspended() {
            return Ok(Quiesced {
                _guard: None,
                closed_at,
            });
        }
        match tokio::time::timeout(timeout, self.lock.clone().write_owned()).await {
            Ok(guard) => Ok(Quiesced {
                _guard: Some(guard),
                closed_at,
            }),
            Err(_) => Err(DbError::QuiesceTimeout(format!(
                "transactions still in flight after {timeout:?}"
            ))),
        }
    }

    /// Whether an operator's suspend holds the gate closed now.
    pub fn is_manually_suspended(&self) -> bool {
        self.manual
            .lock()
            .expect("gate poisoned")
            .as_ref()
            .is_some_and(|m| !m.resume.is_closed())
    }

    /// An operator's suspend: closes the gate until [`resume`](Self::resume)
    /// or until `lease` runs out. A second suspend while suspended is a
    /// no-op (the first lease stands).
    pub async fn suspend(&self, lease: Duration) -> Result<(), DbError> {
        if self.is_manually_suspended() {
            return Ok(());
        }
        let quiesced = self.quiesce(QUIESCE_TIMEOUT).await?;
        self.suspends.fetch_add(1, Ordering::Relaxed);
        let (resume_tx, resume_rx) = oneshot::channel();
        let (ended_tx, ended_rx) = oneshot::channel();
        let lease_expiries = self.lease_expiries.clone();
        // The task owns the closed gate: it reopens it on resume or when the
        // lease runs out, whichever comes first.
        self.tasks.spawn(async move {
            let lease_ran_out = tokio::select! {
                _ = resume_rx => false,
                () = tokio::time::sleep(lease) => true,
            };
            if lease_ran_out {
                lease_expiries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "suspend lease of {lease:?} ran out without a resume; resuming the database"
                );
            }
            let held = Duration::from_micros(quiesced.elapsed_us());
            drop(quiesced);
            let _ = ended_tx.send(held);
        });
        *self.manual.lock().expect("gate poisoned") = Some(ManualSuspend {
            resume: resume_tx,
            ended: ended_rx,
        });
        Ok(())
    }

    /// Reopens a manually suspended gate. Answers how long it was closed, or
    /// `None` when it was not suspended (or the lease had already run out).
    pub async fn resume(&self) -> Option<Duration> {
        let manual = self.manual.lock().expect("gate poisoned").take()?;
        if manual.resume.send(()).is_err() {
            // The lease task had already ended: the lease ran out.
            return None;
        }
        manual.ended.await.ok()
    }

    pub fn status(&self) -> GateStatus {
        GateStatus {
            suspended: self.is_manually_suspended(),
            suspends: self.suspends.load(Ordering::Relaxed),
            lease_expiries: self.lease_expiries.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn quiesce_waits_for_passes_and_blocks_new_ones() {
        let gate = Arc::new(QuiesceGate::new(TaskTracker::new()));
        let pass = gate.pass().await;
        assert!(
            gate.quiesce(Duration::from_millis(30)).await.is_err(),
            "a pass is in flight"
        );
        drop(pass);
        let quiesced = gate
            .quiesce(Duration::from_secs(1))
            .await
            .expect("quiesced");
        let blocked = tokio::time::timeout(Duration::from_millis(30), gate.pass()).await;
        assert!(blocked.is_err(), "no new transaction while quiesced");
        drop(quiesced);
        let _pass = tokio::time::timeout(Duration::from_secs(1), gate.pass())
            .await
            .expect("gate reopened");
    }

    #[tokio::test]
    async fn suspend_resumes_by_itself_when_the_lease_runs_out() {
        let gate = QuiesceGate::new(TaskTracker::new());
        gate.suspend(Duration::from_millis(50))
            .await
            .expect("suspend");
        assert!(gate.status().suspended);
        let _pass = tokio::time::timeout(Duration::from_secs(2), gate.pass())
            .await
            .expect("the lease reopened the gate");
        assert_eq!(gate.status().lease_expiries, 1);
        assert!(!gate.status().suspended);
        assert_eq!(gate.resume().await, None, "nothing left to resume");
    }

    #[tokio::test]
    async fn resume_reopens_the_gate() {
        let gate = QuiesceGate::new(TaskTracker::new());
        gate.suspend(Duration::from_secs(30))
            .await
            .expect("suspend");
        let quiesced = gate.quiesce(Duration::from_millis(1)).await;
        assert!(quiesced.is_ok(), "already quiesced by the suspend");
        drop(quiesced);
        assert!(gate.resume().await.is_some());
        let _pass = tokio::time::timeout(Duration::from_secs(1), gate.pass())
            .await
            .expect("resumed");
        assert_eq!(gate.status().lease_expiries, 0);
    }
}
