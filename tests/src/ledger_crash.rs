//! The ledger under kill -9 (DESIGN §3 rule 6, issue 11): db-server runs
//! the ledger at full speed as a real process and is killed at a random
//! moment, over and over. After each kill:
//!
//! - the crash image (the origin LU, read straight from the array before
//!   db-server comes back) is repairable — at most a redo away from a
//!   consistent ledger — and holds every transaction whose redo db-server
//!   had reported durable (`committed_sequence`) before the kill;
//! - db-server reopens the ledger (its own check passes) at a sequence no
//!   lower than that;
//! - a snapshot taken then verifies with `db-server verify-image
//!   --expect-sequence` at the sequence the acquire reported.
//!
//! The canary runs the same loop with the log and account blocks written
//! side by side and no redo (`--unsafe-test-ledger-writes-side-by-side`),
//! the order before the fix, and the loop must catch a broken ledger.

use std::time::{Duration, Instant};

use db_server::ledger_format::{self, LedgerBlocks, Superblock};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use splitmirror_proto::db::v1 as pb;

use crate::harness::{self, NodeProcess, array_client, array_process, db_client, read_lu};

const LU_SIZE: &str = "4MiB";
/// With 4 KiB blocks and 100 accounts the log ring holds 923 records, so
/// at full speed it wraps several times a second: slots are reused while
/// the kill lands.
const ACCOUNTS: &str = "100";
const CYCLES: u32 = 40;
/// A canary ledger may survive a few kills by luck; give it more.
const CANARY_CYCLES: u32 = 30;

/// What one kill loop saw.
#[derive(Default)]
struct Outcome {
    cycles: u32,
    /// Transactions that the reopened ledgers said they redid.
    redone: u64,
    /// Crash images that needed a redo.
    crash_images_needing_redo: u32,
    failures: Vec<String>,
}

/// db-server running the ledger at full speed, with `extra` arguments.
fn start_db(dir: &std::path::Path, array: &str, extra: &[&str]) -> NodeProcess {
    let mut args = vec!["--workload-tps", "0", "--accounts", ACCOUNTS];
    args.extend(extra);
    harness::db_process(&dir.join("db"), array, &args, &[])
}

async fn ledger_status(client: &harness::DbClient) -> pb::LedgerStatus {
    client
        .status(false)
        .await
        .expect("status")
        .ledger
        .expect("the ledger runs")
}

