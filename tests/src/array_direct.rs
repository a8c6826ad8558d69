//! The array's bulk I/O (reads, copies, checksums and writes of at least
//! 256 KiB) bypasses the page cache with `O_DIRECT` while small mirror
//! writes go through it: the two must stay coherent. Small 4 KiB mirror
//! writes race bulk `CopyRange`s from origin to mate, bulk reads and bulk
//! mirror writes over the same blocks of a real disk's file system; every
//! bulk read, and at the end origin, mate and the LU files themselves, are
//! compared with an exact in-test model of what was written. With the
//! array's range lock disabled the same race must be caught.
//!
//! On tmpfs (or wherever the file system refuses `O_DIRECT`) bulk I/O falls
//! back to the page cache with `posix_fadvise(DONTNEED)`: the second test
//! checks it answers what buffered reads answer, and says so once per LU
//! file in the log.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::RwLock;

use crate::harness::{self, ArrayClient, NodeProcess, array_client};

const BLOCK: usize = 4096;
/// One model region: the unit the test's own locks serialise writes in,
/// and the size of a bulk write.
const REGION_BLOCKS: u64 = 256;
const REGIONS: u64 = 16;
const LU_BLOCKS: u64 = REGION_BLOCKS * REGIONS;
const LU_SIZE: &str = "16MiB";
const SMALL_WRITERS: u64 = 4;
const SMALL_WRITES_PER_WRITER: usize = 250;
const BULK_WRITES: usize = 30;
const COPIERS: u64 = 2;
const COPIES_PER_COPIER: usize = 40;
const READERS: u64 = 2;
const READS_PER_READER: usize = 30;
/// The mirror LU and its origin and mate in the default pairs.
const MIRROR_LU: u32 = 0;
const ORIGIN_LU: u32 = 1;
const MATE_LU: u32 = 2;
/// The line the array logs when a file system refuses `O_DIRECT`.
const FALLBACK_LINE: &str = "the file system refuses O_DIRECT";

/// What a race found wrong; all zero when bulk and small I/O are coherent.
#[derive(Debug, Default, PartialEq, Eq)]
struct Mismatches {
    /// Bulk reads during the race that did not answer the model.
    reads: usize,
    /// 1 MiB regions where origin and mate digests differ.
    origin_vs_mate: usize,
    /// 1 MiB regions where the array's reads of origin or mate differ from
    /// the model.
    array_vs_model: usize,
    /// 1 MiB regions where the LU files (read through the page cache)
    /// differ from the model.
    files_vs_model: usize,
}

impl Mismatches {
    fn any(&self) -> bool {
        *self != Self::default()
    }
}

/// A directory on a file system that takes `O_DIRECT` (not tmpfs on an old
/// kernel): under the workspace's `target/`, on the repository's disk.
fn direct_capable_dir() -> Option<tempfile::TempDir> {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test binary>
    let target = exe
        .ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("array-direct-")
        .tempdir_in(&target)
        .expect("tempdir under target/");
    if accepts_direct(dir.path()) {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: {} refuses O_DIRECT, so the array would take its page-cache fallback \
             there and the race would not test O_DIRECT",
            dir.path().display()
        );
        None
    }
}

/// Whether the file system of `dir` accepts `O_DIRECT`.
fn accepts_direct(dir: &Path) -> bool {
    use rustix::fs::{Mode, OFlags};
    let probe = dir.join("probe-o-direct");
    std::fs::write(&probe, []).expect("probe file");
    let accepted = rustix::fs::open(&probe, OFlags::RDWR | OFlags::DIRECT, Mode::empty()).is_ok();
    std::fs::remove_file(&probe).expect("remove probe file");
    accepted
}

fn start(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> NodeProcess {
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.to_str().expect("utf-8 path"),
        "--lu-size",
        LU_SIZE,
    ];
    args.extend_from_slice(extra);
    NodeProcess::start_with_env("array-node", &args, env)
}

