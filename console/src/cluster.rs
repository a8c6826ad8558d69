//! Starts splitmirror's three nodes in-process, on ephemeral loopback
//! ports: the one way `console demo`, the benchmarks and the test harness
//! start them (feature `embedded`).
//!
//! A whole cluster:
//!
//! ```no_run
//! # async fn example() -> Result<(), splitmirror_console::cluster::ClusterError> {
//! use splitmirror_console::cluster::ClusterBuilder;
//!
//! let cluster = ClusterBuilder::new()
//!     .lu_size_bytes(16 << 20)
//!     .ledger(Some(db_server::ledger::LedgerConfig::default()))
//!     .start()
//!     .await?;
//! let pairs = cluster.clients.array.list_pairs().await?;
//! cluster.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! Single nodes, for scenarios that restart or replace one of them:
//! [`start_array`], [`start_db`], [`start_backup`]. Every start waits until
//! the node answers its health check.
//!
//! Files live under one directory: `array/` (the LU files), `db/` (the
//! journal), `backups/` (the store), `certs/` (the certificates). Without
//! [`ClusterBuilder::dir`] it is a temporary directory, removed when the
//! [`Cluster`] is dropped.
//!
//! Calls are mutual TLS, as in production: without
//! [`ClusterBuilder::credentials`] the cluster creates a CA and the four
//! roles' certificates in `certs/` (as `console certs init` does) and each
//! node uses its role's; [`Credentials::Insecure`] runs plain text.

use std::path::{Path, PathBuf};
use std::time::Duration;

use array_node::{ArrayConfig, ArrayTestHooks};
use backup_server::store::{
    ChunkStore, DEFAULT_GC_GRACE, ExportOutcome, StoreError, StoreLocation,
};
use db_server::ledger::LedgerConfig;
use db_server::manager::{ArrayModeKeeping, ManagerConfig};
use splitmirror_proto::client::ClientError;
use splitmirror_proto::node::{self, NodeError, NodeHandle};
use splitmirror_proto::security::{Security, SecurityError, role};

use crate::clients::{Addresses, Clients};
use crate::mates::{self, MAX_MATES};
use crate::progress::Quiet;
use crate::run::{RunError, wait_synchronized_mate};

/// The LU size of a cluster that names none: small enough for a test,
/// large enough for a ledger.
pub const DEFAULT_LU_SIZE_BYTES: u64 = 64 << 20;

/// The plain LU [`ClusterBuilder::scratch_lu`] adds: in no mirror, the size
/// of the pairs' LUs, for restores elsewhere (`--to-lu`).
pub const SCRATCH_LU: u32 = 6;

/// The plain LU [`ClusterBuilder::save_area`] adds: in no mirror, of the
/// pairs' block size, volume 0's save area for copy-on-write snapshots
/// (db-server `--save-area 0=7`).
pub const SAVE_AREA_LU: u32 = 7;

/// How long a start waits for a node to answer its health check.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(20);

/// A db-server address for a backup server started without a db-server:
/// only live backups, which never ask it, can succeed there.
pub const NO_DB: &str = "http://127.0.0.1:9";

