//! `console demo`: the whole scenario on one machine with no setup. It
//! starts array-node, db-server (with the ledger running) and backup-server
//! in-process on loopback, performs backup runs while the ledger runs, checks
//! each image with the ledger verifier and the digest comparison, and prints
//! the reports.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use splitmirror_proto::node::{self, NodeHandle};
use splitmirror_proto::units::format_bytes;
use tokio_util::sync::CancellationToken;

use crate::clients::{Addresses, Clients};
use crate::progress::ProgressSink;
use crate::run::{RunOptions, RunReport, backup_run};
use crate::status::pair_verify;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub cycles: u32,
    /// Where the nodes keep their files; a temporary directory if `None`.
    pub dir: Option<PathBuf>,
    pub lu_size_bytes: u64,
    pub workload_tps: u32,
    pub workload_workers: u32,
    pub json: bool,
}

/// One demo cycle: the run's report and the ledger verifier's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct DemoCycle {
    pub report: RunReport,
    pub ledger_ok: bool,
    pub ledger_highest_sequence: u64,
    pub ledger_violations: Vec<String>,
}

impl DemoCycle {
    pub fn succeeded(&self) -> bool {
        self.report.succeeded() && self.ledger_ok
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    pub cycles: Vec<DemoCycle>,
    pub verified_runs: usize,
    pub pair_equal_at_end: bool,
    pub transactions_committed: u64,
    pub data_dir: String,
}

impl DemoSummary {
    pub fn succeeded(&self) -> bool {
        self.verified_runs == self.cycles.len() && self.pair_equal_at_end
    }
}

/// The three nodes of the demo.
pub struct LocalCluster {
    pub array: NodeHandle,
    pub db: NodeHandle,
    pub backup: NodeHandle,
    pub store_dir: PathBuf,
}

impl LocalCluster {
    /// Starts the three nodes under `dir` on ephemeral loopback ports,
    /// with the journal on.
    pub async fn start(
        dir: &Path,
        lu_size_bytes: u64,
        ledger: Option<db_server::ledger::LedgerConfig>,
        manager: db_server::manager::ManagerConfig,
    ) -> Result<Self, String> {
        Self::start_with_journal(
            dir,
            lu_size_bytes,
            ledger,
            manager,
            Some(db_server::DEFAULT_JOURNAL_REGION_BYTES),
        )
        .await
    }

    /// The same, choosing the journal (`None` = none, for measuring it).
    pub async fn start_with_journal(
        dir: &Path,
        lu_size_bytes: u64,
        ledger: Option<db_server::ledger::LedgerConfig>,
        manager: db_server::manager::ManagerConfig,
        journal_region_bytes: Option<u64>,
    ) -> Result<Self, String> {
        let array = array_node::spawn(
            array_node::ArrayNodeConfig {
                data_dir: dir.join("array"),
                array: array_node::ArrayConfig::default_pairs(lu_size_bytes)
                    .map_err(|e| e.to_string())?,
                hooks: array_node::ArrayTestHooks::default(),
            },
            node::bind("127.0.0.1:0").await?,
        )
        .await?;
        let db = db_server::spawn(
            db_server::DbServerConfig {
                array_url: array.url(),
                data_dir: dir.join("db"),
                manager,
                ledger,
                journal_region_bytes,
                array_wait: Some(db_server::DEFAULT_ARRAY_WAIT),
                max_suspend_lease: db_server::gate::DEFAULT_MAX_LEASE,
            },
            node::bind("127.0.0.1:0").await?,
        )
        .await?;
        let store_dir = dir.join("backups");
        let backup = backup_server::spawn(
            backup_server::BackupServerConfig {
                array_url: array.url(),
                db_url: db.url(),
                store_dir: store_dir.clone(),
                default_max_bytes_per_s: None,
            },
            node::bind("127.0.0.1:0").await?,
        )
        .await?;
        Ok(Self {
            array,
            db,
            backup,
            store_dir,
        })
    }

    pub fn addresses(&self) -> Addresses {
        Addresses {
            array: self.array.url(),
            db: self.db.url(),
            backup: self.backup.url(),
        }
    }

