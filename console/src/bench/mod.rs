//! `console bench`: the speed targets of splitmirror as benchmarks that
//! print a table and JSON. Each scenario starts its own nodes in-process on
//! loopback (or as processes, where CPU time must be attributed), and
//! measures the peer a user would pick instead in the same run where one
//! exists, so that figures are ratios on a shared, noisy machine.
//!
//! Speed is never asserted: the tests only run each scenario tiny and check
//! that its figures are well-formed.

mod array;
mod backup;
mod common;
mod export;
mod freeze;
mod generations;
mod journal;
mod modes;
mod peer;
mod plot;
mod restore;
mod resync;
mod run_overhead;
mod timeline;
mod tls;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

pub use common::machine;
pub use export::export_endpoint;

/// The scenarios of `console bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Read and Write of the array, next to qemu-nbd + qemu-img convert.
    Array,
    /// A backup of a mate LU, next to qemu-img convert.
    Backup,
    /// The freeze window of acquire/delete cycles, ledger at full speed.
    Freeze,
    /// Ledger throughput per mode; array against host mirroring.
    Modes,
    /// Resync time and bytes per dirty size.
    Resync,
    /// What the journal costs.
    Journal,
    /// Ledger throughput during one backup run (--plot).
    Timeline,
    /// The orchestration overhead of `console run`.
    Run,
    /// Ledger tps and backup MB/s with OTLP export off and on.
    Export,
    /// Backup MB/s and ledger tps with mutual TLS and with --insecure.
    Tls,
    /// Backups after 0 %, 1 % and 10 % of the chunks changed, next to a
    /// full one and to qemu-img convert; file store, and S3 (s3s-fs) when
    /// `s3s-fs` is on PATH.
    Generations,
    /// Restores after 1 %, 10 % and 100 % of the chunks were corrupted, and
    /// reverse resyncs after 1 % and 10 % of the blocks were written, next
    /// to qemu-img convert of the exported image onto an LU file.
    Restore,
}

impl Scenario {
    /// The name on the command line and in the figures.
    pub fn name(self) -> &'static str {
        match self {
            Self::Array => "array",
            Self::Backup => "backup",
            Self::Freeze => "freeze",
            Self::Modes => "modes",
            Self::Resync => "resync",
            Self::Journal => "journal",
            Self::Timeline => "timeline",
            Self::Run => "run",
            Self::Export => "export",
            Self::Tls => "tls",
            Self::Generations => "generations",
            Self::Restore => "restore",
        }
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Size of the LU / volume under test.
    pub size_bytes: u64,
    /// How long each timed phase runs.
    pub seconds: Duration,
    /// A tiny configuration for smoke tests: small sizes, few repetitions.
    pub quick: bool,
    /// Write an SVG plot here (freeze, timeline).
    pub plot: Option<PathBuf>,
    /// Cap the backup's rate in the scenarios that run one (timeline, run).
    pub max_rate: Option<u64>,
    /// timeline: bytes written to the volume while its snapshot is held,
    /// for the resync to copy (at most a quarter of the volume).
    pub dirty_bytes: u64,
    /// freeze: run one uncapped backup of `size_bytes` of random data just
    /// before the cycles, so that its writeback falls inside them.
    pub after_backup: bool,
    /// timeline: how the run takes its snapshot (`Unspecified`: split).
    pub snapshot_method: splitmirror_proto::db::v1::SnapshotMethod,
}

/// What a scenario answers: a table for people, JSON for machines.
pub struct BenchOutput {
    pub table: String,
    pub figures: Value,
}

/// Runs one scenario and answers its output with the machine attached.
pub async fn run(scenario: Scenario, options: &BenchOptions) -> anyhow::Result<BenchOutput> {
    let output = match scenario {
        Scenario::Array => array::run(options).await?,
        Scenario::Backup => backup::run(options).await?,
        Scenario::Freeze => freeze::run(options).await?,
        Scenario::Modes => modes::run(options).await?,
        Scenario::Resync => resync::run(options).await?,
        Scenario::Journal => journal::run(options).await?,
        Scenario::Timeline => timeline::run(options).await?,
        Scenario::Run => run_overhead::run(options).await?,
        Scenario::Export => export::run(options).await?,
        Scenario::Tls => tls::run(options).await?,
        Scenario::Generations => generations::run(options).await?,
        Scenario::Restore => restore::run(options).await?,
    };
    Ok(BenchOutput {
        table: output.table,
        figures: json!({
            "scenario": scenario.name(),
            "machine": machine(),
            "size_bytes": options.size_bytes,
            "seconds": options.seconds.as_secs_f64(),
            "quick": options.quick,
            "max_rate_bytes_per_s": options.max_rate,
            "dirty_bytes": options.dirty_bytes,
            "after_backup": options.after_backup,
            "figures": output.figures,
        }),
    })
}
