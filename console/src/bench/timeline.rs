//! `bench timeline`: one backup run with the ledger at full speed, the
//! ledger's transactions per second sampled every 100 ms, and the run's
//! phases marked — the picture that shows whether a backup, and the resync
//! after it, slow the database.
//!
//! The run is `console run`'s (acquire, back up, compare) keeping its
//! snapshot; while the snapshot is held the bench writes `--dirty` bytes
//! (256 MiB by default, at most a quarter of the volume) to the end of the
//! volume through db-server's write path, in 1 MiB writes, so that the
//! resync after the snapshot's deletion has something measurable to copy;
//! then it deletes the snapshot as the run does and waits for
//! Synchronized. The ledger's rate during the resync is its commit counter
//! read when the snapshot is deleted and when the pair is Synchronized
//! again (a resync of 256 MiB may last only two or three 100 ms samples);
//! during the backup it is the mean of the samples, as before. Afterwards the same backup runs once more on a second
//! cluster whose ledger is idle (1 transaction per second), for the
//! backup's time on an idle volume.
//!
//! With `--snapshot-method cow` the run takes a copy-on-write snapshot
//! (#20): both clusters get a save area as large as the volume, the backup
//! reads the image through db-server, the `--dirty` writes are saved
//! before they land, and the delete resyncs nothing (the "resync" phase is
//! the delete's status round trip).
//!
//! Before the run, both volumes are filled with the same random data
//! beyond the ledger's first 32 MiB (through db-server, then flushed to
//! disk with `sync`), so that the backup copies a volume's worth of data:
//! the chunk store skips all-zero chunks without reading them, and a
//! volume the ledger alone wrote is 98 % zeros.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use serde_json::json;
use splitmirror_proto::db::v1 as dpb;
use tokio_util::sync::CancellationToken;

use super::backup::met;
use super::common::{Bench, f1, f2, full_speed_ledger, table};
use super::{BenchOptions, BenchOutput, plot};
use crate::clients::Clients;
use crate::cluster::ClusterBuilder;
use crate::progress::Quiet;
use crate::run::{RunOptions, RunReport, backup_run_by, method_name, wait_synchronized};

const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// The size of each write that fills or dirties the volume.
const DIRTY_WRITE_BYTES: u64 = 1 << 20;

/// The start of the volume, left to the ledger (which needs about 20 MiB
/// with its default 1000 accounts and 4096 log blocks): not filled.
const LEDGER_AREA_BYTES: u64 = 32 << 20;

/// What the bench writes while the snapshot is held: `--dirty`, at most a
/// quarter of the volume (the ledger lives at its start), whole 1 MiB
/// writes.
fn dirty_bytes(options: &BenchOptions) -> u64 {
    let wanted = options.dirty_bytes.min(options.size_bytes / 4);
    wanted / DIRTY_WRITE_BYTES * DIRTY_WRITE_BYTES
}

fn run_options(options: &BenchOptions, keep_snapshot: bool) -> RunOptions {
    RunOptions {
        volume: 0,
        mate: 1,
        keep_snapshot,
        label: "timeline".into(),
        max_bytes_per_s: options.max_rate,
        cancel: CancellationToken::new(),
        verify_read: false,
    }
}

/// The cluster of a timeline: the default one, with a save area as large
/// as the volume for a copy-on-write run (so that it cannot fill up).
fn cluster(options: &BenchOptions, ledger: db_server::ledger::LedgerConfig) -> ClusterBuilder {
    let builder = ClusterBuilder::new()
        .lu_size_bytes(options.size_bytes)
        .ledger(Some(ledger))
        .journal_region_bytes(Some(db_server::DEFAULT_JOURNAL_REGION_BYTES));
    if is_cow(options) {
        builder.save_area(None)
    } else {
        builder
    }
}

fn is_cow(options: &BenchOptions) -> bool {
    options.snapshot_method == dpb::SnapshotMethod::Cow
}

pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchOutput> {
    let bench = Bench::start_from(cluster(options, full_speed_ledger()), true).await?;
    let filled = fill(&bench.clients, options.size_bytes).await?;
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
    let report = backup_run_by(
        &bench.clients,
        &run_options(options, true),
        options.snapshot_method,
        &Quiet,
    )
    .await;
    if !report.succeeded() {
        stop.cancel();
        let _ = sampler.await;
        bench.shutdown().await?;
        bail!("the run failed: {:?}", report.error);
    }
    let dirty = dirty_bytes(options);
    let dirty_start = origin.elapsed().as_secs_f64();

    let split = split_and_resync(&bench.clients, options, &report, dirty, || {
        origin.elapsed().as_secs_f64()
    })
    .await;
    tokio::time::sleep(lead).await;
    stop.cancel();
    let samples = sampler.await.context("the status sampler")?;
    bench.shutdown().await?;
    let split = split?;

    // The same backup on an idle volume: a second cluster, its ledger at
    // one transaction per second.
    let idle = idle_backup(options).await?;

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
    ] {
        let end = at + ms as f64 / 1000.0;
        phases.push((name.to_string(), at, end));
        at = end;
    }
    phases.push(("dirty".to_string(), dirty_start, split.dirty_end_s));
    phases.push(("delete".to_string(), split.dirty_end_s, split.delete_end_s));
    phases.push(("resync".to_string(), split.delete_end_s, split.resync_end_s));
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
    // A copy-on-write delete resyncs nothing: its "resync" is one status
    // round trip, too short for a rate.
    let during_resync = (!is_cow(options)).then_some(split.resync_tps);
    let after = mean(split.resync_end_s, f64::MAX);
    if let Some(path) = &options.plot {
        plot::timeline(path, &series, &phases)?;
    }
    let ratio = |during: Option<f64>| match (during, before) {
        (Some(during), Some(before)) if before > 0.0 => Some(during / before),
        _ => None,
    };
    let backup_ratio = ratio(during_backup);
    let resync_ratio = ratio(during_resync);
    let backup_seconds = p.backup as f64 / 1000.0;
    let idle_backup_seconds = idle.phases_ms.backup as f64 / 1000.0;
    let backup_over_idle = backup_seconds / idle_backup_seconds.max(1e-3);
    let opt = |v: Option<f64>| v.map_or("-".into(), f1);
    let opt2 = |v: Option<f64>| v.map_or("-".into(), f2);
    let rows = vec![
        vec![
            "ledger tps before the run".into(),
            opt(before),
            "tps".into(),
        ],
        vec![
            "ledger tps during the backup".into(),
            opt(during_backup),
            "tps".into(),
        ],
        vec![
            "  ÷ before".into(),
            opt2(backup_ratio),
            format!("× (target ≥ 0.8: {})", met(backup_ratio.map(|r| r >= 0.8))),
        ],
        vec![
            "ledger tps during the resync".into(),
            opt(during_resync),
            "tps (delete to Synchronized)".into(),
        ],
        vec![
            "  ÷ before".into(),
            opt2(resync_ratio),
            format!("× (target ≥ 0.8: {})", met(resync_ratio.map(|r| r >= 0.8))),
        ],
        vec![
            "ledger tps after the resync".into(),
            opt(after),
            "tps".into(),
        ],
        vec![
            "freeze window".into(),
            report
                .freeze_window_us
                .map_or("-".into(), |v| v.to_string()),
            "µs".into(),
        ],
        vec![
            "backup".into(),
            f1(report.throughput_mb_per_s),
            format!("MB/s ({:.2} s)", backup_seconds),
        ],
        vec![
            "backup, ledger idle (second cluster)".into(),
            f1(idle.throughput_mb_per_s),
            format!("MB/s ({:.2} s)", idle_backup_seconds),
        ],
        vec![
            "backup time ÷ idle backup time".into(),
            f2(backup_over_idle),
            format!("× (target ≤ 2.0: {})", met(Some(backup_over_idle <= 2.0))),
        ],
        vec![
            "random data in the volume before the run".into(),
            f1(filled as f64 / (1u64 << 20) as f64),
            "MiB".into(),
        ],
        vec![
            "written while the snapshot was held (--dirty)".into(),
            f1(dirty as f64 / (1u64 << 20) as f64),
            "MiB".into(),
        ],
        vec![
            "resync".into(),
            f1(split.resync_bytes as f64 / (1u64 << 20) as f64),
            format!("MiB in {:.2} s", split.resync_end_s - split.delete_end_s),
        ],
    ];
    let title = format!(
        "one backup run ({} snapshot) and its resync, ledger at full speed",
        method_name(options.snapshot_method)
    );
    Ok(BenchOutput {
        table: table(&[title.as_str(), "value", "unit"], &rows),
        figures: json!({
            "snapshot_method": method_name(options.snapshot_method),
            "sample_every_ms": SAMPLE_EVERY.as_millis() as u64,
            "series": series.iter().map(|(t, v)| json!([t, v])).collect::<Vec<_>>(),
            "phases": phases.iter().map(|(n, a, b)| json!({"phase": n, "from_s": a, "to_s": b})).collect::<Vec<_>>(),
            "tps_before": before,
            "tps_during_backup": during_backup,
            "tps_during_resync": during_resync,
            "tps_after": after,
            "during_backup_over_before": backup_ratio,
            "during_resync_over_before": resync_ratio,
            "backup_seconds": backup_seconds,
            "idle_backup_seconds": idle_backup_seconds,
            "backup_over_idle_backup": backup_over_idle,
            "idle_backup_report": idle,
            "filled_bytes": filled,
            "dirty_bytes": dirty,
            "resync_bytes": split.resync_bytes,
            "resync_seconds": split.resync_end_s - split.delete_end_s,
            "report": report,
        }),
    })
}

