//! The console's connections to the three nodes, and the retry rule every
//! step uses: a node that does not answer is retried with backoff within a
//! deadline, then reported. Every retried call is idempotent (it carries
//! the run id), so a retry never does a step twice.

use std::future::Future;
use std::time::Duration;

use splitmirror_proto::array::v1::array_service_client::ArrayServiceClient;
use splitmirror_proto::backup::v1::backup_service_client::BackupServiceClient;
use splitmirror_proto::db::v1::db_service_client::DbServiceClient;
use splitmirror_proto::node;
use tonic::transport::Channel;

/// Default addresses (DESIGN.md §6).
pub const DEFAULT_ARRAY: &str = "127.0.0.1:50051";
pub const DEFAULT_DB: &str = "127.0.0.1:50052";
pub const DEFAULT_BACKUP: &str = "127.0.0.1:50053";

/// How long a step keeps retrying a node that does not answer, by default.
pub const STEP_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Addresses {
    pub array: String,
    pub db: String,
    pub backup: String,
}

impl Default for Addresses {
    fn default() -> Self {
        Self {
            array: DEFAULT_ARRAY.into(),
            db: DEFAULT_DB.into(),
            backup: DEFAULT_BACKUP.into(),
        }
    }
}

/// Clients of the three nodes. Channels connect lazily and reconnect, so a
/// node that restarts is reached again by the next retry.
#[derive(Clone)]
pub struct Clients {
    pub addresses: Addresses,
    pub array: ArrayServiceClient<Channel>,
    pub db: DbServiceClient<Channel>,
    pub backup: BackupServiceClient<Channel>,
    /// How long a step keeps retrying a node that does not answer.
    pub step_deadline: Duration,
}

impl Clients {
    pub fn new(addresses: Addresses) -> Result<Self, String> {
        let size = node::MAX_MESSAGE_BYTES;
        Ok(Self {
            array: ArrayServiceClient::new(node::channel(&addresses.array)?)
                .max_decoding_message_size(size)
                .max_encoding_message_size(size),
            db: DbServiceClient::new(node::channel(&addresses.db)?)
                .max_decoding_message_size(size)
                .max_encoding_message_size(size),
            backup: BackupServiceClient::new(node::channel(&addresses.backup)?)
                .max_decoding_message_size(size)
                .max_encoding_message_size(size),
            addresses,
            step_deadline: STEP_DEADLINE,
        })
    }
}

/// Whether a failed call may succeed if tried again.
pub fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
    )
}

/// Calls `call` until it succeeds, fails for good, or `deadline` passes,
/// backing off from 100 ms to 2 s between tries.
pub async fn retry<T, F, Fut>(
    what: &str,
    deadline: Duration,
    mut call: F,
) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    let mut backoff = Duration::from_millis(100);
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(status)
                if is_transient(&status) && tokio::time::Instant::now() + backoff < give_up =>
            {
                tracing::warn!("{what}: {} — retrying in {backoff:?}", status.message());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(status) => return Err(status),
        }
    }
}
