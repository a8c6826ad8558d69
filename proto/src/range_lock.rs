//! A lock over block ranges: holders of overlapping ranges are ordered,
//! holders of disjoint ranges run concurrently.
//!
//! The array uses it so that a `CopyRange` never interleaves with a write to
//! the same blocks; the snapshot manager uses it so that the resync's
//! "re-check → copy → remove" is atomic against writes to the same blocks.
//! Shared holders (readers) do not exclude each other.
//!
//! Overlapping requests are served in arrival order: a request waits for
//! every earlier holder *and every earlier waiter* it conflicts with. Without
//! that, a steady stream of shared holders (database writes to hot blocks)
//! would starve an exclusive one (the resync) for as long as it lasts.
//!
//! Written by hand: the crates that offer range locks are either
//! synchronous or pull in a runtime of their own, and this one is two short
//! lists under a mutex with a `Notify`. The lists are scanned linearly, which
//! is right for the few dozen requests a node has in flight.

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

/// Whether a holder excludes other holders of overlapping ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

#[derive(Debug)]
pub struct RangeLock {
    state: Mutex<State>,
    released: Notify,
    next_id: AtomicU64,
    enabled: bool,
}

#[derive(Debug, Default)]
struct State {
    held: Vec<Request>,
    /// Requests that found a conflict, in arrival order (by id).
    waiting: Vec<Request>,
}

#[derive(Debug, Clone)]
struct Request {
    id: u64,
    blocks: Range<u64>,
    mode: LockMode,
}

impl Request {
    fn conflicts_with(&self, other: &Request) -> bool {
        self.blocks.start < other.blocks.end
            && other.blocks.start < self.blocks.end
            && (self.mode == LockMode::Exclusive || other.mode == LockMode::Exclusive)
    }
}

/// Removes a waiting request if its `lock` future is dropped before it
/// acquires (a cancelled caller must not block those behind it).
struct WaitTicket<'a> {
    lock: &'a RangeLock,
    id: u64,
    active: bool,
}

impl Drop for WaitTicket<'_> {
    fn drop(&mut self) {
        if self.active {
            let mut state = self.lock.state.lock().expect("range lock poisoned");
            state.waiting.retain(|w| w.id != self.id);
            drop(state);
            self.lock.released.notify_waiters();
        }
    }
}

/// Holds a range until dropped.
#[must_use = "the range is released when the guard is dropped"]
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: Option<u64>,
}

impl Default for RangeLock {
    fn default() -> Self {
        Self::new()
    }
}

