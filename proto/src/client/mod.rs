//! One typed client per service, shared by every program that calls a node.
//!
//! - [`ArrayClient`], [`DbClient`], [`BackupClient`]: take and return plain
//!   Rust values (block addresses, byte vectors, digests) and the generated
//!   response messages where those are the data; no caller builds a request
//!   message or reads a `tonic::Status`.
//! - [`ClientError`]: the one error every call returns. Its [`ErrorKind`] is
//!   decided from the gRPC code here and nowhere else, together with the
//!   machine-readable [`Reason`] db-server may attach; the message is for
//!   people and no program decides on it.
//! - [`ErrorKind::is_transient`] is the one retry rule, and [`Backoff`] /
//!   [`retry`] the one backoff policy (the console's steps and db-server's
//!   resync both use it).
//! - Every client is built on one channel builder (`Peer::connect`): the
//!   HTTP/2 windows of
//!   [`crate::node::endpoint`] are set there once, and every client sets the
//!   message-size limits of [`crate::node::MAX_MESSAGE_BYTES`]. Every call opens a
//!   client span and carries its W3C trace context there
//!   ([`TracedChannel`]), and mutual TLS is set up there ([`Security`]).
//!
//! The generated clients stay available (`proto::array::v1::…`) for the few
//! tests that must send what a typed client never would (malformed
//! requests, raw streams).

mod array;
mod backup;
mod db;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};

use crate::telemetry::TracedChannel;

pub use array::{ArrayClient, LuPage, PairInfo};
pub use backup::BackupClient;
pub use db::DbClient;

use crate::reason::{self, Reason};
use crate::security::Security;

/// What class of failure a call met, decided from the gRPC code in
/// [`ErrorKind::from_code`]. Each variant says whether trying the same call
/// again can succeed ([`ErrorKind::is_transient`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The node could not be reached, or it is starting or stopping
    /// (`UNAVAILABLE`). Transient: retry with backoff.
    Unavailable,
    /// The call ran out of time (`DEADLINE_EXCEEDED`). Transient; the call
    /// may or may not have taken effect, which is why every retried call is
    /// idempotent.
    DeadlineExceeded,
    /// The transport failed mid-call without a status (`UNKNOWN`: a reset
    /// connection, a node killed mid-stream). Transient, like
    /// `Unavailable`.
    Broken,
    /// The caller named something that does not exist (`NOT_FOUND`): an
    /// LU, a volume, a backup. Not retryable.
    NotFound,
    /// The request is malformed (`INVALID_ARGUMENT`): a bad run id, a
    /// length that is not whole blocks. Not retryable; the caller's fault.
    InvalidArgument,
    /// A block range past the end of an LU (`OUT_OF_RANGE`). Not retryable.
    OutOfRange,
    /// The target is not in the state the call needs (`FAILED_PRECONDITION`):
    /// a pair resynchronizing, a snapshot held by another run. Whether
    /// waiting helps is said by the [`Reason`], not by this kind.
    FailedPrecondition,
    /// The call was refused for size or load (`RESOURCE_EXHAUSTED`): a write
    /// over the per-request limit, a full disk. Not retryable as it is.
    ResourceExhausted,
    /// The thing the call creates exists already (`ALREADY_EXISTS`).
    AlreadyExists,
    /// The node gave up the call because of a conflict or a cancellation on
    /// its side (`ABORTED`, `CANCELLED`). Not retried automatically: the
    /// caller decides.
    Aborted,
    /// The caller is not allowed (`PERMISSION_DENIED`, `UNAUTHENTICATED`).
    /// Not retryable.
    PermissionDenied,
    /// Stored data is damaged or missing (`DATA_LOSS`): a backup's index
    /// that cannot be read, a chunk missing or corrupt (the message names
    /// it). Not retryable; the evidence is kept for repair.
    DataLoss,
    /// The node failed (`INTERNAL`, `UNIMPLEMENTED`): a disk error, damaged
    /// state, a node too old for the call. Not the caller's fault; not
    /// retryable.
    Internal,
}

