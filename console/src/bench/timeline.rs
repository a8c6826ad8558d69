//! `bench timeline`: one backup run with the ledger at full speed, the
//! ledger's transactions per second sampled every 100 ms, and the run's
//! phases marked — the picture that shows whether a backup slows the
//! database.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::common::{Bench, f1, table};
use super::{BenchOptions, BenchOutput, plot};
use crate::progress::Quiet;
use crate::run::{RunOptions, backup_run};

const SAMPLE_EVERY: Duration = Duration::from_millis(100);

pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchOutput> {
    let bench = Bench::with_busy_ledger(options.size_bytes).await?;
    let origin = Instant::now();
    let stop = CancellationToken::new();
    let sampler = {
        let clients = bench.clients.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut samples: Vec<(f64, u64)> = Vec::new();
            let mut ticker = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = stop.cancelled() => return samples,
                }
                if let Ok(status) = clients.db.status(false).await {
                    let committed = status.ledger.map_or(0, |l| l.transactions_committed);
                    samples.push((origin.elapsed().as_secs_f64(), committed));
                }
            }
        })
    };
    let lead = if options.quick {
        Duration::from_millis(300)
    } else {
        Duration::from_secs(2)
    };
    tokio::time::sleep(lead).await;
    let run_start = origin.elapsed().as_secs_f64();
    let run_options = RunOptions {
        volume: 0,
        keep_snapshot: false,
        label: "timeline".into(),
        max_bytes_per_s: options.max_rate,
        cancel: CancellationToken::new(),
        verify_read: false,
    };
    let report = backup_run(&bench.clients, &run_options, &Quiet).await;
    tokio::time::sleep(lead).await;
    stop.cancel();
    let samples = sampler.await.context("the status sampler")?;
    bench.shutdown().await?;
    if !report.succeeded() {
        bail!("the run failed: {:?}", report.error);
    }

    // tps between consecutive samples, at the later sample's time.
    let series: Vec<(f64, f64)> = samples
        .windows(2)
        .map(|w| {
            (
                w[1].0,
                (w[1].1 - w[0].1) as f64 / (w[1].0 - w[0].0).max(1e-9),
            )
        })
        .collect();
    let p = report.phases_ms;
    let mut at = run_start;
    let mut phases = Vec::new();
    for (name, ms) in [
        ("acquire", p.acquire),
        ("backup", p.backup),
        ("compare", p.compare),
        ("delete", p.delete),
        ("resync", p.resync),
    ] {
        let end = at + ms as f64 / 1000.0;
        phases.push((name.to_string(), at, end));
        at = end;
    }
    let mean = |from: f64, to: f64| {
        let inside: Vec<f64> = series
            .iter()
            .filter(|(t, _)| *t > from && *t <= to)
            .map(|(_, v)| *v)
            .collect();
        if inside.is_empty() {
            None
        } else {
            Some(inside.iter().sum::<f64>() / inside.len() as f64)
        }
    };
    let before = mean(0.0, run_start);
    let backup_phase = &phases[1];
    let during_backup = mean(backup_phase.1, backup_phase.2);
    let after = mean(at, f64::MAX);
    if let Some(path) = &options.plot {
        plot::timeline(path, &series, &phases)?;
    }
    let opt = |v: Option<f64>| v.map_or("-".into(), f1);
    let rows = vec![
        vec!["ledger tps before the run".into(), opt(before)],
        vec!["ledger tps during the backup".into(), opt(during_backup)],
        vec!["ledger tps after the resync".into(), opt(after)],
        vec![
            "freeze window (µs)".into(),
            report
                .freeze_window_us
                .map_or("-".into(), |v| v.to_string()),
        ],
        vec!["backup (MB/s)".into(), f1(report.throughput_mb_per_s)],
    ];
    Ok(BenchOutput {
        table: table(&["one backup run, ledger at full speed", "value"], &rows),
        figures: json!({
            "sample_every_ms": SAMPLE_EVERY.as_millis() as u64,
            "series": series.iter().map(|(t, v)| json!([t, v])).collect::<Vec<_>>(),
            "phases": phases.iter().map(|(n, a, b)| json!({"phase": n, "from_s": a, "to_s": b})).collect::<Vec<_>>(),
            "tps_before": before,
            "tps_during_backup": during_backup,
            "tps_after": after,
            "report": report,
        }),
    })
}
