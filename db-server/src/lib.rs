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
use std::sync::Arc;
use std::time::Duration;

use splitmirror_proto::db::v1::db_service_server::DbServiceServer;
use splitmirror_proto::node::{self, NodeHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::array_port::{ArrayPort, GrpcArray};
use crate::db::Db;
use crate::gate::QuiesceGate;
use crate::ledger::{Ledger, LedgerConfig};
use crate::manager::{ManagerConfig, SnapshotManager};

/// How long start-up waits for the array to answer.
const ARRAY_WAIT: Duration = Duration::from_secs(60);

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
}

/// The journal's default region: intents are rounded out to this.
pub const DEFAULT_JOURNAL_REGION_BYTES: u64 = 64 << 10;

/// Connects to the array, builds the tables, opens the ledger, and serves
/// on `listener` until the handle is shut down.
pub async fn spawn(config: DbServerConfig, listener: TcpListener) -> Result<NodeHandle, String> {
    let addr = listener
        .local_addr()
        .map_err(|e| format!("reading the listener's address: {e}"))?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("creating {}: {e}", config.data_dir.display()))?;
    let array: Arc<dyn ArrayPort> = Arc::new(GrpcArray::new(&config.array_url)?);
    let pairs = wait_for_pairs(array.as_ref(), &config.array_url).await?;
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
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
    let shutdown_manager = manager.clone();
    let gate = Arc::new(QuiesceGate::new(tasks.clone()));
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
    let service = DbServiceServer::new(service::DbGrpc::new(db))
        .max_decoding_message_size(node::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(node::MAX_MESSAGE_BYTES);
    let router = node::server_builder().add_service(service);
    let serve_cancel = cancel.clone();
    let handle_cancel = cancel.clone();
    let task = tokio::spawn(async move {
        let served = node::serve(
            router,
            &["splitmirror.db.v1.DbService"],
            listener,
            serve_cancel,
        )
        .await;
        // The server has stopped: stop the workload and the resync and wait
        // for them, so nothing is left writing after the handle returns.
        cancel.cancel();
        tasks.close();
        tasks.wait().await;
        shutdown_manager.close_journal();
        served
    });
    tracing::info!(%addr, "db-server listening on {addr}");
    Ok(NodeHandle::new(addr, handle_cancel, task))
}

/// Asks the array for its mirror pairs, retrying while it is not up yet.
async fn wait_for_pairs(
    array: &dyn ArrayPort,
    url: &str,
) -> Result<Vec<array_port::PairInfo>, String> {
    let deadline = tokio::time::Instant::now() + ARRAY_WAIT;
    let mut logged = false;
    loop {
        match array.list_pairs().await {
            Ok(pairs) if pairs.is_empty() => {
                return Err(format!("the array at {url} defines no mirror LU"));
            }
            Ok(pairs) => return Ok(pairs),
            Err(e) if e.unavailable && tokio::time::Instant::now() < deadline => {
                if !logged {
                    tracing::info!("waiting for the array at {url}: {e}");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(format!("discovering mirror pairs: {e}")),
        }
    }
}