impl ErrorKind {
    /// The one mapping from a gRPC code to a kind.
    pub fn from_code(code: tonic::Code) -> Self {
        use tonic::Code;
        match code {
            Code::Unavailable => Self::Unavailable,
            Code::DeadlineExceeded => Self::DeadlineExceeded,
            Code::Unknown => Self::Broken,
            Code::NotFound => Self::NotFound,
            Code::InvalidArgument => Self::InvalidArgument,
            Code::OutOfRange => Self::OutOfRange,
            Code::FailedPrecondition => Self::FailedPrecondition,
            Code::ResourceExhausted => Self::ResourceExhausted,
            Code::AlreadyExists => Self::AlreadyExists,
            Code::Aborted | Code::Cancelled => Self::Aborted,
            Code::PermissionDenied | Code::Unauthenticated => Self::PermissionDenied,
            Code::DataLoss => Self::DataLoss,
            Code::Internal | Code::Unimplemented | Code::Ok => Self::Internal,
        }
    }

    /// The one retry rule: whether the same call may succeed if tried again
    /// without anything else changing.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::Unavailable | Self::DeadlineExceeded | Self::Broken
        )
    }

    /// A short lowercase name, for logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unavailable => "unavailable",
            Self::DeadlineExceeded => "deadline exceeded",
            Self::Broken => "connection broken",
            Self::NotFound => "not found",
            Self::InvalidArgument => "invalid argument",
            Self::OutOfRange => "out of range",
            Self::FailedPrecondition => "failed precondition",
            Self::ResourceExhausted => "resource exhausted",
            Self::AlreadyExists => "already exists",
            Self::Aborted => "aborted",
            Self::PermissionDenied => "permission denied",
            Self::DataLoss => "data loss",
            Self::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed call to a node: what was being done, where, what class of
/// failure ([`ErrorKind`]), db-server's [`Reason`] when it gave one, and the
/// node's message (for people).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{doing} on the {node} at {target}: {message} ({kind})")]
pub struct ClientError {
    pub kind: ErrorKind,
    pub reason: Option<Reason>,
    /// Which node: "array", "db-server", "backup server".
    pub node: &'static str,
    /// The address the client was built for.
    pub target: String,
    /// What the caller was doing, e.g. "reading LU 2 at LBA 0".
    pub doing: String,
    /// The node's message, as it sent it.
    pub message: String,
}

impl ClientError {
    /// The error for a failed call, from its status.
    pub fn from_status(
        node: &'static str,
        target: &str,
        doing: impl Into<String>,
        status: &tonic::Status,
    ) -> Self {
        Self {
            kind: ErrorKind::from_code(status.code()),
            reason: reason::reason(status),
            node,
            target: target.to_string(),
            doing: doing.into(),
            message: status.message().to_string(),
        }
    }

    /// An error found on this side before or after the call (a bad address,
    /// an answer that breaks the contract).
    pub fn local(
        kind: ErrorKind,
        node: &'static str,
        target: &str,
        doing: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            reason: None,
            node,
            target: target.to_string(),
            doing: doing.into(),
            message: message.into(),
        }
    }

    /// Whether trying the same call again may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind.is_transient()
    }
}

/// The one backoff policy: waits that double from `initial` up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    next: Duration,
}

impl Backoff {
    /// 100 ms doubling to 2 s: what the console's steps and db-server's
    /// resync use.
    pub const fn standard() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(2))
    }

    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The wait before the next try (and doubles the one after).
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// Back to the first wait, after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::standard()
    }
}

