//! db-server `--array-mode stateful` (issue #19, first embodiment) as a
//! real process against a real array process, with the ledger writing.
//!
//! [0062] names this embodiment's weakness: after a host crash the host's
//! mode and the array's must be reconciled. db-server journals the pair's
//! state first and then ModeSelects the array, and at start-up the journal
//! wins. The crash test kills db-server at each named point between the
//! two ([`CRASHES`], which also says what the array must hold at the
//! moment of the crash, an independent check that the point is where its
//! name says), restarts it, and checks: the array's mode agrees with the
//! journal (a snapshot the journal holds is SNAPSHOT in the array and its
//! holder can delete it), the pair ends Synchronized with origin == mate
//! (ChecksumRange of the whole LUs, quiesced), and the ledger lost nothing
//! (it reopens at no lower a sequence than it had committed, and the
//! quiesced volume passes its own check).
//!
//! Also: db-server bypassed, the array refuses a write straight to the
//! frozen mate — by db-server's own identity (its masking: db-server masks
//! the mate read-only for itself in both modes) and by an identity a
//! `[[grant]]` lets write the mate (the array's mode: mirror-mode) — and a
//! db-server restarted stateless after a stateful run hands every pair
//! back to HOST_MANAGED while still protecting the snapshot it holds.

use std::time::{Duration, Instant};

use splitmirror_proto::array::v1::MirrorMode;
use splitmirror_proto::db::v1 as pb;
use splitmirror_proto::reason::Reason;

use splitmirror_proto::security::role;

use crate::harness::{
    self, ArrayClient, DbClient, ErrorKind, NodeProcess, array_client, db_client,
};

const BLOCKS: u64 = 1024;
const RUN: &str = "stateful-run";
/// The pairs of the default layout: (mirror, origin, mate).
const PAIRS: [(u32, u32, u32); 2] = [(0, 1, 2), (3, 4, 5)];

/// One crash point of the stateful mode changes, what the array must hold
/// when db-server dies there, and whether the journal holds the snapshot
/// then (so that the restarted db-server still does).
struct Crash {
    point: &'static str,
    array_at_crash: MirrorMode,
    snapshot_held_after_restart: bool,
}

const CRASHES: [Crash; 5] = [
    // The journal says Snapshot; the array was not told yet.
    Crash {
        point: "acquire.after_journal",
        array_at_crash: MirrorMode::Synchronized,
        snapshot_held_after_restart: true,
    },
    Crash {
        point: "acquire.after_mode_select",
        array_at_crash: MirrorMode::Snapshot,
        snapshot_held_after_restart: true,
    },
    // The journal says the snapshot is gone (resynchronize); the array
    // still holds the snapshot.
    Crash {
        point: "delete.after_journal",
        array_at_crash: MirrorMode::Snapshot,
        snapshot_held_after_restart: false,
    },
    Crash {
        point: "delete.after_mode_select",
        array_at_crash: MirrorMode::Resynchronizing,
        snapshot_held_after_restart: false,
    },
    // The journal says Synchronized; the array still resynchronizes.
    Crash {
        point: "resync.after_journal_synchronized",
        array_at_crash: MirrorMode::Resynchronizing,
        snapshot_held_after_restart: false,
    },
];

/// The array: the default two pairs of [`BLOCKS`] 4 KiB blocks, and the
/// backup server's identity granted read-write on pair 0's mate (LU 2),
/// so that only the array's mode stands between it and the frozen mate.
fn array_toml() -> String {
    let mut text = String::new();
    for id in [1, 2, 4, 5] {
        text.push_str(&format!(
            "[[lu]]\nid = {id}\nblock_size_bytes = 4096\nblock_count = {BLOCKS}\n"
        ));
    }
    for (mirror, origin, mate) in PAIRS {
        text.push_str(&format!(
            "[[mirror]]\nmirror = {mirror}\norigin = {origin}\nmate = {mate}\n"
        ));
    }
    text.push_str(&format!(
        "[[grant]]\nidentity = {:?}\nlu = 2\naccess = \"read-write\"\n",
        role::BACKUP
    ));
    text
}

/// Starts array-node as a process serving [`array_toml`] from `dir`.
fn start_array(dir: &std::path::Path) -> NodeProcess {
    let data = dir.join("array");
    std::fs::create_dir_all(&data).expect("the array's directory");
    let config = dir.join("array.toml");
    std::fs::write(&config, array_toml()).expect("writing the array config");
    NodeProcess::start(
        "array-node",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().expect("utf-8 path"),
            "--config",
            config.to_str().expect("utf-8 path"),
        ],
    )
}

