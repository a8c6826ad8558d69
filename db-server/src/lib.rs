//! db-server: the database server of splitmirror — the snapshot management
//! program (1517), its communication program (1516) and the ledger database
//! (1515).
//!
//! - [`update_location_table`]: the Fig. 3 table, ranges that merge and split.
//! - [`lu_status`]: the Fig. 10 table, modes and routing.
//! - [`array_port`]: the manager's view of the array (trait + gRPC client).
//! - [`manager`]: the write path (Fig. 5), acquire/delete, the resync (Fig. 7).
//! - [`gate`]: the quiesce gate with its suspend lease.
//! - [`ledger_format`], [`ledger`]: the toy database and its image verifier.
//! - [`db`]: the operations that span them (`AcquireSnapshot`).
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
pub mod lu_status;
pub mod manager;
pub mod service;
pub mod update_location_table;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use splitmirror_proto::db::v1::db_service_server::{self, DbServiceServer};
use splitmirror_proto::node::{self, NodeHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::array_port::{ArrayPort, GrpcArray};
use crate::db::Db;
use crate::gate::QuiesceGate;
use crate::ledger::{Ledger, LedgerConfig};
use crate::manager::{ManagerConfig, SnapshotManager};

/// How long start-up waits for the array to answer unless told otherwise
/// (`--array-wait`).
pub const DEFAULT_ARRAY_WAIT: Duration = Duration::from_secs(60);

/// Everything a db-server needs to start.
#[derive(Debug, Clone)]
pub struct DbServerConfig {
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

/// Serves on `listener` at once, connects to the array (waiting for it up
/// to `array_wait`), builds the tables, opens the ledger, and answers the
/// handle once the node is ready (health `SERVING`). Until then the port
/// answers `NOT_SERVING` and `UNAVAILABLE`; if the array does not come in
/// time, or anything else fails at start, the node stops serving and the
/// error is answered.
pub async fn spawn(config: DbServerConfig, listener: TcpListener) -> Result<NodeHandle, String> {
    let addr = listener
        .local_addr()
        .map_err(|e| format!("reading the listener's address: {e}"))?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("creating {}: {e}", config.data_dir.display()))?;
    let array: Arc<dyn ArrayPort> = Arc::new(GrpcArray::new(&config.array_url)?);
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let service = node::Starting::new(format!(
        "db-server is starting: waiting for the array at {}",
        config.array_url
    ));
    let router = node::server_builder().add_service(service.clone());
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
        Ok(Err(e)) => {
            // The node stops serving by itself; wait until it has.
            let _ = task.await;
            Err(e)
        }
        Err(_) => match task.await {
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => Err("db-server stopped before it was ready".into()),
            Err(join_error) => Err(format!("db-server ended abnormally: {join_error}")),
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
) -> Result<(), String> {
    let pairs = tokio::select! {
        pairs = wait_for_pairs(array.as_ref(), &config.array_url, addr, config.array_wait) => pairs?,
        () = cancel.cancelled() => {
            return Err(format!(
                "shut down while waiting for the array at {}",
                config.array_url
            ));
        }
    };
    let journal = match config.journal_region_bytes {
        Some(region_bytes) => Some(
            journal::Journal::open(&config.data_dir, region_bytes)
                .map_err(|e| format!("opening the journal: {e}"))?,
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
    .map_err(|e| format!("starting the snapshot manager: {e}"))?;
    let _ = started_manager.set(manager.clone());
    let gate = Arc::new(QuiesceGate::with_max_lease(
        tasks.clone(),
        config.max_suspend_lease,
    ));
    let ledger = match &config.ledger {
        Some(ledger_config) => {
            let ledger = Ledger::open(manager.clone(), gate.clone(), ledger_config)
                .await
                .map_err(|e| format!("opening the ledger: {e}"))?;
            ledger.start_workload(ledger_config, cancel.clone(), &tasks);
            Some(ledger)
        }
        None => None,
    };
    let db = Arc::new(Db::new(manager, gate, ledger));
    service.ready(
        DbServiceServer::new(service::DbGrpc::new(db))
            .max_decoding_message_size(node::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(node::MAX_MESSAGE_BYTES),
    );
    Ok(())
}

/// Asks the array for its mirror pairs, retrying while it is not up yet,
/// for at most `wait` (`None`: for ever).
async fn wait_for_pairs(
    array: &dyn ArrayPort,
    url: &str,
    addr: std::net::SocketAddr,
    wait: Option<Duration>,
) -> Result<Vec<array_port::PairInfo>, String> {
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
                    Err(array_port::PortError {
                        unavailable: true,
                        message: format!("no answer from the array at {url}"),
                    })
                }),
            None => array.list_pairs().await,
        };
        match attempt {
            Ok(pairs) if pairs.is_empty() => {
                return Err(format!("the array at {url} defines no mirror LU"));
            }
            Ok(pairs) => {
                if logged {
                    tracing::info!("the array at {url} answers; starting");
                }
                return Ok(pairs);
            }
            Err(e) if e.unavailable => {
                if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    let reason = format!(
                        "gave up waiting for the array at {url} after {}: {e}",
                        waited()
                    );
                    tracing::error!("{reason}");
                    return Err(reason);
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
            Err(e) => return Err(format!("discovering mirror pairs: {e}")),
        }
    }
}
