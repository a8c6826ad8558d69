//! The snapshot manager with a volume of three mates ([0020]) over the
//! memory array: each mate split, recorded, resynchronized and restored on
//! its own, and a write recorded in the table of every split mate.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ArrayModeKeeping, ManagerConfig, PairRef, SnapshotManager};
use crate::array_port::{ArrayMirrorMode, MemoryArray, PairInfo};
use crate::error::DbError;
use crate::journal::Journal;
use crate::lu_status::{PairState, VirtualLu};

const ORIGIN: u32 = 1;
const MATES: [u32; 3] = [2, 5, 6];
const BLOCK_BYTES: usize = 512;

fn pairs() -> Vec<PairInfo> {
    MATES
        .iter()
        .map(|&mate_lu| PairInfo {
            mirror_lu: 0,
            origin_lu: ORIGIN,
            mate_lu,
            block_size_bytes: BLOCK_BYTES as u32,
            block_count: 64,
        })
        .collect()
}

fn mate(n: u32) -> PairRef {
    PairRef::new(0, n)
}

async fn start_on(
    array: Arc<MemoryArray>,
    journal_dir: Option<&std::path::Path>,
    array_mode: ArrayModeKeeping,
) -> Result<Arc<SnapshotManager>, DbError> {
    let journal = journal_dir.map(|dir| Journal::open(dir, 4096).expect("journal"));
    SnapshotManager::start(
        array,
        pairs(),
        journal,
        ManagerConfig {
            array_mode,
            ..ManagerConfig::default()
        },
        CancellationToken::new(),
        TaskTracker::new(),
    )
    .await
}

async fn three_mates() -> (Arc<SnapshotManager>, Arc<MemoryArray>) {
    let array = Arc::new(MemoryArray::new(pairs()));
    let manager = start_on(array.clone(), None, ArrayModeKeeping::Stateful)
        .await
        .expect("start");
    (manager, array)
}

fn block(array: &MemoryArray, lu: u32, lba: usize) -> u8 {
    let bytes = array.lu(lu);
    let block = &bytes[lba * BLOCK_BYTES..(lba + 1) * BLOCK_BYTES];
    assert!(block.iter().all(|b| *b == block[0]), "one value per block");
    block[0]
}

fn dirty(manager: &SnapshotManager, n: u32) -> Vec<std::ops::Range<u64>> {
    manager
        .status()
        .into_iter()
        .find(|s| s.volume == 0 && s.mate == n)
        .expect("the mate's status")
        .dirty_ranges
}

fn state(manager: &SnapshotManager, n: u32) -> PairState {
    manager.volume(mate(n)).expect("pair").inner().state.clone()
}