/// The regions a block range touches.
fn regions_of(lba: u64, blocks: u64) -> std::ops::Range<usize> {
    (lba / REGION_BLOCKS) as usize..(lba + blocks).div_ceil(REGION_BLOCKS) as usize
}

/// The model: each region's bytes behind a lock that every writer holds
/// while its write is in flight (so per block the order of writes, and
/// the final content, is known), and every checked reader holds shared.
/// Copies take no model lock: origin and mate hold the same bytes
/// whenever no write is in flight, so a copy changes nothing.
type Model = Arc<Vec<RwLock<Vec<u8>>>>;

async fn check_read(client: &ArrayClient, model: &Model, lu: u32, lba: u64, blocks: u64) -> bool {
    let regions = regions_of(lba, blocks);
    let mut guards = Vec::new();
    for region in regions.clone() {
        guards.push(model[region].read().await);
    }
    let data = client.read(lu, lba, blocks).await.expect("bulk read");
    let mut expected = Vec::with_capacity(data.len());
    for (region, guard) in regions.zip(&guards) {
        let start = (region as u64 * REGION_BLOCKS).max(lba);
        let end = ((region as u64 + 1) * REGION_BLOCKS).min(lba + blocks);
        let base = region as u64 * REGION_BLOCKS;
        expected.extend_from_slice(
            &guard[((start - base) as usize * BLOCK)..((end - base) as usize * BLOCK)],
        );
    }
    data == expected
}

