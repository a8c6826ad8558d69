//! A volume of three mates ([0020], issue #19) across the real nodes:
//! array-node with `mates = [2, 5, 6]`, db-server `--array-mode stateful`
//! with the ledger writing all the time, and a backup-server.
//!
//! Each (volume, mate) is a pair of its own: mate 1 is split, later mate 2;
//! both are backed up (SnapshotRef.mate names which) and each backup is a
//! consistent ledger at its own acquire's sequence (`db-server
//! verify-image`); mate 1 is resynchronized while mate 2 stays split and
//! mate 2's LU does not change; after mate 2's delete every pair ends
//! Synchronized and the origin equals all three mates.

use std::time::{Duration, Instant};

use array_node::{ArrayConfig, ArrayTestHooks};
use db_server::ledger::LedgerConfig;
use db_server::manager::{ArrayModeKeeping, ManagerConfig};
use splitmirror_proto::backup::v1 as bpb;
use splitmirror_proto::db::v1 as pb;

use crate::harness::{self, DbClient, array_client, backup_client, db_client};

const BLOCK_BYTES: u64 = 4096;
const BLOCKS: u64 = 1024;
const MIRROR: u32 = 0;
const ORIGIN: u32 = 1;
/// The mates of mirror LU 0, mate 1 first.
const MATE_LUS: [u32; 3] = [2, 5, 6];

/// One mirror LU (0) over origin 1 and three mates, [`BLOCKS`] 4 KiB
/// blocks each.
fn three_mates_array() -> ArrayConfig {
    let mut text = String::new();
    for id in [ORIGIN, MATE_LUS[0], MATE_LUS[1], MATE_LUS[2]] {
        text.push_str(&format!(
            "[[lu]]\nid = {id}\nblock_size_bytes = {BLOCK_BYTES}\nblock_count = {BLOCKS}\n"
        ));
    }
    text.push_str(&format!(
        "[[mirror]]\nmirror = {MIRROR}\norigin = {ORIGIN}\nmates = {MATE_LUS:?}\n"
    ));
    ArrayConfig::from_toml(&text).expect("a valid array config")
}

/// A ledger on volume 0 writing at a steady rate while the test runs.
fn ledger_config() -> LedgerConfig {
    LedgerConfig {
        volume: MIRROR,
        accounts: 100,
        target_tps: 300,
        workers: 4,
        initial_balance: 1_000,
        log_blocks: 256,
        ..LedgerConfig::default()
    }
}

/// The volume's Status entries, one per mate.
async fn entries(db: &DbClient) -> Vec<pb::VolumeStatus> {
    db.status(false)
        .await
        .expect("status")
        .volumes
        .into_iter()
        .filter(|v| v.volume == MIRROR)
        .collect()
}

