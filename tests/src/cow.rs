//! Copy-on-write snapshots (issue #20, [0072]–[0078]) across real
//! processes: db-server runs the ledger at full speed against an array
//! with a save area (the plain LU [`harness::SAVE_AREA_LU`], `--save-area
//! 0=20`), and:
//!
//! - a COW snapshot's image, read through db-server's Read of the snapshot
//!   virtual LU while the ledger goes on writing, is byte for byte what a
//!   split-mirror snapshot at the same quiesce would hold, and passes
//!   `db-server verify-image --expect-sequence` at the acquire's sequence;
//! - its delete copies nothing (0 ranges to resync, Synchronized at once)
//!   and leaves origin == mate;
//! - a save area that fills up invalidates the snapshot with a clear
//!   reason, its reads are refused (`snapshot-invalidated`), the ledger
//!   keeps committing and the delete works;
//! - kill -9 of db-server while one is held: after the restart it is
//!   invalidated with the restart reason (the save-area map is not
//!   journaled), its reads are refused, the delete works, the pair is
//!   Synchronized with origin == mate, and the ledger reopens.
//!
//! How "what a split-mirror snapshot at the same quiesce would hold" is
//! checked: a volume holds one snapshot at a time, so a split and a COW
//! snapshot cannot both be taken at one quiesce. Instead the test suspends
//! the database (Suspend), reads the mate LU from the array — exactly the
//! image a split at this moment would freeze, the pair being Synchronized
//! — and acquires the COW snapshot inside the same suspension (an acquire
//! under an operator's suspend takes a hold on its closed gate, so both
//! see one quiesce: the acquire must report the suspend's sequence). Then
//! the database resumes and writes over the blocks before the snapshot is
//! read back.

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use splitmirror_proto::db::v1 as pb;
use splitmirror_proto::reason::Reason;

use crate::harness::{self, ArrayClient, DbClient, ErrorKind, NodeProcess, SAVE_AREA_LU};
use crate::ledger_crash::{verify_with_the_command, wait_ledger_line};

const LU_BYTES: u64 = 4 << 20;
const BLOCK_BYTES: u64 = 4096;
const BLOCKS: u64 = LU_BYTES / BLOCK_BYTES;
/// A save area as large as the volume: it never fills.
const ROOMY_SAVE_AREA_BLOCKS: u64 = BLOCKS;
/// A save area the full-speed ledger fills in moments.
const SMALL_SAVE_AREA_BLOCKS: u64 = 32;
/// With 4 KiB blocks and 100 accounts the log ring wraps several times a
/// second: most of the ledger's blocks are written while a snapshot is held.
const LEDGER_ARGS: [&str; 4] = ["--workload-tps", "0", "--accounts", "100"];
const VOLUME: u32 = 0;
const ORIGIN_LU: u32 = 1;
const MATE_LU: u32 = 2;
/// Acquire-read-delete cycles of the image test.
const IMAGE_CYCLES: u32 = 4;

/// An array with a save area and a db-server running the ledger at full
/// speed with `--save-area 0=20` (and `extra`).
struct Nodes {
    dir: tempfile::TempDir,
    _array: NodeProcess,
    array: ArrayClient,
    db: NodeProcess,
    extra: Vec<String>,
}

impl Nodes {
    async fn start(save_area_blocks: u64, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let array_process = harness::array_process_with_save_area(
            &dir.path().join("array"),
            LU_BYTES,
            save_area_blocks,
            "127.0.0.1:0",
        );
        let array = harness::array_client(&array_process.url());
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let db = start_db(dir.path(), &array_process.addr, &extra).await;
        let nodes = Self {
            dir,
            _array: array_process,
            array,
            db,
            extra,
        };
        harness::wait_synchronized(&nodes.client(), VOLUME).await;
        nodes
    }

    fn client(&self) -> DbClient {
        harness::db_client(&self.db.url())
    }

    /// kill -9 of db-server and a start on the same journal.
    async fn kill_and_restart(&mut self) -> String {
        self.db.kill9();
        self.db = start_db(self.dir.path(), &self.array_addr(), &self.extra).await;
        wait_ledger_line(&mut self.db)
            .await
            .unwrap_or_else(|e| panic!("after the restart: {e}"))
    }

    fn array_addr(&self) -> String {
        self._array.addr.clone()
    }
}