impl RangeLock {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            released: Notify::new(),
            next_id: AtomicU64::new(0),
            enabled: true,
        }
    }

    /// A lock that orders nothing. Only for tests that must show their
    /// checker catches the races the lock prevents.
    pub fn disabled_for_tests() -> Self {
        Self {
            enabled: false,
            ..Self::new()
        }
    }

    /// Waits until `blocks` can be held in `mode` (after every earlier
    /// conflicting request), then holds it.
    pub async fn lock(&self, blocks: Range<u64>, mode: LockMode) -> RangeGuard<'_> {
        if !self.enabled || blocks.is_empty() {
            return RangeGuard {
                lock: self,
                id: None,
            };
        }
        let request = Request {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            blocks,
            mode,
        };
        let mut ticket = WaitTicket {
            lock: self,
            id: request.id,
            active: false,
        };
        loop {
            // Register for the wake-up before checking, so that a release
            // between the check and the wait is not missed.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut state = self.state.lock().expect("range lock poisoned");
                let blocked = state.held.iter().any(|h| h.conflicts_with(&request))
                    || state
                        .waiting
                        .iter()
                        .take_while(|w| w.id < request.id)
                        .any(|w| w.conflicts_with(&request));
                if !blocked {
                    state.waiting.retain(|w| w.id != request.id);
                    state.held.push(request.clone());
                    ticket.active = false;
                    return RangeGuard {
                        lock: self,
                        id: Some(request.id),
                    };
                }
                if !ticket.active {
                    state.waiting.push(request.clone());
                    ticket.active = true;
                }
            }
            released.await;
        }
    }

    /// Holds `blocks` if nothing conflicting is held or waiting, without
    /// waiting.
    pub fn try_lock(&self, blocks: Range<u64>, mode: LockMode) -> Option<RangeGuard<'_>> {
        if !self.enabled || blocks.is_empty() {
            return Some(RangeGuard {
                lock: self,
                id: None,
            });
        }
        let request = Request {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            blocks,
            mode,
        };
        let mut state = self.state.lock().expect("range lock poisoned");
        let blocked = state.held.iter().any(|h| h.conflicts_with(&request))
            || state.waiting.iter().any(|w| w.conflicts_with(&request));
        if blocked {
            return None;
        }
        let id = request.id;
        state.held.push(request);
        Some(RangeGuard {
            lock: self,
            id: Some(id),
        })
    }

    /// How many ranges are held now.
    pub fn held_count(&self) -> usize {
        self.state.lock().expect("range lock poisoned").held.len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let mut state = self.lock.state.lock().expect("range lock poisoned");
            if let Some(index) = state.held.iter().position(|h| h.id == id) {
                state.held.swap_remove(index);
            }
            drop(state);
            self.lock.released.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn disjoint_ranges_do_not_wait() {
        let lock = RangeLock::new();
        let _a = lock.lock(0..10, LockMode::Exclusive).await;
        let _b = lock.lock(10..20, LockMode::Exclusive).await;
        assert_eq!(lock.held_count(), 2);
    }

    #[tokio::test]
    async fn shared_holders_coexist_but_exclude_writers() {
        let lock = RangeLock::new();
        let a = lock.lock(0..10, LockMode::Shared).await;
        let _b = lock.lock(5..15, LockMode::Shared).await;
        assert!(lock.try_lock(9..10, LockMode::Exclusive).is_none());
        assert!(lock.try_lock(15..16, LockMode::Exclusive).is_some());
        drop(a);
        assert!(lock.try_lock(0..5, LockMode::Exclusive).is_some());
    }

    #[tokio::test]
    async fn overlapping_exclusive_waits_for_release() {
        let lock = std::sync::Arc::new(RangeLock::new());
        let first = lock.lock(0..8, LockMode::Exclusive).await;
        let waiter = {
            let lock = lock.clone();
            tokio::spawn(async move {
                let _g = lock.lock(7..9, LockMode::Exclusive).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "overlapping holder must wait");
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("released holder wakes the waiter")
            .expect("task");
        assert_eq!(lock.held_count(), 0);
    }

    #[tokio::test]
    async fn a_waiting_writer_is_not_starved_by_later_readers() {
        let lock = std::sync::Arc::new(RangeLock::new());
        let reader = lock.lock(0..10, LockMode::Shared).await;
        let writer = {
            let lock = lock.clone();
            tokio::spawn(async move {
                let _g = lock.lock(0..100, LockMode::Exclusive).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // A later reader of an overlapping range queues behind the writer…
        assert!(lock.try_lock(50..51, LockMode::Shared).is_none());
        // …but one of a disjoint range does not.
        assert!(lock.try_lock(200..201, LockMode::Shared).is_some());
        drop(reader);
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer gets its turn")
            .expect("task");
    }

    #[tokio::test]
    async fn a_cancelled_waiter_does_not_block_others() {
        let lock = RangeLock::new();
        let holder = lock.lock(0..10, LockMode::Exclusive).await;
        let cancelled = tokio::time::timeout(
            Duration::from_millis(10),
            lock.lock(0..10, LockMode::Exclusive),
        )
        .await;
        assert!(cancelled.is_err());
        drop(holder);
        assert!(lock.try_lock(0..10, LockMode::Exclusive).is_some());
    }

    #[tokio::test]
    async fn disabled_lock_orders_nothing() {
        let lock = RangeLock::disabled_for_tests();
        let _a = lock.lock(0..8, LockMode::Exclusive).await;
        assert!(lock.try_lock(0..8, LockMode::Exclusive).is_some());
    }
}