/// When the phases after the backup ended, in seconds since the bench's
/// origin, and what the resync had to copy.
struct Split {
    dirty_end_s: f64,
    delete_end_s: f64,
    resync_end_s: f64,
    /// The ledger's transactions per second from the snapshot's deletion
    /// to Synchronized, from its commit counter read at both ends (a resync
    /// may last only a few 100 ms samples).
    resync_tps: f64,
    resync_bytes: u64,
}

/// Writes `dirty` bytes to the end of volume 0 while the run's snapshot is
/// held, deletes the snapshot as `console run` does, and waits for the
/// resync to finish.
async fn split_and_resync(
    clients: &Clients,
    options: &BenchOptions,
    report: &RunReport,
    dirty: u64,
    now_s: impl Fn() -> f64,
) -> anyhow::Result<Split> {
    let db = &clients.db;
    write_random(
        clients,
        options.size_bytes - dirty,
        options.size_bytes,
        DIRTY_SEED,
    )
    .await
    .context("dirtying the volume while it is split")?;
    let committed = || async {
        let status = db.status(false).await?;
        anyhow::Ok((
            now_s(),
            status.ledger.map_or(0, |l| l.transactions_committed),
        ))
    };
    let (dirty_end_s, committed_before) = committed().await?;
    let deleted = db
        .delete_snapshot(0, &report.run_id, false)
        .await
        .context("deleting the run's snapshot")?;
    let delete_end_s = now_s();
    wait_synchronized(clients, 0, &Quiet)
        .await
        .context("waiting for the resync")?;
    let (resync_end_s, committed_after) = committed().await?;
    Ok(Split {
        dirty_end_s,
        delete_end_s,
        resync_end_s,
        resync_tps: committed_after.saturating_sub(committed_before) as f64
            / (resync_end_s - dirty_end_s).max(1e-9),
        resync_bytes: deleted.blocks_to_resync * 4096,
    })
}

const FILL_SEED: u64 = 18;
const DIRTY_SEED: u64 = 1818;

/// Fills volume 0 beyond the ledger's area with random data (the same for
/// the same size), and flushes it to disk, so that the writeback of the
/// fill does not fall into the measurement. Answers the bytes written.
async fn fill(clients: &Clients, size_bytes: u64) -> anyhow::Result<u64> {
    if size_bytes <= LEDGER_AREA_BYTES {
        return Ok(0);
    }
    write_random(clients, LEDGER_AREA_BYTES, size_bytes, FILL_SEED)
        .await
        .context("filling the volume with random data")?;
    let status = tokio::task::spawn_blocking(|| std::process::Command::new("sync").status())
        .await
        .context("the sync task")?
        .context("running sync")?;
    if !status.success() {
        bail!("sync failed: {status}");
    }
    Ok(size_bytes - LEDGER_AREA_BYTES)
}

/// Writes random data over `[from_bytes, to_bytes)` of volume 0 through
/// db-server, 1 MiB per write, four writes in flight; each MiB's data
/// depends on `seed` and its offset, so no two chunks are alike.
async fn write_random(
    clients: &Clients,
    from_bytes: u64,
    to_bytes: u64,
    seed: u64,
) -> anyhow::Result<()> {
    use rand::{Rng as _, SeedableRng as _};
    let db = &clients.db;
    let writes = (to_bytes - from_bytes) / DIRTY_WRITE_BYTES;
    let mut results = futures_util::stream::iter(0..writes)
        .map(|i| {
            let offset = from_bytes + i * DIRTY_WRITE_BYTES;
            let mut data = vec![0u8; DIRTY_WRITE_BYTES as usize];
            rand::rngs::SmallRng::seed_from_u64(seed ^ offset).fill(&mut data[..]);
            async move { db.write(0, dpb::VirtualLu::Data, offset / 4096, data).await }
        })
        .buffer_unordered(4);
    while let Some(result) = results.next().await {
        result?;
    }
    Ok(())
}

/// One whole run on a new cluster of the same size whose ledger commits
/// one transaction per second: the backup's time on an idle volume.
async fn idle_backup(options: &BenchOptions) -> anyhow::Result<RunReport> {
    let ledger = db_server::ledger::LedgerConfig {
        target_tps: 1,
        workers: 1,
        ..full_speed_ledger()
    };
    let cluster = cluster(options, ledger).start().await?;
    cluster
        .wait_for_transactions(1, Duration::from_secs(60))
        .await?;
    fill(&cluster.clients, options.size_bytes).await?;
    let report = backup_run_by(
        &cluster.clients,
        &run_options(options, false),
        options.snapshot_method,
        &Quiet,
    )
    .await;
    cluster.shutdown().await?;
    if !report.succeeded() {
        bail!("the idle volume's run failed: {:?}", report.error);
    }
    Ok(report)
}
