//! Why a node refused a call, said so that a program can act on it.
//!
//! A `tonic::Status` code says what class of failure it is; the message is
//! for the operator and may be reworded at any time. When a caller must
//! tell two refusals of the same code apart (a `FAILED_PRECONDITION`
//! because the pair is still resynchronizing — wait and retry — or because
//! another run holds the snapshot — do not), the node adds a reason as
//! ASCII metadata under [`REASON_KEY`]: a trailer on the wire, visible with
//! `grpcurl -v`. Callers decide with [`reason`], never with the message.

use std::fmt;
use std::str::FromStr;

/// The metadata key that carries a [`Reason`].
pub const REASON_KEY: &str = "splitmirror-reason";

/// Why db-server refused a call. The wire form is [`Reason::as_str`]; a
/// value this build does not know reads as no reason (a newer server may
/// add reasons, and an older caller then falls back to the code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The pair is resynchronizing (after a snapshot was deleted, or after a
    /// restart): a snapshot can be acquired once it is Synchronized again.
    /// Retryable after waiting (watch the volume's status).
    Resynchronizing,
    /// A snapshot of the volume is held (by another run, or by this one
    /// when the call needs none): not retryable until it is deleted.
    SnapshotHeld,
    /// The volume is in another mode than the call needs (e.g. deleting a
    /// snapshot of a Synchronized pair). Not retryable as it is.
    WrongMode,
    /// No snapshot is acquired, so the snapshot virtual LU is Undefined.
    NoSnapshot,
    /// The volume does not exist. Not retryable.
    UnknownVolume,
    /// The journal could not record a state change; nothing changed.
    /// Retryable only once the disk is fixed.
    JournalBroken,
    /// The array did not answer; retryable.
    ArrayUnavailable,
    /// The array answered with a failure; not the caller's fault.
    ArrayFailed,
    /// The ledger database failed.
    LedgerFailed,
    /// The database did not quiesce in time; retryable.
    QuiesceTimeout,
    /// db-server is shutting down; retry against the restarted server.
    ShuttingDown,
    /// A suspend lease over the server's cap: ask for a shorter one.
    LeaseOverCap,
    /// A write over the per-request limit: split it.
    TooLarge,
    /// The volume is offline for a restore: its Read and Write answer
    /// `UNAVAILABLE` until the restore ends. Retryable after waiting.
    Restoring,
    /// Another run's restore holds the volume: not retryable until it ends
    /// (EndRestore) or is abandoned.
    RestoreHeld,
    /// EndRestore found origin and mate different, or not the expected
    /// image: the volume stays offline; run the restore again or abandon
    /// it.
    RestoreIncomplete,
    /// The block range runs past the end of the LU or volume (the array's
    /// and db-server's `OUT_OF_RANGE`). Not retryable. It also tells the
    /// node's own `OUT_OF_RANGE` apart from tonic's refusal of an oversized
    /// message, which has the same code (see `node::server_builder`).
    BeyondEnd,
    /// The copy-on-write snapshot was invalidated (its save area filled up,
    /// or db-server restarted while it was held): its image is gone. Not
    /// retryable; the holder deletes it and takes a new one.
    SnapshotInvalidated,
    /// The array's mirroring management table refuses the request in the
    /// pair's current mode (a write naming the mate of a Synchronized or
    /// read-only Snapshot pair, a read of the mate while it
    /// resynchronizes). Not retryable until the pair's mode changes.
    MirrorMode,
}

impl Reason {
    /// Every reason, for tests and documentation.
    pub const ALL: [Reason; 19] = [
        Reason::Resynchronizing,
        Reason::SnapshotHeld,
        Reason::WrongMode,
        Reason::NoSnapshot,
        Reason::UnknownVolume,
        Reason::JournalBroken,
        Reason::ArrayUnavailable,
        Reason::ArrayFailed,
        Reason::LedgerFailed,
        Reason::QuiesceTimeout,
        Reason::ShuttingDown,
        Reason::LeaseOverCap,
        Reason::TooLarge,
        Reason::Restoring,
        Reason::RestoreHeld,
        Reason::RestoreIncomplete,
        Reason::BeyondEnd,
        Reason::SnapshotInvalidated,
        Reason::MirrorMode,
    ];

    /// The wire form: lower-case ASCII words joined by `-`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Resynchronizing => "resynchronizing",
            Reason::SnapshotHeld => "snapshot-held",
            Reason::WrongMode => "wrong-mode",
            Reason::NoSnapshot => "no-snapshot",
            Reason::UnknownVolume => "unknown-volume",
            Reason::JournalBroken => "journal-broken",
            Reason::ArrayUnavailable => "array-unavailable",
            Reason::ArrayFailed => "array-failed",
            Reason::LedgerFailed => "ledger-failed",
            Reason::QuiesceTimeout => "quiesce-timeout",
            Reason::ShuttingDown => "shutting-down",
            Reason::LeaseOverCap => "lease-over-cap",
            Reason::TooLarge => "too-large",
            Reason::Restoring => "restoring",
            Reason::RestoreHeld => "restore-held",
            Reason::RestoreIncomplete => "restore-incomplete",
            Reason::BeyondEnd => "beyond-end",
            Reason::SnapshotInvalidated => "snapshot-invalidated",
            Reason::MirrorMode => "mirror-mode",
        }
    }

    /// Adds this reason to `status` (replacing any reason it had).
    pub fn attach(self, mut status: tonic::Status) -> tonic::Status {
        status.metadata_mut().insert(
            REASON_KEY,
            tonic::metadata::MetadataValue::from_static(self.as_str()),
        );
        status
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reason value this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown splitmirror reason {0:?}")]
pub struct UnknownReason(pub String);

impl FromStr for Reason {
    type Err = UnknownReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownReason(s.to_string()))
    }
}

/// The reason `status` carries, if any. The message is never read.
pub fn reason(status: &tonic::Status) -> Option<Reason> {
    status
        .metadata()
        .get(REASON_KEY)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_round_trips_and_is_a_valid_metadata_value() {
        for r in Reason::ALL {
            assert_eq!(r.as_str().parse::<Reason>(), Ok(r));
            let status = r.attach(tonic::Status::failed_precondition("x"));
            assert_eq!(reason(&status), Some(r), "{r}");
        }
    }

    #[test]
    fn the_decision_reads_the_reason_not_the_message() {
        // The reason with a message that says nothing of it is recognised.
        let reworded = Reason::Resynchronizing.attach(tonic::Status::failed_precondition(
            "la paire se resynchronise encore",
        ));
        assert_eq!(reason(&reworded), Some(Reason::Resynchronizing));
        // The old English text with no reason is not.
        let old_text = tonic::Status::failed_precondition(
            "cannot acquire a snapshot of volume 1: it is in Resynchronizing mode",
        );
        assert_eq!(reason(&old_text), None);
        // A value this build does not know reads as no reason.
        let mut unknown = tonic::Status::failed_precondition("Resynchronizing");
        unknown.metadata_mut().insert(
            REASON_KEY,
            tonic::metadata::MetadataValue::from_static("resynchronizing-later"),
        );
        assert_eq!(reason(&unknown), None);
    }

    #[test]
    fn the_reason_survives_the_trip_through_http_headers() {
        let status = Reason::SnapshotHeld.attach(tonic::Status::failed_precondition("held"));
        let mut headers = tonic::codegen::http::HeaderMap::new();
        status.add_header(&mut headers).expect("headers");
        let back = tonic::Status::from_header_map(&headers).expect("a status");
        assert_eq!(reason(&back), Some(Reason::SnapshotHeld));
    }
}
