//! db-server: the database server of splitmirror — the snapshot management
//! program (1517), its communication program (1516) and the ledger database
//! (1515).
//!
//! - [`update_location_table`]: the Fig. 3 table, ranges that merge and split.
//! - [`lu_status`]: the Fig. 10 table, modes and routing.
//! - [`array_port`]: the manager's view of the array (a trait, and
//!   `GrpcArray` over the shared `ArrayClient`; the in-memory array only
//!   with the `testing` feature).
//! - [`manager`]: the write path (Fig. 5), acquire/delete; its submodule
//!   `manager::resync` the resync (Fig. 7) with its one backoff, and
//!   `manager::restore` the restore states (from a backup, and the reverse
//!   resync to a held snapshot).
//! - [`journal`]: what makes the manager's tables survive a crash.
//! - [`error`]: `DbError`, every refusal and failure, each variant saying
//!   whether a retry can help.
//! - [`gate`]: the quiesce gate with its suspend lease.
//! - [`ledger_format`], [`ledger`]: the toy database and its image verifier;
//!   [`ledger_slot`]: where it runs, stopped and opened again by a restore.
//! - [`db`]: the operations that span them (`AcquireSnapshot`, the
//!   restores).
//! - [`crash`]: named crash points (armed only with the `testing` feature).
//! - [`service`]: the thin gRPC adapter (`splitmirror.db.v1`).
//!
//! [`spawn`] starts a node on a listener; the binary, the tests and the
//! console's embedded demo all use it.

pub mod array_port;
pub mod crash;
pub mod db;
pub mod error;
pub mod gate;
pub mod journal;
pub mod latency;
pub mod ledger;
pub mod ledger_format;
pub mod ledger_slot;
pub mod lu_status;
pub mod manager;
pub mod service;
pub mod update_location_table;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use splitmirror_proto::client::{ClientError, ErrorKind};
use splitmirror_proto::db::v1::db_service_server::{self, DbServiceServer};
use splitmirror_proto::node::{self, NodeHandle};
use splitmirror_proto::security::{AccessPolicy, Security};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::array_port::{ArrayPort, GrpcArray};
use crate::db::Db;
use crate::error::DbError;
use crate::gate::QuiesceGate;
use crate::ledger::LedgerConfig;
use crate::ledger_slot::LedgerSlot;
use crate::lu_status::RestoreKind;
use crate::manager::{ManagerConfig, SnapshotManager};

/// How long start-up waits for the array to answer unless told otherwise
/// (`--array-wait`).
pub const DEFAULT_ARRAY_WAIT: Duration = Duration::from_secs(60);

/// Everything a db-server needs to start.
#[derive(Debug, Clone)]
pub struct DbServerConfig {
    /// Its certificates (for serving and for calling the array), or
    /// `--insecure`.
    pub security: Security,
    /// The identities that may call the control methods
    /// ([`service::CONTROL_METHODS`]); default: the console.
    pub control_identities: Vec<String>,
    pub array_url: String,
    pub data_dir: PathBuf,
    pub manager: ManagerConfig,
    /// `None` runs the snapshot manager without a database.
    pub ledger: Option<LedgerConfig>,
    /// The journal's region size; `None` runs without a journal (no crash
    /// safety — only for measuring what the journal costs).
    pub journal_region_bytes: Option<u64>,
    /// How long start-up waits for the array before giving up; `None`
    /// waits for ever. Meanwhile the node serves: health `NOT_SERVING`,
    /// every call `UNAVAILABLE` saying what it waits for.
    pub array_wait: Option<Duration>,
    /// The longest suspend lease a caller may ask for (DESIGN §3).
    pub max_suspend_lease: Duration,
}

/// The journal's default region: intents are rounded out to this.
pub const DEFAULT_JOURNAL_REGION_BYTES: u64 = 64 << 10;

