//! The quiesce gate of the database: transactions pass it one by one;
//! closing it stops new transactions and waits for those in flight.
//!
//! A manual suspend carries a lease: if no resume arrives in time the gate
//! reopens by itself, logs a warning and counts it, so that a lost console
//! never leaves the database frozen (DESIGN §3). Two rules keep that
//! promise:
//!
//! - The lease is capped ([`QuiesceGate::with_max_lease`], the server's
//!   `--max-suspend-lease`, default [`DEFAULT_MAX_LEASE`]); a longer one is
//!   refused ([`DbError::LeaseOverCap`]) and changes nothing.
//! - A suspend while suspended renews the lease: the gate stays closed until
//!   the new lease from now runs out (longer or shorter than what was left),
//!   and the answer says it was a renewal. So the lease a caller is told is
//!   always the one in force, and a console that needs a long quiesce keeps
//!   it alive by renewing, which a lost console stops doing.
//!
//! An acquire ([`QuiesceGate::quiesce`]) while an operator's suspend is in
//! force does not close the gate again: it takes a hold on the suspend's
//! closed gate. The gate reopens only when the suspend is over (resumed, or
//! its lease ran out) *and* every hold is released, so a snapshot is
//! quiesced from the moment it reads the ledger sequence until the split is
//! done, even if the lease runs out meanwhile or a renewal shortens it (a
//! renewal still may: the suspend ends when the shortened lease runs out, as
//! the operator asked; only the gate waits for the acquire). A hold lasts
//! one acquire, which is bounded, so a lost console still never freezes the
//! database.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock, oneshot, watch};
use tokio_util::task::TaskTracker;

use crate::error::DbError;

/// The lease of a suspend that does not say otherwise (or the cap, if that
/// is lower).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// The longest lease a suspend may ask for unless the server is configured
/// otherwise (`--max-suspend-lease`).
pub const DEFAULT_MAX_LEASE: Duration = Duration::from_secs(60);

/// How long closing the gate may wait for transactions in flight.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct QuiesceGate {
    lock: Arc<RwLock<()>>,
    /// The operator's suspend in force, if any. Its lease task clears it
    /// when the lease runs out; renewals and resumes take this lock too, so
    /// that each of them lands either before the expiry or after it.
    manual: Arc<Mutex<Option<ManualSuspend>>>,
    /// One suspend at a time, so that two at once make a suspend and a
    /// renewal rather than a quiesce timing out behind the other.
    suspending: tokio::sync::Mutex<()>,
    max_lease: Duration,
    suspends: AtomicU64,
    lease_expiries: Arc<AtomicU64>,
    tasks: TaskTracker,
}

struct ManualSuspend {
    /// Tells the lease task which suspend is in the slot.
    generation: u64,
    /// The closed gate, shared with the lease task and with the acquires
    /// that hold it: it reopens when the last of them lets go, so taking a
    /// clone under the slot's lock keeps it closed whatever the lease does.
    closed: Arc<OwnedRwLockWriteGuard<()>>,
    resume: oneshot::Sender<()>,
    ended: oneshot::Receiver<Duration>,
    /// When the lease runs out; a renewal moves it.
    deadline: watch::Sender<tokio::time::Instant>,
}

/// What a suspend did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Suspended {
    /// The lease in force from now on.
    pub lease: Duration,
    /// The gate was already suspended; this renewed its lease.
    pub renewed: bool,
}

/// A transaction's pass through the gate, held for its whole duration.
pub type Pass = OwnedRwLockReadGuard<()>;

/// The gate closed with no transaction in flight; reopens when dropped
/// (unless someone else holds it closed too: an operator's suspend, or an
/// acquire holding that suspend's closed gate).
pub struct Quiesced {
    _guard: Arc<OwnedRwLockWriteGuard<()>>,
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
    /// A gate whose suspends may ask for at most [`DEFAULT_MAX_LEASE`].
    pub fn new(tasks: TaskTracker) -> Self {
        Self::with_max_lease(tasks, DEFAULT_MAX_LEASE)
    }

    /// A gate whose suspends may ask for at most `max_lease`.
    pub fn with_max_lease(tasks: TaskTracker, max_lease: Duration) -> Self {
        Self {
            lock: Arc::new(RwLock::new(())),
            manual: Arc::new(Mutex::new(None)),
            suspending: tokio::sync::Mutex::new(()),
            max_lease,
            suspends: AtomicU64::new(0),
            lease_expiries: Arc::new(AtomicU64::new(0)),
            tasks,
        }
    }

