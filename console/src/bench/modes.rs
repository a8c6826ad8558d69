//! `bench modes`: the ledger's throughput and p99 latency in Synchronized,
//! Snapshot and Resynchronizing modes, and data bytes db-server sends per
//! logical byte written — with the pair mirrored by the array and, for
//! comparison, by the host ([0006]/[0009] against the claim of [0047]).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;
use splitmirror_proto::db::v1 as dpb;

use super::backup::met;
use super::common::{
    Bench, LedgerWindow, f1, f2, full_speed_ledger, measure, sample, table, window,
};
use super::{BenchOptions, BenchOutput};

/// The resync rate cap of the third measurement (`db-server
/// --resync-max-rate`).
const RESYNC_CAP_BYTES_PER_S: u64 = 100_000_000;

/// Bytes of the data volume dirtied (beyond the ledger) to make the resync
/// last through the measurement.
fn bulk_bytes(options: &BenchOptions) -> u64 {
    (options.size_bytes / 2).min(512 << 20)
}

pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchOutput> {
    let seconds = options.seconds;
    let array = per_mode(options, false, None, seconds).await?;
    let host = per_mode(options, true, None, seconds).await?;
    let capped = per_mode(options, false, Some(RESYNC_CAP_BYTES_PER_S), seconds).await?;
    let capped_resync = capped
        .last()
        .map(|(_, w)| w.clone())
        .context("no resync window")?;
    let sync = &array[0].1;
    let host_sync = &host[0].1;
    let mut rows: Vec<Vec<String>> = Vec::new();
    for (mirroring, results) in [("array", &array), ("host", &host)] {
        for (mode, w) in results.iter() {
            let mode = if mirroring == "array" && mode == "Resynchronizing" {
                "Resynchronizing, defaults (no cap)"
            } else {
                mode.as_str()
            };
            rows.push(vec![
                format!("{mirroring} mirroring, {mode}"),
                f1(w.tps),
                f1(w.p99_latency_us),
                f2(w.wire_bytes_per_logical_byte),
                f2(w.tps / sync.tps.max(1e-9)),
            ]);
        }
    }
    rows.push(vec![
        format!(
            "array mirroring, Resynchronizing, resync capped at {} MB/s",
            RESYNC_CAP_BYTES_PER_S / 1_000_000
        ),
        f1(capped_resync.tps),
        f1(capped_resync.p99_latency_us),
        f2(capped_resync.wire_bytes_per_logical_byte),
        f2(capped_resync.tps / sync.tps.max(1e-9)),
    ]);
    let capped_ratio = capped_resync.tps / sync.tps.max(1e-9);
    let snapshot_ratio = array[1].1.tps / sync.tps.max(1e-9);
    let resync_ratio = array[2].1.tps / sync.tps.max(1e-9);
    let tps_ratio = sync.tps / host_sync.tps.max(1e-9);
    let bytes_ratio =
        sync.wire_bytes_per_logical_byte / host_sync.wire_bytes_per_logical_byte.max(1e-9);
    let mut out = table(
        &[
            "ledger at full speed",
            "tps",
            "p99 µs",
            "wire B / logical B",
            "× array sync",
        ],
        &rows,
    );
    out.push_str(&format!(
        "\n  Snapshot / Synchronized {} (target ≥ 0.9: {})\n  Resynchronizing with defaults (no cap) / Synchronized {} (target ≥ 0.8: {}); resync capped at {} MB/s: {}\n  the uncapped resync window: {:.2} s, {} MiB dirtied before it\n  array / host mirroring: {}× tps (target ≥ 1.5), {}× bytes on the wire (target 0.5)\n",
        f2(snapshot_ratio),
        met(Some(snapshot_ratio >= 0.9)),
        f2(resync_ratio),
        met(Some(resync_ratio >= 0.8)),
        RESYNC_CAP_BYTES_PER_S / 1_000_000,
        f2(capped_ratio),
        array[2].1.seconds,
        bulk_bytes(options) >> 20,
        f2(tps_ratio),
        f2(bytes_ratio)
    ));
    let to_json = |results: &Vec<(String, LedgerWindow)>| {
        results
            .iter()
            .map(|(mode, w)| json!({"mode": mode, "window": w}))
            .collect::<Vec<_>>()
    };
    Ok(BenchOutput {
        table: out,
        figures: json!({
            "array_mirroring": to_json(&array),
            "host_mirroring": to_json(&host),
            "snapshot_over_synchronized": snapshot_ratio,
            "resynchronizing_over_synchronized": resync_ratio,
            "resynchronizing_capped_over_synchronized": capped_ratio,
            "resync_cap_bytes_per_s": RESYNC_CAP_BYTES_PER_S,
            "capped_resync": capped_resync,
            "array_over_host_tps": tps_ratio,
            "array_over_host_wire_bytes": bytes_ratio,
        }),
    })
}

/// Measures the modes of one cluster. With host mirroring only the
/// Synchronized mode differs from the array's, so only it is measured.
async fn per_mode(
    options: &BenchOptions,
    host_mirroring: bool,
    resync_cap: Option<u64>,
    seconds: Duration,
) -> anyhow::Result<Vec<(String, LedgerWindow)>> {
    let manager = db_server::manager::ManagerConfig {
        host_mirroring,
        resync_max_bytes_per_s: resync_cap,
        ..db_server::manager::ManagerConfig::default()
    };
    let bench = Bench::start(
        options.size_bytes,
        Some(full_speed_ledger()),
        manager,
        Some(db_server::DEFAULT_JOURNAL_REGION_BYTES),
    )
    .await?;
    let mut results = vec![("Synchronized".to_string(), measure(&bench, seconds).await?)];
    if host_mirroring {
        bench.shutdown().await?;
        return Ok(results);
    }
    let db = &bench.clients.db;
    db.acquire_snapshot(0, "modes").await?;
    results.push(("Snapshot".to_string(), measure(&bench, seconds).await?));
    // Dirty the second half of the volume, so that the resync has enough to
    // copy while the ledger is measured.
    let start_lba = options.size_bytes / 2 / 4096;
    let chunk = 1 << 20;
    let mut offset = 0;
    while offset < bulk_bytes(options) {
        db.write(
            0,
            dpb::VirtualLu::Data,
            start_lba + offset / 4096,
            vec![0x5A; chunk as usize],
        )
        .await?;
        offset += chunk;
    }
    db.delete_snapshot(0, "modes", false).await?;
    // Measured while the pair is Resynchronizing, up to `seconds`.
    let before = sample(&bench).await?;
    let deadline = Instant::now() + seconds;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let status = bench.status().await?;
        let synced = status
            .volumes
            .iter()
            .any(|v| v.volume == 0 && v.data_mode() == dpb::Mode::Synchronized);
        if synced || Instant::now() >= deadline {
            break;
        }
    }
    let after = sample(&bench).await?;
    results.push(("Resynchronizing".to_string(), window(&before, &after, 4096)));
    bench.shutdown().await?;
    Ok(results)
}
