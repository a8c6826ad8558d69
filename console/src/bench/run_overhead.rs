//! `bench run`: one `console run` with the ledger at full speed — its total
//! time and phases — next to the same steps called one by one, so that the
//! orchestration's own overhead is visible.

use std::time::Instant;

use anyhow::bail;
use futures_util::StreamExt;
use serde_json::json;
use splitmirror_proto::backup::v1 as bpb;
use tokio_util::sync::CancellationToken;

use super::common::{Bench, f1, f2, table};
use super::{BenchOptions, BenchOutput};
use crate::progress::Quiet;
use crate::run::{RunOptions, backup_run};

pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchOutput> {
    let bench = Bench::with_busy_ledger(options.size_bytes).await?;
    let clients = &bench.clients;
    // Parts and whole runs alternate, so that neither gains from going
    // second (a warm cache, a settled ledger).
    let rounds = if options.quick { 1 } else { 3 };
    let mut parts = Vec::new();
    let mut runs = Vec::new();
    for round in 0..rounds {
        parts.push(parts_alone(clients, round).await?);
        let report = backup_run(
            clients,
            &RunOptions {
                volume: 0,
                mate: 1,
                keep_snapshot: false,
                label: "bench".into(),
                max_bytes_per_s: options.max_rate,
                cancel: CancellationToken::new(),
                verify_read: false,
            },
            &Quiet,
        )
        .await;
        if !report.succeeded() {
            bail!("the run failed: {:?}", report.error);
        }
        runs.push(report);
    }
    bench.shutdown().await?;
    let n = rounds as f64;
    let mean = |f: &dyn Fn(&Parts) -> f64| parts.iter().map(f).sum::<f64>() / n;
    let run_mean = |f: &dyn Fn(&crate::run::PhasesMs) -> u64| {
        runs.iter().map(|r| f(&r.phases_ms) as f64).sum::<f64>() / n
    };
    let (acquire_ms, backup_ms, delete_ms, resync_ms) = (
        mean(&|p| p.acquire_ms),
        mean(&|p| p.backup_ms),
        mean(&|p| p.delete_ms),
        mean(&|p| p.resync_ms),
    );
    let parts_ms = acquire_ms + backup_ms + delete_ms + resync_ms;
    let total_ms = run_mean(&|p| p.total);
    let overhead = (total_ms - parts_ms) / total_ms.max(1e-9);
    // Time inside the run that no phase accounts for: the console's own
    // work between steps.
    let phases_ms = run_mean(&|p| p.acquire + p.backup + p.compare + p.delete + p.resync);
    let unattributed = (total_ms - phases_ms) / total_ms.max(1e-9);
    let rows = vec![
        vec![
            "acquire".into(),
            f1(acquire_ms),
            f1(run_mean(&|p| p.acquire)),
        ],
        vec!["backup".into(), f1(backup_ms), f1(run_mean(&|p| p.backup))],
        vec![
            "compare digests".into(),
            "-".into(),
            f1(run_mean(&|p| p.compare)),
        ],
        vec!["delete".into(), f1(delete_ms), f1(run_mean(&|p| p.delete))],
        vec!["resync".into(), f1(resync_ms), f1(run_mean(&|p| p.resync))],
        vec!["total".into(), f1(parts_ms), f1(total_ms)],
    ];
    let mut out = table(
        &[
            &format!("phase (ms, mean of {rounds})"),
            "alone",
            "in console run",
        ],
        &rows,
    );
    out.push_str(&format!(
        "\n  orchestration overhead: (run − parts alone) ÷ run = {} %; time between the run's phases ÷ run = {} % (target < 5 %)\n",
        f2(overhead * 100.0),
        f2(unattributed * 100.0)
    ));
    Ok(BenchOutput {
        table: out,
        figures: json!({
            "parts_ms": {"acquire": acquire_ms, "backup": backup_ms, "delete": delete_ms, "resync": resync_ms, "sum": parts_ms},
            "run_total_ms": total_ms,
            "overhead_fraction": overhead,
            "unattributed_fraction": unattributed,
            "rounds": rounds,
            "reports": runs,
        }),
    })
}

struct Parts {
    acquire_ms: f64,
    backup_ms: f64,
    delete_ms: f64,
    resync_ms: f64,
}

/// The steps of a run called one by one, with nothing around them.
async fn parts_alone(clients: &crate::clients::Clients, round: u32) -> anyhow::Result<Parts> {
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    let run_id = format!("parts-{round}");
    let t = Instant::now();
    let acquired = clients.db.acquire_snapshot(0, &run_id).await?;
    let acquire_ms = ms(t);
    let t = Instant::now();
    let id = clients
        .backup
        .start_backup(bpb::StartBackupRequest {
            run_id: run_id.clone(),
            lu: acquired.mate_lu,
            snapshot: Some(bpb::SnapshotRef {
                mate: 1,
                volume: 0,
                holder_run_id: run_id.clone(),
            }),
            ..Default::default()
        })
        .await?
        .backup_id;
    let mut stream = clients.backup.watch_backup(&id).await?;
    while let Some(progress) = stream.next().await {
        progress?;
    }
    let backup_ms = ms(t);
    let t = Instant::now();
    clients.db.delete_snapshot(0, &run_id, false).await?;
    let delete_ms = ms(t);
    let t = Instant::now();
    crate::run::wait_synchronized(clients, 0, &Quiet).await?;
    Ok(Parts {
        acquire_ms,
        backup_ms,
        delete_ms,
        resync_ms: ms(t),
    })
}
