//! The console's clients of the three nodes: the shared typed clients of
//! `splitmirror_proto::client`, with their one retry rule and backoff
//! ([`splitmirror_proto::client::retry`]). Every retried call is
//! idempotent (it carries the run id), so a retry never does a step twice.

use std::time::Duration;

use splitmirror_proto::client::{ArrayClient, BackupClient, ClientError, DbClient};
use splitmirror_proto::security::Security;

/// Default addresses (DESIGN.md §6).
pub const DEFAULT_ARRAY: &str = "127.0.0.1:50051";
pub const DEFAULT_DB: &str = "127.0.0.1:50052";
pub const DEFAULT_BACKUP: &str = "127.0.0.1:50053";

/// How long a step keeps retrying a node that does not answer, by default.
pub const STEP_DEADLINE: Duration = Duration::from_secs(30);

/// Where the three nodes listen (`host:port` or a URL each).
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

/// Clients of the three nodes. They connect lazily and reconnect, so a
/// node that restarts is reached again by the next retry. Cloning is cheap.
#[derive(Clone)]
pub struct Clients {
    pub addresses: Addresses,
    pub array: ArrayClient,
    pub db: DbClient,
    pub backup: BackupClient,
    /// How the clients prove who they are (for health probes too).
    pub security: Security,
    /// How long a step keeps retrying a node that does not answer.
    pub step_deadline: Duration,
}

impl Clients {
    /// Clients of the nodes at `addresses`, retrying for [`STEP_DEADLINE`].
    /// Fails only for an address that cannot be parsed (no call is made).
    pub fn new(addresses: Addresses, security: &Security) -> Result<Self, ClientError> {
        Self::with_array_security(addresses, security, security)
    }

    /// The same, calling the array with another certificate than the other
    /// nodes: the array shows each identity only the LUs granted to it
    /// (LUN masking), and the console's own certificate is granted none by
    /// default — `pair verify` reads origin and mate with db-server's (see
    /// `--array-identity`).
    pub fn with_array_security(
        addresses: Addresses,
        security: &Security,
        array_security: &Security,
    ) -> Result<Self, ClientError> {
        Ok(Self {
            array: ArrayClient::new(&addresses.array, array_security)?,
            db: DbClient::new(&addresses.db, security)?,
            backup: BackupClient::new(&addresses.backup, security)?,
            security: security.clone(),
            addresses,
            step_deadline: STEP_DEADLINE,
        })
    }
}