/// Calls `call` until it succeeds, fails for good (not
/// [`ClientError::is_transient`]), or `deadline` passes, waiting by
/// [`Backoff::standard`] between tries. Only idempotent calls may be retried
/// this way (every splitmirror call that changes state carries a run id for
/// that reason).
pub async fn retry<T, F, Fut>(what: &str, deadline: Duration, mut call: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    let mut backoff = Backoff::standard();
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(error) => {
                let wait = backoff.next_wait();
                if !error.is_transient() || tokio::time::Instant::now() + wait >= give_up {
                    return Err(error);
                }
                tracing::warn!("{what}: {error} — retrying in {wait:?}");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// What every typed client holds besides its generated client: which node
/// it calls and where, and the one way its answers become values or
/// [`ClientError`]s.
#[derive(Debug, Clone)]
struct Peer {
    node: &'static str,
    target: String,
}

impl Peer {
    /// The channel every typed client is built on: lazily connecting,
    /// reconnecting after the peer restarts, with the windows of
    /// [`crate::node::endpoint`], opening a client span per call and sending its
    /// trace context ([`TracedChannel`]). The one place a client-side layer
    /// is added.
    ///
    /// With TLS the server must prove it is `server_role` with a
    /// certificate of the cluster's CA, and this program proves its own
    /// identity with its certificate (see [`crate::security`]).
    fn connect(
        node: &'static str,
        server_role: &'static str,
        target: &str,
        security: &Security,
    ) -> Result<(Self, TracedChannel), ClientError> {
        let channel = security
            .endpoint(target, server_role)
            .map(|endpoint| endpoint.connect_lazy())
            .map_err(|error| {
                ClientError::local(
                    ErrorKind::InvalidArgument,
                    node,
                    target,
                    "calling",
                    error.to_string(),
                )
            })?;
        let peer = Self {
            node,
            target: target.to_string(),
        };
        Ok((peer, TracedChannel::new(channel, node)))
    }

    fn error(&self, doing: impl Into<String>, status: &tonic::Status) -> ClientError {
        ClientError::from_status(self.node, &self.target, doing, status)
    }

    /// The message of a unary answer, or the error, saying what was being
    /// done (only built on failure).
    fn answer<T>(
        &self,
        result: Result<tonic::Response<T>, tonic::Status>,
        doing: impl FnOnce() -> String,
    ) -> Result<T, ClientError> {
        result
            .map(tonic::Response::into_inner)
            .map_err(|status| self.error(doing(), &status))
    }

    /// A server stream's messages, each failure an error saying `doing`.
    fn stream<T: Send + 'static>(
        &self,
        stream: tonic::Streaming<T>,
        doing: String,
    ) -> AnswerStream<T> {
        let peer = self.clone();
        Box::pin(
            stream.map(move |message| message.map_err(|status| peer.error(doing.clone(), &status))),
        )
    }
}

/// The messages of a server stream, as a typed client answers them.
pub type AnswerStream<T> = Pin<Box<dyn Stream<Item = Result<T, ClientError>> + Send>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unreachable_and_broken_calls_are_transient() {
        use tonic::Code;
        let transient: Vec<Code> = [
            Code::Ok,
            Code::Cancelled,
            Code::Unknown,
            Code::InvalidArgument,
            Code::DeadlineExceeded,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::Internal,
            Code::Unavailable,
            Code::DataLoss,
            Code::Unauthenticated,
        ]
        .into_iter()
        .filter(|code| ErrorKind::from_code(*code).is_transient())
        .collect();
        assert_eq!(
            transient,
            vec![Code::Unknown, Code::DeadlineExceeded, Code::Unavailable]
        );
    }

    #[test]
    fn the_kind_and_reason_come_from_code_and_metadata_not_the_message() {
        let status =
            Reason::Resynchronizing.attach(tonic::Status::failed_precondition("anything at all"));
        let error = ClientError::from_status("db-server", "x:1", "acquiring", &status);
        assert_eq!(error.kind, ErrorKind::FailedPrecondition);
        assert_eq!(error.reason, Some(Reason::Resynchronizing));
        let reworded = tonic::Status::failed_precondition("Resynchronizing, wait");
        let error = ClientError::from_status("db-server", "x:1", "acquiring", &reworded);
        assert_eq!(error.reason, None, "a reason is never read from the text");
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut backoff = Backoff::standard();
        let waits: Vec<u64> = (0..7)
            .map(|_| backoff.next_wait().as_millis() as u64)
            .collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1600, 2000, 2000]);
        backoff.reset();
        assert_eq!(backoff.next_wait(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_stops_at_the_first_permanent_error() {
        let mut calls = 0;
        let result: Result<(), ClientError> = retry("test", Duration::from_secs(60), || {
            calls += 1;
            let kind = if calls < 3 {
                ErrorKind::Unavailable
            } else {
                ErrorKind::NotFound
            };
            async move { Err(ClientError::local(kind, "array", "x:1", "test", "no")) }
        })
        .await;
        assert!(matches!(
            result,
            Err(ClientError {
                kind: ErrorKind::NotFound,
                ..
            })
        ));
        assert_eq!(calls, 3);
    }
}
