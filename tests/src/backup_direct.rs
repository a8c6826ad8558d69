//! The chunk store's direct writes (`O_DIRECT`, no page cache) and their
//! fallback: the same frozen mate backed up into a store on a disk (direct
//! writes) and into a store on tmpfs where direct I/O is refused (buffered
//! writes) gives the same chunk digests, verifies in both, and exports to
//! images equal to the mate byte for byte — and each store says which way
//! its files were written.

use array_node::ArrayTestHooks;
use backup_server::blobs::DirBlobs;
use backup_server::store::ChunkStore;
use db_server::manager::ManagerConfig;
use splitmirror_proto::backup::v1 as pb;
use splitmirror_proto::db::v1 as dpb;
use std::path::Path;

use crate::harness::{
    self, array_client, backup_client, db_client, follow_backup, start_array, start_backup,
    start_db,
};

const BLOCK: usize = 4096;
const LU_BYTES: u64 = 12 << 20;

/// A directory on a disk filesystem (not tmpfs), or why there is none.
fn disk_dir() -> Result<tempfile::TempDir, String> {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    for parent in ["/var/tmp", env!("CARGO_MANIFEST_DIR")] {
        let Ok(stat) = rustix::fs::statfs(parent) else {
            continue;
        };
        if stat.f_type as u64 != TMPFS_MAGIC
            && let Ok(dir) = tempfile::tempdir_in(parent)
        {
            return Ok(dir);
        }
    }
    Err("neither /var/tmp nor the source directory is on a disk filesystem".into())
}

/// The mate's data: random (stored raw: files of 1 MiB + 5 bytes, not
/// aligned), repetitive (stored compressed, short odd sizes), and zeros
/// (not stored), a chunk of each in turn.
fn volume_data(seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut data = vec![0u8; LU_BYTES as usize];
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        match i % 3 {
            0 => {
                for b in chunk.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
            1 => {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = (j / 100 + i) as u8;
                }
            }
            _ => {}
        }
    }
    data
}

async fn export(store: &Path, id: &str, file: &Path) -> (Vec<u8>, bool) {
    let store = ChunkStore::open_existing(
        &harness::StoreLocation::Dir(store.to_path_buf()),
        harness::DEFAULT_GC_GRACE,
    )
    .await
    .expect("open the store");
    let outcome = store.export(id, file).await.expect("export");
    (std::fs::read(file).expect("exported image"), outcome.direct)
}

