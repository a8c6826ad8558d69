//! Crash safety with real processes: db-server stopped at each named crash
//! point (the process aborts, as with `kill -9`), restarted, and checked —
//! origin == mate byte for byte, every acknowledged write on the volume, a
//! snapshot still reading as it did. Then the array killed mid-writes, and
//! the journal deleted between runs. The canary journals the intent after
//! the write, and the crash test must catch it.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use splitmirror_proto::db::v1 as pb;

use crate::harness::{
    self, DbClient, NodeProcess, array_client, array_process, db_client, db_process, read_volume,
};

const BLOCK: usize = 4096;
const BLOCKS: u64 = 1024;
const LU_SIZE: &str = "4MiB";
const SEEDS_PER_POINT: u64 = 2;

/// What the test writer knows of one volume.
#[derive(Default)]
struct Expected {
    /// Per block: the last acknowledged content.
    data: BTreeMap<u64, Vec<u8>>,
    /// The write in flight when the node died: it may or may not be there.
    in_flight: Option<(pb::VirtualLu, u64, Vec<u8>)>,
    /// The snapshot as it must read (data at acquire + its own writes).
    snapshot: Option<BTreeMap<u64, Vec<u8>>>,
}

impl Expected {
    fn maybe(&self, target: pb::VirtualLu, lba: u64) -> Option<&[u8]> {
        match &self.in_flight {
            Some((t, start, data))
                if *t == target && lba >= *start && lba < *start + (data.len() / BLOCK) as u64 =>
            {
                let at = (lba - start) as usize * BLOCK;
                Some(&data[at..at + BLOCK])
            }
            _ => None,
        }
    }
}

/// Writes random ranges, remembering what was acknowledged; stops at the
/// first failure (the node died) and remembers the write in flight.
async fn write_some(
    client: &DbClient,
    rng: &mut SmallRng,
    expected: &mut Expected,
    target: pb::VirtualLu,
    count: usize,
) -> bool {
    for _ in 0..count {
        let blocks = rng.random_range(1..=8u64);
        let lba = rng.random_range(0..BLOCKS - blocks);
        let mut data = vec![0u8; blocks as usize * BLOCK];
        rng.fill(&mut data[..]);
        let result = client.write(0, target, lba, data.clone()).await;
        if result.is_err() {
            expected.in_flight = Some((target, lba, data));
            return false;
        }
        let blocks_of = |data: &[u8]| data.chunks(BLOCK).map(<[u8]>::to_vec).collect::<Vec<_>>();
        for (i, block) in blocks_of(&data).into_iter().enumerate() {
            let block_lba = lba + i as u64;
            match target {
                pb::VirtualLu::Data => {
                    expected.data.insert(block_lba, block);
                }
                pb::VirtualLu::Snapshot => {
                    if let Some(snapshot) = &mut expected.snapshot {
                        snapshot.insert(block_lba, block);
                    }
                }
                // db-server refuses a write without a target.
                pb::VirtualLu::Unspecified => unreachable!("an unspecified write succeeded"),
            }
        }
    }
    true
}

/// The scenario: writes, acquire, writes to both virtual LUs, delete,
/// writes during the resync. Answers false as soon as the node dies.
async fn scenario(client: &DbClient, rng: &mut SmallRng, expected: &mut Expected) -> bool {
    if !write_some(client, rng, expected, pb::VirtualLu::Data, 20).await {
        return false;
    }
    expected.snapshot = Some(expected.data.clone());
    let acquired = client.acquire_snapshot(0, "crash-run").await;
    if acquired.is_err() {
        return false;
    }
    if !write_some(client, rng, expected, pb::VirtualLu::Data, 25).await
        || !write_some(client, rng, expected, pb::VirtualLu::Snapshot, 5).await
        || !write_some(client, rng, expected, pb::VirtualLu::Data, 5).await
    {
        return false;
    }
    let deleted = client.delete_snapshot(0, "crash-run", false).await;
    if deleted.is_err() {
        return false;
    }
    expected.snapshot = None;
    if !write_some(client, rng, expected, pb::VirtualLu::Data, 20).await {
        return false;
    }
    // Let the resync finish, unless the node dies first.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        match client.status(false).await {
            Ok(s) if s.volumes[0].data_mode() == pb::Mode::Synchronized => return true,
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(_) => return false,
        }
    }
    panic!("the resync did not finish");
}

