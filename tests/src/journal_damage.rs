//! A damaged journal and a journal whose filesystem fills up, with real
//! processes (issue 11, DESIGN.md §3 rules 4 and 5).
//!
//! - A journal overwritten in the middle, or cut to half its length, while
//!   db-server is down is not a torn tail: the pair must be compared whole
//!   (the snapshot cannot be trusted and is dropped), never restored from
//!   the records before the damage — those lack the regions written later.
//! - A journal append refused for want of space must leave nothing behind:
//!   intents acknowledged after space returns must survive a kill -9.
//!
//! Each ends the way an operator would: delete the snapshot (if one is
//! still held), wait for Synchronized, then read origin and mate through
//! the array and compare them byte for byte.

use std::path::{Path, PathBuf};

use splitmirror_proto::db::v1 as pb;

use crate::harness::{
    self, ClientError, DbClient, array_client, array_process, db_client, db_process,
};

const BLOCK: usize = 4096;
/// Blocks in one journal region (db-server's default 64 KiB regions).
const REGION_BLOCKS: u64 = 16;
const RUN_ID: &str = "journal-damage-run";

/// A block's content, different for every LBA and never all zeros.
fn block_for(lba: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK];
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = (lba as u8) ^ (i as u8) ^ 0x5A;
    }
    data[..8].copy_from_slice(&lba.to_le_bytes());
    data
}

async fn write_block(client: &DbClient, lba: u64) -> Result<(), ClientError> {
    client
        .write(0, pb::VirtualLu::Data, lba, block_for(lba))
        .await
        .map(drop)
}

async fn acquire(client: &DbClient) {
    client.acquire_snapshot(0, RUN_ID).await.expect("acquire");
}

/// What an operator does after the restart: delete the snapshot if one is
/// still held, wait for Synchronized. Answers whether a snapshot was held.
async fn delete_and_wait(client: &DbClient) -> bool {
    let status = harness::volume_status(client, 0).await;
    let held = status.data_mode() == pb::Mode::Snapshot;
    if held {
        client
            .delete_snapshot(0, RUN_ID, false)
            .await
            .expect("delete");
    }
    harness::wait_synchronized(client, 0).await;
    held
}

/// Reads origin (LU 1) and mate (LU 2) whole through the array and answers
/// the first byte where they differ, if any; checks that every acknowledged
/// block is on the origin.
async fn compare_origin_and_mate(array_url: &str, blocks: u64, acknowledged: &[u64]) {
    let array = array_client(array_url);
    let origin = harness::read_lu(&array, 1, 0, blocks).await;
    let mate = harness::read_lu(&array, 2, 0, blocks).await;
    assert_eq!(
        origin.len(),
        blocks as usize * BLOCK,
        "read the whole origin"
    );
    assert_eq!(mate.len(), origin.len(), "read the whole mate");
    if let Some(at) = origin.iter().zip(&mate).position(|(o, m)| o != m) {
        let lba = at / BLOCK;
        let differing_blocks = origin
            .chunks(BLOCK)
            .zip(mate.chunks(BLOCK))
            .filter(|(o, m)| o != m)
            .count();
        panic!(
            "the pair is Synchronized but origin != mate: first difference at byte {at} \
             (LBA {lba}), {differing_blocks} blocks differ"
        );
    }
    for &lba in acknowledged {
        let at = lba as usize * BLOCK;
        assert!(
            origin[at..at + BLOCK] == block_for(lba)[..],
            "the acknowledged write at LBA {lba} is missing"
        );
    }
}

/// Files in `dir` whose name starts with `prefix`.
fn files_named(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("read the data dir")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect()
}