/// Why a db-server did not start (or stopped before it was ready).
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Reading the listener's address or creating the data directory
    /// failed. Not retryable as configured.
    #[error("{doing}: {source}")]
    Io {
        doing: String,
        #[source]
        source: std::io::Error,
    },
    /// The array's address cannot be parsed. Not retryable.
    #[error("the array address: {0}")]
    ArrayAddress(#[source] ClientError),
    /// The array did not answer within `--array-wait`. Retryable: start
    /// again once the array is up.
    #[error("gave up waiting for the array at {target} after {waited}: {last_error}")]
    ArrayWait {
        target: String,
        /// How long start-up waited, e.g. "60s (--array-wait)".
        waited: String,
        #[source]
        last_error: ClientError,
    },
    /// The array answered the pair discovery with a failure (not
    /// unavailability). Not retryable as it is.
    #[error("discovering mirror pairs: {0}")]
    DiscoverPairs(#[source] ClientError),
    /// The array defines no mirror LU: nothing to manage. Not retryable.
    #[error("the array at {0} defines no mirror LU")]
    NoMirrorLu(String),
    /// The journal could not be opened. Not retryable until the disk or the
    /// data directory is fixed.
    #[error("opening the journal: {0}")]
    Journal(#[source] journal::JournalError),
    /// The snapshot manager could not start (a new pair's state could not
    /// be journaled). Not retryable until the disk is fixed.
    /// (The cause is in the message, not a `source`: printed with `{:#}`
    /// it would appear twice.)
    #[error("starting the snapshot manager: {0}")]
    Manager(DbError),
    /// Asked to stop while waiting for the array.
    #[error("shut down while waiting for the array at {0}")]
    ShutDown(String),
    /// The gRPC server failed, or its task panicked (see
    /// [`NodeError`](node::NodeError)). Not retryable as it is.
    #[error("{0}")]
    Serve(#[source] node::NodeError),
    /// The server stopped before it was ready, without saying why.
    #[error("db-server stopped before it was ready")]
    StoppedBeforeReady,
}

/// Serves on `listener` at once, connects to the array (waiting for it up
/// to `array_wait`), builds the tables, opens the ledger (a ledger that
/// fails its check, or whose volume is offline for a restore, stays
/// stopped: `Status` says why), and answers the handle once the node is
/// ready (health `SERVING`). Until then the port
/// answers `NOT_SERVING` and `UNAVAILABLE`; if the array does not come in
/// time, or anything else fails at start, the node stops serving and the
/// error is answered.
pub async fn spawn(
    config: DbServerConfig,
    listener: TcpListener,
) -> Result<NodeHandle, SpawnError> {
    let addr = listener.local_addr().map_err(|source| SpawnError::Io {
        doing: "reading the listener's address".into(),
        source,
    })?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| SpawnError::Io {
        doing: format!("creating {}", config.data_dir.display()),
        source,
    })?;
    let array: Arc<dyn ArrayPort> = Arc::new(
        GrpcArray::new(&config.array_url, &config.security)
            .map_err(SpawnError::ArrayAddress)?
            .with_snapshot_readers(config.control_identities.clone()),
    );
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let service = node::Starting::new(format!(
        "db-server is starting: waiting for the array at {}",
        config.array_url
    ));
    let policy = AccessPolicy::with_control(
        service::CONTROL_METHODS,
        config.control_identities.iter().cloned(),
    );
    let router = node::server_builder(&config.security, policy)
        .map_err(SpawnError::Serve)?
        .add_service(service.clone());
    // The manager, once started, so that shutdown closes its journal.
    let started_manager: Arc<OnceLock<Arc<SnapshotManager>>> = Arc::default();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let start = start(
        config,
        addr,
        array,
        service,
        cancel.clone(),
        tasks.clone(),
        started_manager.clone(),
    );
    let serve_cancel = cancel.clone();
    let handle_cancel = cancel.clone();
    let task = tokio::spawn(async move {
        let served = node::serve_when_ready(
            router,
            &[db_service_server::SERVICE_NAME],
            listener,
            serve_cancel,
            start,
            started_tx,
        )
        .await;
        // The server has stopped: stop the workload and the resync and wait
        // for them, so nothing is left writing after the handle returns.
        cancel.cancel();
        tasks.close();
        tasks.wait().await;
        if let Some(manager) = started_manager.get() {
            manager.close_journal();
        }
        served
    });
    match started_rx.await {
        Ok(Ok(())) => {
            tracing::info!(%addr, "db-server listening on {addr}");
            Ok(NodeHandle::new(addr, handle_cancel, task))
        }
        Ok(Err(start_error)) => {
            // The node stops serving by itself; wait until it has.
            let _ = task.await;
            Err(start_error)
        }
        Err(_) => match task.await {
            Ok(Err(serve_error)) => Err(SpawnError::Serve(serve_error)),
            Ok(Ok(())) => Err(SpawnError::StoppedBeforeReady),
            Err(join_error) => Err(SpawnError::Serve(join_error.into())),
        },
    }
}

/// What start-up does while the port already answers: wait for the array,
/// open the journal, start the manager and the ledger, then hand the real
/// service to `service`.
async fn start(
    config: DbServerConfig,
    addr: std::net::SocketAddr,
    array: Arc<dyn ArrayPort>,
    service: node::Starting<DbServiceServer<service::DbGrpc>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    started_manager: Arc<OnceLock<Arc<SnapshotManager>>>,
) -> Result<(), SpawnError> {
    let pairs = tokio::select! {
        pairs = wait_for_pairs(array.as_ref(), &config.array_url, addr, config.array_wait) => pairs?,
        () = cancel.cancelled() => return Err(SpawnError::ShutDown(config.array_url.clone())),
    };
    let journal = match config.journal_region_bytes {
        Some(region_bytes) => Some(
            journal::Journal::open(&config.data_dir, region_bytes).map_err(SpawnError::Journal)?,
        ),
        None => None,
    };
    let manager = SnapshotManager::start(
        array,
        pairs,
        journal,
        config.manager.clone(),
        cancel.clone(),
        tasks.clone(),
    )
    .await
    .map_err(SpawnError::Manager)?;
    let _ = started_manager.set(manager.clone());
    let gate = Arc::new(QuiesceGate::with_max_lease(
        tasks.clone(),
        config.max_suspend_lease,
    ));
    let ledger = LedgerSlot::new(
        config.ledger.clone(),
        manager.clone(),
        gate.clone(),
        cancel.clone(),
        tasks.clone(),
    );
    // A volume offline for a restore from a backup holds no ledger to run
    // until the restore ends (an interrupted reverse resync was finished
    // by the manager's start). A ledger that does not open (it fails its
    // check) stays stopped, saying why in Status, and db-server serves:
    // restoring a backup over that volume is how it is repaired, and that
    // needs a running db-server.
    if let Some(volume) = ledger.volume() {
        match manager.restore_of(volume) {
            Some((run_id, RestoreKind::FromBackup { backup_id })) => ledger.keep_stopped(format!(
                "volume {volume} offline: restore run {run_id} of backup {backup_id}"
            )),
            Some((run_id, RestoreKind::ToSnapshot { .. })) => ledger.keep_stopped(format!(
                "volume {volume} offline: run {run_id} restores it to its snapshot"
            )),
            None => {
                // Logged, and kept as the slot's stopped reason, by `open`.
                let _refused = ledger.open().await;
            }
        }
    }
    let db = Arc::new(Db::new(manager, gate, ledger));
    service.ready(service::server(db, config.control_identities.clone()));
    Ok(())
}

/// Asks the array for its mirror pairs, retrying while it is not up yet,
/// for at most `wait` (`None`: for ever).
async fn wait_for_pairs(
    array: &dyn ArrayPort,
    url: &str,
    addr: std::net::SocketAddr,
    wait: Option<Duration>,
) -> Result<Vec<array_port::PairInfo>, SpawnError> {
    let deadline = wait.map(|wait| tokio::time::Instant::now() + wait);
    let waited = || match wait {
        Some(wait) => format!("{wait:?} (--array-wait)"),
        None => "ever".into(),
    };
    let mut logged = false;
    loop {
        // An attempt that hangs (a silent peer) must not outlast the wait.
        let attempt = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, array.list_pairs())
                .await
                .unwrap_or_else(|_| {
                    Err(ClientError::local(
                        ErrorKind::DeadlineExceeded,
                        "array",
                        url,
                        "listing mirror pairs",
                        "no answer before the wait ran out",
                    ))
                }),
            None => array.list_pairs().await,
        };
        match attempt {
            Ok(pairs) if pairs.is_empty() => return Err(SpawnError::NoMirrorLu(url.to_string())),
            Ok(pairs) => {
                if logged {
                    tracing::info!("the array at {url} answers; starting");
                }
                return Ok(pairs);
            }
            Err(e) if e.is_transient() => {
                if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    let error = SpawnError::ArrayWait {
                        target: url.to_string(),
                        waited: waited(),
                        last_error: e,
                    };
                    tracing::error!("{error}");
                    return Err(error);
                }
                if !logged {
                    tracing::warn!(
                        "waiting for the array at {url} (for {}): {e}; meanwhile db-server on {addr} answers health NOT_SERVING and calls UNAVAILABLE",
                        waited()
                    );
                    logged = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(SpawnError::DiscoverPairs(e)),
        }
    }
}
