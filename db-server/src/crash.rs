//! Named crash points, so that the crash tests can stop db-server at an
//! exact step — after the intent is durable but before the array write,
//! after a resync copy but before its removal, and so on.
//!
//! A point is armed by the environment: `SPLITMIRROR_CRASH_AT=NAME` (or
//! `NAME:N` to crash at the N-th hit). When reached, the process aborts at
//! once — no destructors, no flushing — as `kill -9` would. Unarmed, a point
//! costs one comparison. Written by hand rather than with the `fail` crate:
//! its `panic` action would only end one tokio task, not the process.
//!
//! Armed points exist only in a build with the `testing` feature (and in
//! unit tests); in a production build [`point`] does nothing and the
//! environment variable is not read.

#[cfg(any(test, feature = "testing"))]
use std::sync::OnceLock;
#[cfg(any(test, feature = "testing"))]
use std::sync::atomic::{AtomicU64, Ordering};

/// Every point there is, for the crash tests.
#[cfg(any(test, feature = "testing"))]
pub const POINTS: [&str; 6] = [
    "write.after_intent",
    "write.after_array",
    "acquire.after_journal",
    "delete.after_journal",
    "resync.after_copy",
    "resync.after_remove",
];

#[cfg(any(test, feature = "testing"))]
static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
#[cfg(any(test, feature = "testing"))]
static HITS: AtomicU64 = AtomicU64::new(0);

#[cfg(any(test, feature = "testing"))]
fn armed() -> &'static Option<(String, u64)> {
    ARMED.get_or_init(|| {
        let text = std::env::var("SPLITMIRROR_CRASH_AT").ok()?;
        let (name, nth) = match text.split_once(':') {
            Some((name, nth)) => (name.to_string(), nth.parse().unwrap_or(1)),
            None => (text, 1),
        };
        tracing::warn!("crash point {name} is armed (hit {nth})");
        Some((name, nth.max(1)))
    })
}

/// Does nothing: a production build has no crash points.
#[cfg(not(any(test, feature = "testing")))]
#[inline(always)]
pub fn point(_name: &'static str) {}

/// Aborts the process if `name` is the armed point and this is its N-th hit.
#[cfg(any(test, feature = "testing"))]
pub fn point(name: &'static str) {
    if let Some((armed, nth)) = armed()
        && armed == name
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 >= *nth
    {
        eprintln!("crash point {name} reached: aborting");
        std::process::abort();
    }
}
