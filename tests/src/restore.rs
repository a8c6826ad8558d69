//! Restore (issue 17): a corrupted volume brought back from its last
//! backup (only the corrupted chunks written, byte for byte the backup,
//! the ledger reopened at the backup's sequence), the reverse resync to a
//! held snapshot (exactly the recorded ranges copied), every refusal
//! (nothing changed on any LU), and kill -9 at the named crash points of
//! db-server and the backup server, then the same restore run again.
//!
//! The oracles are independent of the code under test: the array's
//! `ChecksumRange` of origin and of mate at 1 MiB (the digests a backup's
//! manifest lists), the bytes of the exported backup against the bytes of
//! the volume, the ledger's own verifier, and the test's own account of
//! which chunks it corrupted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use backup_server::manifest;
use db_server::ledger::LedgerConfig;
use db_server::ledger_format;
use db_server::manager::ManagerConfig;
use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use splitmirror_console::cluster::{Cluster, ClusterBuilder};
use splitmirror_proto::backup::v1 as bpb;
use splitmirror_proto::db::v1 as dpb;
use splitmirror_proto::reason::Reason;

use crate::harness::{
    self, ArrayClient, BackupClient, CHUNK_BYTES, DbClient, ErrorKind, chunk_digests,
    follow_restore,
};

const BLOCK_BYTES: u64 = 4096;
/// The volumes of the in-process tests: small, so that a whole volume is
/// read, exported and digested in a moment.
const LU_BYTES: u64 = 32 << 20;
/// The in-process ledger (superblock, 200 accounts, a 256-block log: under
/// 2 MiB) lies in the first chunks; the chunks the tests fill and corrupt
/// start here, clear of it.
const DATA_FIRST_CHUNK: u64 = 8;
/// Chunks of random data written before the backup.
const FILLED_CHUNKS: usize = 12;
/// Chunks corrupted before the restore.
const CORRUPTED_CHUNKS: usize = 3;
/// An id no backup has.
const UNKNOWN_BACKUP: &str = "0190d3c4-0000-7000-8000-00000000dead";

fn ledger_config() -> LedgerConfig {
    LedgerConfig {
        volume: 0,
        accounts: 200,
        workers: 2,
        target_tps: 300,
        log_blocks: 256,
        ..LedgerConfig::default()
    }
}

/// A cluster of two 32 MiB pairs (mirror 0 = 1 + 2 with the ledger, mirror
/// 3 = 4 + 5), mutual TLS and LUN masking as in production.
async fn ledger_cluster() -> Cluster {
    ClusterBuilder::new()
        .credentials(harness::credentials())
        .lu_size_bytes(LU_BYTES)
        .ledger(Some(ledger_config()))
        .start()
        .await
        .expect("start the cluster")
}

/// A backup as a restore needs it: its id, its chunk digests, its image
/// digest and the ledger sequence it holds.
struct Backup {
    id: String,
    digests: Vec<[u8; 32]>,
    image_digest: Vec<u8>,
    ledger_sequence: Option<u64>,
}

async fn backup_of(client: &BackupClient, id: &str) -> Backup {
    let info = client
        .get_backup(id, true)
        .await
        .unwrap_or_else(|e| panic!("getting backup {id}: {e}"));
    assert_eq!(info.state(), bpb::BackupState::Complete, "{info:?}");
    let manifest = info.manifest.expect("a complete backup's manifest");
    let digests: Vec<[u8; 32]> = manifest
        .chunk_digests
        .iter()
        .map(|d| <[u8; 32]>::try_from(d.as_slice()).expect("32-byte digests"))
        .collect();
    assert_eq!(digests.len() as u64, manifest.chunk_count);
    // The manifest's image digest is what the test computes from the
    // digests: EndRestore compares the volume with it.
    assert_eq!(
        manifest.image_digest,
        manifest::image_digest(&digests).to_vec(),
        "backup {id}: the image digest of its chunk digests"
    );
    Backup {
        id: id.to_string(),
        digests,
        image_digest: manifest.image_digest,
        ledger_sequence: manifest.ledger_sequence,
    }
}

/// Starts a backup, follows it to the end, panics unless it completed,
/// and answers it.
async fn complete_backup(client: &BackupClient, request: bpb::StartBackupRequest) -> Backup {
    let run_id = request.run_id.clone();
    let id = client
        .start_backup(request)
        .await
        .unwrap_or_else(|e| panic!("starting backup {run_id}: {e}"))
        .backup_id;
    let last = harness::follow_backup(client, &id).await;
    assert_eq!(
        last.state(),
        bpb::BackupState::Complete,
        "backup {run_id}: {}",
        last.error
    );
    backup_of(client, &id).await
}

