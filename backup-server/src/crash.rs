//! The backup server's named crash points (the mechanism is
//! `splitmirror_proto::crash`: armed by `SPLITMIRROR_CRASH_AT=NAME[:N]`,
//! only in a build with the `testing` feature, which turns on the shared
//! crate's `crash-points`; a no-op otherwise).

pub use splitmirror_proto::crash::point;

/// Every point the backup server has, for the crash tests.
pub const POINTS: [&str; 2] = [
    // A restore's write stream was acknowledged by the array (hit once per
    // stream: `:N` stops after the N-th).
    "restore.after_first_write",
    // Every chunk of a restore was written; before the flush and the
    // array's digests of what was written.
    "restore.before_verify",
];
