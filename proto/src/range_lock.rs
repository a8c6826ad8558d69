//! A lock over block ranges: holders of overlapping ranges are ordered,
//! holders of disjoint ranges run concurrently.
//!
//! The array uses it so that a `CopyRange` never interleaves with a write to
//! the same blocks; the snapshot manager uses it so that the resync's
//! "re-check → copy → remove" is atomic against writes to the same blocks.
//! Shared holders (readers) do not exclude each other.
//!
//! Written by hand: the crates that offer range locks are either
//! synchronous or pull in a runtime of their own, and this one is a short
//! list under a mutex with a `Notify`. The list is scanned linearly, which is
//! right for the few dozen requests a node has in flight; it is not fair (a
//! steady stream of overlapping shared holders can delay an exclusive one).

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
    held: Mutex<Vec<Held>>,
    released: Notify,
    next_id: AtomicU64,
    enabled: bool,
}

#[derive(Debug)]
struct Held {
    id: u64,
    blocks: Range<u64>,
    mode: LockMode,
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
            held: Mutex::new(Vec::new()),
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

    /// Waits until `blocks` can be held in `mode`, then holds it.
    pub async fn lock(&self, blocks: Range<u64>, mode: LockMode) -> RangeGuard<'_> {
        if !self.enabled || blocks.is_empty() {
            return RangeGuard {
                lock: self,
                id: None,
            };
        }
        loop {
            // Register for the wake-up before checking, so that a release
            // between the check and the wait is not missed.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(guard) = self.try_lock(blocks.clone(), mode) {
                return guard;
            }
            released.await;
        }
    }

    /// Holds `blocks` if nothing conflicting is held, without waiting.
    pub fn try_lock(&self, blocks: Range<u64>, mode: LockMode) -> Option<RangeGuard<'_>> {
        if !self.enabled || blocks.is_empty() {
            return Some(RangeGuard {
                lock: self,
                id: None,
            });
        }
        let mut held = self.held.lock().expect("range lock poisoned");
        let conflicts = held.iter().any(|h| {
            h.blocks.start < blocks.end
                && blocks.start < h.blocks.end
                && (mode == LockMode::Exclusive || h.mode == LockMode::Exclusive)
        });
        if conflicts {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        held.push(Held { id, blocks, mode });
        Some(RangeGuard {
            lock: self,
            id: Some(id),
        })
    }

    /// How many ranges are held now.
    pub fn held_count(&self) -> usize {
        self.held.lock().expect("range lock poisoned").len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let mut held = self.lock.held.lock().expect("range lock poisoned");
            if let Some(index) = held.iter().position(|h| h.id == id) {
                held.swap_remove(index);
            }
            drop(held);
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
    async fn disabled_lock_orders_nothing() {
        let lock = RangeLock::disabled_for_tests();
        let _a = lock.lock(0..8, LockMode::Exclusive).await;
        assert!(lock.try_lock(0..8, LockMode::Exclusive).is_some());
    }
}
