//! The ledger end to end: running at full speed while snapshots are taken;
//! each frozen mate LU is a consistent ledger at the reported sequence.

use array_node::ArrayTestHooks;
use db_server::ledger::LedgerConfig;
use db_server::ledger_format;
use db_server::manager::ManagerConfig;

use crate::harness::{self, array_client, db_client, read_lu, start_array, start_db};

const LU_BYTES: u64 = 4 << 20;

fn ledger_config() -> LedgerConfig {
    LedgerConfig {
        volume: 0,
        accounts: 200,
        target_tps: 0,
        workers: 4,
        initial_balance: 1_000,
        log_blocks: 256,
        ..LedgerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_snapshots_of_a_busy_ledger_all_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let array = start_array(
        &dir.path().join("array"),
        harness::small_array(LU_BYTES),
        ArrayTestHooks::default(),
    )
    .await;
    let db = start_db(
        &array.url(),
        &dir.path().join("db"),
        ManagerConfig::default(),
        Some(ledger_config()),
    )
    .await;
    let client = db_client(&db.url());
    let array_client = array_client(&array.url());
    let mut freeze_windows_us = Vec::new();
    let mut last_sequence = 0;
    for i in 0..20 {
        let run_id = format!("e2e-{i}");
        let acquired = client.acquire_snapshot(0, &run_id).await.expect("acquire");
        freeze_windows_us.push(acquired.freeze_window_us);
        assert!(
            acquired.ledger_sequence >= last_sequence,
            "the ledger only moves forward"
        );
        last_sequence = acquired.ledger_sequence;
        let image = read_lu(&array_client, acquired.mate_lu, 0, acquired.block_count).await;
        let report = ledger_format::verify_image(&image, Some(acquired.ledger_sequence));
        assert!(
            report.ok,
            "snapshot {i} at sequence {}: {:?}",
            acquired.ledger_sequence, report.violations
        );
        if i == 0 {
            check_the_verify_image_command(&image, acquired.ledger_sequence, dir.path());
        }
        // A retried acquire answers the same snapshot.
        let again = client
            .acquire_snapshot(0, &run_id)
            .await
            .expect("retried acquire");
        assert!(again.already_held);
        assert_eq!(again.ledger_sequence, acquired.ledger_sequence);
        client
            .delete_snapshot(0, &run_id, false)
            .await
            .expect("delete");
        harness::wait_synchronized(&client, 0).await;
    }
    let status = client.status(false).await.expect("status");
    let ledger = status.ledger.expect("ledger status");
    assert!(ledger.transactions_committed > 0, "the ledger ran");
    freeze_windows_us.sort_unstable();
    eprintln!(
        "freeze window over 20 acquires: p50 {} µs, max {} µs; {} transactions committed",
        freeze_windows_us[10], freeze_windows_us[19], ledger.transactions_committed
    );
    db.shutdown().await.expect("db shutdown");
    // The ledger survives a restart of db-server and continues from its
    // highest sequence.
    let db = start_db(
        &array.url(),
        &dir.path().join("db"),
        ManagerConfig::default(),
        Some(ledger_config()),
    )
    .await;
    let client = db_client(&db.url());
    let status = client.status(false).await.expect("status");
    assert!(
        status.ledger.expect("ledger").sequence >= last_sequence,
        "reopened, not reformatted"
    );
    // A snapshot held across a restart: the retried acquire answers the
    // same snapshot, at the same sequence, and the mate still verifies.
    let held = client
        .acquire_snapshot(0, "across-restart")
        .await
        .expect("acquire");
    db.shutdown().await.expect("db shutdown");
    let db = start_db_holding_snapshots(&array.url(), &dir.path().join("db")).await;
    let client = db_client(&db.url());
    let retried = client
        .acquire_snapshot(0, "across-restart")
        .await
        .expect("retried acquire after the restart");
    assert!(retried.already_held);
    assert_eq!(retried.ledger_sequence, held.ledger_sequence);
    let image = read_lu(&array_client, retried.mate_lu, 0, retried.block_count).await;
    let report = ledger_format::verify_image(&image, Some(retried.ledger_sequence));
    assert!(report.ok, "{:?}", report.violations);
    db.shutdown().await.expect("db shutdown");
}

/// Starts db-server without waiting for Synchronized pairs (a snapshot is
/// held, so the pair stays in Snapshot mode).
async fn start_db_holding_snapshots(
    array_url: &str,
    data_dir: &std::path::Path,
) -> splitmirror_proto::node::NodeHandle {
    let listener = splitmirror_proto::node::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let config = db_server::DbServerConfig {
        security: harness::security(splitmirror_proto::security::role::DB),
        control_identities: vec![splitmirror_proto::security::role::CONSOLE.to_string()],
        array_url: array_url.to_string(),
        data_dir: data_dir.to_path_buf(),
        manager: ManagerConfig::default(),
        ledger: Some(ledger_config()),
        journal_region_bytes: Some(db_server::DEFAULT_JOURNAL_REGION_BYTES),
        array_wait: Some(db_server::DEFAULT_ARRAY_WAIT),
        max_suspend_lease: db_server::gate::DEFAULT_MAX_LEASE,
    };
    let handle = db_server::spawn(config, listener)
        .await
        .expect("start db-server");
    harness::wait_healthy(&handle.url(), splitmirror_proto::security::role::DB).await;
    handle
}

/// The real `db-server verify-image` accepts the image and rejects it with
/// one byte flipped.
fn check_the_verify_image_command(image: &[u8], sequence: u64, dir: &std::path::Path) {
    let good = dir.join("good.raw");
    std::fs::write(&good, image).expect("write image");
    let run = |path: &std::path::Path| {
        harness::command("db-server")
            .args([
                "verify-image",
                "--json",
                "--expect-sequence",
                &sequence.to_string(),
            ])
            .arg(path)
            .output()
            .expect("run db-server verify-image")
    };
    let out = run(&good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["ok"], true);
    assert_eq!(report["highest_sequence"], sequence);
    let mut bad = image.to_vec();
    bad[4096 * 3 + 10] ^= 0x40; // inside account 2
    let bad_path = dir.join("bad.raw");
    std::fs::write(&bad_path, &bad).expect("write image");
    let out = run(&bad_path);
    assert_eq!(out.status.code(), Some(1), "a corrupt image must fail");
}