async fn start_db(dir: &std::path::Path, array: &str, extra: &[String]) -> NodeProcess {
    let mut args: Vec<&str> = LEDGER_ARGS.to_vec();
    args.extend(harness::SAVE_AREA_ARGS);
    args.extend(extra.iter().map(String::as_str));
    let mut db = harness::db_process(&dir.join("db"), array, &args, &[]);
    wait_ledger_line(&mut db)
        .await
        .unwrap_or_else(|e| panic!("db-server with a save area: {e}"));
    db
}

async fn ledger(client: &DbClient) -> pb::LedgerStatus {
    let ledger = client
        .status(false)
        .await
        .expect("status")
        .ledger
        .expect("the ledger runs");
    assert!(ledger.running, "the ledger stopped: {ledger:?}");
    ledger
}

/// Waits (bounded) until the ledger has committed `more` transactions
/// past now: it keeps running.
async fn ledger_commits(client: &DbClient, more: u64, what: &str) {
    let start = ledger(client).await.transactions_committed;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = ledger(client).await.transactions_committed;
        if now >= start + more {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the ledger committed {} transactions in 20 s, not {more}",
            now - start
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first block where two images differ, and how many blocks do.
fn differing_blocks(a: &[u8], b: &[u8]) -> Option<(u64, usize)> {
    assert_eq!(a.len(), b.len(), "images of different lengths");
    let differing: Vec<u64> = a
        .chunks(BLOCK_BYTES as usize)
        .zip(b.chunks(BLOCK_BYTES as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect();
    differing.first().map(|&first| (first, differing.len()))
}

/// With the database suspended: origin and mate hold the same bytes (by
/// the array's ChecksumRange of both LUs).
async fn assert_origin_equals_mate(nodes: &Nodes, what: &str) {
    let client = nodes.client();
    client.suspend(10_000).await.expect("suspend");
    let origin = nodes.array.checksums(ORIGIN_LU, 0, BLOCKS, 16).await;
    let mate = nodes.array.checksums(MATE_LU, 0, BLOCKS, 16).await;
    client.resume().await.expect("resume");
    let (origin, mate) = (origin.expect("origin digests"), mate.expect("mate digests"));
    let differing: Vec<usize> = (0..origin.len())
        .filter(|&i| origin[i] != mate[i])
        .collect();
    assert!(
        differing.is_empty(),
        "{what}: origin and mate differ in 16-block chunks {differing:?}"
    );
}

/// A COW snapshot taken inside a suspension, with what a split at that
/// quiesce would have frozen (the mate, read while suspended).
struct Taken {
    acquired: pb::AcquireSnapshotResponse,
    split_image: Vec<u8>,
}

async fn take_cow_snapshot(nodes: &Nodes, run_id: &str, method: pb::SnapshotMethod) -> Taken {
    let client = nodes.client();
    let suspended = client.suspend(10_000).await.expect("suspend");
    let split_image = harness::read_lu(&nodes.array, MATE_LU, 0, BLOCKS).await;
    let origin_image = harness::read_lu(&nodes.array, ORIGIN_LU, 0, BLOCKS).await;
    let acquired = client.acquire_snapshot_by(VOLUME, run_id, method).await;
    client.resume().await.expect("resume");
    let acquired = acquired.unwrap_or_else(|e| panic!("acquiring a COW snapshot: {e}"));
    assert_eq!(
        differing_blocks(&origin_image, &split_image),
        None,
        "a Synchronized pair, suspended: origin and mate differ (first block, count)"
    );
    assert_eq!(
        acquired.method(),
        pb::SnapshotMethod::Cow,
        "the acquire's answer: {acquired:?}"
    );
    assert_eq!(
        acquired.ledger_sequence, suspended.ledger_sequence,
        "an acquire inside a suspension reports the suspend's sequence"
    );
    Taken {
        acquired,
        split_image,
    }
}

/// The snapshot virtual LU, read through db-server.
async fn read_snapshot(client: &DbClient) -> Result<Vec<u8>, harness::ClientError> {
    client
        .read(VOLUME, pb::VirtualLu::Snapshot, 0, BLOCKS)
        .await
}

/// Deletes the snapshot of `run_id`: a COW delete resyncs nothing and the
/// volume is Synchronized at once.
async fn delete_copies_nothing(client: &DbClient, run_id: &str) {
    let deleted = client
        .delete_snapshot(VOLUME, run_id, false)
        .await
        .unwrap_or_else(|e| panic!("deleting the COW snapshot of {run_id}: {e}"));
    assert_eq!(
        (deleted.ranges_to_resync, deleted.blocks_to_resync),
        (0, 0),
        "a COW delete has nothing to resync: {deleted:?}"
    );
    let status = harness::volume_status(client, VOLUME).await;
    assert_eq!(
        status.data_mode(),
        pb::Mode::Synchronized,
        "right after a COW delete: {status:?}"
    );
    assert_eq!(status.dirty_blocks, 0, "{status:?}");
    assert!(status.snapshot_holder.is_empty(), "{status:?}");
    assert_eq!(
        status.snapshot_method(),
        pb::SnapshotMethod::Unspecified,
        "{status:?}"
    );
}

/// A COW snapshot's read is refused as invalidated.
fn assert_refused_invalidated(read: Result<Vec<u8>, harness::ClientError>, what: &str) {
    match read {
        Ok(image) => panic!(
            "{what}: the invalidated snapshot's read answered {} bytes",
            image.len()
        ),
        Err(e) => {
            assert_eq!(e.kind, ErrorKind::FailedPrecondition, "{what}: {e}");
            assert_eq!(e.reason, Some(Reason::SnapshotInvalidated), "{what}: {e}");
        }
    }
}

/// Cycles of a COW snapshot taken inside a suspension under the
/// full-speed ledger (db-server started with `extra`), the ledger writing
/// on for a random while (so that many of the image's blocks come from the
/// save area), then the snapshot read through db-server, twice: it must
/// equal the split's image and pass verify-image at the acquire's
/// sequence. The pair stays Synchronized while it is held, and each delete
/// copies nothing. Answers the cycles done and the first failure of the
/// image (the status checks panic).
async fn image_cycles(seed: u64, extra: &[&str]) -> (u32, Option<String>) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let nodes = Nodes::start(ROOMY_SAVE_AREA_BLOCKS, extra).await;
    let client = nodes.client();
    for cycle in 0..IMAGE_CYCLES {
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
        let run_id = format!("cow-image-{cycle}");
        let taken = take_cow_snapshot(&nodes, &run_id, pb::SnapshotMethod::Cow).await;
        // The database writes over the snapshot's blocks meanwhile.
        ledger_commits(
            &client,
            rng.random_range(200..3000),
            "while the COW snapshot is held",
        )
        .await;
        let status = harness::volume_status(&client, VOLUME).await;
        assert_eq!(
            (status.data_mode(), status.snapshot_method()),
            (pb::Mode::Synchronized, pb::SnapshotMethod::Cow),
            "seed {seed} cycle {cycle}: a COW snapshot leaves the pair whole: {status:?}"
        );
        let save_area = status.save_area.expect("the volume's save area");
        assert_eq!(
            (save_area.lu, save_area.capacity_blocks),
            (SAVE_AREA_LU, ROOMY_SAVE_AREA_BLOCKS),
            "{status:?}"
        );
        assert!(status.snapshot_invalidated_reason.is_empty(), "{status:?}");
        let image = read_snapshot(&client)
            .await
            .unwrap_or_else(|e| panic!("seed {seed} cycle {cycle}: reading the snapshot: {e}"));
        if let Some((first, count)) = differing_blocks(&image, &taken.split_image) {
            return (
                cycle,
                Some(format!(
                    "cycle {cycle}: the COW image differs from the split's in {count} blocks from \
                     block {first} on; {} blocks were saved",
                    save_area.used_blocks
                )),
            );
        }
        if let Err(report) =
            verify_with_the_command(&image, taken.acquired.ledger_sequence, nodes.dir.path())
        {
            return (
                cycle,
                Some(format!(
                    "cycle {cycle}: the COW image at sequence {} fails verify-image: {report}",
                    taken.acquired.ledger_sequence
                )),
            );
        }
        // Read again after more writes: still the same image.
        ledger_commits(&client, 200, "after the first read").await;
        let again = read_snapshot(&client).await.expect("reading it again");
        if let Some((first, count)) = differing_blocks(&again, &taken.split_image) {
            return (
                cycle,
                Some(format!(
                    "cycle {cycle}: the second read differs in {count} blocks from block {first} on"
                )),
            );
        }
        assert!(
            save_area.used_blocks > 0,
            "seed {seed} cycle {cycle}: the ledger wrote, yet nothing was saved: {status:?}"
        );
        eprintln!(
            "cycle {cycle}: COW snapshot at sequence {}: {} blocks saved, image = split image, \
             verify-image ok",
            taken.acquired.ledger_sequence, save_area.used_blocks
        );
        delete_copies_nothing(&client, &run_id).await;
    }
    (IMAGE_CYCLES, None)
}

/// Issue #20's first test: with the ledger at full speed, a COW snapshot's
/// image read through db-server equals the split's image at the same
/// quiesce and passes verify-image at the acquire's sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cow_snapshot_under_the_full_speed_ledger_is_the_split_image_and_verifies() {
    let seed = harness::seed("cow::a_cow_snapshot_is_the_split_image");
    let (cycles, failure) = image_cycles(seed, &[]).await;
    if let Some(failure) = failure {
        panic!("seed {seed}: {failure}");
    }
    assert_eq!(cycles, IMAGE_CYCLES);
}

/// The canary: a db-server whose writes skip the save
/// (`--unsafe-test-skip-cow-save`) must be caught by the same cycles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_a_write_that_skips_the_save_is_caught() {
    let seed = harness::seed("cow::canary_a_write_that_skips_the_save");
    let (cycles, failure) = image_cycles(seed, &["--unsafe-test-skip-cow-save"]).await;
    let failure = failure.unwrap_or_else(|| {
        panic!(
            "seed {seed}: {cycles} COW snapshots under the full-speed ledger whose writes saved \
             nothing, and no image differed"
        )
    });
    eprintln!("seed {seed}: the canary was caught: {failure}");
}

/// Issue #20's second test: the delete of a COW snapshot the ledger wrote
/// under copies nothing (0 ranges, Synchronized at once, the save area
/// empty) and origin == mate (with the ledger suspended); a split snapshot
/// after it still works, and its delete does resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_cow_snapshot_copies_nothing_and_origin_equals_mate() {
    let nodes = Nodes::start(ROOMY_SAVE_AREA_BLOCKS, &[]).await;
    let client = nodes.client();
    let taken = take_cow_snapshot(&nodes, "cow-delete", pb::SnapshotMethod::Cow).await;
    ledger_commits(&client, 2000, "while the COW snapshot is held").await;
    let used = harness::volume_status(&client, VOLUME)
        .await
        .save_area
        .expect("save area")
        .used_blocks;
    assert!(used > 0, "the ledger wrote, yet nothing was saved");
    delete_copies_nothing(&client, "cow-delete").await;
    let status = harness::volume_status(&client, VOLUME).await;
    assert_eq!(
        status.save_area.expect("save area").used_blocks,
        0,
        "the delete drops the save area's map"
    );
    // A retry of the delete is answered as done.
    let again = client
        .delete_snapshot(VOLUME, "cow-delete", false)
        .await
        .expect("a retried delete");
    assert!(again.already_deleted, "{again:?}");
    assert_origin_equals_mate(&nodes, "after the COW delete").await;
    // The snapshot is gone: its read is refused, not answered with the mate.
    assert!(
        read_snapshot(&client).await.is_err(),
        "a read of the snapshot virtual LU with no snapshot held"
    );
    // A split snapshot afterwards is a split as before: the mate frozen,
    // its delete resyncs what the ledger wrote.
    let split = client
        .acquire_snapshot_by(VOLUME, "split-after-cow", pb::SnapshotMethod::Split)
        .await
        .expect("a split after a COW snapshot");
    assert_eq!(split.method(), pb::SnapshotMethod::Split, "{split:?}");
    let image = harness::read_lu(&nodes.array, split.mate_lu, 0, split.block_count).await;
    verify_with_the_command(&image, split.ledger_sequence, nodes.dir.path())
        .unwrap_or_else(|report| panic!("the split after the COW snapshot: {report}"));
    ledger_commits(&client, 200, "while the split is held").await;
    let deleted = client
        .delete_snapshot(VOLUME, "split-after-cow", false)
        .await
        .expect("deleting the split");
    assert!(deleted.ranges_to_resync > 0, "{deleted:?}");
    harness::wait_synchronized(&client, VOLUME).await;
    assert_origin_equals_mate(&nodes, "after the split's resync").await;
    eprintln!(
        "COW snapshot at sequence {}: {used} blocks saved, deleted with nothing to resync; \
         the split after it resynced {} ranges",
        taken.acquired.ledger_sequence, deleted.ranges_to_resync
    );
}