    /// Stops the nodes, the database first.
    pub async fn shutdown(self) -> Result<(), String> {
        self.db.shutdown().await?;
        self.backup.shutdown().await?;
        self.array.shutdown().await
    }
}

pub async fn demo(
    options: &DemoOptions,
    progress: &dyn ProgressSink,
) -> Result<DemoSummary, String> {
    let temp;
    let dir = match &options.dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("splitmirror-demo-")
                .tempdir()
                .map_err(|e| format!("creating a temporary directory: {e}"))?;
            temp.path().to_path_buf()
        }
    };
    let say = |text: String| {
        if !options.json {
            // A reader that went away (`console demo | head`) must not
            // panic the demo; it runs to its end and cleans up.
            let _ = std::io::Write::write_fmt(&mut std::io::stdout(), format_args!("{text}\n"));
        }
    };
    say(format!(
        "splitmirror demo: array-node, db-server (ledger running) and backup-server on loopback, data in {}",
        dir.display()
    ));
    let ledger = db_server::ledger::LedgerConfig {
        target_tps: options.workload_tps,
        workers: options.workload_workers,
        ..db_server::ledger::LedgerConfig::default()
    };
    let cluster = LocalCluster::start(
        &dir,
        options.lu_size_bytes,
        Some(ledger),
        db_server::manager::ManagerConfig::default(),
    )
    .await?;
    let clients = Clients::new(cluster.addresses())?;
    say(format!(
        "nodes up: array {} · db {} · backup {}; volume 0 is {} with 4096-byte blocks",
        cluster.array.addr,
        cluster.db.addr,
        cluster.backup.addr,
        format_bytes(options.lu_size_bytes)
    ));
    let result = run_cycles(options, &clients, &cluster, progress, &say).await;
    let shutdown = cluster.shutdown().await;
    let summary = result?;
    shutdown?;
    Ok(DemoSummary {
        data_dir: dir.display().to_string(),
        ..summary
    })
}

async fn run_cycles(
    options: &DemoOptions,
    clients: &Clients,
    cluster: &LocalCluster,
    progress: &dyn ProgressSink,
    say: &dyn Fn(String),
) -> Result<DemoSummary, String> {
    // A first start compares origin and mate of each pair (no journal knew
    // them) before the pair is Synchronized; then let the ledger get going,
    // so that the first snapshot freezes a busy database.
    crate::run::wait_synchronized(clients, 0, progress).await?;
    wait_for_transactions(clients, 100, Duration::from_secs(30)).await?;
    let mut cycles = Vec::new();
    for cycle in 1..=options.cycles {
        say(format!("\n== backup run {cycle} of {}", options.cycles));
        let run_options = RunOptions {
            volume: 0,
            keep_snapshot: false,
            label: format!("demo run {cycle}"),
            max_bytes_per_s: None,
            cancel: CancellationToken::new(),
        };
        let report = backup_run(clients, &run_options, progress).await;
        let mut cycle_result = DemoCycle {
            ledger_ok: false,
            ledger_highest_sequence: 0,
            ledger_violations: Vec::new(),
            report,
        };
        if let Some(id) = &cycle_result.report.backup_id {
            let image = cluster.store_dir.join(id).join("image.raw");
            match std::fs::read(&image) {
                Ok(bytes) => {
                    let verdict = db_server::ledger_format::verify_image(
                        &bytes,
                        cycle_result.report.ledger_sequence,
                    );
                    cycle_result.ledger_ok = verdict.ok;
                    cycle_result.ledger_highest_sequence = verdict.highest_sequence;
                    cycle_result.ledger_violations = verdict.violations;
                }
                Err(e) => cycle_result
                    .ledger_violations
                    .push(format!("reading {}: {e}", image.display())),
            }
        }
        say(cycle_result.report.render().trim_end().to_string());
        say(format!(
            "  {:<18} {}",
            "ledger image",
            if cycle_result.ledger_ok {
                format!(
                    "consistent at sequence {} (db-server verify-image)",
                    cycle_result.ledger_highest_sequence
                )
            } else {
                format!("INCONSISTENT: {:?}", cycle_result.ledger_violations)
            }
        ));
        cycles.push(cycle_result);
    }
    let pair = pair_verify(clients, 0, true).await?;
    let status = crate::status::fetch(clients).await?;
    let transactions_committed = status.db.ledger.map_or(0, |l| l.transactions_committed);
    let verified_runs = cycles.iter().filter(|c| c.succeeded()).count();
    let mut freeze: Vec<u64> = cycles
        .iter()
        .filter_map(|c| c.report.freeze_window_us)
        .collect();
    freeze.sort_unstable();
    say(format!(
        "\n== summary: {verified_runs} of {} runs verified (backup = frozen mate, ledger consistent); \
         origin {} mate after the last resync; freeze window max {} µs; {transactions_committed} ledger transactions meanwhile",
        cycles.len(),
        if pair.differing_chunks.is_empty() {
            "=="
        } else {
            "!="
        },
        freeze.last().copied().unwrap_or(0),
    ));
    Ok(DemoSummary {
        cycles,
        verified_runs,
        pair_equal_at_end: pair.differing_chunks.is_empty(),
        transactions_committed,
        data_dir: String::new(),
    })
}

/// Waits until the ledger has committed `count` transactions.
pub async fn wait_for_transactions(
    clients: &Clients,
    count: u64,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let status = crate::status::fetch(clients).await?;
        let committed = status.db.ledger.map_or(0, |l| l.transactions_committed);
        if committed >= count {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "the ledger committed only {committed} transactions in {timeout:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
