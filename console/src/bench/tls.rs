//! `bench tls`: what mutual TLS costs. A backup's MB/s through the backup
//! server and the ledger's transactions per second are measured with every
//! node and client on mutual TLS (the default) and with `--insecure`,
//! alternating in one run (target: mTLS ≥ 0.9 × insecure for both).
//!
//! Each configuration has its own array of random data, made once; each
//! backup starts a backup server of that configuration (a process when its
//! binary is built, as `bench backup` runs it) and writes into a fresh store,
//! removed afterwards. Each ledger measurement starts a cluster of that
//! configuration and stops it after, so that only one ledger runs at a time.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;

use super::backup::{BackupMeasurement, backup_through_server};
use super::common::{Bench, RandomLuArray, array_with_random_lu, f1, f2, full_speed_ledger};
use super::common::{measure, table};
use super::{BenchOptions, BenchOutput};
use crate::cluster::{ClusterBuilder, Credentials};

/// The speed target of issue 14: mTLS ≥ this × insecure.
const TARGET_RATIO: f64 = 0.9;

/// The LU the backups copy, as `bench backup` names it.
const BACKED_UP_LU: u32 = 2;

/// One backup and one ledger window in one configuration.
#[derive(Debug, Clone, serde::Serialize)]
struct Sample {
    round: u32,
    mutual_tls: bool,
    backup_mb_per_s: f64,
    backup_seconds: f64,
    backup_server_cpu_seconds_per_gib: Option<f64>,
    ledger_tps: f64,
    ledger_p99_latency_us: f64,
}

/// The name of a configuration, in the table and in errors.
fn configuration(mutual_tls: bool) -> &'static str {
    if mutual_tls {
        "mutual TLS"
    } else {
        "--insecure"
    }
}

/// Starts a cluster with the ledger at full speed in one configuration,
/// waits until it is past start-up (200 transactions) and measures it for
/// `window`, then stops it.
async fn ledger_window(
    mutual_tls: bool,
    lu_size_bytes: u64,
    window: Duration,
) -> anyhow::Result<super::common::LedgerWindow> {
    let builder = ClusterBuilder::new()
        .lu_size_bytes(lu_size_bytes)
        .ledger(Some(full_speed_ledger()));
    // The default is new certificates in the cluster's directory.
    let builder = if mutual_tls {
        builder
    } else {
        builder.credentials(Credentials::Insecure)
    };
    let cluster = builder.start().await?;
    cluster
        .wait_for_transactions(200, Duration::from_secs(60))
        .await?;
    let bench = Bench {
        clients: cluster.clients.clone(),
        cluster,
    };
    let measured = measure(&bench, window).await;
    bench.shutdown().await?;
    measured
}