/// Waits (bounded) until volume 0's snapshot is invalidated, and answers
/// the reason.
async fn wait_invalidated(client: &DbClient) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = harness::volume_status(client, VOLUME).await;
        if !status.snapshot_invalidated_reason.is_empty() {
            return status.snapshot_invalidated_reason;
        }
        assert!(
            Instant::now() < deadline,
            "the snapshot was not invalidated within 20 s: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue #20's third test: a save area of a few dozen blocks under the
/// full-speed ledger fills up; the snapshot is invalidated with a reason
/// that says so, its reads are refused (`snapshot-invalidated`), the
/// ledger keeps committing, the pair stays Synchronized, and the delete
/// works with nothing to resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_save_area_invalidates_the_snapshot_and_the_ledger_keeps_running() {
    let nodes = Nodes::start(SMALL_SAVE_AREA_BLOCKS, &[]).await;
    let client = nodes.client();
    take_cow_snapshot(&nodes, "cow-full", pb::SnapshotMethod::Cow).await;
    let reason = wait_invalidated(&client).await;
    assert!(
        reason.contains("save area") && reason.contains("fill"),
        "the reason should say the save area filled up: {reason:?}"
    );
    assert!(
        reason.contains(&SMALL_SAVE_AREA_BLOCKS.to_string()),
        "the reason should name the save area's size: {reason:?}"
    );
    ledger_commits(&client, 500, "after the save area filled").await;
    let status = harness::volume_status(&client, VOLUME).await;
    assert_eq!(
        (status.data_mode(), status.snapshot_holder.as_str()),
        (pb::Mode::Synchronized, "cow-full"),
        "the invalidated snapshot is still held, the pair whole: {status:?}"
    );
    let read = read_snapshot(&client).await;
    if let Err(e) = &read {
        assert!(
            e.message.contains("save area"),
            "the refusal should say why: {e}"
        );
    }
    assert_refused_invalidated(read, "after the save area filled");
    delete_copies_nothing(&client, "cow-full").await;
    assert_origin_equals_mate(&nodes, "after deleting the invalidated snapshot").await;
    ledger_commits(&client, 200, "after the delete").await;
    eprintln!("the save area of {SMALL_SAVE_AREA_BLOCKS} blocks filled: {reason}");
}