/// Runs one race on a fresh array process over `dir` and answers what it
/// found wrong.
async fn race(seed: u64, dir: &Path, no_range_lock: bool) -> Mismatches {
    let extra: &[&str] = if no_range_lock {
        &["--unsafe-test-no-range-lock"]
    } else {
        &[]
    };
    let node = start(dir, extra, &[]);
    assert!(
        !node.logged(FALLBACK_LINE),
        "{} accepts O_DIRECT but the array fell back to the page cache",
        dir.display()
    );
    let url = node.url();
    let model: Model = Arc::new(
        (0..REGIONS)
            .map(|_| RwLock::new(vec![0u8; REGION_BLOCKS as usize * BLOCK]))
            .collect(),
    );
    let read_mismatches = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..SMALL_WRITERS {
        let (client, model) = (array_client(&url), model.clone());
        let mut rng = SmallRng::seed_from_u64(seed ^ (writer + 1).wrapping_mul(0x9E37_79B9));
        tasks.spawn(async move {
            for _ in 0..SMALL_WRITES_PER_WRITER {
                let lba = rng.random_range(0..LU_BLOCKS);
                let mut data = vec![0u8; BLOCK];
                rng.fill(&mut data[..]);
                let region = (lba / REGION_BLOCKS) as usize;
                let mut bytes = model[region].write().await;
                client
                    .write(MIRROR_LU, lba, data.clone())
                    .await
                    .expect("small mirror write");
                let at = (lba % REGION_BLOCKS) as usize * BLOCK;
                bytes[at..at + BLOCK].copy_from_slice(&data);
            }
        });
    }
    {
        let (client, model) = (array_client(&url), model.clone());
        let mut rng = SmallRng::seed_from_u64(seed ^ 0xB01C_0000);
        tasks.spawn(async move {
            for _ in 0..BULK_WRITES {
                let region = rng.random_range(0..REGIONS) as usize;
                let mut data = vec![0u8; REGION_BLOCKS as usize * BLOCK];
                rng.fill(&mut data[..]);
                let mut bytes = model[region].write().await;
                client
                    .write(MIRROR_LU, region as u64 * REGION_BLOCKS, data.clone())
                    .await
                    .expect("bulk mirror write");
                *bytes = data;
            }
        });
    }
    for copier in 0..COPIERS {
        let client = array_client(&url);
        let mut rng = SmallRng::seed_from_u64(seed ^ (copier + 100).wrapping_mul(0x85EB_CA6B));
        tasks.spawn(async move {
            for _ in 0..COPIES_PER_COPIER {
                // 1 MiB, one bulk chunk, anywhere (mostly across two regions).
                let lba = rng.random_range(0..=LU_BLOCKS - REGION_BLOCKS);
                client
                    .copy_range(ORIGIN_LU, MATE_LU, lba, REGION_BLOCKS)
                    .await
                    .expect("copy origin to mate");
            }
        });
    }
    for reader in 0..READERS {
        let (client, model) = (array_client(&url), model.clone());
        let mismatches = read_mismatches.clone();
        let mut rng = SmallRng::seed_from_u64(seed ^ (reader + 200).wrapping_mul(0xC2B2_AE35));
        tasks.spawn(async move {
            for _ in 0..READS_PER_READER {
                // 256 KiB to 1 MiB: one bulk read each.
                let blocks = rng.random_range(64..=REGION_BLOCKS);
                let lba = rng.random_range(0..=LU_BLOCKS - blocks);
                let lu = [MIRROR_LU, ORIGIN_LU, MATE_LU][rng.random_range(0..3)];
                if !check_read(&client, &model, lu, lba, blocks).await {
                    mismatches.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.expect("race task");
    }

    let client = array_client(&url);
    let mut found = Mismatches {
        reads: read_mismatches.load(Ordering::Relaxed),
        ..Mismatches::default()
    };
    // ChecksumRange in 1 MiB chunks: bulk reads of both sides.
    let origin = client
        .checksums(ORIGIN_LU, 0, LU_BLOCKS, REGION_BLOCKS)
        .await
        .expect("origin digests");
    let mate = client
        .checksums(MATE_LU, 0, LU_BLOCKS, REGION_BLOCKS)
        .await
        .expect("mate digests");
    found.origin_vs_mate = origin.iter().zip(&mate).filter(|(a, b)| a != b).count();
    let files: Vec<PathBuf> = [ORIGIN_LU, MATE_LU]
        .iter()
        .map(|lu| dir.join(format!("lu{lu}.img")))
        .collect();
    let file_bytes: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).unwrap_or_else(|e| panic!("reading {}: {e}", f.display())))
        .collect();
    for region in 0..REGIONS {
        let expected = model[region as usize].read().await;
        let lba = region * REGION_BLOCKS;
        for (lu, file) in [ORIGIN_LU, MATE_LU].iter().zip(&file_bytes) {
            let read = client
                .read(*lu, lba, REGION_BLOCKS)
                .await
                .expect("final bulk read");
            if read != *expected {
                found.array_vs_model += 1;
            }
            let at = lba as usize * BLOCK;
            if file[at..at + expected.len()] != expected[..] {
                found.files_vs_model += 1;
            }
        }
    }
    drop(node);
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_bulk_io_and_buffered_mirror_writes_stay_coherent() {
    let seed = harness::seed("direct_bulk_io_and_buffered_mirror_writes_stay_coherent");
    for round in 0..2 {
        let Some(dir) = direct_capable_dir() else {
            return;
        };
        let found = race(seed.wrapping_add(round), dir.path(), false).await;
        assert!(
            !found.any(),
            "seed {seed} round {round}: bulk and small I/O disagree: {found:?}"
        );
    }
}

/// The canary: the same race with the array's range lock disabled lets a
/// copy's direct read of origin and its direct write of mate straddle a
/// mirror write of the same blocks; the checker must see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_without_the_range_lock_the_checker_fails() {
    let seed = harness::seed("canary_without_the_range_lock_the_checker_fails");
    for round in 0..10 {
        let Some(dir) = direct_capable_dir() else {
            return;
        };
        let found = race(seed.wrapping_add(round), dir.path(), true).await;
        eprintln!("seed {seed} round {round} without the range lock: {found:?}");
        if found.any() {
            return;
        }
    }
    panic!("seed {seed}: 10 rounds without the range lock and the checker never failed");
}

/// Fills the mirror LU with small (buffered) writes, then answers whether
/// bulk reads (1 MiB) of origin, and of mate after a bulk copy, equal
/// small (64 KiB, buffered) reads and the file's bytes.
async fn bulk_reads_equal_buffered_reads(url: &str, dir: &Path, seed: u64) {
    let client = array_client(url);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut written = vec![0u8; LU_BLOCKS as usize * BLOCK];
    rng.fill(&mut written[..]);
    // 128 KiB writes: below the bulk threshold, so buffered.
    for (i, piece) in written.chunks(32 * BLOCK).enumerate() {
        client
            .write(MIRROR_LU, i as u64 * 32, piece.to_vec())
            .await
            .expect("small mirror write");
    }
    // A bulk copy over the mate's first half (direct or fallback writes).
    client
        .write(MATE_LU, 0, vec![0u8; 8 << 20])
        .await
        .expect("bulk write of zeros to the mate");
    client
        .copy_range(ORIGIN_LU, MATE_LU, 0, LU_BLOCKS / 2)
        .await
        .expect("copy");
    for lu in [ORIGIN_LU, MATE_LU] {
        let mut bulk = Vec::new();
        let mut small = Vec::new();
        for region in 0..REGIONS {
            bulk.extend(
                client
                    .read(lu, region * REGION_BLOCKS, REGION_BLOCKS)
                    .await
                    .expect("bulk read"),
            );
        }
        for piece in 0..LU_BLOCKS / 16 {
            small.extend(client.read(lu, piece * 16, 16).await.expect("small read"));
        }
        let file = std::fs::read(dir.join(format!("lu{lu}.img"))).expect("LU file");
        assert!(
            bulk == small,
            "LU {lu}: bulk reads differ from buffered reads"
        );
        assert!(
            bulk == written,
            "LU {lu}: bulk reads differ from what was written"
        );
        assert!(
            file == written,
            "LU {lu}: the file differs from what was written"
        );
    }
}

/// How many lines of `node`'s log name `file` with the fallback's words.
fn fallback_lines(node: &NodeProcess, file: &Path) -> usize {
    let name = file.display().to_string();
    node.log
        .lock()
        .expect("log")
        .iter()
        .filter(|line| line.contains(FALLBACK_LINE) && line.contains(&name))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_io_on_tmpfs_answers_what_buffered_io_answers() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("SKIPPED: no /dev/shm (tmpfs) on this machine to try the fallback on");
        return;
    }
    let seed = harness::seed("bulk_io_on_tmpfs_answers_what_buffered_io_answers");
    // As the kernel has it: tmpfs refuses O_DIRECT before Linux 6.6 (the
    // fallback), accepts it since.
    let dir = tempfile::tempdir_in(shm).expect("tempdir in /dev/shm");
    let refused = !accepts_direct(dir.path());
    eprintln!(
        "/dev/shm {} O_DIRECT on this kernel",
        if refused { "refuses" } else { "accepts" }
    );
    let node = start(dir.path(), &[], &[]);
    for lu in [1, 2, 4, 5] {
        let file = dir.path().join(format!("lu{lu}.img"));
        assert_eq!(
            fallback_lines(&node, &file),
            usize::from(refused),
            "the fallback's line for {}",
            file.display()
        );
    }
    bulk_reads_equal_buffered_reads(&node.url(), dir.path(), seed).await;
    drop(node);

    // The fallback itself, made to happen on tmpfs whatever the kernel.
    let dir = tempfile::tempdir_in(shm).expect("tempdir in /dev/shm");
    let node = start(
        dir.path(),
        &[],
        &[(array_node::storage::TEST_REFUSE_O_DIRECT_ENV, "1")],
    );
    for lu in [1, 2, 4, 5] {
        let file = dir.path().join(format!("lu{lu}.img"));
        assert_eq!(
            fallback_lines(&node, &file),
            1,
            "the fallback is said once for {}",
            file.display()
        );
    }
    bulk_reads_equal_buffered_reads(&node.url(), dir.path(), seed.wrapping_add(1)).await;
    // Bulk I/O does not log the line again.
    for lu in [1, 2, 4, 5] {
        assert_eq!(
            fallback_lines(&node, &dir.path().join(format!("lu{lu}.img"))),
            1
        );
    }
}