/// The median of `values` (the mean of the middle two for an even count);
/// 0 for none.
fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchOutput> {
    let size = options.size_bytes;
    let rounds: u32 = if options.quick { 1 } else { 3 };
    let ledger_window_duration = if options.quick {
        options.seconds.min(Duration::from_millis(300))
    } else {
        options.seconds
    };
    let started = Instant::now();
    // Index 0: insecure, 1: mutual TLS (see `source`).
    let sources: [RandomLuArray; 2] = [
        array_with_random_lu(BACKED_UP_LU, size, false).await?,
        array_with_random_lu(BACKED_UP_LU, size, true).await?,
    ];
    let source = |mutual_tls: bool| &sources[usize::from(mutual_tls)];

    let mut samples = Vec::new();
    let mut store_number = 0;
    for round in 1..=rounds {
        // Secure, then insecure, each round: interleaved, so that neither
        // configuration has the machine's quieter minutes to itself.
        for mutual_tls in [true, false] {
            let from = source(mutual_tls);
            store_number += 1;
            let store = from.dir.path().join(format!("store-{store_number}"));
            let BackupMeasurement {
                mb_per_s,
                seconds,
                cpu_seconds_per_gib,
            } = backup_through_server(from, size, &store)
                .await
                .with_context(|| format!("the backup with {}", configuration(mutual_tls)))?;
            // Only one image on disk at a time, whatever --size is.
            std::fs::remove_dir_all(&store)
                .with_context(|| format!("removing {}", store.display()))?;
            let ledger = ledger_window(mutual_tls, size, ledger_window_duration)
                .await
                .with_context(|| format!("the ledger with {}", configuration(mutual_tls)))?;
            samples.push(Sample {
                round,
                mutual_tls,
                backup_mb_per_s: mb_per_s,
                backup_seconds: seconds,
                backup_server_cpu_seconds_per_gib: cpu_seconds_per_gib,
                ledger_tps: ledger.tps,
                ledger_p99_latency_us: ledger.p99_latency_us,
            });
        }
    }
    for RandomLuArray { array, .. } in sources {
        array.shutdown().await.map_err(anyhow::Error::msg)?;
    }

    let median_of = |mutual_tls: bool, figure: fn(&Sample) -> Option<f64>| {
        let chosen: Vec<f64> = samples
            .iter()
            .filter(|s| s.mutual_tls == mutual_tls)
            .filter_map(figure)
            .collect();
        (!chosen.is_empty()).then(|| median(chosen))
    };
    let both = |figure: fn(&Sample) -> Option<f64>| {
        (
            median_of(true, figure).unwrap_or(0.0),
            median_of(false, figure).unwrap_or(0.0),
        )
    };
    let mbps = both(|s| Some(s.backup_mb_per_s));
    let tps = both(|s| Some(s.ledger_tps));
    let cpu = (
        median_of(true, |s| s.backup_server_cpu_seconds_per_gib),
        median_of(false, |s| s.backup_server_cpu_seconds_per_gib),
    );
    let ratio = |(mtls, insecure): (f64, f64)| mtls / insecure.max(1e-9);
    let (mbps_ratio, tps_ratio) = (ratio(mbps), ratio(tps));
    let met = mbps_ratio >= TARGET_RATIO && tps_ratio >= TARGET_RATIO;

    let cpu_cell = |value: Option<f64>| value.map_or("n/a".into(), f2);
    let rows = vec![
        vec![
            configuration(true).into(),
            f1(mbps.0),
            f1(tps.0),
            cpu_cell(cpu.0),
        ],
        vec![
            configuration(false).into(),
            f1(mbps.1),
            f1(tps.1),
            cpu_cell(cpu.1),
        ],
        vec![
            "mTLS ÷ insecure".into(),
            f2(mbps_ratio),
            f2(tps_ratio),
            match cpu {
                (Some(mtls), Some(insecure)) => f2(mtls / insecure.max(1e-9)),
                _ => "n/a".into(),
            },
        ],
    ];
    let mut out = table(
        &[
            &format!("median of {rounds}"),
            "backup MB/s",
            "ledger tx/s",
            "backup-server CPU s/GiB",
        ],
        &rows,
    );
    let verdict = if met {
        "met".to_string()
    } else {
        let mut short = Vec::new();
        if mbps_ratio < TARGET_RATIO {
            short.push(format!("backup {}", f2(mbps_ratio)));
        }
        if tps_ratio < TARGET_RATIO {
            short.push(format!("ledger {}", f2(tps_ratio)));
        }
        format!("NOT met ({})", short.join(", "))
    };
    out.push_str(&format!(
        "\n  target: mTLS ÷ insecure ≥ {TARGET_RATIO} for backup MB/s and ledger tx/s: {verdict}.\n  \
         {rounds} round(s) of mutual TLS then --insecure; ledger windows of {} s; {} s in all.\n",
        f1(ledger_window_duration.as_secs_f64()),
        f1(started.elapsed().as_secs_f64())
    ));
    Ok(BenchOutput {
        table: out,
        figures: json!({
            "rounds": rounds,
            "target_ratio": TARGET_RATIO,
            "target_met": met,
            "backup_mb_per_s": {"mutual_tls": mbps.0, "insecure": mbps.1, "ratio": mbps_ratio},
            "ledger_tps": {"mutual_tls": tps.0, "insecure": tps.1, "ratio": tps_ratio},
            "backup_server_cpu_seconds_per_gib": {"mutual_tls": cpu.0, "insecure": cpu.1},
            "samples": samples,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_even_and_none() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }
}
