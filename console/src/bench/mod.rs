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
mod freeze;
mod journal;
mod modes;
mod peer;
mod plot;
mod resync;
mod run_overhead;
mod timeline;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

pub use common::machine;

/// The scenarios, by name.
pub const SCENARIOS: [&str; 8] = [
    "array", "backup", "freeze", "modes", "resync", "journal", "timeline", "run",
];

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
}

/// What a scenario answers: a table for people, JSON for machines.
pub struct BenchOutput {
    pub table: String,
    pub figures: Value,
}

/// Runs one scenario and answers its output with the machine attached.
pub async fn run(scenario: &str, options: &BenchOptions) -> Result<BenchOutput, String> {
    let output = match scenario {
        "array" => array::run(options).await?,
        "backup" => backup::run(options).await?,
        "freeze" => freeze::run(options).await?,
        "modes" => modes::run(options).await?,
        "resync" => resync::run(options).await?,
        "journal" => journal::run(options).await?,
        "timeline" => timeline::run(options).await?,
        "run" => run_overhead::run(options).await?,
        other => {
            return Err(format!(
                "unknown scenario {other:?}; one of: {}",
                SCENARIOS.join(", ")
            ));
        }
    };
    Ok(BenchOutput {
        table: output.table,
        figures: json!({
            "scenario": scenario,
            "machine": machine(),
            "size_bytes": options.size_bytes,
            "seconds": options.seconds.as_secs_f64(),
            "quick": options.quick,
            "max_rate_bytes_per_s": options.max_rate,
            "figures": output.figures,
        }),
    })
}
