//! Mirror writes racing `CopyRange` of overlapping ranges from origin to
//! mate: with the range lock, origin and mate end equal byte for byte; with
//! it disabled, the same test must find them different.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use array_node::ArrayTestHooks;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::harness::{self, array_client, lu_digests, start_array};

const BLOCK: usize = 4096;
const LU_BLOCKS: u64 = 512;
const WRITERS: u64 = 4;
/// Each writer writes at least this many times, and then on until the
/// copiers are done: a copy paced behind the writes (#18) must still race
/// them, and a mismatch made by the last copies must not be healed by a
/// later copy that nothing raced.
const WRITES_PER_WRITER: usize = 150;
const COPIERS: u64 = 2;
const COPIES_PER_COPIER: usize = 80;

/// Runs one race and answers how many 16-block chunks differ between origin
/// and mate at the end.
async fn race(seed: u64, hooks: ArrayTestHooks) -> usize {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_array(
        dir.path(),
        harness::small_array(LU_BLOCKS * BLOCK as u64),
        hooks,
    )
    .await;
    let url = node.url();
    let copies_done = Arc::new(AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let client = array_client(&url);
        let mut rng = SmallRng::seed_from_u64(seed ^ (writer + 1).wrapping_mul(0x9E37_79B9));
        let copies_done = copies_done.clone();
        writers.spawn(async move {
            let mut written = 0;
            while written < WRITES_PER_WRITER || !copies_done.load(Ordering::Acquire) {
                written += 1;
                let blocks = rng.random_range(1..=16u64);
                let lba = rng.random_range(0..=LU_BLOCKS - blocks);
                let mut data = vec![0u8; blocks as usize * BLOCK];
                rng.fill(&mut data[..]);
                client.write(0, lba, data).await.expect("mirror write");
            }
        });
    }
    let mut copiers = tokio::task::JoinSet::new();
    for copier in 0..COPIERS {
        let client = array_client(&url);
        let mut rng = SmallRng::seed_from_u64(seed ^ (copier + 100).wrapping_mul(0x85EB_CA6B));
        copiers.spawn(async move {
            for _ in 0..COPIES_PER_COPIER {
                let blocks = rng.random_range(1..=256u64);
                let lba = rng.random_range(0..=LU_BLOCKS - blocks);
                client.copy_range(1, 2, lba, blocks).await.expect("copy");
            }
        });
    }
    while let Some(result) = copiers.join_next().await {
        result.expect("copier task");
    }
    copies_done.store(true, Ordering::Release);
    while let Some(result) = writers.join_next().await {
        result.expect("writer task");
    }
    let client = array_client(&url);
    let origin = lu_digests(&client, 1).await;
    let mate = lu_digests(&client, 2).await;
    // Compare at a finer grain too: the files themselves.
    let origin_file = std::fs::read(dir.path().join("lu1.img")).expect("origin");
    let mate_file = std::fs::read(dir.path().join("lu2.img")).expect("mate");
    assert_eq!(
        origin == mate,
        origin_file == mate_file,
        "digests agree with cmp"
    );
    node.shutdown().await.expect("shutdown");
    origin_file
        .chunks(16 * BLOCK)
        .zip(mate_file.chunks(16 * BLOCK))
        .filter(|(a, b)| a != b)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_never_interleaves_with_mirror_writes() {
    let seed = harness::seed("copy_never_interleaves_with_mirror_writes");
    for round in 0..3 {
        let mismatches = race(seed.wrapping_add(round), ArrayTestHooks::default()).await;
        assert_eq!(
            mismatches, 0,
            "seed {seed} round {round}: origin and mate differ in {mismatches} chunks"
        );
    }
}

/// The canary: the same race with the range lock disabled must leave origin
/// and mate different, or the test above proves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_without_the_range_lock_the_race_is_caught() {
    let seed = harness::seed("canary_without_the_range_lock_the_race_is_caught");
    let hooks = ArrayTestHooks {
        disable_range_lock: true,
    };
    for round in 0..10 {
        let mismatches = race(seed.wrapping_add(round), hooks).await;
        eprintln!("seed {seed} round {round}: {mismatches} chunks differ without the lock");
        if mismatches > 0 {
            return;
        }
    }
    panic!("seed {seed}: 10 rounds without the range lock never made origin and mate differ");
}
