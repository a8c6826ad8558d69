//! What the scenarios share: clusters, the ledger at full speed, waiting on
//! status, sampling counters, files of random data, statistics.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use splitmirror_proto::db::v1 as dpb;

use crate::clients::Clients;
use crate::cluster::{Cluster, ClusterBuilder};

/// The machine the figures come from.
pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let memory_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|n| n.parse::<u64>().ok())
                })
        })
        .unwrap_or(0);
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_gib": memory_kib as f64 / (1 << 20) as f64,
        "os": std::env::consts::OS,
    })
}

/// The ledger as fast as it goes, as every database scenario runs it: four
/// workers saturate this machine's two cores; more only add queueing.
pub fn full_speed_ledger() -> db_server::ledger::LedgerConfig {
    db_server::ledger::LedgerConfig {
        target_tps: 0,
        workers: 4,
        ..db_server::ledger::LedgerConfig::default()
    }
}

/// A cluster and its clients, started and Synchronized, in a temporary
/// directory removed after it stops.
pub struct Bench {
    pub cluster: Cluster,
    pub clients: Clients,
}

impl Bench {
    /// Starts the cluster and, with a ledger, waits until it has committed
    /// its first 200 transactions (past its start-up).
    pub async fn start(
        lu_size_bytes: u64,
        ledger: Option<db_server::ledger::LedgerConfig>,
        manager: db_server::manager::ManagerConfig,
        journal_region_bytes: Option<u64>,
    ) -> anyhow::Result<Self> {
        let has_ledger = ledger.is_some();
        let builder = ClusterBuilder::new()
            .lu_size_bytes(lu_size_bytes)
            .ledger(ledger)
            .manager(manager)
            .journal_region_bytes(journal_region_bytes);
        Self::start_from(builder, has_ledger).await
    }

    /// Starts the cluster `builder` describes and, with a ledger
    /// (`has_ledger`), waits as [`Bench::start`] does.
    pub async fn start_from(builder: ClusterBuilder, has_ledger: bool) -> anyhow::Result<Self> {
        let cluster = builder.start().await?;
        if has_ledger {
            cluster
                .wait_for_transactions(200, Duration::from_secs(60))
                .await?;
        }
        Ok(Self {
            clients: cluster.clients.clone(),
            cluster,
        })
    }

    /// The default cluster with the ledger at full speed and the journal on.
    pub async fn with_busy_ledger(lu_size_bytes: u64) -> anyhow::Result<Self> {
        Self::start(
            lu_size_bytes,
            Some(full_speed_ledger()),
            db_server::manager::ManagerConfig::default(),
            Some(db_server::DEFAULT_JOURNAL_REGION_BYTES),
        )
        .await
    }

    /// db-server's status with the latency histogram: the bench computes
    /// percentiles over a window, from the difference of two histograms.
    pub async fn status(&self) -> anyhow::Result<dpb::StatusResponse> {
        Ok(self.clients.db.status(true).await?)
    }

    pub async fn shutdown(self) -> anyhow::Result<()> {
        Ok(self.cluster.shutdown().await?)
    }
}

/// Ledger counters at one moment.
#[derive(Debug, Clone)]
pub struct LedgerSample {
    pub at: Instant,
    pub committed: u64,
    pub histogram: Vec<u64>,
    pub traffic: dpb::ArrayTraffic,
    pub journal: dpb::JournalStatus,
}

pub async fn sample(bench: &Bench) -> anyhow::Result<LedgerSample> {
    let status = bench.status().await?;
    let ledger = status.ledger.unwrap_or_default();
    Ok(LedgerSample {
        at: Instant::now(),
        committed: ledger.transactions_committed,
        histogram: ledger.latency_histogram,
        traffic: status.array_traffic.unwrap_or_default(),
        journal: status.journal.unwrap_or_default(),
    })
}

/// What the ledger did between two samples.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LedgerWindow {
    pub seconds: f64,
    pub transactions: u64,
    pub tps: f64,
    pub p50_latency_us: f64,
    pub p99_latency_us: f64,
    pub max_latency_us: f64,
    /// Data bytes db-server sent to the array per logical byte the ledger
    /// wrote (three 4096-byte blocks per transaction).
    pub wire_bytes_per_logical_byte: f64,
    pub journal_bytes: u64,
    pub journal_fsyncs: u64,
}

