//! First start is not a warning (issue 13): on a brand-new array db-server
//! says at INFO that it compares each new pair; a WARN is kept for a lost
//! journal — here one deleted while a snapshot was held and the origin
//! written, so that origin and mate differ when db-server comes back.

use std::path::Path;

use splitmirror_proto::db::v1 as pb;

use crate::harness::{self, NodeProcess, db_client};

const LU_SIZE: &str = "4MiB";
const BLOCK_BYTES: usize = 4096;

fn start_array(dir: &Path) -> NodeProcess {
    let data = dir.join("array");
    NodeProcess::start(
        "array-node",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--lu-size",
            LU_SIZE,
        ],
    )
}

fn start_db(dir: &Path, array: &str) -> NodeProcess {
    let data = dir.join("db");
    NodeProcess::start(
        "db-server",
        &[
            "--listen",
            "127.0.0.1:0",
            "--array",
            array,
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--no-ledger",
        ],
    )
}

/// The lines logged at WARN that speak of origin and mate differing.
fn difference_warnings(db: &NodeProcess) -> Vec<String> {
    db.log
        .lock()
        .expect("log")
        .iter()
        .filter(|l| l.contains(" WARN ") && (l.contains("may differ") || l.contains("differed")))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_logs_no_warning_and_a_deleted_journal_still_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let array = start_array(dir.path());
    let mut db = start_db(dir.path(), &array.addr);
    let mut client = db_client(&db.url()).await;
    harness::wait_synchronized(&mut client, 0).await;
    let log = db.log.lock().expect("log").clone();
    assert!(
        log.iter()
            .any(|l| l.contains(" INFO ") && l.contains("new pair: comparing origin and mate")),
        "a first start says it compares each new pair: {log:?}"
    );
    assert_eq!(
        difference_warnings(&db),
        Vec::<String>::new(),
        "a brand-new array is no cause for a warning"
    );

    // A snapshot held, the origin written, then the journal lost.
    client
        .acquire_snapshot(pb::AcquireSnapshotRequest {
            volume: 0,
            run_id: "lost-journal-run".into(),
        })
        .await
        .expect("acquire");
    for lba in [0u64, 300, 900] {
        client
            .write(pb::VolumeWriteRequest {
                volume: 0,
                target: pb::VirtualLu::Data.into(),
                lba,
                data: vec![0xC3; BLOCK_BYTES],
            })
            .await
            .expect("write while split");
    }
    db.kill9();
    std::fs::remove_file(dir.path().join("db").join("journal.log")).expect("delete the journal");
    let db = start_db(dir.path(), &array.addr);
    let mut client = db_client(&db.url()).await;
    harness::wait_synchronized(&mut client, 0).await;
    let warnings = difference_warnings(&db);
    assert!(
        !warnings.is_empty(),
        "a deleted journal over a pair that differs is warned about: {:?}",
        db.log
    );
}
