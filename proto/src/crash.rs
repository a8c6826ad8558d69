//! Named crash points, so that the crash tests can stop a node at an exact
//! step — db-server after a write intent is durable but before the array
//! write, the backup server after a restore's first chunk is written, and
//! so on. Each node lists its own points (`db_server::crash::POINTS`,
//! `backup_server::crash::POINTS`); this module arms and fires them.
//!
//! A point is armed by the environment: `SPLITMIRROR_CRASH_AT=NAME` (or
//! `NAME:N` to crash at the N-th hit). When reached, the process aborts at
//! once — no destructors, no flushing — as `kill -9` would. Unarmed, a point
//! costs one comparison. Written by hand rather than with the `fail` crate:
//! its `panic` action would only end one tokio task, not the process.
//!
//! Armed points exist only with the `crash-points` feature (which the nodes'
//! `testing` features turn on); without it [`point`] does nothing and the
//! environment variable is not read.

#[cfg(feature = "crash-points")]
use std::sync::OnceLock;
#[cfg(feature = "crash-points")]
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(feature = "crash-points")]
static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
#[cfg(feature = "crash-points")]
static HITS: AtomicU64 = AtomicU64::new(0);

#[cfg(feature = "crash-points")]
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

/// Does nothing: a build without `crash-points` has no crash points.
#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn point(_name: &'static str) {}

/// Aborts the process if `name` is the armed point and this is its N-th hit.
#[cfg(feature = "crash-points")]
pub fn point(name: &'static str) {
    if let Some((armed, nth)) = armed()
        && armed == name
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 >= *nth
    {
        eprintln!("crash point {name} reached: aborting");
        std::process::abort();
    }
}