pub fn window(before: &LedgerSample, after: &LedgerSample, block_size_bytes: u64) -> LedgerWindow {
    use db_server::latency::quantile_us;
    let seconds = after.at.duration_since(before.at).as_secs_f64();
    let transactions = after.committed.saturating_sub(before.committed);
    let logical = transactions * 3 * block_size_bytes;
    let sent = after
        .traffic
        .bytes_sent
        .saturating_sub(before.traffic.bytes_sent);
    LedgerWindow {
        seconds,
        transactions,
        tps: transactions as f64 / seconds.max(1e-9),
        p50_latency_us: quantile_us(&before.histogram, &after.histogram, 0.5).unwrap_or(0.0),
        p99_latency_us: quantile_us(&before.histogram, &after.histogram, 0.99).unwrap_or(0.0),
        max_latency_us: quantile_us(&before.histogram, &after.histogram, 1.0).unwrap_or(0.0),
        wire_bytes_per_logical_byte: if logical == 0 {
            0.0
        } else {
            sent as f64 / logical as f64
        },
        journal_bytes: after
            .journal
            .bytes_written
            .saturating_sub(before.journal.bytes_written),
        journal_fsyncs: after.journal.fsyncs.saturating_sub(before.journal.fsyncs),
    }
}

/// Measures the ledger for `duration` (or until `stop` says so).
pub async fn measure(bench: &Bench, duration: Duration) -> anyhow::Result<LedgerWindow> {
    let before = sample(bench).await?;
    tokio::time::sleep(duration).await;
    let after = sample(bench).await?;
    Ok(window(&before, &after, 4096))
}

/// Writes `size_bytes` of random data to `path` (a whole LU file).
pub fn random_file(path: &Path, size_bytes: u64, seed: u64) -> anyhow::Result<()> {
    let mut file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut buf = vec![0u8; 4 << 20];
    let mut left = size_bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        file.write_all(&buf[..n])
            .with_context(|| format!("writing {}", path.display()))?;
        left -= n as u64;
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

/// An array node whose real LU `lu` holds random data (so that neither
/// side of a comparison can skip zeros), in a fresh temporary directory.
pub struct RandomLuArray {
    pub dir: tempfile::TempDir,
    pub array: splitmirror_proto::node::NodeHandle,
    /// The LU's file, for the peer to export.
    pub lu_file: std::path::PathBuf,
    /// The certificates the array serves with (in `certs/` under `dir`),
    /// or plain text.
    pub credentials: crate::cluster::Credentials,
}

/// An array whose LU `lu` holds random data, serving with new certificates
/// (`secure`) or plain text.
pub async fn array_with_random_lu(
    lu: u32,
    size_bytes: u64,
    secure: bool,
) -> anyhow::Result<RandomLuArray> {
    let dir = tempfile::Builder::new()
        .prefix("splitmirror-bench-")
        .tempdir()
        .context("creating a temporary directory")?;
    let data_dir = dir.path().join("array");
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let lu_file = data_dir.join(format!("lu{lu}.img"));
    random_file(&lu_file, size_bytes, u64::from(lu))?;
    let credentials = if secure {
        crate::cluster::Credentials::create_in(&dir.path().join("certs"))?
    } else {
        crate::cluster::Credentials::Insecure
    };
    let array = crate::cluster::start_array(
        &data_dir,
        array_node::ArrayConfig::default_pairs(size_bytes)?,
        array_node::ArrayTestHooks::default(),
        &credentials.security(splitmirror_proto::security::role::ARRAY)?,
    )
    .await?;
    Ok(RandomLuArray {
        dir,
        array,
        lu_file,
        credentials,
    })
}

/// p-quantile (0..=1) of `values`, nearest rank.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
}

/// A binary next to the running console (target/<profile>/…), if built.
pub fn sibling_binary(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::current_exe().ok()?.parent()?.join(name);
    path.exists().then_some(path)
}

/// CPU seconds (user + system) a process has used, from /proc.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, in parentheses).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Linux reports clock ticks of 1/100 s on every architecture it runs
    // splitmirror on (USER_HZ).
    Some((utime + stime) / 100.0)
}

/// A table of rows, columns padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::from(" ");
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i == 0 {
                out.push_str(&format!(" {cell}{} ", " ".repeat(pad)));
            } else {
                out.push_str(&format!(" {}{cell} ", " ".repeat(pad)));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out.push_str(&line(widths.iter().map(|w| "-".repeat(*w)).collect()));
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

pub fn f1(value: f64) -> String {
    format!("{value:.1}")
}

pub fn f2(value: f64) -> String {
    format!("{value:.2}")
}