/// After a restart: the snapshot (if held) reads as it did; then the pair
/// resynchronizes, origin == mate, and every acknowledged write is there.
/// Answers the mismatches found.
///
/// `insecure`: the nodes run `--insecure` (see [`crash_once`]).
async fn check_after_restart(
    db: &NodeProcess,
    array_url: &str,
    expected: &Expected,
    insecure: bool,
) -> Vec<String> {
    let mut mismatches = Vec::new();
    let (console, as_db) = if insecure {
        (harness::INSECURE, harness::INSECURE)
    } else {
        (
            harness::security(splitmirror_proto::security::role::CONSOLE),
            harness::security(splitmirror_proto::security::role::DB),
        )
    };
    let client = DbClient::new(&db.url(), &console).expect("db-server address");
    let status = harness::volume_status(&client, 0).await;
    if status.data_mode() == pb::Mode::Snapshot {
        assert_eq!(
            status.snapshot_holder, "crash-run",
            "the holder survives the restart"
        );
        let snapshot = read_volume(&client, 0, pb::VirtualLu::Snapshot, 0, BLOCKS).await;
        if let Some(want) = &expected.snapshot {
            for lba in 0..BLOCKS {
                let got = &snapshot[lba as usize * BLOCK..(lba as usize + 1) * BLOCK];
                let acked = want.get(&lba).map_or(&[0u8; BLOCK][..], Vec::as_slice);
                if got != acked && Some(got) != expected.maybe(pb::VirtualLu::Snapshot, lba) {
                    mismatches.push(format!("snapshot block {lba} changed across the restart"));
                }
            }
        }
        client
            .delete_snapshot(0, "crash-run", false)
            .await
            .expect("delete after restart");
    }
    harness::wait_synchronized(&client, 0).await;
    let volume = read_volume(&client, 0, pb::VirtualLu::Data, 0, BLOCKS).await;
    for lba in 0..BLOCKS {
        let got = &volume[lba as usize * BLOCK..(lba as usize + 1) * BLOCK];
        let acked = expected
            .data
            .get(&lba)
            .map_or(&[0u8; BLOCK][..], Vec::as_slice);
        if got != acked && Some(got) != expected.maybe(pb::VirtualLu::Data, lba) {
            mismatches.push(format!("block {lba}: an acknowledged write is missing"));
        }
    }
    let array = harness::ArrayClient::new(array_url, &as_db).expect("array address");
    if harness::lu_digests(&array, 1).await != harness::lu_digests(&array, 2).await {
        mismatches.push("origin != mate after the resync".into());
    }
    mismatches
}

/// One crash: starts the nodes, arms `point` at hit `nth`, runs the
/// scenario until the process aborts, restarts and checks.
///
/// The scenario writes the snapshot virtual LU, which only an array
/// without LUN masking lets db-server write: both nodes run `--insecure`
/// (see `harness::INSECURE`).
async fn crash_once(point: &str, nth: u64, seed: u64, extra: &[&str]) -> (bool, Vec<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let array_dir = dir.path().join("array");
    let array = NodeProcess::start(
        "array-node",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            array_dir.to_str().expect("utf-8 path"),
            "--lu-size",
            LU_SIZE,
            "--insecure",
        ],
    );
    let armed = format!("{point}:{nth}");
    let args: Vec<&str> = ["--no-ledger", "--insecure"]
        .iter()
        .chain(extra)
        .copied()
        .collect();
    let mut db = db_process(
        &dir.path().join("db"),
        &array.addr,
        &args,
        &[("SPLITMIRROR_CRASH_AT", &armed)],
    );
    let client = DbClient::new(&db.url(), &harness::INSECURE).expect("db-server address");
    harness::wait_synchronized(&client, 0).await;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut expected = Expected::default();
    let completed = scenario(&client, &mut rng, &mut expected).await;
    let crashed = !completed;
    if crashed {
        assert!(
            db.wait_exit(Duration::from_secs(10)).is_some(),
            "db-server failed a call without crashing at {point}"
        );
        assert!(
            db.logged(&format!("crash point {point} reached")),
            "crashed elsewhere: {:?}",
            db.log
        );
    }
    db.kill9();
    let db = db_process(&dir.path().join("db"), &array.addr, &args, &[]);
    let mismatches = check_after_restart(&db, &array.url(), &expected, true).await;
    (crashed, mismatches)
}

