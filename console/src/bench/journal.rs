//! `bench journal`: what crash safety costs — ledger throughput in Snapshot
//! mode with the journal and without it, and journal bytes and fsyncs per
//! 1,000 transactions.

use serde_json::json;

use super::common::{Bench, LedgerWindow, f1, f2, full_speed_ledger, measure, table};
use super::{BenchOptions, BenchOutput};

pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchOutput> {
    let with = snapshot_mode(options, Some(db_server::DEFAULT_JOURNAL_REGION_BYTES)).await?;
    let without = snapshot_mode(options, None).await?;
    let ratio = with.tps / without.tps.max(1e-9);
    let per_k = |value: u64| value as f64 * 1000.0 / with.transactions.max(1) as f64;
    let rows = vec![
        vec![
            "Snapshot mode, journal on".into(),
            f1(with.tps),
            "tps".into(),
        ],
        vec![
            "Snapshot mode, journal off".into(),
            f1(without.tps),
            "tps".into(),
        ],
        vec!["on / off".into(), f2(ratio), "× (target ≥ 0.9)".into()],
        vec![
            "journal bytes per 1,000 transactions".into(),
            f1(per_k(with.journal_bytes)),
            "bytes".into(),
        ],
        vec![
            "journal fsyncs per 1,000 transactions".into(),
            f1(per_k(with.journal_fsyncs)),
            "fsyncs".into(),
        ],
    ];
    Ok(BenchOutput {
        table: table(
            &["journal cost (ledger at full speed)", "value", "unit"],
            &rows,
        ),
        figures: json!({
            "with_journal": with,
            "without_journal": without,
            "with_over_without_tps": ratio,
            "journal_bytes_per_1000_transactions": per_k(with.journal_bytes),
            "journal_fsyncs_per_1000_transactions": per_k(with.journal_fsyncs),
        }),
    })
}

async fn snapshot_mode(
    options: &BenchOptions,
    journal: Option<u64>,
) -> anyhow::Result<LedgerWindow> {
    let bench = Bench::start(
        options.size_bytes,
        Some(full_speed_ledger()),
        db_server::manager::ManagerConfig::default(),
        journal,
    )
    .await?;
    bench.clients.db.acquire_snapshot(0, "journal").await?;
    let window = measure(&bench, options.seconds).await?;
    bench.shutdown().await?;
    Ok(window)
}