/// The array as the backup server's identity (read-write on LU 2).
fn as_backup(array_url: &str) -> ArrayClient {
    ArrayClient::new(array_url, &harness::security(role::BACKUP)).expect("array address")
}

/// db-server with the ledger writing on volume 0, `extra` flags
/// (`--array-mode stateful`) and `env` (a crash point).
fn start_db(
    dir: &std::path::Path,
    array: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> NodeProcess {
    let mut args = vec!["--workload-tps", "300", "--accounts", "100"];
    args.extend(extra);
    harness::db_process(&dir.join("db"), array, &args, env)
}

const STATEFUL: [&str; 2] = ["--array-mode", "stateful"];

/// `sequence` from the ledger's "opened the existing ledger at sequence S"
/// line (a "formatted a new ledger" line: 0).
fn opened_sequence(line: &str) -> u64 {
    line.split("opened the existing ledger at sequence ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

async fn committed(client: &DbClient) -> Option<u64> {
    let status = client.status(false).await.ok()?;
    status.ledger.map(|l| l.committed_sequence)
}

/// The mode and mate_writable the array holds for a mirror LU.
async fn array_mode(array: &ArrayClient, mirror: u32) -> (MirrorMode, bool) {
    let page = array
        .mode_sense(mirror)
        .await
        .unwrap_or_else(|e| panic!("mode sense of mirror LU {mirror}: {e}"));
    (page.mirror_mode, page.mate_writable)
}

/// Runs the ledger, acquires, deletes and waits for the resync, noting
/// the ledger's committed sequence before each step, until a call fails
/// (db-server died). Answers the last committed sequence seen, and
/// whether a call failed.
async fn run_until_a_call_fails(client: &DbClient) -> (u64, bool) {
    let mut last = 0;
    let mut note = |seen: Option<u64>| {
        if let Some(seen) = seen {
            last = last.max(seen);
        }
        seen.is_some()
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    if !note(committed(client).await) || client.acquire_snapshot(0, RUN).await.is_err() {
        return (last, true);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    if !note(committed(client).await) || client.delete_snapshot(0, RUN, false).await.is_err() {
        return (last, true);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let Ok(status) = client.status(false).await else {
            return (last, true);
        };
        note(status.ledger.map(|l| l.committed_sequence));
        if status.volumes[0].data_mode() == pb::Mode::Synchronized {
            return (last, false);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the resync did not finish");
}

/// Suspends the database and checks every pair: Synchronized in Status,
/// SYNCHRONIZED in the array (and in Status's array mode), origin ==
/// mate over the whole LUs; the ledger's sequence is at least
/// `committed` and the live volume passes the ledger's own check at it.
async fn check_synchronized_and_nothing_lost(
    db: &DbClient,
    array: &ArrayClient,
    committed: u64,
    what: &str,
) {
    let sequence = db.suspend(30_000).await.expect("suspend").ledger_sequence;
    let status = db.status(false).await.expect("status");
    for (mirror, origin, mate) in PAIRS {
        let volume = status
            .volumes
            .iter()
            .find(|v| v.volume == mirror)
            .expect("volume in Status");
        assert_eq!(
            volume.data_mode(),
            pb::Mode::Synchronized,
            "{what}: volume {mirror}"
        );
        assert_eq!(
            volume.array_mode_keeping(),
            pb::ArrayModeKeeping::Stateful,
            "{what}"
        );
        assert_eq!(volume.array_mode, "SYNCHRONIZED", "{what}: volume {mirror}");
        assert_eq!(
            array_mode(array, mirror).await,
            (MirrorMode::Synchronized, false),
            "{what}: the array's mode of mirror LU {mirror}"
        );
        assert!(
            harness::lu_digests(array, origin).await == harness::lu_digests(array, mate).await,
            "{what}: origin LU {origin} != mate LU {mate} (whole LU, quiesced)"
        );
    }
    assert!(
        sequence >= committed,
        "{what}: the ledger is at sequence {sequence}, but {committed} had been committed"
    );
    let image = harness::read_lu(array, 0, 0, BLOCKS).await;
    let report = db_server::ledger_format::verify_image(&image, Some(sequence));
    assert!(
        report.ok,
        "{what}: the ledger's check on the quiesced volume at {sequence}: {:?}",
        report.violations
    );
    db.resume().await.expect("resume");
}

/// Checks a snapshot held by [`RUN`] on a stateful db-server: SNAPSHOT in
/// the array and in Status, its mate a consistent ledger image, a write
/// straight to the mate refused by the array — db-server's own identity
/// by its masking, an identity granted read-write on the mate by the
/// mode (mirror-mode) — with no byte changed.
async fn check_held_snapshot(db: &DbClient, array: &ArrayClient, array_url: &str, what: &str) {
    let volume = harness::volume_status(db, 0).await;
    assert_eq!(volume.data_mode(), pb::Mode::Snapshot, "{what}: {volume:?}");
    assert_eq!(volume.snapshot_holder, RUN, "{what}");
    assert_eq!(volume.array_mode, "SNAPSHOT", "{what}");
    assert_eq!(
        array_mode(array, 0).await,
        (MirrorMode::Snapshot, false),
        "{what}: the array holds the journal's snapshot"
    );
    let frozen = harness::lu_digests(array, volume.mate_lu).await;
    let image = harness::read_lu(array, volume.mate_lu, 0, BLOCKS).await;
    let report = db_server::ledger_format::verify_image(&image, None);
    assert!(
        report.ok,
        "{what}: the frozen mate is no consistent ledger: {:?}",
        report.violations
    );
    let refused = array
        .write(volume.mate_lu, 0, vec![0xEE; 4096])
        .await
        .expect_err("db-server's own identity may not write the frozen mate");
    assert_eq!(
        refused.kind,
        ErrorKind::PermissionDenied,
        "{what}: {refused:?}"
    );
    let refused = as_backup(array_url)
        .write(volume.mate_lu, 0, vec![0xEE; 4096])
        .await
        .expect_err("the array's mode refuses a write to the frozen mate");
    assert_eq!(
        (refused.kind, refused.reason),
        (ErrorKind::FailedPrecondition, Some(Reason::MirrorMode)),
        "{what}: {refused:?}"
    );
    // The ledger goes on committing (it writes the mirror LU, which the
    // array routes to the origin alone) and the mate stays as it was.
    let before = committed(db).await.expect("the ledger runs");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = committed(db).await.expect("the ledger runs");
        if now > before + 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the ledger committed {} transactions in 5 s under the snapshot \
             (from {before}): {:?}",
            now - before,
            db.status(false).await.map(|s| s.ledger)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        harness::lu_digests(array, volume.mate_lu).await,
        frozen,
        "{what}: the frozen mate changed"
    );
}

/// One crash: start both, arm `crash.point`, run until db-server dies
/// there, check the array's mode at the crash, restart stateful, check.
async fn crash_once(crash: &Crash) {
    let point = crash.point;
    let dir = tempfile::tempdir().expect("tempdir");
    let array_node = start_array(dir.path());
    let array = array_client(&array_node.url());
    // A first start compares origin and mate of each pair (a resync
    // path): done without the ledger and unarmed, so that the armed
    // process meets its point in the scenario, not at start-up.
    let mut first = harness::db_process(
        &dir.path().join("db"),
        &array_node.addr,
        &["--array-mode", "stateful", "--no-ledger"],
        &[],
    );
    harness::wait_synchronized(&db_client(&first.url()), 0).await;
    harness::wait_synchronized(&db_client(&first.url()), 3).await;
    first.kill9();
    let armed = format!("{point}:1");
    let mut db = start_db(
        dir.path(),
        &array_node.addr,
        &STATEFUL,
        &[("SPLITMIRROR_CRASH_AT", &armed)],
    );
    let client = db_client(&db.url());
    crate::ledger_crash::wait_ledger_line(&mut db)
        .await
        .unwrap_or_else(|e| panic!("{point}: {e}"));
    harness::wait_synchronized(&client, 0).await;
    for (mirror, _, _) in PAIRS {
        assert_eq!(
            array_mode(&array, mirror).await,
            (MirrorMode::Synchronized, false),
            "{point}: a stateful start sets every pair"
        );
    }
    let (committed, failed) = run_until_a_call_fails(&client).await;
    assert!(failed, "{point}: the scenario ended without reaching it");
    assert!(
        db.wait_exit(Duration::from_secs(10)).is_some(),
        "{point}: db-server failed a call without crashing"
    );
    assert!(
        db.logged(&format!("crash point {point} reached")),
        "{point}: crashed elsewhere: {:?}",
        db.log
    );
    assert_eq!(
        array_mode(&array, 0).await.0,
        crash.array_at_crash,
        "{point}: the array's mode when db-server died there"
    );
    db.kill9();

    let mut db = start_db(dir.path(), &array_node.addr, &STATEFUL, &[]);
    let line = crate::ledger_crash::wait_ledger_line(&mut db)
        .await
        .unwrap_or_else(|e| panic!("{point}: {e}"));
    assert!(
        opened_sequence(&line) >= committed,
        "{point}: the ledger reopened at {line:?}, but {committed} had been committed"
    );
    let client = db_client(&db.url());
    if crash.snapshot_held_after_restart {
        check_held_snapshot(
            &client,
            &array,
            &array_node.url(),
            &format!("{point}, after the restart"),
        )
        .await;
        client
            .delete_snapshot(0, RUN, false)
            .await
            .unwrap_or_else(|e| panic!("{point}: the holder deletes after the restart: {e}"));
    } else {
        let volume = harness::volume_status(&client, 0).await;
        assert!(
            volume.snapshot_holder.is_empty(),
            "{point}: the journal had let the snapshot go: {volume:?}"
        );
    }
    harness::wait_synchronized(&client, 0).await;
    check_synchronized_and_nothing_lost(&client, &array, committed, point).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateful_db_server_killed_between_journal_and_mode_select_reconciles() {
    for crash in &CRASHES {
        eprintln!("crash point {}", crash.point);
        crash_once(crash).await;
    }
}

/// db-server bypassed: while a stateful snapshot is held, a write straight
/// to the mate is refused by the array (db-server's identity by its
/// masking, a granted identity by the mode: [`check_held_snapshot`]); then
/// db-server restarted stateless hands every pair back to HOST_MANAGED,
/// still holds the snapshot (its journal's), keeps the mate frozen (masked
/// for its own identity), and deletes and resynchronizes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateless_restart_after_a_stateful_run_hands_the_pairs_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let array_node = start_array(dir.path());
    let array = array_client(&array_node.url());
    let mut db = start_db(dir.path(), &array_node.addr, &STATEFUL, &[]);
    let client = db_client(&db.url());
    harness::wait_synchronized(&client, 0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let acquired = client.acquire_snapshot(0, RUN).await.expect("acquire");
    check_held_snapshot(&client, &array, &array_node.url(), "stateful, held").await;
    let frozen = harness::lu_digests(&array, acquired.mate_lu).await;
    let committed = committed(&client).await.expect("the ledger runs");
    db.kill9();

    let mut db = start_db(dir.path(), &array_node.addr, &[], &[]);
    crate::ledger_crash::wait_ledger_line(&mut db)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = db_client(&db.url());
    for (mirror, _, _) in PAIRS {
        assert_eq!(
            array_mode(&array, mirror).await,
            (MirrorMode::HostManaged, false),
            "a stateless start hands mirror LU {mirror} back"
        );
        let volume = harness::volume_status(&client, mirror).await;
        assert_eq!(volume.array_mode_keeping(), pb::ArrayModeKeeping::Stateless);
    }
    let volume = harness::volume_status(&client, 0).await;
    assert_eq!(volume.data_mode(), pb::Mode::Snapshot, "{volume:?}");
    assert_eq!(volume.snapshot_holder, RUN);
    // The stateless db-server protects the mate its own way (masking).
    let refused = array
        .write(acquired.mate_lu, 0, vec![0xEE; 4096])
        .await
        .expect_err("the frozen mate stays protected after the switch");
    assert_eq!(refused.kind, ErrorKind::PermissionDenied, "{refused:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        harness::lu_digests(&array, acquired.mate_lu).await,
        frozen,
        "the ledger's writes reached the frozen mate after the switch"
    );
    client
        .delete_snapshot(0, RUN, false)
        .await
        .expect("delete after the switch");
    harness::wait_synchronized(&client, 0).await;
    let sequence = client
        .suspend(30_000)
        .await
        .expect("suspend")
        .ledger_sequence;
    assert!(sequence >= committed, "{sequence} < {committed}");
    for (mirror, origin, mate) in PAIRS {
        assert_eq!(
            array_mode(&array, mirror).await,
            (MirrorMode::HostManaged, false)
        );
        assert!(
            harness::lu_digests(&array, origin).await == harness::lu_digests(&array, mate).await,
            "origin LU {origin} != mate LU {mate}"
        );
    }
    let image = harness::read_lu(&array, 0, 0, BLOCKS).await;
    let report = db_server::ledger_format::verify_image(&image, Some(sequence));
    assert!(report.ok, "{:?}", report.violations);
    client.resume().await.expect("resume");
}
