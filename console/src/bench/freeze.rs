//! `bench freeze`: acquire/delete cycles with the ledger at full speed —
//! the freeze window's p50 / p99 / max, and the longest transaction a
//! client of the ledger saw meanwhile.
//!
//! With `--after-backup`, one uncapped backup of `--size` of random data
//! (as `bench backup` runs it: its own array, a backup-server process, a
//! chunk store on the same disk) runs first, while the ledger is already
//! busy, and the cycles start the moment it ends: the kernel's writeback
//! of what the backup wrote falls inside them. The same number of cycles
//! runs first on the same cluster before the backup, as the control: on a
//! shared machine the figure to read is the p99 after the backup against
//! the p99 before it.

use serde_json::json;

use super::backup::{backup_through_server, met};
use super::common::{Bench, array_with_random_lu, f1, f2, percentile, sample, table, window};
use super::{BenchOptions, BenchOutput, plot};
use crate::progress::Quiet;

pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchOutput> {
    let cycles = if options.quick { 5 } else { 100 };
    // The backup's source is made before the cluster starts, so that only
    // the backup itself runs beside the ledger.
    let source = if options.after_backup {
        Some(array_with_random_lu(2, options.size_bytes, true).await?)
    } else {
        None
    };
    let bench = Bench::with_busy_ledger(options.size_bytes).await?;
    let (backup, control_us) = match &source {
        Some(source) => {
            let control_us = freeze_cycles(&bench, cycles, "control").await?;
            let store = source.dir.path().join("store");
            let backup = backup_through_server(source, options.size_bytes, &store).await?;
            (Some(backup), Some(control_us))
        }
        None => (None, None),
    };
    let before = sample(&bench).await?;
    let started = std::time::Instant::now();
    let windows_us = freeze_cycles(&bench, cycles, "freeze").await?;
    let cycles_seconds = started.elapsed().as_secs_f64();
    let after = sample(&bench).await?;
    let ledger = window(&before, &after, 4096);
    bench.shutdown().await?;
    if let Some(source) = source {
        source.array.shutdown().await.map_err(anyhow::Error::msg)?;
    }
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
    let mut rows = Vec::new();
    if let Some(control_us) = &control_us {
        rows.push(vec![
            "control: freeze window p99 before the backup".into(),
            f1(percentile(control_us, 0.99)),
            format!(
                "µs (p50 {}, max {})",
                f1(percentile(control_us, 0.5)),
                f1(percentile(control_us, 1.0))
            ),
        ]);
    }
    if let Some(backup) = &backup {
        rows.push(vec![
            "backup just before (random data, uncapped)".into(),
            f1(backup.mb_per_s),
            format!("MB/s ({} s)", f2(backup.seconds)),
        ]);
    }
    rows.extend([
        vec!["freeze window p50".into(), f1(p50), "µs".into()],
        vec![
            "freeze window p99".into(),
            f1(p99),
            format!("µs (target < 2000: {})", met(Some(p99 < 2000.0))),
        ],
        vec!["freeze window max".into(), f1(max), "µs".into()],
        vec![
            format!("the {cycles} cycles took"),
            f2(cycles_seconds),
            "s".into(),
        ],
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
    ]);
    Ok(BenchOutput {
        table: table(
            &[
                &if backup.is_some() {
                    format!("{cycles} acquire/delete cycles right after a backup")
                } else {
                    format!("{cycles} acquire/delete cycles")
                },
                "value",
                "unit",
            ],
            &rows,
        ),
        figures: json!({
            "cycles": cycles,
            "freeze_window_us": {"p50": p50, "p99": p99, "max": max, "all": windows_us},
            "cycles_seconds": cycles_seconds,
            "control_before_backup_us": control_us.as_ref().map(|c| json!({
                "p50": percentile(c, 0.5),
                "p99": percentile(c, 0.99),
                "max": percentile(c, 1.0),
            })),
            "longest_ledger_stall_us": ledger.max_latency_us,
            "after_backup": backup.map(|b| json!({
                "backup_mb_per_s": b.mb_per_s,
                "backup_seconds": b.seconds,
                "backup_server_cpu_seconds_per_gib": b.cpu_seconds_per_gib,
            })),
            "ledger": ledger,
        }),
    })
}

/// `cycles` acquire/delete cycles, each waiting for its resync; answers the
/// freeze windows in µs.
async fn freeze_cycles(bench: &Bench, cycles: usize, name: &str) -> anyhow::Result<Vec<f64>> {
    let mut windows_us = Vec::with_capacity(cycles);
    for cycle in 0..cycles {
        let run_id = format!("{name}-{cycle}");
        let db = &bench.clients.db;
        let acquired = db.acquire_snapshot(0, &run_id).await?;
        windows_us.push(acquired.freeze_window_us as f64);
        db.delete_snapshot(0, &run_id, false).await?;
        crate::run::wait_synchronized(&bench.clients, 0, &Quiet).await?;
    }
    Ok(windows_us)
}