/// Waits (bounded) until volume 0 is Synchronized: after a restart the
/// journal may have a resync to finish before a snapshot can be acquired.
async fn wait_synchronized(client: &harness::DbClient) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = client.status(false).await.expect("status");
        if status
            .volumes
            .iter()
            .any(|v| v.volume == 0 && v.data_mode() == pb::Mode::Synchronized)
        {
            return;
        }
        assert!(Instant::now() < deadline, "volume 0 not synchronized");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The checks on the image a crash left (read from the array before
/// db-server reopens it). Answers whether it needed a redo.
///
/// `uncertain` are the sequences earlier crashes left unacknowledged (handed
/// out, not committed): each may exist or not, and a reopened ledger goes on
/// past them either way, so they are the only ones allowed to be missing.
fn check_crash_image(
    image: &[u8],
    committed: u64,
    uncertain: &[std::ops::RangeInclusive<u64>],
    failures: &mut Vec<String>,
) -> bool {
    let report = ledger_format::verify_image(image, None);
    if !report.ok_after_redo {
        failures.push(format!(
            "the crash image is broken beyond redo: {:?}",
            report.violations
        ));
    }
    if report.highest_sequence < committed {
        failures.push(format!(
            "the crash image reaches sequence {} but {committed} was committed",
            report.highest_sequence
        ));
    }
    // Every committed transaction still in the ring's reach is in its slot
    // (or a later one has reused the slot): none was lost.
    let block_size = report.layout.map_or(4096, |l| l.block_size_bytes as usize);
    if let Superblock::Ledger(layout) =
        ledger_format::decode_superblock(&image[..block_size.min(image.len())])
    {
        let bs = layout.block_size_bytes as usize;
        let at = |lba: u64| lba as usize * bs;
        let blocks = LedgerBlocks::decode(
            layout,
            &image[at(layout.account_lba(0))..at(layout.log_start_lba())],
            &image[at(layout.log_start_lba())..at(layout.total_blocks())],
        );
        let lowest = committed.saturating_sub(layout.log_blocks - 1).max(1);
        for sequence in lowest..=committed {
            if uncertain.iter().any(|range| range.contains(&sequence)) {
                continue;
            }
            let slot = (sequence % layout.log_blocks) as usize;
            match blocks.log[slot] {
                Ok(Some(record)) if record.sequence >= sequence => {}
                other => {
                    failures.push(format!(
                        "committed transaction {sequence} is lost: its slot holds {other:?}"
                    ));
                    break;
                }
            }
        }
    }
    report.redo_pending > 0
}

/// Runs `db-server verify-image --json --expect-sequence` on an image.
pub(crate) fn verify_with_the_command(
    image: &[u8],
    sequence: u64,
    dir: &std::path::Path,
) -> Result<(), String> {
    let path = dir.join("snapshot.raw");
    std::fs::write(&path, image).expect("write the image");
    let out = harness::command("db-server")
        .args(["verify-image", "--json", "--expect-sequence"])
        .arg(sequence.to_string())
        .arg(&path)
        .output()
        .expect("run db-server verify-image");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The loop: start, run a while, kill -9, check the crash image, restart,
/// snapshot, verify. Stops early at the first failure if asked to.
async fn kill_loop(seed: u64, cycles: u32, extra: &[&str], stop_at_failure: bool) -> Outcome {
    let dir = tempfile::tempdir().expect("tempdir");
    let array = array_process(&dir.path().join("array"), LU_SIZE, "127.0.0.1:0");
    let array_client = array_client(&array.url());
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut outcome = Outcome::default();
    let mut uncertain = Vec::new();
    let mut db = start_db(dir.path(), &array.addr, extra);
    if let Err(why) = wait_ledger_line(&mut db).await {
        panic!("the first start: {why}");
    }
    for cycle in 0..cycles {
        let client = db_client(&db.url());
        let run_ms = rng.random_range(20..300u64);
        tokio::time::sleep(Duration::from_millis(run_ms)).await;
        let before = ledger_status(&client).await;
        db.kill9();
        // Writes the array had already taken finish by themselves; give
        // them a moment, then read the crash image before anyone repairs
        // it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let block_count = (4u64 << 20) / 4096;
        let crash_image = read_lu(&array_client, 1, 0, block_count).await;
        let mut failures = Vec::new();
        let needed_redo = check_crash_image(
            &crash_image,
            before.committed_sequence,
            &uncertain,
            &mut failures,
        );
        outcome.crash_images_needing_redo += u32::from(needed_redo);
        db = start_db(dir.path(), &array.addr, extra);
        let opened = wait_ledger_line(&mut db).await.and_then(|line| {
            opened_at(&line).ok_or_else(|| format!("the ledger did not reopen: {line}"))
        });
        match &opened {
            &Ok((sequence, redone)) => {
                outcome.redone += redone;
                // Above the committed sequence and up to where the ledger
                // reopened, a sequence handed out before the kill may never
                // have been logged; the ledger goes on past it, so from now
                // on it may be missing for good. (Above the reopened
                // sequence, numbers are handed out again.)
                if sequence > before.committed_sequence {
                    uncertain.push(before.committed_sequence + 1..=sequence);
                }
                if sequence < before.committed_sequence {
                    failures.push(format!(
                        "reopened at sequence {sequence}, below the committed {}",
                        before.committed_sequence
                    ));
                }
            }
            Err(why) => {
                // Nothing more to check: the node is not up.
                failures.push(why.clone());
                outcome
                    .failures
                    .extend(failures.into_iter().map(|f| format!("cycle {cycle}: {f}")));
                break;
            }
        }
        let client = db_client(&db.url());
        wait_synchronized(&client).await;
        let run_id = format!("ledger-crash-{cycle}");
        let acquired = client.acquire_snapshot(0, &run_id).await.expect("acquire");
        let image = read_lu(&array_client, acquired.mate_lu, 0, acquired.block_count).await;
        if let Err(report) = verify_with_the_command(&image, acquired.ledger_sequence, dir.path()) {
            failures.push(format!(
                "the snapshot at sequence {} fails verify-image: {report}",
                acquired.ledger_sequence
            ));
        }
        client
            .delete_snapshot(0, &run_id, false)
            .await
            .expect("delete");
        eprintln!(
            "cycle {cycle}: ran {run_ms} ms, committed {} of {} handed out; crash image {}; \
             reopened {:?} (sequence, redone); snapshot at {}: {}",
            before.committed_sequence,
            before.sequence,
            if needed_redo {
                "needed a redo"
            } else {
                "was clean"
            },
            opened,
            acquired.ledger_sequence,
            if failures.is_empty() {
                "ok".to_string()
            } else {
                format!("{failures:?}")
            }
        );
        outcome.cycles += 1;
        let failed = !failures.is_empty();
        outcome
            .failures
            .extend(failures.into_iter().map(|f| format!("cycle {cycle}: {f}")));
        if failed && stop_at_failure {
            break;
        }
    }
    outcome
}

/// Waits (bounded) for the line that says the ledger is open — formatted
/// or reopened — and answers it; an error if db-server exits first (the
/// ledger refused to open) or takes too long.
pub(crate) async fn wait_ledger_line(db: &mut NodeProcess) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = db.log.lock().expect("log").iter().find_map(|line| {
            (line.contains("opened the existing ledger") || line.contains("formatted a new ledger"))
                .then(|| line.clone())
        });
        if let Some(line) = found {
            return Ok(line);
        }
        if let Some(status) = db.wait_exit(Duration::from_millis(20)) {
            return Err(format!(
                "db-server exited ({status}) before its ledger opened: {:?}",
                db.log.lock().expect("log")
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the ledger did not open within 30 s: {:?}",
                db.log.lock().expect("log")
            ));
        }
    }
}

