//! `console demo`: the whole scenario on one machine with no setup. It
//! starts array-node, db-server (with the ledger running) and backup-server
//! in-process on loopback, performs backup runs while the ledger runs, checks
//! each image with the ledger verifier and the digest comparison, and prints
//! the reports.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use backup_server::store::{ChunkStore, DEFAULT_GC_GRACE};
use serde::Serialize;
use splitmirror_proto::units::format_bytes;
use tokio_util::sync::CancellationToken;

use crate::clients::Clients;
use crate::cluster::{Cluster, ClusterBuilder};
use crate::progress::ProgressSink;
use crate::run::{RunOptions, RunReport, backup_run};
use crate::status::pair_verify;

/// What `console demo` runs.
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

/// Exports backup `id` from the store as a raw image under the demo's
/// directory (`exports/<id>.raw`, the file `backup-server export` writes)
/// and answers its bytes, for the ledger verifier.
async fn export_and_read(cluster: &Cluster, id: &str) -> anyhow::Result<Vec<u8>> {
    let exports = cluster.dir.join("exports");
    std::fs::create_dir_all(&exports).with_context(|| format!("creating {}", exports.display()))?;
    let image = exports.join(format!("{id}.raw"));
    let store = ChunkStore::open(&cluster.store, DEFAULT_GC_GRACE)
        .await
        .with_context(|| format!("opening the store {}", cluster.store))?;
    store
        .export(id, &image)
        .await
        .with_context(|| format!("exporting backup {id} to {}", image.display()))?;
    std::fs::read(&image).with_context(|| format!("reading {}", image.display()))
}

/// Runs the demo: starts the cluster, performs the runs, stops the
/// cluster, and answers the summary. It fails only when the demo could not
/// run (a node did not start); failed runs are in the summary.
pub async fn demo(
    options: &DemoOptions,
    progress: &dyn ProgressSink,
) -> anyhow::Result<DemoSummary> {
    let say = |text: String| {
        if !options.json {
            // A reader that went away (`console demo | head`) must not
            // panic the demo; it runs to its end and cleans up.
            let _ = std::io::Write::write_fmt(&mut std::io::stdout(), format_args!("{text}\n"));
        }
    };
    let mut builder = ClusterBuilder::new()
        .lu_size_bytes(options.lu_size_bytes)
        .ledger(Some(db_server::ledger::LedgerConfig {
            target_tps: options.workload_tps,
            workers: options.workload_workers,
            ..db_server::ledger::LedgerConfig::default()
        }))
        // The pairs' first comparison is waited for below, with progress.
        .wait_synchronized(false);
    if let Some(dir) = &options.dir {
        builder = builder.dir(dir);
    }
    say(
        "splitmirror demo: array-node, db-server (ledger running) and backup-server on loopback"
            .to_string(),
    );
    let cluster = builder.start().await.context("starting the nodes")?;
    let data_dir = cluster.dir.display().to_string();
    say(format!(
        "nodes up: array {} · db {} · backup {}; volume 0 is {} with 4096-byte blocks; data in {data_dir}",
        cluster.array.addr,
        cluster.db.addr,
        cluster.backup.addr,
        format_bytes(options.lu_size_bytes)
    ));
    let result = run_cycles(options, &cluster, progress, &say).await;
    let shutdown = cluster.shutdown().await;
    let summary = result?;
    shutdown.context("stopping the nodes")?;
    Ok(DemoSummary {
        data_dir,
        ..summary
    })
}

async fn run_cycles(
    options: &DemoOptions,
    cluster: &Cluster,
    progress: &dyn ProgressSink,
    say: &dyn Fn(String),
) -> anyhow::Result<DemoSummary> {
    let clients: &Clients = &cluster.clients;
    // A first start compares origin and mate of each pair (no journal knew
    // them) before the pair is Synchronized; then let the ledger get going,
    // so that the first snapshot freezes a busy database.
    crate::run::wait_synchronized(clients, 0, progress)
        .await
        .context("waiting for volume 0 to be Synchronized")?;
    progress.finish();
    cluster
        .wait_for_transactions(100, Duration::from_secs(30))
        .await?;
    let mut cycles = Vec::new();
    for cycle in 1..=options.cycles {
        say(format!("\n== backup run {cycle} of {}", options.cycles));
        let run_options = RunOptions {
            volume: 0,
            keep_snapshot: false,
            label: format!("demo run {cycle}"),
            max_bytes_per_s: None,
            cancel: CancellationToken::new(),
            verify_read: false,
        };
        let report = backup_run(clients, &run_options, progress).await;
        let mut cycle_result = DemoCycle {
            ledger_ok: false,
            ledger_highest_sequence: 0,
            ledger_violations: Vec::new(),
            report,
        };
        if let Some(id) = &cycle_result.report.backup_id {
            match export_and_read(cluster, id).await {
                Ok(bytes) => {
                    let verdict = db_server::ledger_format::verify_image(
                        &bytes,
                        cycle_result.report.ledger_sequence,
                    );
                    cycle_result.ledger_ok = verdict.ok;
                    cycle_result.ledger_highest_sequence = verdict.highest_sequence;
                    cycle_result.ledger_violations = verdict.violations;
                }
                Err(e) => cycle_result.ledger_violations.push(format!("{e:#}")),
            }
        }
        say(cycle_result.report.render().trim_end().to_string());
        say(format!(
            "  {:<18} {}",
            "ledger image",
            if cycle_result.ledger_ok {
                format!(
                    "consistent at sequence {} (exported image, db-server verify-image)",
                    cycle_result.ledger_highest_sequence
                )
            } else {
                format!("INCONSISTENT: {:?}", cycle_result.ledger_violations)
            }
        ));
        cycles.push(cycle_result);
    }
    let pair = pair_verify(clients, 0, true)
        .await
        .context("comparing origin and mate at the end")?;
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
    // What each run read and stored: after the first, only what changed.
    for (i, cycle) in cycles.iter().enumerate() {
        let c = &cycle.report.counts;
        if let (Some(read), Some(reused), Some(zero), Some(stored)) = (
            c.chunks_read,
            c.chunks_reused,
            c.chunks_zero,
            c.new_bytes_stored,
        ) {
            say(format!(
                "   run {} read {read} of {} chunks, stored {} new ({reused} already stored, {zero} zero)",
                i + 1,
                read + reused + zero,
                format_bytes(stored)
            ));
        }
    }
    Ok(DemoSummary {
        cycles,
        verified_runs,
        pair_equal_at_end: pair.differing_chunks.is_empty(),
        transactions_committed,
        data_dir: String::new(),
    })
}