/// The scenario of the first defect: a snapshot with forty written regions,
/// db-server killed, the journal damaged by `damage` (which answers the
/// damaged bytes), db-server restarted.
async fn damaged_journal_is_not_a_torn_tail(damage: impl FnOnce(&Path) -> Vec<u8>) {
    const BLOCKS: u64 = 1024;
    let dir = tempfile::tempdir().expect("tempdir");
    let db_dir = dir.path().join("db");
    let array = array_process(&dir.path().join("array"), "4MiB", "127.0.0.1:0");
    let mut db = db_process(&db_dir, &array.addr, &["--no-ledger"], &[]);
    let client = db_client(&db.url());
    harness::wait_synchronized(&client, 0).await;
    acquire(&client).await;
    // One write per region, so that the intents make up most of the file
    // and its middle falls among them: the records before the damage hold
    // the snapshot, the ones after it regions that must not be forgotten.
    let acknowledged: Vec<u64> = (0..40u64).map(|i| i * REGION_BLOCKS + i % 7).collect();
    for &lba in &acknowledged {
        write_block(&client, lba)
            .await
            .expect("write in Snapshot mode");
    }
    db.kill9();
    let damaged = damage(&db_dir.join("journal.log"));

    let db = db_process(&db_dir, &array.addr, &["--no-ledger"], &[]);
    let client = db_client(&db.url());
    let snapshot_held = delete_and_wait(&client).await;
    compare_origin_and_mate(&array.url(), BLOCKS, &acknowledged).await;

    assert!(
        !snapshot_held,
        "a snapshot restored from a damaged journal cannot be trusted"
    );
    assert!(
        db.logged("journal unusable"),
        "the damage is logged: {:?}",
        db.log
    );
    let aside = files_named(&db_dir, "journal.damaged-");
    assert_eq!(
        aside.len(),
        1,
        "the damaged journal is set aside: {aside:?}"
    );
    assert!(
        std::fs::read(&aside[0]).expect("read the set-aside journal") == damaged,
        "the damaged journal is kept byte for byte"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_overwritten_in_the_middle_means_a_full_resync() {
    damaged_journal_is_not_a_torn_tail(|path| {
        let mut bytes = std::fs::read(path).expect("read the journal");
        let middle = bytes.len() / 2;
        for byte in &mut bytes[middle..middle + 8] {
            *byte ^= 0xFF;
        }
        std::fs::write(path, &bytes).expect("damage the journal");
        bytes
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_cut_to_half_means_a_full_resync() {
    damaged_journal_is_not_a_torn_tail(|path| {
        let mut bytes = std::fs::read(path).expect("read the journal");
        bytes.truncate(bytes.len() / 2);
        std::fs::write(path, &bytes).expect("truncate the journal");
        bytes
    })
    .await;
}

/// A tmpfs mounted for the length of a test; unmounted when dropped (also
/// when the test panics).
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it) on `dir`, or
    /// answers the reason it could not.
    fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = std::process::Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Something still holds a file open there: detach it anyway so
            // that no mount outlives the test.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .status();
        }
    }
}

/// Writes 4 KiB blocks to `filler` until the filesystem is full.
fn fill(filler: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(filler).expect("create the filler");
    let chunk = vec![0xF1u8; BLOCK];
    for _ in 0..1024 {
        if file.write_all(&chunk).is_err() {
            return;
        }
    }
    panic!("{} never filled its filesystem", filler.display());
}

/// The scenario of the second defect: the journal's filesystem fills up
/// during a snapshot, appends are refused, space returns, two more writes
/// are acknowledged, db-server is killed and restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intents_acknowledged_after_a_full_journal_filesystem_survive_a_crash() {
    // 512 regions: more intents than fit in what is left of the journal's
    // last page once the filesystem is full.
    const BLOCKS: u64 = 8192;
    let dir = tempfile::tempdir().expect("tempdir");
    let db_dir = dir.path().join("db");
    // Declared before the nodes, so dropped after them: nothing holds a
    // file open on the tmpfs when it is unmounted.
    let _tmpfs = match Tmpfs::mount(&db_dir, "128k") {
        Ok(tmpfs) => tmpfs,
        Err(reason) => {
            eprintln!(
                "SKIPPED: needs root to mount a tmpfs \
                 (intents_acknowledged_after_a_full_journal_filesystem_survive_a_crash): {reason}"
            );
            return;
        }
    };
    let array = array_process(&dir.path().join("array"), "32MiB", "127.0.0.1:0");
    let mut db = db_process(&db_dir, &array.addr, &["--no-ledger"], &[]);
    let client = db_client(&db.url());
    harness::wait_synchronized(&client, 0).await;
    acquire(&client).await;

    let filler = db_dir.join("filler");
    fill(&filler);
    let mut acknowledged = Vec::new();
    let mut refused_region = None;
    for region in 0..BLOCKS / REGION_BLOCKS {
        let lba = region * REGION_BLOCKS;
        match write_block(&client, lba).await {
            Ok(()) => acknowledged.push(lba),
            Err(status) => {
                eprintln!("write to new region {region} refused: {status:?}");
                refused_region = Some(region);
                break;
            }
        }
    }
    let refused_region = refused_region.expect("a full filesystem refuses new intents");
    // A write inside an already-journaled region needs no journal space.
    write_block(&client, 1)
        .await
        .expect("a write inside a journaled region");
    acknowledged.push(1);

    std::fs::remove_file(&filler).expect("free the space");
    let later: Vec<u64> = [refused_region, refused_region + 3, refused_region + 40]
        .iter()
        .map(|region| region * REGION_BLOCKS + 5)
        .collect();
    assert!(later.iter().all(|&lba| lba < BLOCKS), "{later:?}");
    for &lba in &later {
        write_block(&client, lba)
            .await
            .expect("a write once space has returned");
        acknowledged.push(lba);
    }
    db.kill9();

    let db = db_process(&db_dir, &array.addr, &["--no-ledger"], &[]);
    let client = db_client(&db.url());
    let snapshot_held = delete_and_wait(&client).await;
    compare_origin_and_mate(&array.url(), BLOCKS, &acknowledged).await;
    assert!(
        snapshot_held,
        "the journal was intact, so the snapshot survived the restart"
    );
    drop(db);
}