    /// The longest lease a suspend may ask for.
    /// The lease a suspend asking for `lease` gets (`None`:
    /// [`DEFAULT_LEASE`], at most the cap), or the refusal of a lease over
    /// the cap. Request validation asks it too, before anything happens.
    pub fn lease_for(&self, lease: Option<Duration>) -> Result<Duration, DbError> {
        let lease = lease.unwrap_or(DEFAULT_LEASE.min(self.max_lease));
        if lease > self.max_lease {
            return Err(DbError::LeaseOverCap {
                lease_ms: lease.as_millis() as u64,
                max_lease_ms: self.max_lease.as_millis() as u64,
            });
        }
        Ok(lease)
    }

    pub fn max_lease(&self) -> Duration {
        self.max_lease
    }

    /// Waits for the gate to be open and passes it.
    pub async fn pass(&self) -> Pass {
        self.lock.clone().read_owned().await
    }

    /// Closes the gate and waits (at most `timeout`) for the transactions in
    /// flight. New transactions wait from the moment this is called. When an
    /// operator's suspend already holds the gate closed, the database is
    /// quiesced already and this answers at once with a hold on that closed
    /// gate: it stays closed until this is dropped, even if the suspend's
    /// lease runs out or the operator resumes meanwhile.
    pub async fn quiesce(&self, timeout: Duration) -> Result<Quiesced, DbError> {
        let closed_at = Instant::now();
        // Under the slot's lock: the lease task and a resume take the
        // suspend out under it, so the clone is taken while the gate is
        // still closed.
        if let Some(manual) = self.manual.lock().expect("gate poisoned").as_ref() {
            return Ok(Quiesced {
                _guard: manual.closed.clone(),
                closed_at,
            });
        }
        match tokio::time::timeout(timeout, self.lock.clone().write_owned()).await {
            Ok(guard) => Ok(Quiesced {
                _guard: Arc::new(guard),
                closed_at,
            }),
            Err(_) => Err(DbError::QuiesceTimeout { timeout }),
        }
    }

    /// Whether an operator's suspend holds the gate closed now.
    pub fn is_manually_suspended(&self) -> bool {
        self.manual.lock().expect("gate poisoned").is_some()
    }

    /// An operator's suspend: closes the gate until [`resume`](Self::resume)
    /// or until `lease` (`None`: [`DEFAULT_LEASE`], at most the cap) runs
    /// out. While suspended, renews the lease to `lease` from now instead.
    /// A lease over the cap is refused and changes nothing.
    pub async fn suspend(&self, lease: Option<Duration>) -> Result<Suspended, DbError> {
        let lease = self.lease_for(lease)?;
        let _one_at_a_time = self.suspending.lock().await;
        if let Some(manual) = self.manual.lock().expect("gate poisoned").as_ref() {
            // Under the slot's lock: the lease task decides an expiry under
            // it too, so this renewal is either seen or finds no suspend.
            manual
                .deadline
                .send_replace(tokio::time::Instant::now() + lease);
            tracing::info!("suspend lease renewed: the database resumes by itself in {lease:?}");
            return Ok(Suspended {
                lease,
                renewed: true,
            });
        }
        let quiesced = self.quiesce(QUIESCE_TIMEOUT).await?;
        let generation = self.suspends.fetch_add(1, Ordering::Relaxed) + 1;
        let (resume_tx, mut resume_rx) = oneshot::channel();
        let (ended_tx, ended_rx) = oneshot::channel();
        let (deadline_tx, mut deadline_rx) = watch::channel(tokio::time::Instant::now() + lease);
        let lease_expiries = self.lease_expiries.clone();
        let slot = self.manual.clone();
        // In the slot before the task can look for it there.
        *self.manual.lock().expect("gate poisoned") = Some(ManualSuspend {
            generation,
            closed: quiesced._guard.clone(),
            resume: resume_tx,
            ended: ended_rx,
            deadline: deadline_tx,
        });
        // The task owns the closed gate: it reopens it on resume or when the
        // lease (as last renewed) runs out, whichever comes first.
        self.tasks.spawn(async move {
            let lease_ran_out = loop {
                let deadline = *deadline_rx.borrow_and_update();
                tokio::select! {
                    _ = &mut resume_rx => break false,
                    changed = deadline_rx.changed() => {
                        if changed.is_err() {
                            // The suspend left the slot: a resume took it.
                            break false;
                        }
                    }
                    () = tokio::time::sleep_until(deadline) => {
                        let mut manual = slot.lock().expect("gate poisoned");
                        if manual.as_ref().is_none_or(|m| m.generation != generation) {
                            // A resume took the suspend just now.
                            break false;
                        }
                        if *deadline_rx.borrow() > tokio::time::Instant::now() {
                            // Renewed just now.
                            continue;
                        }
                        *manual = None;
                        break true;
                    }
                }
            };
            if lease_ran_out {
                lease_expiries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("suspend lease ran out without a resume; resuming the database");
            }
            let held = Duration::from_micros(quiesced.elapsed_us());
            // The suspend is over; the gate reopens now unless an acquire
            // still holds it (then when that acquire lets go).
            drop(quiesced);
            let _ = ended_tx.send(held);
        });
        Ok(Suspended {
            lease,
            renewed: false,
        })
    }

