//! `bench freeze`: acquire/delete cycles with the ledger at full speed —
//! the freeze window's p50 / p99 / max, and the longest transaction a
//! client of the ledger saw meanwhile.

use serde_json::json;

use super::common::{Bench, f1, percentile, sample, table, window};
use super::{BenchOptions, BenchOutput, plot};
use crate::progress::Quiet;

pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchOutput> {
    let cycles = if options.quick { 5 } else { 100 };
    let bench = Bench::with_busy_ledger(options.size_bytes).await?;
    let before = sample(&bench).await?;
    let mut windows_us = Vec::with_capacity(cycles);
    for cycle in 0..cycles {
        let run_id = format!("freeze-{cycle}");
        let db = &bench.clients.db;
        let acquired = db.acquire_snapshot(0, &run_id).await?;
        windows_us.push(acquired.freeze_window_us as f64);
        db.delete_snapshot(0, &run_id, false).await?;
        crate::run::wait_synchronized(&bench.clients, 0, &Quiet).await?;
    }
    let after = sample(&bench).await?;
    let ledger = window(&before, &after, 4096);
    bench.shutdown().await?;
    let (p50, p99, max) = (
        percentile(&windows_us, 0.5),
        percentile(&windows_us, 0.99),
        percentile(&windows_us, 1.0),
    );
    if let Some(path) = &options.plot {
        plot::histogram(
            path,
            "Freeze window of AcquireSnapshot (ledger at full speed)",
            "freeze window (µs)",
            &windows_us,
        )?;
    }
    let rows = vec![
        vec!["freeze window p50".into(), f1(p50), "µs".into()],
        vec![
            "freeze window p99".into(),
            f1(p99),
            "µs (target < 2000)".into(),
        ],
        vec!["freeze window max".into(), f1(max), "µs".into()],
        vec![
            "longest ledger transaction seen".into(),
            f1(ledger.max_latency_us),
            "µs (bucket bound)".into(),
        ],
        vec![
            "ledger p99 transaction".into(),
            f1(ledger.p99_latency_us),
            "µs".into(),
        ],
        vec![
            "ledger throughput meanwhile".into(),
            f1(ledger.tps),
            "tps".into(),
        ],
    ];
    Ok(BenchOutput {
        table: table(
            &[&format!("{cycles} acquire/delete cycles"), "value", "unit"],
            &rows,
        ),
        figures: json!({
            "cycles": cycles,
            "freeze_window_us": {"p50": p50, "p99": p99, "max": max, "all": windows_us},
            "longest_ledger_stall_us": ledger.max_latency_us,
            "ledger": ledger,
        }),
    })
}
