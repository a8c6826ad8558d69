//! db-server's named crash points (the mechanism is
//! `splitmirror_proto::crash`: armed by `SPLITMIRROR_CRASH_AT=NAME[:N]`,
//! only in a build with the `testing` feature).

pub use splitmirror_proto::crash::point;

/// Every point db-server has, for the crash tests and the soak.
pub const POINTS: [&str; 6] = [
    "write.after_intent",
    "write.after_array",
    "acquire.after_journal",
    "delete.after_journal",
    "resync.after_copy",
    "resync.after_remove",
];