/// `(sequence, redone)` from the ledger's "opened the existing ledger at
/// sequence S: redid N transactions" line.
fn opened_at(line: &str) -> Option<(u64, u64)> {
    let rest = line
        .split("opened the existing ledger at sequence ")
        .nth(1)?;
    let (sequence, rest) = rest.split_once(": redid ")?;
    let redone = rest.split_whitespace().next()?;
    Some((sequence.parse().ok()?, redone.parse().ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_survives_kill_9_at_full_speed() {
    let seed = harness::seed("the_ledger_survives_kill_9_at_full_speed");
    let started = Instant::now();
    let outcome = kill_loop(seed, CYCLES, &[], false).await;
    eprintln!(
        "seed {seed}: {} cycles in {:.1} s, {} crash images needed a redo, {} transactions redone, {} failures",
        outcome.cycles,
        started.elapsed().as_secs_f64(),
        outcome.crash_images_needing_redo,
        outcome.redone,
        outcome.failures.len()
    );
    assert!(
        outcome.failures.is_empty(),
        "seed {seed}: {:#?}",
        outcome.failures
    );
    assert_eq!(outcome.cycles, CYCLES);
}

/// The canary: the old order (log and accounts side by side, no redo on
/// open) must be caught within the cycles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_side_by_side_ledger_writes_are_caught() {
    let seed = harness::seed("canary_side_by_side_ledger_writes_are_caught");
    let outcome = kill_loop(
        seed,
        CANARY_CYCLES,
        &["--unsafe-test-ledger-writes-side-by-side"],
        true,
    )
    .await;
    eprintln!(
        "seed {seed}: the canary was caught after {} of at most {CANARY_CYCLES} cycles: {:?}",
        outcome.cycles, outcome.failures
    );
    assert!(
        !outcome.failures.is_empty(),
        "seed {seed}: {CANARY_CYCLES} kills of a ledger that writes its blocks side by side and \
         redoes nothing, and the loop never caught a broken ledger"
    );
}