/// Issue #20's fourth test: kill -9 of db-server (started with
/// `--snapshot-method cow`, so the acquire names no method) while a COW
/// snapshot with saved blocks is held. After the restart the snapshot is
/// invalidated with the restart reason, its reads refused, the delete
/// works with nothing to resync, the pair is Synchronized with origin ==
/// mate, and the ledger reopened; a new COW snapshot then verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_a_cow_snapshot_is_held_invalidates_it() {
    let seed = harness::seed("cow::kill_9_while_a_cow_snapshot_is_held");
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut extra = vec!["--snapshot-method", "cow"];
    extra.extend(harness::SECOND_SAVE_AREA_ARGS);
    let mut nodes = Nodes::start(ROOMY_SAVE_AREA_BLOCKS, &extra).await;
    let client = nodes.client();
    let taken = take_cow_snapshot(&nodes, "cow-kill", pb::SnapshotMethod::Unspecified).await;
    ledger_commits(&client, rng.random_range(100..2000), "before the kill").await;
    let before = ledger(&client).await;
    let opened = nodes.kill_and_restart().await;
    assert!(
        opened.contains("opened the existing ledger"),
        "seed {seed}: the ledger did not reopen: {opened}"
    );
    let client = nodes.client();
    let status = harness::volume_status(&client, VOLUME).await;
    assert_eq!(
        status.data_mode(),
        pb::Mode::Synchronized,
        "seed {seed}: the pair never split: {status:?}"
    );
    // The journal keeps the pair Synchronized after the restart; whether
    // Status still names the invalidated snapshot's holder and method is
    // not the contract's point: if it does, they are this snapshot's.
    if !status.snapshot_holder.is_empty() {
        assert_eq!(
            (status.snapshot_holder.as_str(), status.snapshot_method()),
            ("cow-kill", pb::SnapshotMethod::Cow),
            "seed {seed}: after the restart: {status:?}"
        );
    }
    let reason = status.snapshot_invalidated_reason.clone();
    assert!(
        reason.contains("restarted"),
        "seed {seed}: the reason should say db-server restarted: {status:?}"
    );
    assert_refused_invalidated(read_snapshot(&client).await, "after the restart");
    delete_copies_nothing(&client, "cow-kill").await;
    assert_origin_equals_mate(&nodes, "after the restart and the delete").await;
    let after = ledger(&client).await;
    assert!(
        after.committed_sequence >= before.committed_sequence,
        "seed {seed}: the reopened ledger is behind what was committed before the kill: \
         {after:?} < {before:?}"
    );
    ledger_commits(&client, 200, "after the restart").await;
    // COW works again after the restart.
    let again = take_cow_snapshot(&nodes, "cow-after-kill", pb::SnapshotMethod::Unspecified).await;
    ledger_commits(&client, 500, "while the new snapshot is held").await;
    let image = read_snapshot(&client)
        .await
        .expect("reading the new snapshot");
    assert_eq!(
        differing_blocks(&image, &again.split_image),
        None,
        "seed {seed}: the new COW image differs from the split's"
    );
    verify_with_the_command(&image, again.acquired.ledger_sequence, nodes.dir.path())
        .unwrap_or_else(|r| panic!("seed {seed}: the new COW image fails verify-image: {r}"));
    delete_copies_nothing(&client, "cow-after-kill").await;
    eprintln!(
        "seed {seed}: killed with the snapshot of sequence {} held at committed sequence {}; \
         after the restart: {reason}",
        taken.acquired.ledger_sequence, before.committed_sequence
    );
}