    /// Ends an operator's suspend and reopens the gate, or lets an acquire
    /// holding it closed reopen it when that acquire is done. Answers how
    /// long the suspend lasted, or `None` when it was not suspended (or the
    /// lease had already run out).
    pub async fn resume(&self) -> Option<Duration> {
        let manual = self.manual.lock().expect("gate poisoned").take()?;
        // The lease task ends on this signal, or on finding the slot empty
        // if its lease ran out at the same moment; either way it reports.
        let _ = manual.resume.send(());
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
        gate.suspend(Some(Duration::from_millis(50)))
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
        gate.suspend(Some(Duration::from_secs(30)))
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

    /// The lease in force after a second suspend is the one the second
    /// suspend answered: the gate stays closed past the first lease.
    #[tokio::test]
    async fn a_second_suspend_renews_the_lease_it_answers() {
        let gate = QuiesceGate::new(TaskTracker::new());
        let first = gate
            .suspend(Some(Duration::from_millis(300)))
            .await
            .expect("suspend");
        assert_eq!(
            first,
            Suspended {
                lease: Duration::from_millis(300),
                renewed: false
            }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = gate
            .suspend(Some(Duration::from_secs(2)))
            .await
            .expect("renew");
        assert_eq!(
            second,
            Suspended {
                lease: Duration::from_secs(2),
                renewed: true
            }
        );
        // Well past the first lease (300 ms from the start), well inside
        // the second one.
        let blocked = tokio::time::timeout(Duration::from_millis(600), gate.pass()).await;
        assert!(blocked.is_err(), "the first lease reopened the gate");
        assert!(gate.status().suspended);
        assert_eq!(gate.status().lease_expiries, 0);
        assert_eq!(gate.status().suspends, 1, "a renewal is not a new suspend");
        assert!(gate.resume().await.is_some());
        let _pass = tokio::time::timeout(Duration::from_secs(1), gate.pass())
            .await
            .expect("resumed");
    }

    /// A renewal may also shorten the lease: it is "this long from now".
    #[tokio::test]
    async fn a_renewal_can_shorten_the_lease() {
        let gate = QuiesceGate::new(TaskTracker::new());
        gate.suspend(Some(Duration::from_secs(30)))
            .await
            .expect("suspend");
        let renewed = gate
            .suspend(Some(Duration::from_millis(50)))
            .await
            .expect("renew");
        assert!(renewed.renewed);
        let _pass = tokio::time::timeout(Duration::from_secs(2), gate.pass())
            .await
            .expect("the shortened lease reopened the gate");
        assert_eq!(gate.status().lease_expiries, 1);
        assert!(!gate.status().suspended);
    }

    #[tokio::test]
    async fn a_lease_over_the_cap_is_refused_and_changes_nothing() {
        let gate = QuiesceGate::with_max_lease(TaskTracker::new(), Duration::from_secs(60));
        for lease in [
            Duration::from_millis(60_001),
            Duration::from_millis(u64::from(u32::MAX)),
        ] {
            match gate.suspend(Some(lease)).await {
                Err(DbError::LeaseOverCap {
                    lease_ms,
                    max_lease_ms: 60_000,
                }) => assert_eq!(lease_ms, lease.as_millis() as u64),
                other => panic!("a lease of {lease:?} answered {other:?}"),
            }
            assert!(!gate.status().suspended);
        }
        // Refused as a renewal too, and the lease in force stays.
        gate.suspend(Some(Duration::from_secs(60)))
            .await
            .expect("at the cap");
        assert!(matches!(
            gate.suspend(Some(Duration::from_secs(61))).await,
            Err(DbError::LeaseOverCap { .. })
        ));
        assert!(gate.status().suspended);
        assert!(gate.resume().await.is_some());
        // The default lease never exceeds a lower cap.
        let gate = QuiesceGate::with_max_lease(TaskTracker::new(), Duration::from_secs(3));
        let suspended = gate.suspend(None).await.expect("default lease");
        assert_eq!(suspended.lease, Duration::from_secs(3));
        assert!(gate.resume().await.is_some());
    }

    /// An acquire under an operator's suspend holds the gate closed past
    /// the lease: no transaction may start between its reading the ledger
    /// sequence and its split, or the mate holds a torn transaction.
    #[tokio::test]
    async fn a_lease_running_out_under_an_acquire_waits_for_it() {
        let gate = QuiesceGate::new(TaskTracker::new());
        gate.suspend(Some(Duration::from_millis(50)))
            .await
            .expect("suspend");
        let hold = gate
            .quiesce(Duration::from_millis(1))
            .await
            .expect("quiesced by the suspend");
        // Well past the lease.
        let blocked = tokio::time::timeout(Duration::from_millis(400), gate.pass()).await;
        assert!(blocked.is_err(), "a transaction passed under the acquire");
        assert!(!gate.status().suspended, "the operator's suspend is over");
        assert_eq!(gate.status().lease_expiries, 1);
        drop(hold);
        let _pass = tokio::time::timeout(Duration::from_secs(1), gate.pass())
            .await
            .expect("reopened once the acquire let go");
    }

    /// A renewal may shorten the lease under an acquire; the suspend ends
    /// then, but the gate waits for the acquire.
    #[tokio::test]
    async fn a_shortening_renewal_under_an_acquire_waits_for_it() {
        let gate = QuiesceGate::new(TaskTracker::new());
        gate.suspend(Some(Duration::from_secs(30)))
            .await
            .expect("suspend");
        let hold = gate
            .quiesce(Duration::from_millis(1))
            .await
            .expect("quiesced by the suspend");
        let renewed = gate
            .suspend(Some(Duration::from_millis(20)))
            .await
            .expect("renew");
        assert!(renewed.renewed);
        let blocked = tokio::time::timeout(Duration::from_millis(400), gate.pass()).await;
        assert!(blocked.is_err(), "a transaction passed under the acquire");
        assert!(!gate.status().suspended);
        assert_eq!(gate.status().lease_expiries, 1);
        drop(hold);
        let _pass = tokio::time::timeout(Duration::from_secs(1), gate.pass())
            .await
            .expect("reopened once the acquire let go");
    }

    /// A resume under an acquire ends the suspend at once but does not cut
    /// the acquire's hold short.
    #[tokio::test]
    async fn a_resume_under_an_acquire_waits_for_it() {
        let gate = QuiesceGate::new(TaskTracker::new());
        gate.suspend(Some(Duration::from_secs(30)))
            .await
            .expect("suspend");
        let hold = gate
            .quiesce(Duration::from_millis(1))
            .await
            .expect("quiesced by the suspend");
        let resumed = tokio::time::timeout(Duration::from_secs(1), gate.resume())
            .await
            .expect("a resume does not wait for the acquire");
        assert!(resumed.is_some());
        assert!(!gate.status().suspended);
        let blocked = tokio::time::timeout(Duration::from_millis(100), gate.pass()).await;
        assert!(blocked.is_err(), "a transaction passed under the acquire");
        drop(hold);
        let _pass = tokio::time::timeout(Duration::from_secs(1), gate.pass())
            .await
            .expect("reopened once the acquire let go");
        assert_eq!(gate.status().lease_expiries, 0);
    }

    /// Renewals racing the expiry: each one either keeps the gate closed
    /// for its whole lease or finds the suspend over and starts a new one;
    /// never an answer "renewed" with the gate reopening at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn renewals_at_the_expiry_are_honoured_or_start_anew() {
        let gate = QuiesceGate::new(TaskTracker::new());
        for _ in 0..50 {
            gate.suspend(Some(Duration::from_millis(2)))
                .await
                .expect("suspend");
            tokio::time::sleep(Duration::from_millis(2)).await;
            let answer = gate
                .suspend(Some(Duration::from_millis(300)))
                .await
                .expect("renew or suspend");
            assert_eq!(answer.lease, Duration::from_millis(300));
            let blocked = tokio::time::timeout(Duration::from_millis(100), gate.pass()).await;
            assert!(blocked.is_err(), "the gate opened right after {answer:?}");
            assert!(gate.resume().await.is_some(), "{answer:?}");
        }
    }
}