/// How many times each point is hit in one scenario, roughly: the crash is
/// armed at a random hit within it.
fn hits(point: &str) -> u64 {
    match point {
        "write.after_intent" => 35,
        "write.after_array" => 75,
        "resync.after_copy" | "resync.after_remove" => 10,
        _ => 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_server_killed_at_every_crash_point_loses_nothing() {
    let seed = harness::seed("db_server_killed_at_every_crash_point_loses_nothing");
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut runs = 0;
    let mut crashes = 0;
    let mut all_mismatches = Vec::new();
    for point in db_server::crash::POINTS {
        for round in 0..SEEDS_PER_POINT {
            let nth = rng.random_range(1..=hits(point));
            let (crashed, mismatches) = crash_once(point, nth, seed.wrapping_add(round), &[]).await;
            runs += 1;
            crashes += u64::from(crashed);
            eprintln!(
                "crash point {point} (hit {nth}, round {round}): {}, {} mismatches",
                if crashed { "crashed" } else { "not reached" },
                mismatches.len()
            );
            all_mismatches.extend(mismatches.into_iter().map(|m| format!("{point}: {m}")));
        }
    }
    eprintln!(
        "seed {seed}: {} points × {SEEDS_PER_POINT} seeds = {runs} runs, {crashes} crashes, {} mismatches",
        db_server::crash::POINTS.len(),
        all_mismatches.len()
    );
    assert!(crashes >= runs / 2, "most runs must actually crash");
    assert!(all_mismatches.is_empty(), "seed {seed}: {all_mismatches:?}");
}

/// The canary: with the intent journaled after the write, a crash between
/// the two loses the range, and the check must see origin != mate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_intent_after_write_is_caught() {
    let seed = harness::seed("canary_intent_after_write_is_caught");
    // Hits 21..=45 of write.after_array are the Snapshot-mode data writes.
    for (round, nth) in [22u64, 27, 33, 38, 44].into_iter().enumerate() {
        let (crashed, mismatches) = crash_once(
            "write.after_array",
            nth,
            seed.wrapping_add(round as u64),
            &["--unsafe-test-intent-after-write"],
        )
        .await;
        eprintln!("canary round {round} (hit {nth}): crashed {crashed}, mismatches {mismatches:?}");
        if !mismatches.is_empty() {
            return;
        }
    }
    panic!("seed {seed}: the crash test never caught an intent journaled after its write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_array_killed_mid_writes_is_resynchronized_after_it_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut array = array_process(&dir.path().join("array"), LU_SIZE, "127.0.0.1:0");
    let array_addr = array.addr.clone();
    let db = db_process(&dir.path().join("db"), &array_addr, &["--no-ledger"], &[]);
    let client = db_client(&db.url());
    harness::wait_synchronized(&client, 0).await;
    let mut rng = SmallRng::seed_from_u64(harness::seed("the_array_killed_mid_writes"));
    let mut expected = Expected::default();
    // Kill the array while a writer is busy (Synchronized mode).
    let writer_client = client.clone();
    let writer = tokio::spawn(async move {
        let completed = write_some(
            &writer_client,
            &mut rng,
            &mut expected,
            pb::VirtualLu::Data,
            100_000,
        )
        .await;
        (completed, expected)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    array.kill9();
    let (completed, expected) = writer.await.expect("writer");
    assert!(!completed, "the writer saw the array die");
    assert!(
        expected.data.len() > 10,
        "writes were acknowledged before the kill"
    );
    // The pair is not Synchronized while the array is away. Asked up to
    // three times: once under CI load this client's connection to db-server
    // answered "h2 protocol error" right after the array's death (seen once,
    // not reproduced in 16 runs here); a new call reconnects.
    let mut status = None;
    for _ in 0..3 {
        match client.volume_status(0).await {
            Ok(answer) => {
                status = Some(answer);
                break;
            }
            Err(error) => {
                eprintln!("volume status after the array's death: {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let status = status.expect("volume status within three tries");
    assert_ne!(status.data_mode(), pb::Mode::Synchronized, "{status:?}");
    let array = array_process(&dir.path().join("array"), LU_SIZE, &array_addr);
    let mismatches = check_after_restart(&db, &array.url(), &expected, false).await;
    assert!(mismatches.is_empty(), "{mismatches:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_journal_means_a_full_resync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let array = array_process(&dir.path().join("array"), LU_SIZE, "127.0.0.1:0");
    let mut db = db_process(&dir.path().join("db"), &array.addr, &["--no-ledger"], &[]);
    let client = db_client(&db.url());
    harness::wait_synchronized(&client, 0).await;
    assert!(
        db.logged("no usable journal record"),
        "a first start compares the whole volume"
    );
    db.kill9();
    // Make origin and mate differ behind db-server's back, then lose the
    // journal that would not have known anyway.
    let array_client = array_client(&array.url());
    for lba in [0u64, 500, 1023] {
        array_client
            .write_with(1, lba, vec![0xEE; BLOCK], true)
            .await
            .expect("write origin");
    }
    assert_ne!(
        harness::lu_digests(&array_client, 1).await,
        harness::lu_digests(&array_client, 2).await
    );
    std::fs::remove_file(dir.path().join("db").join("journal.log")).expect("delete the journal");
    let db = db_process(&dir.path().join("db"), &array.addr, &["--no-ledger"], &[]);
    let client = db_client(&db.url());
    harness::wait_synchronized(&client, 0).await;
    assert!(db.logged("no usable journal record"), "{:?}", db.log);
    assert_eq!(
        harness::lu_digests(&array_client, 1).await,
        harness::lu_digests(&array_client, 2).await,
        "origin == mate after the full resync"
    );
    // A restart with the journal intact needs no full resync.
    drop(db);
    let db = db_process(&dir.path().join("db"), &array.addr, &["--no-ledger"], &[]);
    let client = db_client(&db.url());
    harness::wait_synchronized(&client, 0).await;
    assert!(
        !db.logged("no usable journal record"),
        "the journal knew the pair"
    );
}