/// Waits (bounded) until every Status entry of the volume is Synchronized.
async fn wait_every_mate_synchronized(db: &DbClient) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let entries = entries(db).await;
        if entries
            .iter()
            .all(|e| e.data_mode() == pb::Mode::Synchronized)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not every mate synchronized: {entries:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (bounded) until the entry of `mate` is Synchronized.
async fn wait_mate_synchronized(db: &DbClient, mate: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let entry = entries(db)
            .await
            .into_iter()
            .find(|e| e.mate == mate)
            .expect("the mate's entry");
        if entry.data_mode() == pb::Mode::Synchronized {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "mate {mate} not synchronized: {entry:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the ledger has committed `transactions` more, so that the
/// origin moves on between the steps.
async fn let_the_ledger_write(db: &DbClient, transactions: u64) {
    let committed = || async {
        db.status(false)
            .await
            .expect("status")
            .ledger
            .expect("the ledger runs")
            .committed_sequence
    };
    let before = committed().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while committed().await < before + transactions {
        assert!(
            Instant::now() < deadline,
            "the ledger committed fewer than {transactions} transactions in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Splits mate `mate` of the volume for run `run_id`.
async fn split(db: &DbClient, mate: u32, run_id: &str) -> pb::AcquireSnapshotResponse {
    db.acquire_snapshot_with(pb::AcquireSnapshotRequest {
        volume: MIRROR,
        run_id: run_id.into(),
        mate,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("splitting mate {mate}: {e}"))
}

/// Backs up the split mate `mate` (held by `run_id`, its LU `mate_lu`) and
/// answers the exported image.
async fn back_up(
    backup: &harness::BackupClient,
    store: &std::path::Path,
    mate: u32,
    mate_lu: u32,
    run_id: &str,
) -> Vec<u8> {
    let id = backup
        .start_backup(bpb::StartBackupRequest {
            run_id: run_id.into(),
            lu: mate_lu,
            snapshot: Some(bpb::SnapshotRef {
                mate,
                volume: MIRROR,
                holder_run_id: run_id.into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("backing up mate {mate}: {e}"))
        .backup_id;
    let last = harness::follow_backup(backup, &id).await;
    assert_eq!(
        last.state(),
        bpb::BackupState::Complete,
        "the backup of mate {mate}: {}",
        last.error
    );
    let info = backup.get_backup(&id, false).await.expect("get backup");
    assert!(!info.live, "mate {mate}'s backup is frozen");
    let verified = backup.verify_backup(&id).await.expect("verify backup");
    assert!(verified.ok && verified.frozen, "mate {mate}: {verified:?}");
    let opened = backup_server::store::ChunkStore::open_existing(
        &harness::StoreLocation::Dir(store.to_path_buf()),
        harness::DEFAULT_GC_GRACE,
    )
    .await
    .expect("open the store");
    let file = store.join(format!("mate-{mate}.raw"));
    opened.export(&id, &file).await.expect("export");
    std::fs::read(&file).expect("the exported image")
}

/// The real `db-server verify-image --expect-sequence` on `image`: a
/// consistent ledger whose highest committed sequence is `sequence`.
fn verify_image_command(image: &[u8], sequence: u64, path: &std::path::Path, what: &str) {
    std::fs::write(path, image).expect("write the image");
    let out = harness::command("db-server")
        .args([
            "verify-image",
            "--json",
            "--expect-sequence",
            &sequence.to_string(),
        ])
        .arg(path)
        .output()
        .expect("run db-server verify-image");
    assert!(
        out.status.success(),
        "{what}: verify-image at sequence {sequence}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(report["ok"], true, "{what}: {report}");
    assert_eq!(report["highest_sequence"], sequence, "{what}: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_mates_split_backed_up_and_resynchronized_each_on_its_own() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let array = harness::start_array(
        &dir.path().join("array"),
        three_mates_array(),
        ArrayTestHooks::default(),
    )
    .await;
    let db = harness::start_db(
        &array.url(),
        &dir.path().join("db"),
        ManagerConfig {
            array_mode: ArrayModeKeeping::Stateful,
            ..ManagerConfig::default()
        },
        Some(ledger_config()),
    )
    .await;
    let store = dir.path().join("store");
    let backup = harness::start_backup(&array.url(), &db.url(), &store).await;
    let db_client = db_client(&db.url());
    let array_client = array_client(&array.url());
    let backup_client = backup_client(&backup.url());
    wait_every_mate_synchronized(&db_client).await;

    let mates: Vec<(u32, u32)> = entries(&db_client)
        .await
        .iter()
        .map(|e| (e.mate, e.mate_lu))
        .collect();
    assert_eq!(
        mates,
        vec![(1, 2), (2, 5), (3, 6)],
        "one Status entry per mate, in order"
    );

    let_the_ledger_write(&db_client, 30).await;
    let first = split(&db_client, 1, "mate-1").await;
    assert_eq!(first.mate_lu, MATE_LUS[0]);
    let_the_ledger_write(&db_client, 30).await;
    let second = split(&db_client, 2, "mate-2").await;
    assert_eq!(second.mate_lu, MATE_LUS[1]);
    assert!(
        second.ledger_sequence > first.ledger_sequence,
        "the ledger wrote between the splits: {} then {}",
        first.ledger_sequence,
        second.ledger_sequence
    );

    // While split: three entries, each with its own holder and mode.
    let held: Vec<(u32, u32, String, pb::Mode)> = entries(&db_client)
        .await
        .iter()
        .map(|e| (e.mate, e.mate_lu, e.snapshot_holder.clone(), e.data_mode()))
        .collect();
    assert_eq!(
        held,
        vec![
            (1, 2, "mate-1".to_string(), pb::Mode::Snapshot),
            (2, 5, "mate-2".to_string(), pb::Mode::Snapshot),
            (3, 6, String::new(), pb::Mode::Synchronized),
        ],
        "Status while mates 1 and 2 are split"
    );

    // The ledger goes on writing the origin and mate 3.
    let_the_ledger_write(&db_client, 30).await;

    // Both backups: each a consistent ledger at its own split's sequence.
    for (mate, acquired) in [(1, &first), (2, &second)] {
        let run_id = format!("mate-{mate}");
        let image = back_up(&backup_client, &store, mate, acquired.mate_lu, &run_id).await;
        let frozen = harness::read_lu(&array_client, acquired.mate_lu, 0, BLOCKS).await;
        assert!(image == frozen, "mate {mate}'s backup equals its frozen LU");
        verify_image_command(
            &image,
            acquired.ledger_sequence,
            &dir.path().join(format!("verify-{mate}.raw")),
            &format!("mate {mate}'s backup"),
        );
        eprintln!(
            "mate {mate}: backed up at ledger sequence {}, verify-image ok",
            acquired.ledger_sequence
        );
    }

    // Resync mate 1 while mate 2 stays split: mate 2's LU does not move.
    let mate_2_before = harness::lu_digests(&array_client, MATE_LUS[1]).await;
    db_client
        .delete_snapshot_of(MIRROR, 1, "mate-1", false)
        .await
        .expect("delete mate 1");
    wait_mate_synchronized(&db_client, 1).await;
    let_the_ledger_write(&db_client, 30).await;
    let mate_2_after = harness::lu_digests(&array_client, MATE_LUS[1]).await;
    assert!(
        mate_2_before == mate_2_after,
        "mate 2 changed while mate 1 was resynchronized"
    );
    let after_first_resync: Vec<(u32, String, pb::Mode)> = entries(&db_client)
        .await
        .iter()
        .map(|e| (e.mate, e.snapshot_holder.clone(), e.data_mode()))
        .collect();
    assert_eq!(
        after_first_resync,
        vec![
            (1, String::new(), pb::Mode::Synchronized),
            (2, "mate-2".to_string(), pb::Mode::Snapshot),
            (3, String::new(), pb::Mode::Synchronized),
        ],
        "Status after mate 1's resync"
    );

    db_client
        .delete_snapshot_of(MIRROR, 2, "mate-2", false)
        .await
        .expect("delete mate 2");
    wait_every_mate_synchronized(&db_client).await;

    // Quiesced: the origin equals every mate, and is the ledger at its
    // sequence.
    let sequence = db_client
        .suspend(30_000)
        .await
        .expect("suspend")
        .ledger_sequence;
    let origin = harness::lu_digests(&array_client, ORIGIN).await;
    for (index, mate_lu) in MATE_LUS.iter().enumerate() {
        assert!(
            harness::lu_digests(&array_client, *mate_lu).await == origin,
            "origin LU {ORIGIN} != mate {} (LU {mate_lu}), whole LU, quiesced",
            index + 1
        );
    }
    let image = harness::read_lu(&array_client, MIRROR, 0, BLOCKS).await;
    verify_image_command(
        &image,
        sequence,
        &dir.path().join("verify-origin.raw"),
        "the quiesced volume",
    );
    db_client.resume().await.expect("resume");
    eprintln!(
        "splits at {} and {}, quiesced at {sequence}: origin == 3 mates, in {:?}",
        first.ledger_sequence,
        second.ledger_sequence,
        started.elapsed()
    );

    backup.shutdown().await.expect("backup");
    db.shutdown().await.expect("db");
    array.shutdown().await.expect("array");
}
