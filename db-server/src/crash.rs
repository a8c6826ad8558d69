//! db-server's named crash points (the mechanism is
//! `splitmirror_proto::crash`: armed by `SPLITMIRROR_CRASH_AT=NAME[:N]`,
//! only in a build with the `testing` feature).

pub use splitmirror_proto::crash::point;

/// The points of the write path and the resync, for the crash tests and
/// the soak (which drive writes, snapshots and resyncs).
pub const POINTS: [&str; 6] = [
    "write.after_intent",
    "write.after_array",
    "acquire.after_journal",
    "delete.after_journal",
    "resync.after_copy",
    "resync.after_remove",
];

/// The points of the restores (BeginRestore, EndRestore, RestoreSnapshot),
/// listed apart so that a crash test that drives no restore does not wait
/// for points it never reaches:
/// - `restore.after_journal`: Restoring is durable, the writer's grant not
///   yet set (start-up sets it);
/// - `restore.after_grant`: the grant set, BeginRestore not yet answered;
/// - `end_restore.after_journal`: Synchronized is durable, the grant not
///   yet withdrawn (start-up withdraws it) and the ledger not reopened;
/// - `reverse.after_journal`: RestoringToSnapshot is durable, nothing
///   copied yet;
/// - `reverse.after_copy`: after each chunk copied mate → origin (start-up
///   copies every recorded range again, then journals Synchronized).
pub const RESTORE_POINTS: [&str; 5] = [
    "restore.after_journal",
    "restore.after_grant",
    "end_restore.after_journal",
    "reverse.after_journal",
    "reverse.after_copy",
];
