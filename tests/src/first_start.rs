//! First start is not a warning (issue 13): on a brand-new array db-server
//! says at INFO that it compares each new pair; a WARN is kept for a lost
//! journal — here one deleted while a snapshot was held and the origin
//! written, so that origin and mate differ when db-server comes back.

use splitmirror_proto::db::v1 as pb;

use crate::harness::{self, NodeProcess, array_process, db_client, db_process};

const LU_SIZE: &str = "4MiB";
const BLOCK_BYTES: usize = 4096;

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
    let array = array_process(&dir.path().join("array"), LU_SIZE, "127.0.0.1:0");
    let mut db = db_process(&dir.path().join("db"), &array.addr, &["--no-ledger"], &[]);
    let client = db_client(&db.url());
    harness::wait_synchronized(&client, 0).await;
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
        .acquire_snapshot(0, "lost-journal-run")
        .await
        .expect("acquire");
    for lba in [0u64, 300, 900] {
        client
            .write(0, pb::VirtualLu::Data, lba, vec![0xC3; BLOCK_BYTES])
            .await
            .expect("write while split");
    }
    db.kill9();
    std::fs::remove_file(dir.path().join("db").join("journal.log")).expect("delete the journal");
    let db = db_process(&dir.path().join("db"), &array.addr, &["--no-ledger"], &[]);
    let client = db_client(&db.url());
    harness::wait_synchronized(&client, 0).await;
    let warnings = difference_warnings(&db);
    assert!(
        !warnings.is_empty(),
        "a deleted journal over a pair that differs is warned about: {:?}",
        db.log
    );
}
