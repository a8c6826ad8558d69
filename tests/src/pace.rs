//! The array's adaptive pace of background copies, end to end: a
//! continuous background copy at full speed while the hosts are idle,
//! slowed when foreground writes arrive, back to full speed when they stop
//! — asserting the direction, never a speed. A pace that ignores the
//! foreground must fail the same check. And db-server's Status reports the
//! pace.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use array_node::{ArrayNodeConfig, ArrayTestHooks};
use splitmirror_proto::array::v1 as pb;
use splitmirror_proto::db::v1 as dpb;
use splitmirror_proto::pace::{PaceConfig, PaceController};
use splitmirror_proto::security::role;
use tokio::time::Instant;

use crate::harness::{self, ArrayClient};

const BLOCK_BYTES: u64 = 4096;
/// Each background copy moves one 1 MiB chunk (bulk work).
const COPY_BLOCKS: u64 = 256;
const LU_BYTES: u64 = 64 << 20;
/// Concurrent foreground writers (4 KiB, FUA): enough that their latency
/// rises when they compete with the copies for the disk and two cores.
const FOREGROUND_WRITERS: u64 = 32;

async fn start(pace: PaceController, dir: &std::path::Path) -> splitmirror_proto::node::NodeHandle {
    let security = harness::security(role::ARRAY);
    let config = ArrayNodeConfig {
        data_dir: dir.to_path_buf(),
        array: harness::small_array(LU_BYTES),
        hooks: ArrayTestHooks::default(),
        security,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let handle = array_node::spawn_with_pace(config, pace, listener)
        .await
        .expect("start array node");
    harness::wait_healthy(&handle.url(), role::ARRAY).await;
    handle
}

/// Copies origin 1 → mate 2 in 1 MiB chunks, round and round, until
/// `stop`.
async fn background_copies(client: ArrayClient, stop: Arc<AtomicBool>) {
    let chunks = LU_BYTES / BLOCK_BYTES / COPY_BLOCKS;
    let mut chunk = 0;
    while !stop.load(Ordering::Relaxed) {
        client
            .copy_range(1, 2, (chunk % chunks) * COPY_BLOCKS, COPY_BLOCKS)
            .await
            .expect("background copy");
        chunk += 1;
    }
}

/// 4 KiB FUA writes to mirror LU 3, `FOREGROUND_WRITERS` at a time, until
/// `stop`; counts them in `written`.
async fn foreground_writes(client: ArrayClient, stop: Arc<AtomicBool>, written: Arc<AtomicU64>) {
    let mut writers = Vec::new();
    for writer in 0..FOREGROUND_WRITERS {
        let (client, stop, written) = (client.clone(), stop.clone(), written.clone());
        writers.push(tokio::spawn(async move {
            let mut lba = writer * 97;
            while !stop.load(Ordering::Relaxed) {
                client
                    .write_with(
                        3,
                        lba % (LU_BYTES / BLOCK_BYTES),
                        vec![writer as u8; 4096],
                        true,
                    )
                    .await
                    .expect("foreground write");
                written.fetch_add(1, Ordering::Relaxed);
                lba += 7919;
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer task");
    }
}

/// Samples the array's pace every 200 ms for `span`.
async fn sample(client: &ArrayClient, span: Duration) -> Vec<pb::BackgroundPace> {
    let end = Instant::now() + span;
    let mut samples = Vec::new();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(200)).await;
        samples.push(client.pace().await.expect("Pace"));
    }
    samples
}

fn reason(pace: &pb::BackgroundPace) -> pb::PaceReason {
    pace.reason()
}

/// Runs the three phases against an array paced by `pace` and answers
/// whether the pace went the right way, with what it saw.
async fn run_direction_check(pace: PaceController) -> Result<String, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start(pace, dir.path()).await;
    let client = harness::array_client(&node.url());
    let stop_background = Arc::new(AtomicBool::new(false));
    let background = tokio::spawn(background_copies(client.clone(), stop_background.clone()));
    let outcome = phases(&client).await;
    stop_background.store(true, Ordering::Relaxed);
    background.await.expect("background task");
    node.shutdown().await.expect("array shutdown");
    outcome
}

async fn phases(client: &ArrayClient) -> Result<String, String> {
    // 1. Background only: idle, unlimited.
    let idle = sample(client, Duration::from_secs(2)).await;
    let idle_last = idle.last().expect("samples").clone();
    let mut seen = format!("idle: {}", idle_last.why);
    if reason(&idle_last) != pb::PaceReason::Idle || idle_last.rate_bytes_per_s.is_some() {
        return Err(format!(
            "{seen}; with no foreground the pace is not idle and unlimited: {idle_last:?}"
        ));
    }
    let idle_moved = idle_last.background_bytes_per_s;
    if idle_moved == 0 {
        return Err(format!(
            "{seen}; the background copies moved nothing: {idle_last:?}"
        ));
    }
    // 2. Foreground writes arrive.
    let stop_foreground = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let foreground = tokio::spawn(foreground_writes(
        client.clone(),
        stop_foreground.clone(),
        written.clone(),
    ));
    let busy = sample(client, Duration::from_secs(3)).await;
    stop_foreground.store(true, Ordering::Relaxed);
    foreground.await.expect("foreground task");
    let yielding: Vec<_> = busy
        .iter()
        .filter(|p| {
            matches!(
                reason(p),
                pb::PaceReason::Sharing | pb::PaceReason::Yielding | pb::PaceReason::Minimum
            )
        })
        .collect();
    let lowest_moved = busy
        .iter()
        .skip(2)
        .map(|p| p.background_bytes_per_s)
        .min()
        .unwrap_or(u64::MAX);
    let lowest_rate = busy.iter().filter_map(|p| p.rate_bytes_per_s).min();
    seen += &format!(
        "; with {} foreground writes: {} of {} samples not idle, lowest rate {:?}, \
         lowest moved {lowest_moved} B/s vs {idle_moved} B/s idle; e.g. {}",
        written.load(Ordering::Relaxed),
        yielding.len(),
        busy.len(),
        lowest_rate,
        busy.iter()
            .map(|p| p.why.as_str())
            .nth(busy.len() / 2)
            .unwrap_or("")
    );
    if yielding.is_empty() || lowest_rate.is_none_or(|rate| rate >= idle_moved) {
        return Err(format!(
            "{seen}; the pace never slowed the background for the foreground"
        ));
    }
    if lowest_moved * 10 > idle_moved * 7 {
        return Err(format!(
            "{seen}; the background did not slow down (below 70% of idle)"
        ));
    }
    // 3. The foreground stops: full speed again.
    let after = sample(client, Duration::from_secs(2)).await;
    let after_last = after.last().expect("samples").clone();
    seen += &format!("; after: {}", after_last.why);
    if reason(&after_last) != pb::PaceReason::Idle || after_last.rate_bytes_per_s.is_some() {
        return Err(format!(
            "{seen}; the pace did not return to idle: {after_last:?}"
        ));
    }
    if after_last.background_bytes_per_s <= lowest_moved {
        return Err(format!(
            "{seen}; the background did not speed up again: {after_last:?}"
        ));
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_copies_yield_to_the_foreground_and_take_back_full_speed() {
    let pace = PaceController::new(PaceConfig::default(), Instant::now());
    match run_direction_check(pace).await {
        Ok(seen) => eprintln!("{seen}"),
        Err(failure) => panic!("{failure}"),
    }
}

/// The canary: a pace that ignores the foreground must fail the check
/// above, or it proves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_a_pace_blind_to_the_foreground_fails_the_check() {
    let pace = PaceController::ignoring_foreground_for_tests(PaceConfig::default(), Instant::now());
    match run_direction_check(pace).await {
        Ok(seen) => panic!("a pace that ignores the foreground passed the direction check: {seen}"),
        Err(failure) => eprintln!("caught, as it must be: {failure}"),
    }
}

/// db-server's Status carries the array's pace, with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_status_reports_the_background_pace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let array = harness::start_array(
        &dir.path().join("array"),
        harness::small_array(4 << 20),
        ArrayTestHooks::default(),
    )
    .await;
    let manager = db_server::manager::ManagerConfig {
        resync_min_bytes_per_s: Some(32 << 20),
        ..Default::default()
    };
    let db = harness::start_db(&array.url(), &dir.path().join("db"), manager, None).await;
    let status = harness::db_client(&db.url())
        .status(false)
        .await
        .expect("Status");
    let pace = status.background_pace.expect("Status carries the pace");
    assert_ne!(pace.reason(), dpb::PaceReason::Unspecified, "{pace:?}");
    assert_eq!(pace.resync_min_bytes_per_s, 32 << 20, "{pace:?}");
    assert!(!pace.why.is_empty(), "{pace:?}");
    // Without the array, Status still answers, without a pace.
    array.shutdown().await.expect("array shutdown");
    let status = harness::db_client(&db.url())
        .status(false)
        .await
        .expect("Status without the array");
    assert_eq!(status.background_pace, None);
    db.shutdown().await.expect("db shutdown");
}