async fn wait_synchronized(manager: &SnapshotManager, n: u32) {
    for _ in 0..1000 {
        if state(manager, n) == PairState::Synchronized {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("mate {n} did not become Synchronized");
}

/// Waits until every pair of the volume is Synchronized, then compares
/// the origin with each mate byte for byte.
async fn every_mate_synchronized_and_equal(manager: &SnapshotManager, array: &MemoryArray) {
    manager
        .wait_synchronized(0, Duration::from_secs(5))
        .await
        .expect("every mate synchronized");
    for mate_lu in MATES {
        assert_eq!(array.lu(ORIGIN), array.lu(mate_lu), "mate LU {mate_lu}");
    }
}

async fn write(manager: &SnapshotManager, lba: u64, value: u8) {
    manager
        .write(0, VirtualLu::Data, lba, vec![value; BLOCK_BYTES])
        .await
        .expect("write");
}

#[tokio::test]
async fn a_write_while_two_mates_are_split_is_recorded_in_both_tables() {
    let (manager, array) = three_mates().await;
    assert_eq!(manager.mate_count(0).expect("volume"), 3);
    assert_eq!(manager.volume_ids(), vec![0], "one volume, three pairs");
    write(&manager, 0, 1).await;
    manager.acquire(mate(1), "run-1", 1).await.expect("split 1");
    write(&manager, 4, 4).await;
    manager.acquire(mate(2), "run-2", 2).await.expect("split 2");
    write(&manager, 8, 8).await;
    assert_eq!(dirty(&manager, 1), vec![4..5, 8..9]);
    assert_eq!(dirty(&manager, 2), vec![8..9], "only since its own split");
    assert!(dirty(&manager, 3).is_empty(), "mate 3 stays synchronized");
    // The array sent each write where the modes say.
    for lba in [0, 4, 8] {
        assert_eq!(block(&array, ORIGIN, lba), lba.max(1) as u8);
        assert_eq!(block(&array, 6, lba), lba.max(1) as u8, "mate 3 current");
    }
    assert_eq!(
        (block(&array, 2, 4), block(&array, 2, 8)),
        (0, 0),
        "mate 1 frozen"
    );
    assert_eq!(
        (block(&array, 5, 4), block(&array, 5, 8)),
        (4, 0),
        "mate 2 frozen later"
    );
    // Each snapshot reads its own mate.
    let image = manager
        .read(mate(2), VirtualLu::Snapshot, 4, 1)
        .await
        .expect("read mate 2");
    assert_eq!(image, vec![4; BLOCK_BYTES]);
    // Resync mate 1 while mate 2 stays split.
    manager
        .delete(mate(1), "run-1", false)
        .await
        .expect("delete 1");
    wait_synchronized(&manager, 1).await;
    assert_eq!(array.lu(ORIGIN), array.lu(2), "mate 1 resynchronized");
    assert_eq!(block(&array, 5, 8), 0, "mate 2 still frozen");
    assert_eq!(dirty(&manager, 2), vec![8..9]);
    assert!(matches!(state(&manager, 2), PairState::Snapshot { .. }));
    manager
        .delete(mate(2), "run-2", false)
        .await
        .expect("delete 2");
    manager
        .wait_synchronized(0, Duration::from_secs(5))
        .await
        .expect("every mate synchronized");
    for mate_lu in MATES {
        assert_eq!(array.lu(ORIGIN), array.lu(mate_lu), "mate LU {mate_lu}");
        assert_eq!(
            array.mode_of_pair(0, mate_lu),
            ArrayMirrorMode::Synchronized
        );
    }
    assert_eq!(array.refused_by_mode.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn each_mates_snapshot_and_table_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let array = Arc::new(MemoryArray::new(pairs()));
    let manager = start_on(array.clone(), Some(dir.path()), ArrayModeKeeping::Stateful)
        .await
        .expect("start");
    manager
        .wait_synchronized(0, Duration::from_secs(5))
        .await
        .expect("synchronized");
    manager.acquire(mate(1), "run-1", 1).await.expect("split 1");
    write(&manager, 4, 4).await;
    manager.acquire(mate(3), "run-3", 2).await.expect("split 3");
    write(&manager, 20, 20).await;
    manager.close_journal();
    drop(manager);
    let manager = start_on(array.clone(), Some(dir.path()), ArrayModeKeeping::Stateful)
        .await
        .expect("restart");
    assert_eq!(
        manager.holder(mate(1)).expect("pair").as_deref(),
        Some("run-1")
    );
    assert_eq!(manager.holder(mate(2)).expect("pair"), None);
    assert_eq!(
        manager.holder(mate(3)).expect("pair").as_deref(),
        Some("run-3")
    );
    // Intents are regions of 4096 bytes: eight 512-byte blocks.
    assert_eq!(dirty(&manager, 1), vec![0..8, 16..24]);
    assert_eq!(dirty(&manager, 3), vec![16..24]);
    assert_eq!(array.mode_of_pair(0, 5), ArrayMirrorMode::Synchronized);
    for split_mate_lu in [2, 6] {
        assert!(matches!(
            array.mode_of_pair(0, split_mate_lu),
            ArrayMirrorMode::Snapshot { .. }
        ));
    }
    for (n, run) in [(1, "run-1"), (3, "run-3")] {
        manager.delete(mate(n), run, false).await.expect("delete");
    }
    every_mate_synchronized_and_equal(&manager, &array).await;
}

#[tokio::test]
async fn a_reverse_resync_from_one_mate_reaches_every_other_mate() {
    let (manager, array) = three_mates().await;
    write(&manager, 0, 1).await;
    write(&manager, 1, 1).await;
    manager.acquire(mate(2), "run-r", 1).await.expect("split 2");
    write(&manager, 0, 9).await;
    manager.acquire(mate(3), "run-3", 2).await.expect("split 3");
    assert_eq!(
        block(&array, 2, 0),
        9,
        "mate 1 synchronized: it took the write"
    );
    let outcome = manager
        .restore_snapshot(mate(2), "run-r")
        .await
        .expect("reverse from mate 2");
    assert_eq!(outcome.blocks_copied, 1);
    assert_eq!(
        block(&array, ORIGIN, 0),
        1,
        "the origin is back at mate 2's image"
    );
    // Mate 1 was synchronized: it resynchronizes the range; mate 3 is split
    // and keeps it recorded, its image untouched.
    wait_synchronized(&manager, 1).await;
    assert_eq!(array.lu(ORIGIN), array.lu(2));
    assert_eq!(array.lu(ORIGIN), array.lu(5));
    assert_eq!(block(&array, 6, 0), 9, "mate 3 still frozen");
    assert_eq!(dirty(&manager, 3), vec![0..1]);
    manager
        .delete(mate(3), "run-3", false)
        .await
        .expect("delete 3");
    every_mate_synchronized_and_equal(&manager, &array).await;
}

#[tokio::test]
async fn several_mates_need_the_stateful_array() {
    let array = Arc::new(MemoryArray::new(pairs()));
    let refused = start_on(array, None, ArrayModeKeeping::Stateless).await;
    match refused {
        Err(DbError::InvalidArgument(why)) => {
            assert!(why.contains("--array-mode stateful"), "{why}")
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("a stateless db-server started with several mates"),
    }
}

#[tokio::test]
async fn a_mate_the_volume_does_not_have_is_refused() {
    let (manager, _array) = three_mates().await;
    assert!(matches!(
        manager.acquire(mate(4), "run-x", 1).await,
        Err(DbError::InvalidArgument(_))
    ));
    assert!(matches!(
        manager.acquire(PairRef::new(9, 1), "run-x", 1).await,
        Err(DbError::UnknownVolume(9))
    ));
    // Copy-on-write and a restore from a backup are built for one mate.
    assert!(matches!(
        manager
            .acquire_by(mate(1), "run-c", 1, super::SnapshotMethod::Cow)
            .await,
        Err(DbError::InvalidArgument(_))
    ));
    assert!(matches!(
        manager.check_begin_restore(0, "restore-1"),
        Err(DbError::InvalidArgument(_))
    ));
}