fn chunk_digests(store: &Path, id: &str) -> serde_json::Value {
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(store.join("indexes").join(format!("{id}.json"))).expect("index"),
    )
    .expect("the index is JSON");
    index["chunk_digests"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_written_direct_and_one_written_buffered_hold_the_same_backup() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("SKIPPED: /dev/shm (tmpfs) does not exist here: no filesystem for the fallback");
        return;
    }
    let disk = match disk_dir() {
        Ok(dir) => dir,
        Err(why) => {
            eprintln!("SKIPPED: {why}: no filesystem for the direct writes");
            return;
        }
    };
    let memory = tempfile::tempdir_in(shm).expect("tempdir in /dev/shm");
    // tmpfs does O_DIRECT since Linux 6.6; refuse it below this directory
    // as older tmpfs (and some network filesystems) do, so that the
    // fallback is what runs there.
    let probe = memory.path().join("probe");
    match backup_server::direct::open_direct(&probe, true) {
        Ok(_) => {
            eprintln!(
                "this kernel's tmpfs accepts O_DIRECT: the test hook refuses it below {}",
                memory.path().display()
            );
            backup_server::direct::refuse_direct_io_below(memory.path());
        }
        Err(e) => eprintln!("tmpfs refuses O_DIRECT here ({e}): the fallback runs as is"),
    }
    let _ = std::fs::remove_file(&probe);

    let seed = harness::seed("backup_direct");
    let array = start_array(
        &disk.path().join("array"),
        harness::small_array(LU_BYTES),
        ArrayTestHooks::default(),
    )
    .await;
    let db = start_db(
        &array.url(),
        &disk.path().join("db"),
        ManagerConfig::default(),
        None,
    )
    .await;
    let db_client = db_client(&db.url());
    let data = volume_data(seed);
    for (i, mib) in data.chunks(1 << 20).enumerate() {
        db_client
            .write(
                0,
                dpb::VirtualLu::Data,
                (i * (1 << 20) / BLOCK) as u64,
                mib.to_vec(),
            )
            .await
            .expect("write the volume");
    }
    let acquired = db_client
        .acquire_snapshot(0, "direct-1")
        .await
        .expect("acquire");
    let array_client = array_client(&array.url());
    let mate = harness::read_lu(&array_client, acquired.mate_lu, 0, LU_BYTES / BLOCK as u64).await;
    assert!(mate == data, "the mate holds what was written");

    let on_disk = disk.path().join("store");
    let in_memory = memory.path().join("store");
    let mut ids = Vec::new();
    for store in [&on_disk, &in_memory] {
        let backup = start_backup(&array.url(), &db.url(), store).await;
        let client = backup_client(&backup.url());
        let id = client
            .start_backup(pb::StartBackupRequest {
                run_id: format!("direct-{}", ids.len()),
                lu: acquired.mate_lu,
                snapshot: Some(pb::SnapshotRef {
                    mate: 0,
                    volume: 0,
                    holder_run_id: "direct-1".into(),
                }),
                ..Default::default()
            })
            .await
            .expect("start")
            .backup_id;
        let last = follow_backup(&client, &id).await;
        assert_eq!(last.state(), pb::BackupState::Complete, "{}", last.error);
        let verified = client.verify_backup(&id).await.expect("verify");
        assert!(
            verified.ok && verified.frozen,
            "{}: {verified:?}",
            store.display()
        );
        backup.shutdown().await.expect("backup shutdown");
        ids.push(id);
    }

    // The same chunks, named by the same digests.
    let digests = chunk_digests(&on_disk, &ids[0]);
    assert_eq!(
        digests.as_array().map(Vec::len),
        Some((LU_BYTES >> 20) as usize)
    );
    assert_eq!(digests, chunk_digests(&in_memory, &ids[1]));
    // The same chunk files, byte for byte.
    for chunk in std::fs::read_dir(on_disk.join("chunks"))
        .expect("chunks")
        .flat_map(|d| std::fs::read_dir(d.expect("entry").path()).expect("chunk dir"))
    {
        let chunk = chunk.expect("entry").path();
        let relative = chunk.strip_prefix(&on_disk).expect("below the store");
        assert!(
            std::fs::read(&chunk).expect("chunk")
                == std::fs::read(in_memory.join(relative))
                    .expect("the same chunk in the other store"),
            "{} differs between the stores",
            relative.display()
        );
    }

    // Each store says how its files were written: the disk's with
    // O_DIRECT, tmpfs's through the page cache.
    let direct = DirBlobs::write_counts_of(&on_disk);
    let buffered = DirBlobs::write_counts_of(&in_memory);
    eprintln!(
        "disk store: {} direct, {} buffered; tmpfs store: {} direct, {} buffered",
        direct.direct_files(),
        direct.buffered_files(),
        buffered.direct_files(),
        buffered.buffered_files()
    );
    // 8 chunks stored (4 random, 4 repetitive), plus store.json, the
    // writer records and the index.
    assert!(direct.direct_files() >= 8 && direct.buffered_files() == 0 && !direct.refused());
    assert!(buffered.buffered_files() >= 8 && buffered.direct_files() == 0 && buffered.refused());

    // Each export equals the mate, the disk's written direct.
    let (image, was_direct) = export(&on_disk, &ids[0], &disk.path().join("export.raw")).await;
    assert!(
        was_direct,
        "the export on the disk was written with O_DIRECT"
    );
    assert!(
        image == mate,
        "the export of the disk store equals the mate"
    );
    let (image, was_direct) = export(&in_memory, &ids[1], &memory.path().join("export.raw")).await;
    assert!(
        !was_direct,
        "the export on tmpfs fell back to buffered writes"
    );
    assert!(
        image == mate,
        "the export of the tmpfs store equals the mate"
    );

    db.shutdown().await.expect("db");
    array.shutdown().await.expect("array");
}