/// Why a cluster or a node did not start or stop. None is retryable as it
/// is: each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The array configuration is invalid (an LU size that is not whole
    /// blocks, a mirror naming a missing LU).
    #[error("the array configuration: {0}")]
    ArrayConfig(#[source] array_node::ConfigError),
    /// The data directory (or the temporary one) could not be created.
    #[error("creating {path}: {source}")]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No loopback port could be bound.
    #[error("binding a loopback port for the {node}: {source}")]
    Bind {
        node: &'static str,
        #[source]
        source: NodeError,
    },
    /// The node failed to start: its files, its configuration, the array
    /// it waits for (db-server). The source is the node's own typed error.
    #[error("starting the {node}: {source}")]
    Start {
        node: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The node started but did not answer its health check in time.
    #[error("the {node} at {url} did not answer its health check within {timeout:?}: {source}")]
    NotHealthy {
        node: &'static str,
        url: String,
        timeout: Duration,
        #[source]
        source: NodeError,
    },
    /// A call made while starting failed (the first status, a client that
    /// could not be built).
    #[error(transparent)]
    Call(#[from] ClientError),
    /// Waiting for a volume to be Synchronized failed.
    #[error("waiting for the pairs to be Synchronized: {0}")]
    Synchronizing(#[from] RunError),
    /// The certificates could not be created or read.
    #[error("the certificates: {0}")]
    Certificates(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The ledger did not commit the transactions waited for in time.
    #[error("the ledger committed only {committed} of {wanted} transactions in {timeout:?}")]
    LedgerSlow {
        committed: u64,
        wanted: u64,
        timeout: Duration,
    },
    /// A node did not stop cleanly.
    #[error("stopping the {node}: {source}")]
    Stop {
        node: &'static str,
        #[source]
        source: NodeError,
    },
}

/// How a cluster's nodes and its console prove who they are.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// The certificates in this directory, as `console certs init` writes
    /// them: each program uses its role's.
    Certificates(PathBuf),
    /// Plain text without authentication (`--insecure`).
    Insecure,
}

impl Credentials {
    /// Creates a CA and the four roles' certificates in `dir` (reusing
    /// them when `dir` already holds a set).
    pub fn create_in(dir: &Path) -> Result<Self, ClusterError> {
        if !dir.join(splitmirror_proto::security::CA_FILE).exists() {
            crate::certs::init(dir, &crate::certs::InitOptions::default())
                .map_err(|e| ClusterError::Certificates(Box::new(e)))?;
        }
        Ok(Self::Certificates(dir.to_path_buf()))
    }

    /// The security of the program of `role` (its certificate, or none).
    pub fn security(&self, role: &str) -> Result<Security, SecurityError> {
        match self {
            Self::Certificates(dir) => Security::from_dir(dir, role),
            Self::Insecure => Ok(Security::Insecure),
        }
    }

    /// The same, as a [`ClusterError`].
    fn security_of(&self, role: &str) -> Result<Security, ClusterError> {
        self.security(role)
            .map_err(|e| ClusterError::Certificates(Box::new(e)))
    }
}

/// What [`start_db`] starts db-server with; `Default` is a production
/// db-server without a ledger.
#[derive(Debug, Clone)]
pub struct DbOptions {
    pub manager: ManagerConfig,
    /// `None` runs the snapshot manager without a database.
    pub ledger: Option<LedgerConfig>,
    /// `None` runs without a journal (only to measure what it costs).
    pub journal_region_bytes: Option<u64>,
    /// How long start-up waits for the array; `None` waits for ever.
    pub array_wait: Option<Duration>,
    pub max_suspend_lease: Duration,
}

impl Default for DbOptions {
    fn default() -> Self {
        Self {
            manager: ManagerConfig::default(),
            ledger: None,
            journal_region_bytes: Some(db_server::DEFAULT_JOURNAL_REGION_BYTES),
            array_wait: Some(db_server::DEFAULT_ARRAY_WAIT),
            max_suspend_lease: db_server::gate::DEFAULT_MAX_LEASE,
        }
    }
}

/// The extra mates [`ClusterBuilder::mates`] gives mirror LU 0 and mirror
/// LU 3 (after their first mates, LU 2 and LU 5): past the scratch LU (6)
/// and the save area (7), so that either can be added too.
pub const EXTRA_MATE_LUS: [[u32; 2]; 2] = [[8, 9], [10, 11]];

/// The array configuration of [`ClusterBuilder::mates`] as the array's own
/// TOML (`mates = [..]`), for its parser to read: the default two pairs
/// with `mates` (1 to [`MAX_MATES`]) mates each, LUs of `lu_size_bytes`
/// in 4 KiB blocks.
pub fn pairs_with_mates_toml(lu_size_bytes: u64, mates: u32) -> String {
    let block_count = lu_size_bytes / 4096;
    let mut lu_tables = String::new();
    let mut mirror_tables = String::new();
    for (mirror, origin, first_mate, extra) in [
        (0u32, 1u32, 2u32, EXTRA_MATE_LUS[0]),
        (3, 4, 5, EXTRA_MATE_LUS[1]),
    ] {
        let mate_lus: Vec<u32> = std::iter::once(first_mate)
            .chain(extra)
            .take(mates.clamp(1, MAX_MATES) as usize)
            .collect();
        for lu in std::iter::once(origin).chain(mate_lus.iter().copied()) {
            lu_tables.push_str(&format!(
                "[[lu]]\nid = {lu}\nblock_size_bytes = 4096\nblock_count = {block_count}\n\n"
            ));
        }
        let listed: Vec<String> = mate_lus.iter().map(u32::to_string).collect();
        mirror_tables.push_str(&format!(
            "[[mirror]]\nmirror = {mirror}\norigin = {origin}\nmates = [{}]\n\n",
            listed.join(", ")
        ));
    }
    lu_tables + &mirror_tables
}

/// Builds a [`Cluster`]: every option has the default a production node
/// has, except the directory (temporary) and the ports (ephemeral).
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    dir: Option<PathBuf>,
    lu_size_bytes: u64,
    array: Option<ArrayConfig>,
    array_hooks: ArrayTestHooks,
    db: DbOptions,
    store: Option<StoreLocation>,
    gc_grace: Duration,
    backup_max_bytes_per_s: Option<u64>,
    wait_synchronized: bool,
    credentials: Option<Credentials>,
    scratch_lu: bool,
    save_area: bool,
    /// The save area's blocks; `None`: as many as a pair's LU.
    save_area_blocks: Option<u64>,
    /// How many mates each mirror LU of the default two pairs has (1..=3).
    mates: u32,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterBuilder {
    /// Two mirror pairs of [`DEFAULT_LU_SIZE_BYTES`] LUs (mirror LU 0 =
    /// origin 1 + mate 2, mirror LU 3 = 4 + 5), no ledger, the journal on,
    /// in a temporary directory; [`ClusterBuilder::start`] answers once
    /// every pair is Synchronized.
    pub fn new() -> Self {
        Self {
            dir: None,
            lu_size_bytes: DEFAULT_LU_SIZE_BYTES,
            array: None,
            array_hooks: ArrayTestHooks::default(),
            db: DbOptions::default(),
            store: None,
            gc_grace: DEFAULT_GC_GRACE,
            backup_max_bytes_per_s: None,
            wait_synchronized: true,
            credentials: None,
            scratch_lu: false,
            save_area: false,
            save_area_blocks: None,
            mates: 1,
        }
    }

    /// Gives each mirror LU of the default two pairs `mates` mates (1 to
    /// [`MAX_MATES`], [0020]; default 1): mirror LU 0 = origin 1 + mates
    /// 2, 8, 9 and mirror LU 3 = origin 4 + mates 5, 10, 11 (the first
    /// `mates` of each), every mate a real LU of the pairs' size. Each
    /// (mirror LU, mate) is a pair with its own mode, which only an array
    /// that keeps the modes can enforce: with more than one mate,
    /// [`ClusterBuilder::start`] runs db-server with the stateful array
    /// mode (`--array-mode stateful`), whatever
    /// [`ClusterBuilder::array_mode`] said. Ignored with
    /// [`ClusterBuilder::array_config`]. A count outside 1..=3 fails the
    /// start ([`ClusterError::ArrayConfig`]). The LU size must be a
    /// multiple of 4 KiB, as with one mate.
    pub fn mates(mut self, mates: u32) -> Self {
        self.mates = mates;
        self
    }

    /// Adds the plain LU [`SAVE_AREA_LU`] (7) of `blocks` blocks (of the
    /// pairs' block size; `None`: as many as a pair's LU) to the default
    /// two pairs, read-write for db-server (the array's owner identity),
    /// and starts db-server with it as volume 0's save area, so that
    /// volume 0 can take copy-on-write snapshots. Off by default. The LU
    /// is ignored with [`ClusterBuilder::array_config`] (whose LU 7 is then
    /// the save area, if it has one).
    pub fn save_area(mut self, blocks: Option<u64>) -> Self {
        self.save_area = true;
        self.save_area_blocks = blocks;
        self
    }

    /// Adds the plain LU [`SCRATCH_LU`] (6) to the default two pairs, of
    /// their LUs' size, with configured grants: read-write for the backup
    /// server (a restore elsewhere writes it) and read for the console (to
    /// compare it). Off by default: the default array has the two pairs
    /// only. Ignored with [`ClusterBuilder::array_config`].
    pub fn scratch_lu(mut self, scratch_lu: bool) -> Self {
        self.scratch_lu = scratch_lu;
        self
    }

    /// How the nodes and the console prove who they are (default: new
    /// certificates in `certs/` under the directory).
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// Keeps the nodes' files under `dir` (created if missing, kept after).
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// The size of each LU of the default two pairs.
    pub fn lu_size_bytes(mut self, lu_size_bytes: u64) -> Self {
        self.lu_size_bytes = lu_size_bytes;
        self
    }

    /// The array's LUs and mirrors, instead of the default two pairs.
    pub fn array_config(mut self, array: ArrayConfig) -> Self {
        self.array = Some(array);
        self
    }

    /// The array's fault hooks (their switches need array-node's `testing`
    /// feature).
    pub fn array_hooks(mut self, hooks: ArrayTestHooks) -> Self {
        self.array_hooks = hooks;
        self
    }

    /// The snapshot manager's configuration (resync method and rate, host
    /// mirroring, test hooks).
    pub fn manager(mut self, manager: ManagerConfig) -> Self {
        self.db.manager = manager;
        self
    }

    /// Who keeps the pairs' modes (db-server `--array-mode`): db-server
    /// (stateless, the default) or the array (stateful: db-server sets
    /// them with ModeSelect and the array enforces them). Stateful needs
    /// the offload resync, the default. Set after [`ClusterBuilder::manager`],
    /// which replaces it.
    pub fn array_mode(mut self, array_mode: ArrayModeKeeping) -> Self {
        self.db.manager.array_mode = array_mode;
        self
    }

    /// The ledger db-server runs on volume 0; `None` (the default) runs
    /// none.
    pub fn ledger(mut self, ledger: Option<LedgerConfig>) -> Self {
        self.db.ledger = ledger;
        self
    }

    /// The journal's region size; `None` runs without a journal.
    pub fn journal_region_bytes(mut self, journal_region_bytes: Option<u64>) -> Self {
        self.db.journal_region_bytes = journal_region_bytes;
        self
    }

    /// Every db-server option at once.
    pub fn db_options(mut self, db: DbOptions) -> Self {
        self.db = db;
        self
    }

    /// Where the backup server keeps its chunk store (default: the
    /// directory `backups/` under the cluster's directory).
    pub fn store_dir(mut self, store_dir: impl Into<PathBuf>) -> Self {
        self.store = Some(StoreLocation::Dir(store_dir.into()));
        self
    }

    /// The backup server's chunk store: a directory or an S3 bucket.
    pub fn store(mut self, store: StoreLocation) -> Self {
        self.store = Some(store);
        self
    }

    /// The store's garbage-collection grace period (default 24 h).
    pub fn gc_grace(mut self, gc_grace: Duration) -> Self {
        self.gc_grace = gc_grace;
        self
    }

    /// The backup server's rate cap for jobs that ask for none.
    pub fn backup_max_bytes_per_s(mut self, max_bytes_per_s: Option<u64>) -> Self {
        self.backup_max_bytes_per_s = max_bytes_per_s;
        self
    }

    /// Whether [`ClusterBuilder::start`] waits until every volume is
    /// Synchronized (default yes: a first start compares origin and mate of
    /// each pair before it is).
    pub fn wait_synchronized(mut self, wait: bool) -> Self {
        self.wait_synchronized = wait;
        self
    }

    /// Starts array-node, db-server and backup-server, in that order, each
    /// answering its health check before the next starts.
    pub async fn start(self) -> Result<Cluster, ClusterError> {
        let (temp, dir) = match self.dir {
            Some(dir) => (None, dir),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("splitmirror-")
                    .tempdir()
                    .map_err(|source| ClusterError::Directory {
                        path: std::env::temp_dir(),
                        source,
                    })?;
                let dir = temp.path().to_path_buf();
                (Some(temp), dir)
            }
        };
        let default_pairs = self.array.is_none();
        let array_config = match self.array {
            Some(config) => config,
            None => {
                let mut config = match self.mates {
                    0 | 4.. => Err(array_node::ConfigError::Invalid(format!(
                        "{} mates per mirror LU: a mirror LU has 1 to {MAX_MATES}",
                        self.mates
                    ))),
                    1 => ArrayConfig::default_pairs(self.lu_size_bytes),
                    mates => {
                        ArrayConfig::from_toml(&pairs_with_mates_toml(self.lu_size_bytes, mates))
                    }
                }
                .map_err(ClusterError::ArrayConfig)?;
                if self.scratch_lu {
                    let (block_size_bytes, block_count) = config
                        .lus
                        .first()
                        .map(|lu| (lu.block_size_bytes, lu.block_count))
                        .unwrap_or((4096, self.lu_size_bytes / 4096));
                    let backup = config.access.backup.clone();
                    config
                        .add_plain_lu(
                            SCRATCH_LU,
                            block_size_bytes,
                            block_count,
                            &[
                                (backup.as_str(), array_node::Access::ReadWrite),
                                (role::CONSOLE, array_node::Access::Read),
                            ],
                        )
                        .map_err(ClusterError::ArrayConfig)?;
                }
                if self.save_area {
                    let (block_size_bytes, lu_blocks) = config
                        .lus
                        .first()
                        .map(|lu| (lu.block_size_bytes, lu.block_count))
                        .unwrap_or((4096, self.lu_size_bytes / 4096));
                    let owner = config.access.owner.clone();
                    config
                        .add_plain_lu(
                            SAVE_AREA_LU,
                            block_size_bytes,
                            self.save_area_blocks.unwrap_or(lu_blocks),
                            &[(owner.as_str(), array_node::Access::ReadWrite)],
                        )
                        .map_err(ClusterError::ArrayConfig)?;
                }
                config
            }
        };
        let mut db_options = self.db.clone();
        if default_pairs && self.mates > 1 {
            // Only the array can hold one mode per (mirror LU, mate).
            db_options.manager.array_mode = ArrayModeKeeping::Stateful;
        }
        if self.save_area {
            // Volume 0 is mirror LU 0.
            db_options.manager.save_areas.insert(0, SAVE_AREA_LU);
        }
        let credentials = match self.credentials {
            Some(credentials) => credentials,
            None => Credentials::create_in(&dir.join("certs"))?,
        };
        let array = start_array(
            &dir.join("array"),
            array_config,
            self.array_hooks,
            &credentials.security_of(role::ARRAY)?,
        )
        .await?;
        let db = match start_db(
            &array.url(),
            &dir.join("db"),
            &db_options,
            &credentials.security_of(role::DB)?,
        )
        .await
        {
            Ok(db) => db,
            Err(error) => {
                let _ = array.shutdown().await;
                return Err(error);
            }
        };
        let store = self
            .store
            .unwrap_or_else(|| StoreLocation::Dir(dir.join("backups")));
        let backup = match start_backup(
            &array.url(),
            &db.url(),
            &store,
            self.gc_grace,
            self.backup_max_bytes_per_s,
            &credentials.security_of(role::BACKUP)?,
        )
        .await
        {
            Ok(backup) => backup,
            Err(error) => {
                let _ = db.shutdown().await;
                let _ = array.shutdown().await;
                return Err(error);
            }
        };
        let addresses = Addresses {
            array: array.url(),
            db: db.url(),
            backup: backup.url(),
        };
        let cluster = Cluster {
            // The console's clients, except the array's, which acts as
            // db-server: the owner of the pairs may read and write every
            // LU, as the demo's pair comparison and the tests need.
            clients: Clients::with_array_security(
                addresses,
                &credentials.security_of(role::CONSOLE)?,
                &credentials.security_of(role::DB)?,
            )?,
            credentials,
            array,
            db,
            backup,
            dir,
            store,
            gc_grace: self.gc_grace,
            _temp: temp,
        };
        if self.wait_synchronized {
            // Every (volume, mate) pair: each synchronizes on its own.
            let pairs: Vec<(u32, u32)> = cluster
                .clients
                .db
                .status(false)
                .await?
                .volumes
                .iter()
                .map(|v| (v.volume, mates::mate_of(v)))
                .collect();
            for (volume, mate) in pairs {
                wait_synchronized_mate(&cluster.clients, volume, mate, &Quiet).await?;
            }
        }
        Ok(cluster)
    }
}

/// Three running nodes, their addresses and clients. Stop it with
/// [`Cluster::shutdown`]; a cluster merely dropped leaves its nodes running
/// until the runtime ends.
pub struct Cluster {
    pub array: NodeHandle,
    pub db: NodeHandle,
    pub backup: NodeHandle,
    /// Clients of the three nodes (`clients.addresses` holds their URLs),
    /// as the console, and of the array as db-server.
    pub clients: Clients,
    /// The certificates the nodes and the clients use.
    pub credentials: Credentials,
    /// Where the nodes keep their files.
    pub dir: PathBuf,
    /// The backup server's chunk store.
    pub store: StoreLocation,
    /// Its garbage-collection grace period.
    pub gc_grace: Duration,
    /// The temporary directory, removed when the cluster is dropped.
    _temp: Option<tempfile::TempDir>,
}

impl Cluster {
    /// The backup server's chunk store, opened beside the server (to
    /// export a backup, or to look at what it holds).
    pub async fn open_store(&self) -> Result<ChunkStore, StoreError> {
        ChunkStore::open_existing(&self.store, self.gc_grace).await
    }

    /// Writes backup `id` as a raw image to `path` (every chunk checked
    /// against its digest).
    pub async fn export_backup(&self, id: &str, path: &Path) -> Result<ExportOutcome, StoreError> {
        self.open_store().await?.export(id, path).await
    }

    /// The nodes' URLs.
    pub fn addresses(&self) -> &Addresses {
        &self.clients.addresses
    }

    /// Waits until the ledger has committed `count` transactions.
    pub async fn wait_for_transactions(
        &self,
        count: u64,
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.clients.db.status(false).await?;
            let committed = status.ledger.map_or(0, |l| l.transactions_committed);
            if committed >= count {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ClusterError::LedgerSlow {
                    committed,
                    wanted: count,
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the nodes, the database first (so that its last writes reach
    /// the array), and answers the first failure.
    pub async fn shutdown(self) -> Result<(), ClusterError> {
        let stop = |node: &'static str| move |source| ClusterError::Stop { node, source };
        let db = (self.db.shutdown().await).map_err(stop("db-server"));
        let backup = (self.backup.shutdown().await).map_err(stop("backup server"));
        let array = (self.array.shutdown().await).map_err(stop("array"));
        db.and(backup).and(array)
    }
}

/// Binds an ephemeral loopback port for `node`.
async fn bind_loopback(node: &'static str) -> Result<tokio::net::TcpListener, ClusterError> {
    node::bind("127.0.0.1:0")
        .await
        .map_err(|source| ClusterError::Bind { node, source })
}

/// Waits (at most [`HEALTH_TIMEOUT`]) until the node of `server_role` at
/// `url` answers its health check.
pub async fn wait_healthy(
    node: &'static str,
    url: &str,
    security: &Security,
    server_role: &str,
) -> Result<(), ClusterError> {
    let deadline = tokio::time::Instant::now() + HEALTH_TIMEOUT;
    loop {
        match node::probe_health(url, "", security, server_role).await {
            Ok(()) => return Ok(()),
            Err(source) if tokio::time::Instant::now() > deadline => {
                return Err(ClusterError::NotHealthy {
                    node,
                    url: url.to_string(),
                    timeout: HEALTH_TIMEOUT,
                    source,
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Starts an array node over the LU files in `data_dir` (created as
/// needed).
pub async fn start_array(
    data_dir: &Path,
    array: ArrayConfig,
    hooks: ArrayTestHooks,
    security: &Security,
) -> Result<NodeHandle, ClusterError> {
    const NODE: &str = "array";
    let config = array_node::ArrayNodeConfig {
        data_dir: data_dir.to_path_buf(),
        array,
        hooks,
        security: security.clone(),
    };
    let handle = array_node::spawn(config, bind_loopback(NODE).await?)
        .await
        .map_err(|source| ClusterError::Start {
            node: NODE,
            source: Box::new(source),
        })?;
    wait_healthy(NODE, &handle.url(), security, role::ARRAY).await?;
    Ok(handle)
}

/// Starts a db-server against the array at `array_url`, its journal in
/// `data_dir`. It answers once db-server is ready; a first start may leave
/// pairs Resynchronizing a moment longer (see
/// [`crate::run::wait_synchronized`]).
pub async fn start_db(
    array_url: &str,
    data_dir: &Path,
    options: &DbOptions,
    security: &Security,
) -> Result<NodeHandle, ClusterError> {
    const NODE: &str = "db-server";
    let config = db_server::DbServerConfig {
        security: security.clone(),
        control_identities: vec![role::CONSOLE.to_string()],
        array_url: array_url.to_string(),
        data_dir: data_dir.to_path_buf(),
        manager: options.manager.clone(),
        ledger: options.ledger.clone(),
        journal_region_bytes: options.journal_region_bytes,
        array_wait: options.array_wait,
        max_suspend_lease: options.max_suspend_lease,
    };
    let handle = db_server::spawn(config, bind_loopback(NODE).await?)
        .await
        .map_err(|source| ClusterError::Start {
            node: NODE,
            source: Box::new(source),
        })?;
    wait_healthy(NODE, &handle.url(), security, role::DB).await?;
    Ok(handle)
}

/// Starts a backup server reading from the array at `array_url` and
/// confirming snapshots with the db-server at `db_url` ([`NO_DB`] for live
/// backups alone), its chunk store at `store`.
pub async fn start_backup(
    array_url: &str,
    db_url: &str,
    store: &StoreLocation,
    gc_grace: Duration,
    default_max_bytes_per_s: Option<u64>,
    security: &Security,
) -> Result<NodeHandle, ClusterError> {
    const NODE: &str = "backup server";
    let config = backup_server::BackupServerConfig {
        security: security.clone(),
        control_identities: vec![role::CONSOLE.to_string()],
        array_url: array_url.to_string(),
        db_url: db_url.to_string(),
        store: store.clone(),
        gc_grace,
        default_max_bytes_per_s,
    };
    let handle = backup_server::spawn(config, bind_loopback(NODE).await?)
        .await
        .map_err(|source| ClusterError::Start {
            node: NODE,
            source: Box::new(source),
        })?;
    wait_healthy(NODE, &handle.url(), security, role::BACKUP).await?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_mates_are_written_as_the_arrays_mates_list_and_parsed_by_it() {
        let text = pairs_with_mates_toml(1 << 20, 3);
        assert!(text.contains("mates = [2, 8, 9]"), "{text}");
        let config = ArrayConfig::from_toml(&text).expect("the array parses it");
        let rows: Vec<(u32, u32, u32)> = config
            .mirrors
            .iter()
            .map(|row| (row.mirror, row.origin, row.mate))
            .collect();
        assert_eq!(
            rows,
            vec![
                (0, 1, 2),
                (0, 1, 8),
                (0, 1, 9),
                (3, 4, 5),
                (3, 4, 10),
                (3, 4, 11)
            ]
        );
        assert_eq!(config.lus.len(), 8);
        assert!(config.lus.iter().all(|lu| lu.block_count == 256));
        // One mate: the default pairs' LUs and rows.
        let one = ArrayConfig::from_toml(&pairs_with_mates_toml(1 << 20, 1)).expect("parses");
        assert_eq!(
            one.mirrors,
            ArrayConfig::default_pairs(1 << 20).expect("valid").mirrors
        );
    }

    #[tokio::test]
    async fn a_mate_count_outside_one_to_three_is_refused_before_anything_starts() {
        for mates in [0, 4] {
            let refused = ClusterBuilder::new().mates(mates).start().await;
            assert!(
                matches!(&refused, Err(ClusterError::ArrayConfig(_))),
                "{mates} mates: {:?}",
                refused.as_ref().err()
            );
        }
    }
}