/// A frozen backup of `volume`: acquire, copy the mate, delete, and wait
/// until the pair is Synchronized again.
async fn frozen_backup(db: &DbClient, backup: &BackupClient, volume: u32, run_id: &str) -> Backup {
    let acquired = db
        .acquire_snapshot(volume, run_id)
        .await
        .unwrap_or_else(|e| panic!("acquiring for {run_id}: {e}"));
    let taken = complete_backup(
        backup,
        bpb::StartBackupRequest {
            run_id: run_id.into(),
            lu: acquired.mate_lu,
            expected_block_count: Some(acquired.block_count),
            label: format!("restore test: {run_id}"),
            snapshot: Some(bpb::SnapshotRef {
                mate: 0,
                volume,
                holder_run_id: run_id.into(),
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        taken.ledger_sequence,
        Some(acquired.ledger_sequence),
        "the backup records the snapshot's ledger sequence"
    );
    db.delete_snapshot(volume, run_id, false)
        .await
        .unwrap_or_else(|e| panic!("deleting the snapshot of {run_id}: {e}"));
    harness::wait_synchronized(db, volume).await;
    taken
}

/// A live backup of a real LU (a mate, which the backup identity may
/// read), for the clusters where nothing writes.
async fn live_backup(backup: &BackupClient, lu: u32, run_id: &str) -> Backup {
    complete_backup(
        backup,
        bpb::StartBackupRequest {
            run_id: run_id.into(),
            lu,
            label: format!("restore test: {run_id}"),
            live: true,
            ..Default::default()
        },
    )
    .await
}

/// `amount` distinct chunks of `from..to`, in order.
fn pick_chunks(rng: &mut SmallRng, from: u64, to: u64, amount: usize) -> Vec<u64> {
    let mut chunks: Vec<u64> = sample(rng, (to - from) as usize, amount)
        .into_iter()
        .map(|i| from + i as u64)
        .collect();
    chunks.sort_unstable();
    chunks
}

fn random_chunk(rng: &mut SmallRng) -> Vec<u8> {
    let mut data = vec![0u8; CHUNK_BYTES as usize];
    rng.fill(&mut data[..]);
    data
}

/// Writes random data over whole chunks of `volume` through db-server.
async fn fill_chunks(db: &DbClient, volume: u32, chunks: &[u64], rng: &mut SmallRng) {
    for &chunk in chunks {
        db.write(
            volume,
            dpb::VirtualLu::Data,
            chunk * CHUNK_BYTES / BLOCK_BYTES,
            random_chunk(rng),
        )
        .await
        .unwrap_or_else(|e| panic!("writing chunk {chunk} of volume {volume}: {e}"));
    }
}

/// Corrupts whole chunks behind db-server's back: random data written to
/// the mirror LU through the array (so origin and mate both hold it), as
/// the pairs' owner (the test's array client is db-server's identity).
async fn corrupt_chunks(array: &ArrayClient, mirror_lu: u32, chunks: &[u64], rng: &mut SmallRng) {
    for &chunk in chunks {
        array
            .write(
                mirror_lu,
                chunk * CHUNK_BYTES / BLOCK_BYTES,
                random_chunk(rng),
            )
            .await
            .unwrap_or_else(|e| panic!("corrupting chunk {chunk} of LU {mirror_lu}: {e}"));
    }
}

/// The chunks whose digest differs.
fn differing(a: &[[u8; 32]], b: &[[u8; 32]]) -> Vec<u64> {
    assert_eq!(a.len(), b.len(), "digest lists of different lengths");
    a.iter()
        .zip(b)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

/// The 1 MiB digests of every real LU the test's identity sees (origins,
/// mates, plain LUs; a mirror LU is its origin), to show that a refusal
/// changed no byte anywhere.
async fn every_lu(array: &ArrayClient) -> BTreeMap<u32, Vec<[u8; 32]>> {
    let mut all = BTreeMap::new();
    for lu in array.list_lus().await.expect("list LUs") {
        if lu.kind() != splitmirror_proto::array::v1::LuKind::Mirror {
            all.insert(lu.id, chunk_digests(array, lu.id).await);
        }
    }
    all
}

/// The whole LU, read through the array.
async fn read_whole_lu(array: &ArrayClient, lu: u32) -> Vec<u8> {
    let page = array.mode_sense(lu).await.expect("mode sense");
    let piece = CHUNK_BYTES / u64::from(page.block_size_bytes) * 4;
    let mut image = Vec::new();
    let mut lba = 0;
    while lba < page.block_count {
        let blocks = (page.block_count - lba).min(piece);
        image.extend(harness::read_lu(array, lu, lba, blocks).await);
        lba += blocks;
    }
    image
}

/// Byte-for-byte equality, naming the first chunk that differs instead of
/// printing megabytes.
fn assert_same_bytes(expected: &[u8], actual: &[u8], what: &str) {
    assert_eq!(expected.len(), actual.len(), "{what}: lengths differ");
    if let Some(chunk) = expected
        .chunks(CHUNK_BYTES as usize)
        .zip(actual.chunks(CHUNK_BYTES as usize))
        .position(|(e, a)| e != a)
    {
        panic!("{what}: chunk {chunk} differs");
    }
}

/// Asserts that `error` is the refusal `kind` with `reason`.
#[track_caller]
fn assert_refused(
    error: &harness::ClientError,
    kind: ErrorKind,
    reason: Option<Reason>,
    what: &str,
) {
    assert_eq!(
        (error.kind, error.reason),
        (kind, reason),
        "{what}: {error}"
    );
}

/// The volume is offline for the restore run `run_id`: db-server says so,
/// its Read and Write answer UNAVAILABLE (restoring), and the ledger, when
/// it lives on the volume, does not run.
async fn assert_offline(db: &DbClient, volume: u32, run_id: &str, ledger_volume: bool) {
    let status = harness::volume_status(db, volume).await;
    let restore = status
        .restore
        .as_ref()
        .unwrap_or_else(|| panic!("volume {volume} is not offline for a restore: {status:?}"));
    assert_eq!(restore.run_id, run_id, "{status:?}");
    assert_ne!(
        status.data_mode(),
        dpb::Mode::Synchronized,
        "an offline volume is not served: {status:?}"
    );
    let read = db
        .read(volume, dpb::VirtualLu::Data, 0, 1)
        .await
        .expect_err("a read of a volume offline for a restore");
    assert_refused(
        &read,
        ErrorKind::Unavailable,
        Some(Reason::Restoring),
        "read while offline",
    );
    // What block 0 holds, so that a write wrongly let through would show
    // only in the refusal, not in the data.
    let write = db
        .write(
            volume,
            dpb::VirtualLu::Data,
            0,
            vec![0u8; BLOCK_BYTES as usize],
        )
        .await
        .expect_err("a write to a volume offline for a restore");
    assert_refused(
        &write,
        ErrorKind::Unavailable,
        Some(Reason::Restoring),
        "write while offline",
    );
    if ledger_volume {
        let ledger = db
            .status(false)
            .await
            .expect("status")
            .ledger
            .expect("the ledger's status");
        assert!(
            !ledger.running,
            "the ledger does not run on an offline volume: {ledger:?}"
        );
        assert!(
            !ledger.stopped_reason.is_empty(),
            "a stopped ledger says why: {ledger:?}"
        );
    }
}

/// The volume is online again: Synchronized, no restore, readable.
async fn assert_online(db: &DbClient, volume: u32) {
    harness::wait_synchronized(db, volume).await;
    let status = harness::volume_status(db, volume).await;
    assert!(status.restore.is_none(), "{status:?}");
    db.read(volume, dpb::VirtualLu::Data, 0, 1)
        .await
        .unwrap_or_else(|e| panic!("a read of volume {volume} once online: {e}"));
}

/// Waits (bounded) until the ledger's sequence is past `sequence`.
async fn wait_ledger_past(db: &DbClient, sequence: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ledger = db
            .status(false)
            .await
            .expect("status")
            .ledger
            .expect("the ledger's status");
        if ledger.running && ledger.sequence > sequence {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ledger does not reach {sequence}: {ledger:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The ledger runs, and its sequence grows past `from`.
async fn assert_ledger_grows_from(db: &DbClient, from: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ledger = db
            .status(false)
            .await
            .expect("status")
            .ledger
            .expect("the ledger's status");
        assert!(ledger.running, "the ledger runs again: {ledger:?}");
        assert!(
            ledger.sequence >= from,
            "the reopened ledger went back before {from}: {ledger:?}"
        );
        if ledger.sequence > from {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ledger does not grow from {from}: {ledger:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Origin == mate of a pair the ledger writes: compared with the database
/// suspended.
async fn assert_pair_equal_suspended(db: &DbClient, array: &ArrayClient, origin: u32, mate: u32) {
    db.suspend(20_000).await.expect("suspend");
    let origin_digests = chunk_digests(array, origin).await;
    let mate_digests = chunk_digests(array, mate).await;
    db.resume().await.expect("resume");
    assert_eq!(
        differing(&origin_digests, &mate_digests),
        Vec::<u64>::new(),
        "origin {origin} and mate {mate} differ at these chunks"
    );
}

fn restore_request(run_id: &str, backup_id: &str, volume: u32) -> bpb::StartRestoreRequest {
    bpb::StartRestoreRequest {
        run_id: run_id.into(),
        backup_id: backup_id.into(),
        volume: Some(volume),
        ..Default::default()
    }
}

fn restore_to_lu_request(run_id: &str, backup_id: &str, lu: u32) -> bpb::StartRestoreRequest {
    bpb::StartRestoreRequest {
        run_id: run_id.into(),
        backup_id: backup_id.into(),
        to_lu: Some(lu),
        ..Default::default()
    }
}

/// A finished restore job that completed, verified, for `backup`.
#[track_caller]
fn assert_restore_complete(last: &bpb::RestoreProgress, backup: &Backup) {
    assert_eq!(
        (last.state(), last.phase()),
        (bpb::RestoreState::Complete, bpb::RestorePhase::Done),
        "restore run {}: {} ({:?})",
        last.run_id,
        last.error,
        last.failure()
    );
    assert!(last.verified, "a complete restore is verified: {last:?}");
    assert_eq!(last.backup_id, backup.id);
    assert_eq!(last.chunks_total, backup.digests.len() as u64, "{last:?}");
    assert_eq!(last.image_digest, backup.image_digest, "{last:?}");
    assert_eq!(last.ledger_sequence, backup.ledger_sequence, "{last:?}");
    assert_eq!(
        last.bytes_written,
        last.chunks_written * CHUNK_BYTES,
        "{last:?}"
    );
}

/// The main path, driven call by call: corrupt three chunks of volume 0
/// while the ledger runs, restore the last backup. The volume equals the
/// backup byte for byte on both sides, only the chunks that differ were
/// written (the corrupted ones, and the ledger's own chunks it wrote since
/// the backup, counted by the test from the array's digests once the
/// volume is offline), and the ledger reopens at the backup's sequence and
/// runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_the_last_backup_writes_only_what_differs_and_reopens_the_ledger() {
    let seed = harness::seed("restore::restoring_the_last_backup");
    let mut rng = SmallRng::seed_from_u64(seed);
    let cluster = ledger_cluster().await;
    let c = &cluster.clients;
    let chunk_count = LU_BYTES / CHUNK_BYTES;
    let filled = pick_chunks(&mut rng, DATA_FIRST_CHUNK, chunk_count, FILLED_CHUNKS);
    fill_chunks(&c.db, 0, &filled, &mut rng).await;
    cluster
        .wait_for_transactions(50, Duration::from_secs(30))
        .await
        .expect("the ledger writes");
    let backup = frozen_backup(&c.db, &c.backup, 0, "backup-before-corruption").await;
    let sequence = backup.ledger_sequence.expect("a frozen backup's sequence");
    // The ledger moves on past the backup, then chunks get corrupted.
    wait_ledger_past(&c.db, sequence + 20).await;
    let corrupted = pick_chunks(&mut rng, DATA_FIRST_CHUNK, chunk_count, CORRUPTED_CHUNKS);
    corrupt_chunks(&c.array, 0, &corrupted, &mut rng).await;
    eprintln!("seed {seed}: corrupted chunks {corrupted:?}, backup at sequence {sequence}");

    let run = "restore-after-corruption";
    let begun =
        c.db.begin_restore(0, run, &backup.id)
            .await
            .expect("begin restore");
    assert!(!begun.already_restoring);
    assert_eq!((begun.mirror_lu, begun.origin_lu, begun.mate_lu), (0, 1, 2));
    let stopped = begun
        .ledger_sequence_stopped
        .expect("the ledger ran on the volume");
    assert!(
        stopped > sequence,
        "stopped at {stopped}, backup {sequence}"
    );
    assert_offline(&c.db, 0, run, true).await;
    let status = harness::volume_status(&c.db, 0).await;
    let restore = status.restore.expect("restore status");
    assert_eq!(restore.kind(), dpb::RestoreKind::FromBackup);
    assert_eq!(restore.backup_id, backup.id);

    // The test's own account of what must be written, now that nothing
    // writes the volume: the corrupted chunks, and the ledger's chunks it
    // changed since the backup.
    let origin_before = chunk_digests(&c.array, 1).await;
    let mate_before = chunk_digests(&c.array, 2).await;
    assert_eq!(
        origin_before, mate_before,
        "origin == mate before the restore"
    );
    let to_write = differing(&origin_before, &backup.digests);
    let (ledger_changed, data_changed): (Vec<u64>, Vec<u64>) =
        to_write.iter().partition(|&&c| c < DATA_FIRST_CHUNK);
    assert_eq!(
        data_changed, corrupted,
        "outside the ledger, exactly the corrupted chunks differ from the backup"
    );
    let expected_written = (corrupted.len() + ledger_changed.len()) as u64;

    let started = c
        .backup
        .start_restore(restore_request(run, &backup.id, 0))
        .await
        .expect("start restore");
    assert!(!started.already_started);
    let last = follow_restore(&c.backup, run).await;
    assert_restore_complete(&last, &backup);
    assert_eq!(last.volume, Some(0));
    assert_eq!(last.lu, 0, "a volume is restored through its mirror LU");
    eprintln!(
        "restore: {} chunks, {} to write ({} corrupted + {} of the ledger), {} written, {} B/s",
        last.chunks_total,
        last.chunks_to_write,
        corrupted.len(),
        ledger_changed.len(),
        last.chunks_written,
        last.throughput_bytes_per_s
    );
    assert_eq!(
        last.chunks_to_write, expected_written,
        "chunks to write: the corrupted {corrupted:?} and the ledger's {ledger_changed:?}"
    );
    assert_eq!(
        last.chunks_written, expected_written,
        "only the chunks that differ are written: the corrupted {corrupted:?} and the ledger's {ledger_changed:?}"
    );

    // Both sides hold the backup: by the array's digests, and byte for
    // byte against the exported backup.
    assert_eq!(chunk_digests(&c.array, 1).await, backup.digests, "origin");
    assert_eq!(chunk_digests(&c.array, 2).await, backup.digests, "mate");
    let export = cluster.dir.join("backup.raw");
    cluster
        .export_backup(&backup.id, &export)
        .await
        .expect("export the backup");
    let exported = std::fs::read(&export).expect("read the export");
    std::fs::remove_file(&export).expect("remove the export");
    let volume = read_whole_lu(&c.array, 1).await;
    assert_same_bytes(&exported, &volume, "restored origin vs the backup");
    assert_same_bytes(
        &exported,
        &read_whole_lu(&c.array, 2).await,
        "restored mate vs the backup",
    );
    let report = ledger_format::verify_image(&volume, Some(sequence));
    assert!(
        report.ok,
        "the restored ledger at sequence {sequence}: {:?}",
        report.violations
    );
    // Still offline until EndRestore.
    assert_offline(&c.db, 0, run, true).await;

    let ended =
        c.db.end_restore(0, run, false, Some(backup.image_digest.clone()))
            .await
            .expect("end restore");
    assert!(!ended.already_ended && !ended.abandoned, "{ended:?}");
    assert!(ended.image_digest_matches, "{ended:?}");
    assert_eq!(ended.image_digest, backup.image_digest);
    assert_eq!(ended.chunks_compared, backup.digests.len() as u64);
    assert!(ended.ledger_running, "{}", ended.ledger_error);
    assert_eq!(ended.ledger_sequence, Some(sequence), "{ended:?}");
    assert_online(&c.db, 0).await;
    assert_ledger_grows_from(&c.db, sequence).await;
    assert_pair_equal_suspended(&c.db, &c.array, 1, 2).await;
    // A retry of the end answers that it had ended.
    let again =
        c.db.end_restore(0, run, false, Some(backup.image_digest.clone()))
            .await
            .expect("end restore again");
    assert!(again.already_ended, "{again:?}");
    cluster.shutdown().await.expect("shutdown");
}

/// The sum of the update location table's blocks.
fn recorded_blocks(status: &dpb::VolumeStatus) -> u64 {
    status.dirty_ranges.iter().map(|r| r.blocks).sum()
}

/// Reverse resync: while a snapshot is held and the volume is written,
/// RestoreSnapshot puts the volume back to the frozen mate by copying
/// exactly the recorded ranges. On volume 3 nothing but the test writes,
/// so the copy is exactly the table read just before; on volume 0 the
/// ledger writes too, and reopens at the snapshot's sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_resync_copies_exactly_the_recorded_ranges_back_to_the_frozen_mate() {
    let seed = harness::seed("restore::reverse_resync");
    let mut rng = SmallRng::seed_from_u64(seed);
    let cluster = ledger_cluster().await;
    let c = &cluster.clients;
    let chunk_count = LU_BYTES / CHUNK_BYTES;
    let block_count = LU_BYTES / BLOCK_BYTES;

    // Volume 3: only the test writes it.
    let filled = pick_chunks(&mut rng, 0, chunk_count, FILLED_CHUNKS);
    fill_chunks(&c.db, 3, &filled, &mut rng).await;
    let acquired =
        c.db.acquire_snapshot(3, "reverse-3")
            .await
            .expect("acquire");
    let frozen = chunk_digests(&c.array, acquired.mate_lu).await;
    for _ in 0..20 {
        let blocks = rng.random_range(1..=64u64);
        let lba = rng.random_range(0..block_count - blocks);
        let mut data = vec![0u8; (blocks * BLOCK_BYTES) as usize];
        rng.fill(&mut data[..]);
        c.db.write(3, dpb::VirtualLu::Data, lba, data)
            .await
            .expect("write volume 3");
    }
    let status = harness::volume_status(&c.db, 3).await;
    let recorded = recorded_blocks(&status);
    assert_eq!(recorded, status.dirty_blocks);
    assert!(recorded > 0);
    assert_ne!(
        chunk_digests(&c.array, 4).await,
        frozen,
        "the writes changed the origin"
    );
    let restored =
        c.db.restore_snapshot(3, "reverse-3")
            .await
            .expect("restore snapshot of volume 3");
    eprintln!(
        "seed {seed}: volume 3: {} ranges, {} blocks recorded; copied {} ranges, {} blocks, {} bytes in {} us",
        status.dirty_ranges.len(),
        recorded,
        restored.ranges_copied,
        restored.blocks_copied,
        restored.bytes_copied,
        restored.duration_us
    );
    assert!(!restored.already_restored);
    assert_eq!(restored.blocks_copied, recorded, "blocks copied = recorded");
    assert_eq!(
        restored.bytes_copied,
        recorded * BLOCK_BYTES,
        "bytes copied = the recorded ranges' blocks × block size"
    );
    assert_eq!(restored.ranges_copied, status.dirty_ranges.len() as u64);
    assert_eq!(
        chunk_digests(&c.array, 4).await,
        frozen,
        "origin == frozen mate"
    );
    assert_eq!(chunk_digests(&c.array, 5).await, frozen, "mate unchanged");
    let after = harness::volume_status(&c.db, 3).await;
    assert_eq!(after.data_mode(), dpb::Mode::Synchronized, "{after:?}");
    assert!(
        after.snapshot_lu.is_none() && after.restore.is_none(),
        "{after:?}"
    );
    assert_eq!(after.dirty_blocks, 0, "nothing left to resync: {after:?}");
    // A retry answers that it was done, and copies nothing more.
    let again =
        c.db.restore_snapshot(3, "reverse-3")
            .await
            .expect("restore snapshot again");
    assert!(again.already_restored, "{again:?}");

    // Volume 0: the ledger writes between the acquire and the restore.
    let acquired =
        c.db.acquire_snapshot(0, "reverse-0")
            .await
            .expect("acquire");
    let frozen = chunk_digests(&c.array, acquired.mate_lu).await;
    let sequence = acquired.ledger_sequence;
    let changed = pick_chunks(&mut rng, DATA_FIRST_CHUNK, chunk_count, 2);
    fill_chunks(&c.db, 0, &changed, &mut rng).await;
    wait_ledger_past(&c.db, sequence + 50).await;
    let before = harness::volume_status(&c.db, 0).await;
    let restored =
        c.db.restore_snapshot(0, "reverse-0")
            .await
            .expect("restore snapshot of volume 0");
    eprintln!(
        "volume 0: {} blocks recorded just before; copied {} ranges, {} blocks; sequence {} -> {:?}",
        recorded_blocks(&before),
        restored.ranges_copied,
        restored.blocks_copied,
        sequence,
        restored.ledger_sequence
    );
    // The ledger may write between the status and the restore's stop: the
    // table only grows.
    assert!(restored.blocks_copied >= recorded_blocks(&before));
    assert_eq!(restored.bytes_copied, restored.blocks_copied * BLOCK_BYTES);
    assert_eq!(restored.snapshot_ledger_sequence, sequence);
    assert!(restored.ledger_running, "{}", restored.ledger_error);
    assert_eq!(restored.ledger_sequence, Some(sequence), "{restored:?}");
    // The data area equals the frozen mate on both sides (the ledger's
    // chunks move on at once).
    for lu in [1, 2] {
        let now = chunk_digests(&c.array, lu).await;
        assert_eq!(
            now[DATA_FIRST_CHUNK as usize..],
            frozen[DATA_FIRST_CHUNK as usize..],
            "LU {lu} outside the ledger equals the frozen mate"
        );
    }
    assert_online(&c.db, 0).await;
    assert_ledger_grows_from(&c.db, sequence).await;
    assert_pair_equal_suspended(&c.db, &c.array, 1, 2).await;
    cluster.shutdown().await.expect("shutdown");
}

/// The refusal tests' array: mirror 0 = 1 + 2 (16 MiB), mirror 3 = 4 + 5
/// (8 MiB, another size), mirror 10 = 11 + 12 (16 MiB of 512-byte blocks,
/// another block size), and the plain LUs 20 (8 MiB) and 21 (16 MiB) that
/// the backup identity may write and the test's identity (db-server's)
/// read.
fn refusal_array() -> array_node::ArrayConfig {
    use array_node::access::GrantConfig;
    use array_node::config::{MirrorConfig, RealLuConfig};
    let lu = |id, block_size_bytes: u32, bytes: u64| RealLuConfig {
        id,
        block_size_bytes,
        block_count: bytes / u64::from(block_size_bytes),
    };
    let mirror = |mirror, origin, mate| MirrorConfig {
        mirror,
        origin,
        mate,
    };
    let grant = |identity: &str, lu, access| GrantConfig {
        identity: identity.into(),
        lu,
        access,
    };
    use array_node::Access::{Read, ReadWrite};
    use splitmirror_proto::security::role;
    let config = array_node::ArrayConfig {
        lus: vec![
            lu(1, 4096, 16 << 20),
            lu(2, 4096, 16 << 20),
            lu(4, 4096, 8 << 20),
            lu(5, 4096, 8 << 20),
            lu(11, 512, 16 << 20),
            lu(12, 512, 16 << 20),
            lu(20, 4096, 8 << 20),
            lu(21, 4096, 16 << 20),
        ],
        mirrors: vec![mirror(0, 1, 2), mirror(3, 4, 5), mirror(10, 11, 12)],
        access: Default::default(),
        grants: vec![
            grant(role::BACKUP, 20, ReadWrite),
            grant(role::BACKUP, 21, ReadWrite),
            grant(role::DB, 20, Read),
            grant(role::DB, 21, Read),
        ],
    };
    config.validate().expect("a valid array config");
    config
}

/// Gives up the restore run `run_id` of `volume`, and checks the volume is
/// back online.
async fn abandon(db: &DbClient, volume: u32, run_id: &str) {
    let ended = db
        .end_restore(volume, run_id, true, None)
        .await
        .unwrap_or_else(|e| panic!("abandoning restore run {run_id}: {e}"));
    assert!(ended.abandoned, "{ended:?}");
    assert_online(db, volume).await;
}

/// The chunk file of a directory store holding `digest`.
fn chunk_file(store: &Path, digest: &[u8; 32]) -> PathBuf {
    let hex = manifest::to_hex(digest);
    store.join("chunks").join(&hex[..3]).join(&hex)
}

/// Every refusal the issue lists, each asserting that no byte changed on
/// any LU (the 1 MiB digests of every real LU before and after): an
/// unknown backup, one of another size or block size, one with a missing
/// or a damaged chunk, the volume held by another run's snapshot or
/// another run's restore, and `to_lu` naming a mirror, origin
/// or mate LU. Then a restore elsewhere (onto a plain LU) that succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_changes_no_byte_on_any_lu() {
    let seed = harness::seed("restore::every_refusal");
    let mut rng = SmallRng::seed_from_u64(seed);
    let cluster = ClusterBuilder::new()
        .credentials(harness::credentials())
        .array_config(refusal_array())
        .ledger(None)
        .start()
        .await
        .expect("start the cluster");
    let c = &cluster.clients;
    let store = match &cluster.store {
        harness::StoreLocation::Dir(dir) => dir.clone(),
        harness::StoreLocation::S3 { .. } => panic!("a directory store"),
    };
    // Backups: volume 0 (16 MiB), volume 3 (8 MiB), volume 10 (16 MiB of
    // 512-byte blocks); nothing writes, so live backups of the mates are
    // the volumes as they are.
    // Chunks 0..12 hold data (an all-zero chunk is not stored).
    let filled: Vec<u64> = (0..12).collect();
    fill_chunks(&c.db, 0, &filled, &mut rng).await;
    fill_chunks(&c.db, 3, &pick_chunks(&mut rng, 0, 8, 4), &mut rng).await;
    c.db.write(10, dpb::VirtualLu::Data, 2048, random_chunk(&mut rng))
        .await
        .expect("write volume 10");
    let b0 = live_backup(&c.backup, 2, "backup-volume-0").await;
    let b3 = live_backup(&c.backup, 5, "backup-volume-3").await;
    let b10 = live_backup(&c.backup, 12, "backup-volume-10").await;
    // Volume 0 moves on: chunks 2 and 5 now differ from its backup (a
    // restore would write them), and hold data.
    fill_chunks(&c.db, 0, &[2, 5], &mut rng).await;
    let before = every_lu(&c.array).await;
    assert_eq!(
        before.len(),
        8,
        "every real LU is seen: {:?}",
        before.keys()
    );
    assert_eq!(differing(&before[&1], &b0.digests), [2, 5]);
    let unchanged = |what: &'static str| {
        let before = before.clone();
        let array = c.array.clone();
        async move {
            let now = every_lu(&array).await;
            for (lu, digests) in &before {
                assert_eq!(
                    differing(digests, &now[lu]),
                    Vec::<u64>::new(),
                    "{what}: LU {lu} changed at these chunks"
                );
            }
        }
    };

    // An unknown backup: NOT_FOUND, for a volume and for a plain LU.
    c.db.begin_restore(0, "r-unknown", UNKNOWN_BACKUP)
        .await
        .expect("begin restore");
    let error = c
        .backup
        .start_restore(restore_request("r-unknown", UNKNOWN_BACKUP, 0))
        .await
        .expect_err("an unknown backup");
    assert_refused(&error, ErrorKind::NotFound, None, "unknown backup");
    abandon(&c.db, 0, "r-unknown").await;
    let error = c
        .backup
        .start_restore(restore_to_lu_request("r-unknown-lu", UNKNOWN_BACKUP, 21))
        .await
        .expect_err("an unknown backup onto a plain LU");
    assert_refused(&error, ErrorKind::NotFound, None, "unknown backup, to_lu");
    unchanged("unknown backup").await;

    // Another size, another block size: FAILED_PRECONDITION.
    for (run, backup, what) in [
        ("r-size", &b3, "an 8 MiB backup onto a 16 MiB volume"),
        (
            "r-block-size",
            &b10,
            "a backup of 512-byte blocks onto 4096",
        ),
    ] {
        c.db.begin_restore(0, run, &backup.id)
            .await
            .expect("begin restore");
        let error = c
            .backup
            .start_restore(restore_request(run, &backup.id, 0))
            .await
            .expect_err(what);
        assert_refused(&error, ErrorKind::FailedPrecondition, None, what);
        abandon(&c.db, 0, run).await;
    }
    for (run, backup, lu, what) in [
        (
            "r-size-lu-20",
            &b0,
            20,
            "a 16 MiB backup onto the 8 MiB LU 20",
        ),
        (
            "r-size-lu-21",
            &b3,
            21,
            "an 8 MiB backup onto the 16 MiB LU 21",
        ),
        ("r-block-size-lu", &b10, 21, "512-byte blocks onto LU 21"),
    ] {
        let error = c
            .backup
            .start_restore(restore_to_lu_request(run, &backup.id, lu))
            .await
            .expect_err(what);
        assert_refused(&error, ErrorKind::FailedPrecondition, None, what);
    }
    unchanged("another size or block size").await;

    // A chunk missing from the store: DATA_LOSS at StartRestore.
    let missing = chunk_file(&store, &b0.digests[5]);
    let kept = std::fs::read(&missing).expect("read the chunk file");
    std::fs::remove_file(&missing).expect("remove the chunk file");
    c.db.begin_restore(0, "r-missing", &b0.id)
        .await
        .expect("begin restore");
    let error = c
        .backup
        .start_restore(restore_request("r-missing", &b0.id, 0))
        .await
        .expect_err("a backup with a missing chunk");
    assert_refused(&error, ErrorKind::DataLoss, None, "missing chunk");
    abandon(&c.db, 0, "r-missing").await;
    std::fs::write(&missing, &kept).expect("put the chunk file back");
    unchanged("missing chunk").await;

    // A damaged chunk that must be written: the job fails CHUNK_DAMAGED
    // before its first write.
    let damaged = chunk_file(&store, &b0.digests[2]);
    let kept = std::fs::read(&damaged).expect("read the chunk file");
    let mut bad = kept.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0xFF;
    bad[middle + 1] ^= 0x55;
    std::fs::write(&damaged, &bad).expect("damage the chunk file");
    c.db.begin_restore(0, "r-damaged", &b0.id)
        .await
        .expect("begin restore");
    c.backup
        .start_restore(restore_request("r-damaged", &b0.id, 0))
        .await
        .expect("start restore");
    let last = follow_restore(&c.backup, "r-damaged").await;
    assert_eq!(
        (last.state(), last.failure()),
        (bpb::RestoreState::Failed, bpb::RestoreFailure::ChunkDamaged),
        "{last:?}"
    );
    assert_eq!(
        (last.chunks_written, last.bytes_written),
        (0, 0),
        "{last:?}"
    );
    assert!(!last.verified);
    assert_offline(&c.db, 0, "r-damaged", false).await;
    abandon(&c.db, 0, "r-damaged").await;
    std::fs::write(&damaged, &kept).expect("put the chunk file back");
    unchanged("damaged chunk").await;

    // Another run's snapshot: snapshot-held.
    c.db.acquire_snapshot(0, "other-run")
        .await
        .expect("acquire");
    let error =
        c.db.begin_restore(0, "r-snapshot", &b0.id)
            .await
            .expect_err("a snapshot held");
    assert_refused(
        &error,
        ErrorKind::FailedPrecondition,
        Some(Reason::SnapshotHeld),
        "snapshot held",
    );
    let error = c
        .backup
        .start_restore(restore_request("r-snapshot", &b0.id, 0))
        .await
        .expect_err("a volume not offline for the run");
    assert_refused(
        &error,
        ErrorKind::FailedPrecondition,
        None,
        "not offline for the run",
    );
    c.db.delete_snapshot(0, "other-run", false)
        .await
        .expect("delete");
    harness::wait_synchronized(&c.db, 0).await;
    unchanged("snapshot held").await;

    // Another run's restore: restore-held, for BeginRestore, EndRestore,
    // AcquireSnapshot; and the backup server will not write for it.
    c.db.begin_restore(0, "r-one", &b0.id)
        .await
        .expect("begin restore");
    let error =
        c.db.begin_restore(0, "r-two", &b0.id)
            .await
            .expect_err("another run's restore");
    assert_refused(
        &error,
        ErrorKind::FailedPrecondition,
        Some(Reason::RestoreHeld),
        "begin, restore held",
    );
    let error =
        c.db.end_restore(0, "r-two", false, None)
            .await
            .expect_err("another run's restore");
    assert_refused(
        &error,
        ErrorKind::FailedPrecondition,
        Some(Reason::RestoreHeld),
        "end, restore held",
    );
    let error =
        c.db.acquire_snapshot(0, "r-two")
            .await
            .expect_err("a restore holds the volume");
    assert_refused(
        &error,
        ErrorKind::FailedPrecondition,
        Some(Reason::RestoreHeld),
        "acquire, restore held",
    );
    let error = c
        .backup
        .start_restore(restore_request("r-two", &b0.id, 0))
        .await
        .expect_err("the volume is offline for another run");
    assert_refused(
        &error,
        ErrorKind::FailedPrecondition,
        None,
        "start for another run",
    );
    let again =
        c.db.begin_restore(0, "r-one", &b0.id)
            .await
            .expect("begin restore again");
    assert!(again.already_restoring, "{again:?}");
    abandon(&c.db, 0, "r-one").await;
    unchanged("restore held").await;

    // Restore elsewhere, onto the plain LU 20: it holds the 8 MiB backup of
    // volume 3, and no other LU changed.
    let lus_before = every_lu(&c.array).await;
    c.backup
        .start_restore(restore_to_lu_request("r-elsewhere", &b3.id, 20))
        .await
        .expect("restore onto LU 20");
    let last = follow_restore(&c.backup, "r-elsewhere").await;
    assert_restore_complete(&last, &b3);
    assert_eq!((last.lu, last.volume), (20, None));
    let to_write = differing(&lus_before[&20], &b3.digests).len() as u64;
    assert_eq!(last.chunks_written, to_write, "{last:?}");
    assert_eq!(chunk_digests(&c.array, 20).await, b3.digests);
    let mut now = every_lu(&c.array).await;
    now.remove(&20);
    for (lu, digests) in &now {
        assert_eq!(
            &lus_before[lu], digests,
            "restore elsewhere: LU {lu} changed"
        );
    }
    // `to_lu` naming an LU of a pair: INVALID_ARGUMENT, with a backup of
    // the right size, so that the kind of the LU is the only fault.
    let mut wrong = Vec::new();
    for (lus, backup) in [([0, 1, 2], &b0), ([3, 4, 5], &b3), ([10, 11, 12], &b10)] {
        for lu in lus {
            match c
                .backup
                .start_restore(restore_to_lu_request(&format!("r-to-{lu}"), &backup.id, lu))
                .await
            {
                Err(error) if error.kind == ErrorKind::InvalidArgument => {}
                other => wrong.push(format!("to_lu {lu}: {other:?}")),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "to_lu naming an LU of a pair must be INVALID_ARGUMENT: {wrong:#?}"
    );
    // Nothing changed since the restore elsewhere (LU 20 holds the backup).
    let after = every_lu(&c.array).await;
    for (lu, digests) in &after {
        let expected = if *lu == 20 {
            &b3.digests
        } else {
            &lus_before[lu]
        };
        assert_eq!(
            differing(expected, digests),
            Vec::<u64>::new(),
            "to_lu of a pair: LU {lu} changed at these chunks"
        );
    }

    cluster.shutdown().await.expect("shutdown");
}

/// BeginRestore of a resynchronizing pair is refused (resynchronizing),
/// and changes nothing: the resync goes on and ends with origin as it was
/// and mate equal to it. The resync is slowed to 1 MiB/s so that the pair
/// is seen resynchronizing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_restore_of_a_resynchronizing_pair_is_refused() {
    let seed = harness::seed("restore::resynchronizing");
    let mut rng = SmallRng::seed_from_u64(seed);
    let cluster = ClusterBuilder::new()
        .credentials(harness::credentials())
        .lu_size_bytes(8 << 20)
        .manager(ManagerConfig {
            resync_max_bytes_per_s: Some(1 << 20),
            ..ManagerConfig::default()
        })
        .ledger(None)
        .start()
        .await
        .expect("start the cluster");
    let c = &cluster.clients;
    let b3 = live_backup(&c.backup, 5, "backup-volume-3").await;
    let before = every_lu(&c.array).await;
    // The pair resynchronizing (slowly: 1 MiB/s): resynchronizing.
    c.db.acquire_snapshot(3, "resync-run")
        .await
        .expect("acquire");
    fill_chunks(&c.db, 3, &[0, 1, 2, 3, 4], &mut rng).await;
    c.db.delete_snapshot(3, "resync-run", false)
        .await
        .expect("delete");
    let origin_3 = chunk_digests(&c.array, 4).await;
    let error =
        c.db.begin_restore(3, "r-resync", &b3.id)
            .await
            .expect_err("a resynchronizing pair");
    assert_refused(
        &error,
        ErrorKind::FailedPrecondition,
        Some(Reason::Resynchronizing),
        "resynchronizing",
    );
    let status = harness::volume_status(&c.db, 3).await;
    assert_eq!(
        status.data_mode(),
        dpb::Mode::Resynchronizing,
        "still resynchronizing after the refusal: {status:?}"
    );
    assert!(status.restore.is_none(), "{status:?}");
    harness::wait_synchronized(&c.db, 3).await;
    assert_eq!(chunk_digests(&c.array, 4).await, origin_3, "origin 3");
    assert_eq!(
        chunk_digests(&c.array, 5).await,
        origin_3,
        "mate 3 resynced"
    );
    let mut now = every_lu(&c.array).await;
    now.remove(&4);
    now.remove(&5);
    for (lu, digests) in &now {
        assert_eq!(&before[lu], digests, "resynchronizing: LU {lu} changed");
    }
    cluster.shutdown().await.expect("shutdown");
}

/// A whole LU's 1 MiB chunk digests.
type ChunkDigests = [[u8; 32]];

/// The crash test's LUs: 32 MiB, so that a kill and a re-run take a moment.
const PROCESS_LU_SIZE: &str = "32MiB";
/// db-server's ledger as a process (200 accounts, its default 4096-block
/// log: about 17 MiB) lies in chunks 0..=16; the crash test corrupts
/// chunks from here on.
const PROCESS_DATA_FIRST_CHUNK: u64 = 20;
/// db-server's flags in the crash test: a small, slow ledger (2 cores).
const PROCESS_DB_ARGS: [&str; 6] = [
    "--workload-tps",
    "200",
    "--workload-workers",
    "2",
    "--accounts",
    "200",
];

/// Three nodes as processes, each restartable at its address.
struct Processes {
    dir: tempfile::TempDir,
    _array: harness::NodeProcess,
    array_addr: String,
    db: harness::NodeProcess,
    db_addr: String,
    backup: harness::NodeProcess,
    backup_addr: String,
}

impl Processes {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let array =
            harness::array_process(&dir.path().join("array"), PROCESS_LU_SIZE, "127.0.0.1:0");
        let array_addr = array.addr.clone();
        let db = harness::db_process(&dir.path().join("db"), &array_addr, &PROCESS_DB_ARGS, &[]);
        let db_addr = db.addr.clone();
        let backup = harness::backup_process(
            "127.0.0.1:0",
            &dir.path().join("store"),
            &array_addr,
            &db_addr,
            &[],
        );
        let backup_addr = backup.addr.clone();
        Self {
            dir,
            _array: array,
            array_addr,
            db,
            db_addr,
            backup,
            backup_addr,
        }
    }

    /// kill -9 of db-server, and a new one at the same address, with
    /// `crash_at` armed if given.
    fn restart_db(&mut self, crash_at: Option<&str>) {
        self.db.kill9();
        let env: Vec<(&str, &str)> = crash_at
            .map(|point| ("SPLITMIRROR_CRASH_AT", point))
            .into_iter()
            .collect();
        self.db = harness::db_process_at(
            &self.db_addr,
            &self.dir.path().join("db"),
            &self.array_addr,
            &PROCESS_DB_ARGS,
            &env,
        );
    }

    /// kill -9 of the backup server, and a new one at the same address.
    fn restart_backup(&mut self, crash_at: Option<&str>) {
        self.backup.kill9();
        let env: Vec<(&str, &str)> = crash_at
            .map(|point| ("SPLITMIRROR_CRASH_AT", point))
            .into_iter()
            .collect();
        self.backup = harness::backup_process(
            &self.backup_addr,
            &self.dir.path().join("store"),
            &self.array_addr,
            &self.db_addr,
            &env,
        );
    }

    fn db(&self) -> DbClient {
        harness::db_client(&self.db.url())
    }

    fn backup(&self) -> BackupClient {
        harness::backup_client(&self.backup.url())
    }

    fn array(&self) -> ArrayClient {
        harness::array_client(&format!("http://{}", self.array_addr))
    }
}

/// Waits (bounded) until the process stops at the armed crash point.
#[track_caller]
fn assert_crashed_at(node: &mut harness::NodeProcess, point: &str) {
    assert!(
        node.wait_exit(Duration::from_secs(20)).is_some(),
        "the node did not stop at {point}"
    );
    assert!(
        node.logged(&format!("crash point {point} reached")),
        "stopped elsewhere than {point}: {:?}",
        node.log
    );
}

/// Follows a restore until it ends or its server goes away; answers the
/// last progress seen.
async fn watch_until_gone(backup: &BackupClient, run_id: &str) -> Option<bpb::RestoreProgress> {
    use futures_util::StreamExt;
    let mut stream = backup.watch_restore(run_id).await.ok()?;
    let mut last = None;
    while let Ok(Some(Ok(progress))) =
        tokio::time::timeout(Duration::from_secs(60), stream.next()).await
    {
        last = Some(progress);
    }
    last
}

/// After a crash during the restore run `run_id` of `backup` and the
/// restart: if db-server still has the volume offline for the run, it is
/// not served (no Read or Write, no ledger) and the same run again (begin,
/// start, end) completes it and verifies; if the restore had ended before
/// the crash, the volume held the backup when db-server died
/// (`at_crash`: origin's and mate's digests then) and the end answers so.
/// Either way the volume comes back online with the ledger from the
/// backup's sequence, origin == mate.
async fn rerun_restore(
    p: &Processes,
    run_id: &str,
    backup: &Backup,
    at_crash: Option<(&ChunkDigests, &ChunkDigests)>,
    must_be_offline: bool,
) -> Option<bpb::RestoreProgress> {
    let (db, backups, array) = (p.db(), p.backup(), p.array());
    let sequence = backup.ledger_sequence.expect("the backup's sequence");
    let status = harness::volume_status(&db, 0).await;
    let rerun = if status.restore.is_some() {
        assert_offline(&db, 0, run_id, true).await;
        let begun = db
            .begin_restore(0, run_id, &backup.id)
            .await
            .expect("begin restore again");
        assert!(begun.already_restoring, "the same run: {begun:?}");
        backups
            .start_restore(restore_request(run_id, &backup.id, 0))
            .await
            .expect("start restore again");
        let last = follow_restore(&backups, run_id).await;
        assert_restore_complete(&last, backup);
        assert_eq!(chunk_digests(&array, 1).await, backup.digests, "origin");
        assert_eq!(chunk_digests(&array, 2).await, backup.digests, "mate");
        assert_offline(&db, 0, run_id, true).await;
        let ended = db
            .end_restore(0, run_id, false, Some(backup.image_digest.clone()))
            .await
            .expect("end restore");
        assert!(ended.image_digest_matches, "{ended:?}");
        assert!(ended.ledger_running, "{}", ended.ledger_error);
        assert_eq!(ended.ledger_sequence, Some(sequence), "{ended:?}");
        Some(last)
    } else {
        assert!(
            !must_be_offline,
            "the restore was journaled before the crash, yet the volume is online: {status:?}"
        );
        let (origin, mate) = at_crash.expect("the digests at the crash");
        assert_eq!(origin, backup.digests, "online after the crash: origin");
        assert_eq!(mate, backup.digests, "online after the crash: mate");
        let ended = db
            .end_restore(0, run_id, false, Some(backup.image_digest.clone()))
            .await
            .expect("end restore after the restart");
        assert!(ended.already_ended, "{ended:?}");
        None
    };
    assert_online(&db, 0).await;
    assert_ledger_grows_from(&db, sequence).await;
    assert_pair_equal_suspended(&db, &array, 1, 2).await;
    rerun
}

/// kill -9 at each named point of a restore — db-server in BeginRestore
/// (after the journal, after the grant), in EndRestore (after the
/// journal), in the reverse resync (after the copy); the backup server
/// after its first write and before its verification — then the node
/// restarted and the same run again: the volume is never served half
/// restored, and the run completes and verifies. One set of processes;
/// the node under test is restarted with the point armed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_restore_crash_point_the_same_run_completes_it() {
    let seed = harness::seed("restore::killed_at_every_restore_crash_point");
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut p = Processes::start();
    let chunk_count = (32u64 << 20) / CHUNK_BYTES;
    harness::wait_all_synchronized(&p.db()).await;
    wait_ledger_past(&p.db(), 20).await;
    let backup = frozen_backup(&p.db(), &p.backup(), 0, "crash-backup").await;
    let sequence = backup.ledger_sequence.expect("a frozen backup's sequence");
    eprintln!("seed {seed}: backup {} at sequence {sequence}", backup.id);

    for point in [
        "restore.after_journal",
        "restore.after_grant",
        "end_restore.after_journal",
    ] {
        p.restart_db(Some(point));
        harness::wait_synchronized(&p.db(), 0).await;
        assert_ledger_grows_from(&p.db(), sequence).await;
        let corrupted = pick_chunks(&mut rng, PROCESS_DATA_FIRST_CHUNK, chunk_count, 3);
        corrupt_chunks(&p.array(), 0, &corrupted, &mut rng).await;
        let run = format!("crash-{point}");
        let (db, backups) = (p.db(), p.backup());
        let crashed_in_begin = db.begin_restore(0, &run, &backup.id).await.is_err();
        if !crashed_in_begin {
            backups
                .start_restore(restore_request(&run, &backup.id, 0))
                .await
                .expect("start restore");
            assert_restore_complete(&follow_restore(&backups, &run).await, &backup);
            db.end_restore(0, &run, false, Some(backup.image_digest.clone()))
                .await
                .expect_err("db-server stops in EndRestore");
        }
        assert_crashed_at(&mut p.db, point);
        let origin = chunk_digests(&p.array(), 1).await;
        let mate = chunk_digests(&p.array(), 2).await;
        p.restart_db(None);
        let rerun = rerun_restore(
            &p,
            &run,
            &backup,
            Some((&origin, &mate)),
            point.starts_with("restore."),
        )
        .await;
        eprintln!(
            "{point}: crashed in {}, re-run {}",
            if crashed_in_begin {
                "BeginRestore"
            } else {
                "EndRestore"
            },
            rerun.map_or("not needed (ended before the crash)".to_string(), |last| {
                format!("wrote {} chunks", last.chunks_written)
            })
        );
    }

    for point in ["restore.after_first_write", "restore.before_verify"] {
        p.restart_backup(Some(point));
        let corrupted = pick_chunks(&mut rng, PROCESS_DATA_FIRST_CHUNK, chunk_count, 3);
        corrupt_chunks(&p.array(), 0, &corrupted, &mut rng).await;
        let run = format!("crash-{point}");
        let (db, backups) = (p.db(), p.backup());
        db.begin_restore(0, &run, &backup.id)
            .await
            .expect("begin restore");
        let differed = differing(&chunk_digests(&p.array(), 1).await, &backup.digests);
        assert!(differed.len() >= corrupted.len(), "{differed:?}");
        // The job may die before the answer or after it.
        let _ = backups
            .start_restore(restore_request(&run, &backup.id, 0))
            .await;
        let last = watch_until_gone(&backups, &run).await;
        assert!(
            last.as_ref()
                .is_none_or(|l| l.state() != bpb::RestoreState::Complete),
            "the job completed despite {point}: {last:?}"
        );
        assert_crashed_at(&mut p.backup, point);
        // Offline, not served, while the restore is unfinished.
        assert_offline(&db, 0, &run, true).await;
        let origin = chunk_digests(&p.array(), 1).await;
        assert_eq!(origin, chunk_digests(&p.array(), 2).await, "origin == mate");
        let left = differing(&origin, &backup.digests);
        eprintln!(
            "{point}: {} of {} chunks still differ at the crash",
            left.len(),
            differed.len()
        );
        if point == "restore.after_first_write" {
            assert!(
                left.len() < differed.len(),
                "the first write reached the array"
            );
        } else {
            assert!(
                left.is_empty(),
                "before the verification every chunk is written"
            );
        }
        if !left.is_empty() {
            let error = db
                .end_restore(0, &run, false, Some(backup.image_digest.clone()))
                .await
                .expect_err("a half-restored volume does not end");
            assert_refused(
                &error,
                ErrorKind::FailedPrecondition,
                Some(Reason::RestoreIncomplete),
                "ending a half-restored volume",
            );
            assert_offline(&db, 0, &run, true).await;
        }
        p.restart_backup(None);
        let rerun = rerun_restore(&p, &run, &backup, None, true)
            .await
            .expect("the restore re-run");
        assert_eq!(
            rerun.chunks_written,
            left.len() as u64,
            "the re-run writes exactly what still differed: {rerun:?}"
        );
    }

    // The reverse resync, killed after its copy.
    let point = "reverse.after_copy";
    p.restart_db(Some(point));
    harness::wait_synchronized(&p.db(), 0).await;
    let db = p.db();
    let run = "crash-reverse";
    let acquired = db.acquire_snapshot(0, run).await.expect("acquire");
    let frozen = chunk_digests(&p.array(), acquired.mate_lu).await;
    let changed = pick_chunks(&mut rng, PROCESS_DATA_FIRST_CHUNK, chunk_count, 2);
    fill_chunks(&db, 0, &changed, &mut rng).await;
    wait_ledger_past(&db, acquired.ledger_sequence + 20).await;
    db.restore_snapshot(0, run)
        .await
        .expect_err("db-server stops after the copy");
    assert_crashed_at(&mut p.db, point);
    p.restart_db(None);
    let db = p.db();
    let status = harness::volume_status(&db, 0).await;
    if status.restore.is_some() {
        // Not yet finished by the restart: not served meanwhile.
        assert_offline(&db, 0, run, true).await;
    }
    let restored = db
        .restore_snapshot(0, run)
        .await
        .expect("restore snapshot again");
    eprintln!("{point}: after the restart, the same run answers {restored:?}");
    assert_eq!(restored.snapshot_ledger_sequence, acquired.ledger_sequence);
    assert!(restored.ledger_running, "{}", restored.ledger_error);
    if !restored.already_restored {
        assert_eq!(restored.ledger_sequence, Some(acquired.ledger_sequence));
    }
    assert_online(&db, 0).await;
    assert_ledger_grows_from(&db, acquired.ledger_sequence).await;
    for lu in [1, 2] {
        let now = chunk_digests(&p.array(), lu).await;
        assert_eq!(
            now[PROCESS_DATA_FIRST_CHUNK as usize..],
            frozen[PROCESS_DATA_FIRST_CHUNK as usize..],
            "LU {lu} outside the ledger equals the frozen mate"
        );
    }
    assert_pair_equal_suspended(&db, &p.array(), 1, 2).await;
}

/// The operator's path, through the console's restore (what `console
/// restore --volume 0 --backup-id ID` runs): a safety backup of the corrupted
/// volume first, then the last backup written back, verified, the ledger
/// reopened at the backup's sequence and running on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_restores_the_last_backup_after_a_safety_backup() {
    use splitmirror_console::progress::Quiet;
    use splitmirror_console::restore::{self as console_restore, RestoreRequest};
    let seed = harness::seed("restore::the_console_restores_the_last_backup");
    let mut rng = SmallRng::seed_from_u64(seed);
    let cluster = ledger_cluster().await;
    let c = &cluster.clients;
    let chunk_count = LU_BYTES / CHUNK_BYTES;
    let filled = pick_chunks(&mut rng, DATA_FIRST_CHUNK, chunk_count, FILLED_CHUNKS);
    fill_chunks(&c.db, 0, &filled, &mut rng).await;
    cluster
        .wait_for_transactions(50, Duration::from_secs(30))
        .await
        .expect("the ledger writes");
    let backup = frozen_backup(&c.db, &c.backup, 0, "console-backup").await;
    let sequence = backup.ledger_sequence.expect("a frozen backup's sequence");
    wait_ledger_past(&c.db, sequence + 20).await;
    let corrupted = pick_chunks(&mut rng, DATA_FIRST_CHUNK, chunk_count, CORRUPTED_CHUNKS);
    let mut corrupt_digests = Vec::new();
    for &chunk in &corrupted {
        let data = random_chunk(&mut rng);
        corrupt_digests.push(*blake3::hash(&data).as_bytes());
        c.array
            .write(0, chunk * CHUNK_BYTES / BLOCK_BYTES, data)
            .await
            .expect("corrupt a chunk");
    }

    let report = console_restore::restore(c, &RestoreRequest::volume(0, &backup.id), &Quiet)
        .await
        .unwrap_or_else(|e| panic!("console restore: {e}"));
    eprintln!("seed {seed}: corrupted {corrupted:?}\n{}", report.render());
    assert!(report.succeeded(), "{report:?}");
    assert!(report.verified && !report.already_restoring, "{report:?}");
    assert_eq!(report.backup_id, backup.id);
    assert_eq!(report.volume, Some(0));
    assert_eq!(report.backup_ledger_sequence, Some(sequence));
    assert_eq!(report.chunks_total, chunk_count);
    // The corrupted chunks, and at most the ledger's own chunks.
    assert!(
        report.chunks_written >= corrupted.len() as u64
            && report.chunks_written <= corrupted.len() as u64 + DATA_FIRST_CHUNK,
        "{} chunks written for {} corrupted",
        report.chunks_written,
        corrupted.len()
    );
    assert_eq!(report.chunks_written, report.chunks_to_write);
    assert_eq!(report.bytes_written, report.chunks_written * CHUNK_BYTES);
    let end = report.end.as_ref().expect("EndRestore's check");
    assert!(end.image_digest_matches, "{end:?}");
    let image_digest: [u8; 32] = backup.image_digest.as_slice().try_into().expect("32 bytes");
    assert_eq!(end.image_digest, manifest::to_hex(&image_digest));
    assert!(report.ledger_running, "{:?}", report.ledger_error);
    assert_eq!(report.ledger_sequence, Some(sequence));

    // The safety backup holds the volume as it was: the corrupted chunks.
    let safety_id = report
        .safety_backup
        .backup_id()
        .unwrap_or_else(|| panic!("a safety backup: {:?}", report.safety_backup));
    let safety = backup_of(&c.backup, safety_id).await;
    for (chunk, digest) in corrupted.iter().zip(&corrupt_digests) {
        assert_eq!(
            &safety.digests[*chunk as usize], digest,
            "the safety backup holds corrupted chunk {chunk}"
        );
    }
    // Outside the ledger's chunks, both sides hold the backup.
    for lu in [1, 2] {
        let now = chunk_digests(&c.array, lu).await;
        assert_eq!(
            now[DATA_FIRST_CHUNK as usize..],
            backup.digests[DATA_FIRST_CHUNK as usize..],
            "LU {lu} outside the ledger equals the backup"
        );
    }
    assert_online(&c.db, 0).await;
    assert_ledger_grows_from(&c.db, sequence).await;
    assert_pair_equal_suspended(&c.db, &c.array, 1, 2).await;
    cluster.shutdown().await.expect("shutdown");
}

fn console_output(args: &[String]) -> std::process::Output {
    harness::command("console")
        .args(args)
        .env_remove("SPLITMIRROR_DB")
        .env_remove("SPLITMIRROR_BACKUP")
        .env_remove("SPLITMIRROR_ARRAY")
        .output()
        .expect("run the console")
}

/// The CLI: `console restore --help` explains the safety backup and
/// --force; a restore of a backup that does not exist, against a running
/// cluster, exits non-zero naming the backup, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_restore_help_and_an_unknown_backup() {
    let help = tokio::task::spawn_blocking(|| {
        console_output(&["restore".to_string(), "--help".to_string()])
    })
    .await
    .expect("console task");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success(), "{text}");
    assert!(text.contains("safety backup"), "{text}");
    assert!(text.contains("--force"), "{text}");
    assert!(text.contains("--no-safety-backup"), "{text}");

    let cluster = ClusterBuilder::new()
        .credentials(harness::credentials())
        .lu_size_bytes(4 << 20)
        .ledger(None)
        .start()
        .await
        .expect("start the cluster");
    let before = every_lu(&cluster.clients.array).await;
    let a = cluster.addresses();
    let args: Vec<String> = [
        "--array",
        &a.array,
        "--db",
        &a.db,
        "--backup",
        &a.backup,
        "restore",
        "--volume",
        "0",
        "--backup-id",
        UNKNOWN_BACKUP,
    ]
    .map(str::to_string)
    .to_vec();
    let out = tokio::task::spawn_blocking(move || console_output(&args))
        .await
        .expect("console task");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "console restore of an unknown backup: {:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains(UNKNOWN_BACKUP) || stdout.contains(UNKNOWN_BACKUP),
        "the message names the backup: {stdout}{stderr}"
    );
    let status = harness::volume_status(&cluster.clients.db, 0).await;
    assert!(status.restore.is_none(), "not taken offline: {status:?}");
    assert_eq!(every_lu(&cluster.clients.array).await, before);
    cluster.shutdown().await.expect("shutdown");
}