/// Issue #20's backup of a COW snapshot: the backup server reads the
/// snapshot through db-server's snapshot virtual LU while the ledger
/// writes over the blocks; the backup's chunk digests are those of the
/// snapshot's image (read through db-server, and equal to the split's
/// image), its manifest carries the acquire's sequence, and the server
/// verifies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_a_cow_snapshot_equals_its_image_and_verifies() {
    use splitmirror_proto::backup::v1 as bpb;
    let nodes = Nodes::start(ROOMY_SAVE_AREA_BLOCKS, &[]).await;
    let backup = harness::backup_process(
        "127.0.0.1:0",
        &nodes.dir.path().join("store"),
        &nodes.array_addr(),
        &nodes.db.addr,
        &[],
    );
    let backups = harness::backup_client(&backup.url());
    let client = nodes.client();
    let run_id = "cow-backup";
    let taken = take_cow_snapshot(&nodes, run_id, pb::SnapshotMethod::Cow).await;
    ledger_commits(&client, 1000, "before the backup").await;
    let backup_id = backups
        .start_backup(bpb::StartBackupRequest {
            run_id: run_id.into(),
            lu: taken.acquired.mate_lu,
            label: "cow".into(),
            snapshot: Some(bpb::SnapshotRef {
                mate: 0,
                volume: VOLUME,
                holder_run_id: run_id.into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("starting a backup of the COW snapshot: {e}"))
        .backup_id;
    let last = harness::follow_backup(&backups, &backup_id).await;
    assert_eq!(
        last.state(),
        bpb::BackupState::Complete,
        "the backup of the COW snapshot: {}",
        last.error
    );
    let image = read_snapshot(&client).await.expect("reading the snapshot");
    assert_eq!(
        differing_blocks(&image, &taken.split_image),
        None,
        "the COW image differs from the split's"
    );
    let info = backups
        .get_backup(&backup_id, true)
        .await
        .expect("the backup's manifest");
    let manifest = info.manifest.expect("a complete backup's manifest");
    let expected: Vec<Vec<u8>> = image
        .chunks(harness::CHUNK_BYTES as usize)
        .map(|chunk| blake3::hash(chunk).as_bytes().to_vec())
        .collect();
    let differing: Vec<usize> = (0..expected.len().max(manifest.chunk_digests.len()))
        .filter(|&i| expected.get(i) != manifest.chunk_digests.get(i))
        .collect();
    assert!(
        differing.is_empty(),
        "the backup's chunks {differing:?} differ from the COW snapshot's image"
    );
    assert_eq!(
        manifest.ledger_sequence,
        Some(taken.acquired.ledger_sequence),
        "the manifest's sequence"
    );
    let verified = backups
        .verify_backup(&backup_id)
        .await
        .expect("verifying the backup");
    assert!(verified.ok, "{verified:?}");
    delete_copies_nothing(&client, run_id).await;
    eprintln!(
        "the backup {backup_id} of the COW snapshot at sequence {}: {} chunks equal to its image, \
         verified",
        taken.acquired.ledger_sequence,
        expected.len()
    );
}
