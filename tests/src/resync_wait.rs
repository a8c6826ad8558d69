//! The console waits out a running resync by db-server's machine-readable
//! reason (issue 13): an acquire refused while the pair resynchronizes
//! carries the `splitmirror-reason: resynchronizing` trailer, and
//! `console run` waits for Synchronized on it, then acquires — it never
//! reads the message. (That a reworded message changes nothing is the unit
//! test `reason::tests::the_decision_reads_the_reason_not_the_message` in
//! the shared crate.)

use array_node::ArrayTestHooks;
use db_server::manager::ManagerConfig;
use splitmirror_proto::db::v1 as pb;
use splitmirror_proto::reason::Reason;

use crate::harness::{self, ErrorKind, db_client, start_array, start_backup, start_db};

/// Bytes written while the first snapshot is held: the resync to copy.
const DIRTY_BYTES: u64 = 8 << 20;
/// Slow enough that the resync is still running when the console starts
/// (about four seconds), fast enough for a test.
const RESYNC_BYTES_PER_S: u64 = 2 << 20;
const WRITE_BYTES: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_run_waits_out_a_running_resync_by_its_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let array = start_array(
        &dir.path().join("array"),
        harness::small_array(16 << 20),
        ArrayTestHooks::default(),
    )
    .await;
    let db = start_db(
        &array.url(),
        &dir.path().join("db"),
        ManagerConfig {
            resync_max_bytes_per_s: Some(RESYNC_BYTES_PER_S),
            ..ManagerConfig::default()
        },
        None,
    )
    .await;
    let backup = start_backup(&array.url(), &db.url(), &dir.path().join("store")).await;
    let client = db_client(&db.url());

    // An earlier run: acquire, write 8 MiB to the origin, delete → a resync
    // of 8 MiB at 2 MiB/s.
    client
        .acquire_snapshot(0, "earlier-run")
        .await
        .expect("acquire");
    let block_size_bytes = u64::from(harness::volume_status(&client, 0).await.block_size_bytes);
    for i in 0..DIRTY_BYTES / WRITE_BYTES {
        client
            .write(
                0,
                pb::VirtualLu::Data,
                i * WRITE_BYTES / block_size_bytes,
                vec![0xA5 ^ i as u8; WRITE_BYTES as usize],
            )
            .await
            .expect("write while split");
    }
    client
        .delete_snapshot(0, "earlier-run", false)
        .await
        .expect("delete");

    // The refusal says why in its trailer, through the real server.
    let refused = client
        .acquire_snapshot(0, "too-early")
        .await
        .expect_err("a resynchronizing pair cannot be split");
    assert_eq!(
        (refused.kind, refused.reason),
        (ErrorKind::FailedPrecondition, Some(Reason::Resynchronizing)),
        "{refused:?}"
    );
    let status = harness::volume_status(&client, 0).await;
    assert_eq!(status.data_mode(), pb::Mode::Resynchronizing, "{status:?}");

    let addresses = [
        "--array".to_string(),
        array.addr.to_string(),
        "--db".into(),
        db.addr.to_string(),
        "--backup".into(),
        backup.addr.to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        harness::command("console")
            .args(&addresses)
            .args(["run", "--volume", "0", "--json"])
            .env_remove("SPLITMIRROR_DB")
            .env_remove("SPLITMIRROR_BACKUP")
            .env_remove("SPLITMIRROR_ARRAY")
            .output()
            .expect("run console")
    })
    .await
    .expect("console task");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "the run waits for the resync and succeeds: stdout {stdout} stderr {stderr}"
    );
    assert!(
        stderr.contains("waiting for volume 0 to finish resynchronizing"),
        "the run waited rather than acquiring at once: {stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(report["verified"], true, "{report}");
    assert_eq!(report["snapshot_deleted"], true, "{report}");
    db.shutdown().await.expect("db");
    backup.shutdown().await.expect("backup");
}
