//! Backups as generations in the chunk store (issue 16): ten generations of
//! a volume the ledger keeps writing, on a directory and on a real S3
//! server (s3s-fs), each export equal to its frozen mate byte for byte and
//! the store holding about one copy plus the changes; `verify_read`; the
//! faults (an unknown or corrupt index, a missing chunk, S3 unreachable or
//! refusing, kill -9 mid-backup and the grace period of garbage
//! collection); and the conversion of raw-image backups of earlier
//! versions.
//!
//! The oracles are independent of the backup server: the frozen mate LU as
//! the array reads it, the ledger's own verifier, the store's files (an
//! index is `indexes/<id>.json`, a chunk `chunks/<3 hex>/<64 hex>`, an S3
//! object the file `BUCKET/PREFIX/KEY` of s3s-fs).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use backup_server::blobs::BlobError;
use backup_server::manifest::{self, Manifest};
use backup_server::s3::{S3Args, S3Credentials};
use backup_server::store::{ChunkStore, StoreError};
use backup_server::{BackupServerConfig, SpawnError};
use db_server::ledger::LedgerConfig;
use db_server::ledger_format;
use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use splitmirror_console::cluster::{Cluster, ClusterBuilder};
use splitmirror_proto::backup::v1 as bpb;
use splitmirror_proto::db::v1 as dpb;
use splitmirror_proto::security::role;

use crate::harness::{
    self, ArrayClient, BackupClient, DEFAULT_GC_GRACE, DbClient, ErrorKind, NO_DB, NodeProcess,
    StoreLocation, follow_backup,
};
use crate::s3_server::S3Server;

const CHUNK_BYTES: u64 = backup_server::store::CHUNK_SIZE_BYTES;
/// The ten generations' volume: small, so that ten of them are quick.
const GENERATIONS_LU_BYTES: u64 = 64 << 20;
const GENERATIONS: usize = 10;
/// The ledger's blocks (superblock, 200 accounts, a 256-block log: under
/// 2 MiB) lie in the first chunks; the data this test writes starts here,
/// clear of them.
const DATA_FIRST_CHUNK: u64 = 8;
/// Chunks of random data written before the first generation; the other
/// chunks of the data area stay zero.
const FILLED_CHUNKS: usize = 40;
/// Chunks of the data area rewritten before each later generation (the
/// ledger changes its own chunks as well).
const CHANGED_CHUNKS: usize = 2;
/// Blocks read from the array at once when the frozen mate is read back.
const READ_PIECE_BLOCKS: u64 = 1024;

fn ledger_config() -> LedgerConfig {
    LedgerConfig {
        volume: 0,
        accounts: 200,
        workers: 2,
        target_tps: 500,
        log_blocks: 256,
        ..LedgerConfig::default()
    }
}

/// A frozen backup of the snapshot `holder` holds on `volume`, started by
/// `run_id`.
fn frozen_request(
    run_id: &str,
    acquired: &dpb::AcquireSnapshotResponse,
    holder: &str,
    verify_read: bool,
) -> bpb::StartBackupRequest {
    bpb::StartBackupRequest {
        run_id: run_id.into(),
        lu: acquired.mate_lu,
        expected_block_count: Some(acquired.block_count),
        label: format!("generations test: {run_id}"),
        snapshot: Some(bpb::SnapshotRef {
            mate: 0,
            volume: acquired.volume,
            holder_run_id: holder.into(),
        }),
        verify_read,
        ..Default::default()
    }
}

/// A live backup of `lu` (for tests without db-server).
fn live_request(run_id: &str, lu: u32) -> bpb::StartBackupRequest {
    bpb::StartBackupRequest {
        run_id: run_id.into(),
        lu,
        label: format!("generations test: {run_id}"),
        live: true,
        ..Default::default()
    }
}

/// Starts a backup, follows it to the end and answers its info (with the
/// manifest's counts); panics unless it completed.
async fn complete_backup(
    client: &BackupClient,
    request: bpb::StartBackupRequest,
) -> bpb::BackupInfo {
    let run_id = request.run_id.clone();
    let id = client
        .start_backup(request)
        .await
        .unwrap_or_else(|e| panic!("starting backup {run_id}: {e}"))
        .backup_id;
    let last = follow_backup(client, &id).await;
    assert_eq!(
        last.state(),
        bpb::BackupState::Complete,
        "backup {run_id}: {}",
        last.error
    );
    client.get_backup(&id, false).await.expect("get backup")
}

fn counts_of(info: &bpb::BackupInfo) -> (bpb::ChunkCounts, u64) {
    let manifest = info
        .manifest
        .as_ref()
        .expect("a complete backup's manifest");
    (
        manifest.counts.expect("chunk counts in the manifest"),
        manifest.chunk_count,
    )
}

/// Writes new random data over whole chunks of volume 0 through
/// db-server, so that origin and mate both change.
async fn write_chunks(db: &DbClient, chunks: &[u64], block_size_bytes: u64, rng: &mut SmallRng) {
    for &chunk in chunks {
        let mut data = vec![0u8; CHUNK_BYTES as usize];
        rng.fill(&mut data[..]);
        db.write(
            0,
            dpb::VirtualLu::Data,
            chunk * CHUNK_BYTES / block_size_bytes,
            data,
        )
        .await
        .unwrap_or_else(|e| panic!("writing chunk {chunk} of volume 0: {e}"));
    }
}

/// Writes random data over the first `bytes` of real LU `lu` through the
/// array (for tests without db-server).
async fn fill_lu(client: &ArrayClient, lu: u32, bytes: u64, rng: &mut SmallRng) {
    let mut at = 0;
    while at < bytes {
        let len = (bytes - at).min(8 << 20);
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data[..]);
        client
            .write(lu, at / 4096, data)
            .await
            .unwrap_or_else(|e| panic!("filling LU {lu} at byte {at}: {e}"));
        at += len;
    }
}

/// The whole LU, read through the array in pieces.
async fn read_whole_lu(client: &ArrayClient, lu: u32, block_count: u64) -> Vec<u8> {
    let mut image = Vec::new();
    let mut lba = 0;
    while lba < block_count {
        let blocks = (block_count - lba).min(READ_PIECE_BLOCKS);
        image.extend(harness::read_lu(client, lu, lba, blocks).await);
        lba += blocks;
    }
    image
}

/// Byte-for-byte equality, naming the first chunk that differs instead of
/// printing megabytes.
fn assert_same_bytes(expected: &[u8], actual: &[u8], what: &str) {
    assert_eq!(
        expected.len(),
        actual.len(),
        "{what}: {} bytes expected, {} found",
        expected.len(),
        actual.len()
    );
    if let Some(chunk) = expected
        .chunks(CHUNK_BYTES as usize)
        .zip(actual.chunks(CHUNK_BYTES as usize))
        .position(|(e, a)| e != a)
    {
        panic!("{what}: chunk {chunk} differs");
    }
}

/// One generation's figures, for the table.
struct Generation {
    sequence: u64,
    chunk_count: u64,
    counts: bpb::ChunkCounts,
}

/// Ten generations of volume 0 while the ledger writes it, in the store at
/// `store` (the cluster's directory when `None`): each export equals the
/// frozen mate byte for byte and holds a ledger that verifies at its
/// snapshot's sequence; the store holds one copy plus the changes.
async fn ten_generations(test: &str, store: Option<StoreLocation>) {
    let started = Instant::now();
    let seed = harness::seed(test);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut builder = ClusterBuilder::new()
        .credentials(harness::credentials())
        .lu_size_bytes(GENERATIONS_LU_BYTES)
        .ledger(Some(ledger_config()));
    if let Some(store) = store {
        builder = builder.store(store);
    }
    let cluster = builder.start().await.expect("start the cluster");
    let clients = &cluster.clients;
    let block_size_bytes = u64::from(
        clients
            .array
            .mode_sense(2)
            .await
            .expect("mode sense")
            .block_size_bytes,
    );
    let data_area: Vec<u64> = (DATA_FIRST_CHUNK..GENERATIONS_LU_BYTES / CHUNK_BYTES).collect();
    let pick = |rng: &mut SmallRng, amount: usize| -> Vec<u64> {
        sample(rng, data_area.len(), amount)
            .into_iter()
            .map(|i| data_area[i])
            .collect()
    };
    let filled = pick(&mut rng, FILLED_CHUNKS);
    write_chunks(&clients.db, &filled, block_size_bytes, &mut rng).await;

    let mut generations = Vec::new();
    for generation in 0..GENERATIONS {
        if generation > 0 {
            let changed = pick(&mut rng, CHANGED_CHUNKS);
            write_chunks(&clients.db, &changed, block_size_bytes, &mut rng).await;
        }
        let run_id = format!("generation-{generation}");
        let acquired = clients
            .db
            .acquire_snapshot(0, &run_id)
            .await
            .expect("acquire");
        let info = complete_backup(
            &clients.backup,
            frozen_request(&run_id, &acquired, &run_id, false),
        )
        .await;
        // The oracle: the frozen mate as the array reads it while the
        // snapshot still holds it.
        let mate = read_whole_lu(&clients.array, acquired.mate_lu, acquired.block_count).await;
        clients
            .db
            .delete_snapshot(0, &run_id, false)
            .await
            .expect("delete the snapshot");
        harness::wait_synchronized(&clients.db, 0).await;

        let file = cluster.dir.join(format!("export-{generation}.raw"));
        cluster
            .export_backup(&info.backup_id, &file)
            .await
            .unwrap_or_else(|e| panic!("exporting generation {generation}: {e}"));
        let image = std::fs::read(&file).expect("read the export");
        std::fs::remove_file(&file).expect("remove the export");
        assert_same_bytes(
            &mate,
            &image,
            &format!("generation {generation}: export vs frozen mate"),
        );
        let report = ledger_format::verify_image(&image, Some(acquired.ledger_sequence));
        assert!(
            report.ok,
            "generation {generation}: the exported ledger at sequence {}: {:?}",
            acquired.ledger_sequence, report.violations
        );
        let (counts, chunk_count) = counts_of(&info);
        assert!(!counts.verify_read);
        assert_eq!(
            counts.chunks_read + counts.chunks_reused + counts.chunks_zero,
            chunk_count,
            "generation {generation}: every chunk is read, reused or zero: {counts:?}"
        );
        assert_eq!(
            counts.bytes_read,
            counts.chunks_read * CHUNK_BYTES,
            "generation {generation}: bytes read are the chunks read"
        );
        generations.push(Generation {
            sequence: acquired.ledger_sequence,
            chunk_count,
            counts,
        });
    }

    let listed = clients
        .backup
        .list_backups_and_store()
        .await
        .expect("list backups");
    let summary = listed.store.expect("the store's summary");
    eprintln!(
        "{test}: seed {seed}, store {}, {} generations of a {} MiB volume in {:.1} s",
        summary.location,
        GENERATIONS,
        GENERATIONS_LU_BYTES >> 20,
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "{:>3} {:>8} {:>6} {:>5} {:>7} {:>5} {:>12} {:>12}",
        "gen", "sequence", "chunks", "read", "reused", "zero", "new stored", "bytes read"
    );
    for (i, g) in generations.iter().enumerate() {
        eprintln!(
            "{:>3} {:>8} {:>6} {:>5} {:>7} {:>5} {:>12} {:>12}",
            i,
            g.sequence,
            g.chunk_count,
            g.counts.chunks_read,
            g.counts.chunks_reused,
            g.counts.chunks_zero,
            g.counts.new_bytes_stored,
            g.counts.bytes_read
        );
    }
    let new_bytes_total: u64 = generations.iter().map(|g| g.counts.new_bytes_stored).sum();
    eprintln!(
        "store: {} chunks, {} bytes stored for {} logical bytes ({:.1} % of full copies); first backup stored {} bytes, the nine after it {} bytes",
        summary.chunks,
        summary.stored_bytes,
        summary.logical_bytes,
        100.0 * summary.stored_bytes as f64 / summary.logical_bytes.max(1) as f64,
        generations[0].counts.new_bytes_stored,
        new_bytes_total - generations[0].counts.new_bytes_stored
    );

    assert_eq!(
        summary.logical_bytes,
        GENERATIONS as u64 * GENERATIONS_LU_BYTES,
        "the store lists the ten generations"
    );
    assert!(
        summary.stored_bytes <= new_bytes_total,
        "the store holds one copy plus the changes: {} bytes stored, the backups added {new_bytes_total}",
        summary.stored_bytes
    );
    let first_read = generations[0].counts.chunks_read;
    for (i, g) in generations.iter().enumerate().skip(1) {
        assert!(
            g.counts.chunks_read < first_read,
            "generation {i} read {} chunks, the first {first_read}: only the changes are read",
            g.counts.chunks_read
        );
    }
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_generations_with_the_ledger_running_in_a_directory_store() {
    ten_generations(
        "generations::ten_generations_with_the_ledger_running_in_a_directory_store",
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_generations_with_the_ledger_running_in_an_s3_store() {
    let Some(s3) = S3Server::start() else {
        return;
    };
    ten_generations(
        "generations::ten_generations_with_the_ledger_running_in_an_s3_store",
        Some(StoreLocation::S3 {
            bucket: s3.bucket().to_string(),
            prefix: "generations".into(),
            args: s3.args(),
        }),
    )
    .await;
    drop(s3);
}

/// A cluster without a ledger, so that nothing writes the volume but the
/// test.
async fn quiet_cluster(lu_bytes: u64) -> Cluster {
    ClusterBuilder::new()
        .credentials(harness::credentials())
        .lu_size_bytes(lu_bytes)
        .ledger(None)
        .start()
        .await
        .expect("start the cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_read_reads_every_chunk_and_an_unchanged_volume_reads_none() {
    let seed = harness::seed("generations::verify_read");
    let mut rng = SmallRng::seed_from_u64(seed);
    let cluster = quiet_cluster(16 << 20).await;
    let clients = &cluster.clients;
    // Ten of the sixteen chunks random, the others zero.
    let filled: Vec<u64> = sample(&mut rng, 16, 10)
        .into_iter()
        .map(|i| i as u64)
        .collect();
    write_chunks(&clients.db, &filled, 4096, &mut rng).await;

    let acquired = clients
        .db
        .acquire_snapshot(0, "first")
        .await
        .expect("acquire");
    let first = complete_backup(
        &clients.backup,
        frozen_request("first", &acquired, "first", false),
    )
    .await;
    let (counts, chunk_count) = counts_of(&first);
    assert_eq!(counts.chunks_zero, 6, "{counts:?}");
    assert_eq!(counts.chunks_read, 10, "{counts:?}");
    assert!(counts.new_bytes_stored > 0);

    // The same snapshot again, reading every chunk although the store
    // holds them all.
    let verified = complete_backup(
        &clients.backup,
        frozen_request("first-verify-read", &acquired, "first", true),
    )
    .await;
    let (counts, _) = counts_of(&verified);
    let nonzero = chunk_count - counts.chunks_zero;
    assert!(counts.verify_read);
    assert_eq!(
        counts.chunks_read, nonzero,
        "verify_read reads every non-zero chunk: {counts:?}"
    );
    assert_eq!(counts.bytes_read, nonzero * CHUNK_BYTES, "{counts:?}");
    assert_eq!(counts.chunks_reused, nonzero, "all were held: {counts:?}");
    assert_eq!(counts.new_bytes_stored, 0, "nothing new stored: {counts:?}");
    let mate = read_whole_lu(&clients.array, acquired.mate_lu, acquired.block_count).await;
    clients
        .db
        .delete_snapshot(0, "first", false)
        .await
        .expect("delete");
    harness::wait_synchronized(&clients.db, 0).await;
    let file = cluster.dir.join("verify-read.raw");
    cluster
        .export_backup(&verified.backup_id, &file)
        .await
        .expect("export");
    assert_same_bytes(
        &mate,
        &std::fs::read(&file).expect("read the export"),
        "the verify_read backup vs the frozen mate",
    );

    // A new snapshot of the unchanged volume: no chunk is read.
    let again = clients
        .db
        .acquire_snapshot(0, "again")
        .await
        .expect("acquire");
    let unchanged = complete_backup(
        &clients.backup,
        frozen_request("again", &again, "again", false),
    )
    .await;
    let (counts, _) = counts_of(&unchanged);
    eprintln!(
        "verify_read: first {:?}; verify_read {:?}; unchanged {counts:?}",
        counts_of(&first).0,
        counts_of(&verified).0
    );
    assert_eq!(counts.chunks_read, 0, "{counts:?}");
    assert_eq!(counts.bytes_read, 0, "no data read: {counts:?}");
    assert_eq!(counts.chunks_reused, nonzero, "{counts:?}");
    assert_eq!(counts.new_bytes_stored, 0, "{counts:?}");
    clients
        .db
        .delete_snapshot(0, "again", false)
        .await
        .expect("delete");
    cluster.shutdown().await.expect("shutdown");
}

/// The files of a directory store's `indexes/`.
fn index_files(store: &Path) -> Vec<String> {
    match std::fs::read_dir(store.join("indexes")) {
        Ok(entries) => entries
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|name| !name.starts_with('.'))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("listing the indexes: {e}"),
    }
}

/// The chunk files of a directory store (`chunks/<3 hex>/<64 hex>`).
fn chunk_files(store: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(dirs) = std::fs::read_dir(store.join("chunks")) else {
        return found;
    };
    for dir in dirs {
        let dir = dir.expect("entry").path();
        let Ok(files) = std::fs::read_dir(&dir) else {
            continue;
        };
        for file in files {
            let path = file.expect("entry").path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|n| n.len() == 64 && manifest::from_hex(&n).is_some()) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

fn store_dir(cluster: &Cluster) -> PathBuf {
    match &cluster.store {
        StoreLocation::Dir(dir) => dir.clone(),
        StoreLocation::S3 { .. } => panic!("a directory store was expected"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_backup_of_an_unknown_id_is_not_found_and_of_a_corrupt_index_data_loss() {
    let seed = harness::seed("generations::corrupt_index");
    let mut rng = SmallRng::seed_from_u64(seed);
    let cluster = quiet_cluster(4 << 20).await;
    let clients = &cluster.clients;
    write_chunks(&clients.db, &[0, 2], 4096, &mut rng).await;
    let acquired = clients
        .db
        .acquire_snapshot(0, "corrupt")
        .await
        .expect("acquire");
    let info = complete_backup(
        &clients.backup,
        frozen_request("corrupt", &acquired, "corrupt", false),
    )
    .await;
    clients
        .db
        .delete_snapshot(0, "corrupt", false)
        .await
        .expect("delete");
    let store = store_dir(&cluster);

    let unknown = "0190d3c4-0000-7000-8000-000000000000";
    let error = clients
        .backup
        .get_backup(unknown, false)
        .await
        .expect_err("an unknown backup");
    assert_eq!(error.kind, ErrorKind::NotFound, "{error}");

    // The server that wrote the index remembers it; a server started on
    // the store now reads it from the disk.
    let index = store
        .join("indexes")
        .join(format!("{}.json", info.backup_id));
    std::fs::write(&index, b"{\"format_version\": 3, \"backup_id\": garbage").expect("corrupt");
    let reader = harness::start_backup_at(
        &cluster.addresses().array,
        &cluster.addresses().db,
        &cluster.store,
        DEFAULT_GC_GRACE,
    )
    .await;
    let client = harness::backup_client(&reader.url());
    let error = client
        .get_backup(&info.backup_id, false)
        .await
        .expect_err("a corrupt index");
    // The typed client says DataLoss, from the code alone.
    assert_eq!(error.kind, ErrorKind::DataLoss, "{error}");
    let status = client
        .raw()
        .get_backup(bpb::GetBackupRequest {
            backup_id: info.backup_id.clone(),
            include_digests: false,
        })
        .await
        .expect_err("a corrupt index");
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    assert!(
        status.message().contains(&info.backup_id),
        "the index is named: {status:?}"
    );
    // Nothing lists it as a complete backup.
    let listed = client.list_backups().await.expect("list");
    assert!(
        listed.iter().all(|b| b.backup_id != info.backup_id),
        "{listed:?}"
    );
    let verified = client
        .raw()
        .verify_backup(bpb::BackupIdRequest {
            backup_id: info.backup_id.clone(),
        })
        .await
        .expect_err("verify of a corrupt index");
    assert_eq!(verified.code(), tonic::Code::DataLoss, "{verified:?}");
    reader.shutdown().await.expect("shutdown");
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_chunk_fails_verify_and_export_naming_it() {
    let seed = harness::seed("generations::missing_chunk");
    let mut rng = SmallRng::seed_from_u64(seed);
    let cluster = quiet_cluster(4 << 20).await;
    let clients = &cluster.clients;
    write_chunks(&clients.db, &[1, 3], 4096, &mut rng).await;
    let acquired = clients
        .db
        .acquire_snapshot(0, "missing")
        .await
        .expect("acquire");
    let info = complete_backup(
        &clients.backup,
        frozen_request("missing", &acquired, "missing", false),
    )
    .await;
    clients
        .db
        .delete_snapshot(0, "missing", false)
        .await
        .expect("delete");
    let store = store_dir(&cluster);
    let digests = clients
        .backup
        .get_backup(&info.backup_id, true)
        .await
        .expect("get with digests")
        .manifest
        .expect("manifest")
        .chunk_digests;
    let digest: [u8; 32] = digests[3].as_slice().try_into().expect("32 bytes");
    let hex = manifest::to_hex(&digest);
    let chunk = store.join("chunks").join(&hex[..3]).join(&hex);
    std::fs::remove_file(&chunk).expect("remove chunk 3");

    let verified = clients
        .backup
        .verify_backup(&info.backup_id)
        .await
        .expect("verify");
    assert!(!verified.ok);
    assert_eq!(verified.bad_chunks, [3]);
    assert_eq!(
        verified.problems,
        [bpb::ChunkProblem {
            index: 3,
            digest: hex.clone(),
            kind: bpb::ChunkProblemKind::Missing as i32,
        }]
    );

    let out_file = cluster.dir.join("missing.raw");
    let store_arg = store.to_str().expect("utf-8 path");
    let out = harness::command("backup-server")
        .args(["export", "--store", store_arg, &info.backup_id])
        .arg(&out_file)
        .output()
        .expect("run backup-server export");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("export with a missing chunk: {:?}: {stderr}", out.status);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&hex), "the chunk is named: {stderr}");
    assert!(!out_file.exists(), "no export file is left");
    assert!(
        !PathBuf::from(format!("{}.partial", out_file.display())).exists(),
        "no partial file is left"
    );
    cluster.shutdown().await.expect("shutdown");
}

/// Starts a backup server on `store` as the binary does, answering the
/// error instead of panicking.
async fn spawn_backup_server(
    array_url: &str,
    store: StoreLocation,
) -> Result<splitmirror_proto::node::NodeHandle, SpawnError> {
    let listener = splitmirror_proto::node::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let config = BackupServerConfig {
        security: harness::security(role::BACKUP),
        control_identities: vec![role::CONSOLE.to_string()],
        array_url: array_url.to_string(),
        db_url: NO_DB.to_string(),
        store,
        gc_grace: DEFAULT_GC_GRACE,
        default_max_bytes_per_s: None,
    };
    backup_server::spawn(config, listener).await
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

fn credentials(access_key: &str, secret_key: &str) -> S3Credentials {
    S3Credentials {
        access_key_id: access_key.into(),
        secret_access_key: secret_key.into(),
        session_token: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_s3_store_stops_the_backup_server_from_starting() {
    let started = Instant::now();
    let store = StoreLocation::S3 {
        bucket: "backups".into(),
        prefix: "unreachable".into(),
        args: S3Args {
            endpoint: Some(format!("http://127.0.0.1:{}", closed_port())),
            region: Some("us-east-1".into()),
            virtual_hosted_style: false,
            credentials: Some(credentials("nobody", "nothing")),
        },
    };
    match spawn_backup_server("http://127.0.0.1:1", store).await {
        Ok(_) => panic!("a backup server started on an unreachable store"),
        Err(SpawnError::Store(StoreError::Blob(BlobError::Unavailable { doing, message }))) => {
            eprintln!(
                "unreachable store, after {:.1} s: unavailable while {doing}: {message}",
                started.elapsed().as_secs_f64()
            );
        }
        Err(other) => panic!("expected the store to be unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_s3_credentials_stop_the_backup_server_from_starting() {
    let Some(s3) = S3Server::start() else {
        return;
    };
    let mut args = s3.args();
    args.credentials = Some(credentials(s3.access_key(), "not-the-secret"));
    let store = StoreLocation::S3 {
        bucket: s3.bucket().to_string(),
        prefix: "refused".into(),
        args,
    };
    match spawn_backup_server("http://127.0.0.1:1", store).await {
        Ok(_) => panic!("a backup server started with a wrong secret"),
        Err(SpawnError::Store(StoreError::Blob(BlobError::PermissionDenied {
            doing,
            message,
        }))) => {
            eprintln!("wrong secret: refused {doing}: {message}");
        }
        Err(other) => panic!("expected the store to refuse the credentials, got {other:?}"),
    }
    let objects: Vec<_> = std::fs::read_dir(s3.bucket_dir())
        .expect("the bucket directory")
        .collect();
    assert!(objects.is_empty(), "nothing written: {objects:?}");
}

/// Kills (SIGKILL) the s3s-fs process of `server`, leaving its directory:
/// the child of this process that serves its port.
fn kill_s3s_fs(server: &S3Server) {
    let port = server
        .endpoint()
        .rsplit(':')
        .next()
        .expect("a port in the endpoint")
        .to_string();
    let me = std::process::id();
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let entry = entry.expect("entry");
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let (Ok(stat), Ok(cmdline)) = (
            std::fs::read_to_string(entry.path().join("stat")),
            std::fs::read(entry.path().join("cmdline")),
        ) else {
            continue;
        };
        // "pid (comm) state ppid …": the parent is after the last ')'.
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let serves_port = args
            .windows(2)
            .any(|w| w[0] == b"--port" && w[1] == port.as_bytes());
        if ppid == Some(me) && args[0].ends_with(b"s3s-fs") && serves_port {
            let pid = rustix::process::Pid::from_raw(pid).expect("a pid");
            rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("SIGKILL");
            killed += 1;
        }
    }
    assert_eq!(killed, 1, "one s3s-fs child serves port {port}");
    let addr = server.endpoint().trim_start_matches("http://").to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_ok() {
        assert!(Instant::now() < deadline, "s3s-fs still answers on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_store_gone_under_a_running_server_fails_start_backup_as_unavailable() {
    let Some(s3) = S3Server::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let array = harness::start_array(
        &dir.path().join("array"),
        harness::small_array(4 << 20),
        array_node::ArrayTestHooks::default(),
    )
    .await;
    let prefix = "gone";
    let store = StoreLocation::S3 {
        bucket: s3.bucket().to_string(),
        prefix: prefix.into(),
        args: s3.args(),
    };
    let server = harness::start_backup_at(&array.url(), NO_DB, &store, DEFAULT_GC_GRACE).await;
    let client = harness::backup_client(&server.url());
    let indexes = s3.bucket_dir().join(prefix).join("indexes");
    assert!(
        s3.bucket_dir().join(prefix).join("store.json").is_file(),
        "the server created its store"
    );

    kill_s3s_fs(&s3);
    let started = Instant::now();
    let error = client
        .start_backup(live_request("store-gone", 2))
        .await
        .expect_err("StartBackup with the store gone");
    eprintln!(
        "StartBackup with s3s-fs gone, after {:.1} s: {error}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(error.kind, ErrorKind::Unavailable, "{error}");
    let found: Vec<_> = std::fs::read_dir(&indexes)
        .map(|entries| entries.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(found.is_empty(), "no index in the bucket: {found:?}");

    // s3s-fs back on the same directory and port: the server answers from
    // the store again, and it holds no backup.
    let mut restarted = restart_s3s_fs(&s3);
    let listed = client.list_backups().await;
    let _ = restarted.kill();
    let _ = restarted.wait();
    let listed = listed.expect("ListBackups once the store is back");
    assert!(listed.is_empty(), "no backup after the failure: {listed:?}");
    server.shutdown().await.expect("shutdown");
    array.shutdown().await.expect("shutdown");
    drop(s3);
}

/// Starts s3s-fs again over the directory and on the port of `server`
/// (killed by [`kill_s3s_fs`]), and waits until it answers.
fn restart_s3s_fs(server: &S3Server) -> std::process::Child {
    let addr = server.endpoint().trim_start_matches("http://").to_string();
    let port = addr.rsplit(':').next().expect("a port").to_string();
    let root = server
        .bucket_dir()
        .parent()
        .expect("the bucket is below the data root")
        .to_path_buf();
    let mut child = std::process::Command::new("s3s-fs")
        .args(["--host", "127.0.0.1", "--port", &port])
        .args(["--access-key", server.access_key()])
        .args(["--secret-key", server.secret_key()])
        .arg(&root)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("restart s3s-fs");
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(&addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the restarted s3s-fs exited ({status}): port {port} was taken meanwhile");
        }
        assert!(
            Instant::now() < deadline,
            "the restarted s3s-fs does not answer"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_server_killed_mid_backup_leaves_no_index_and_gc_waits_out_the_grace() {
    const GRACE: &str = "3s";
    let seed = harness::seed("generations::killed_mid_backup");
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let array = harness::start_array(
        &dir.path().join("array"),
        harness::small_array(64 << 20),
        array_node::ArrayTestHooks::default(),
    )
    .await;
    let array_client = harness::array_client(&array.url());
    fill_lu(&array_client, 5, 4 << 20, &mut rng).await;
    fill_lu(&array_client, 2, 32 << 20, &mut rng).await;
    let store = dir.path().join("store");
    let store_arg = store.to_str().expect("utf-8 path");
    let array_addr = array.addr.to_string();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--array",
        array_addr.as_str(),
        "--store",
        store_arg,
        "--gc-grace",
        GRACE,
    ];
    let mut server = NodeProcess::start("backup-server", &args);
    let client = harness::backup_client(&server.url());
    // A complete backup whose chunks every collection must keep.
    let kept = complete_backup(&client, live_request("kept", 5)).await;
    let kept_chunks = chunk_files(&store).len();
    assert_eq!(kept_chunks, 4);

    // 32 MiB at 8 MiB/s: the copy runs for about 4 s; it is killed once
    // it has stored its first chunks.
    let doomed = client
        .start_backup(bpb::StartBackupRequest {
            max_bytes_per_s: Some(8 << 20),
            ..live_request("doomed", 2)
        })
        .await
        .expect("start")
        .backup_id;
    let deadline = Instant::now() + Duration::from_secs(20);
    while chunk_files(&store).len() < kept_chunks + 2 {
        assert!(Instant::now() < deadline, "the copy stored no chunk");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let info = client.get_backup(&doomed, false).await.expect("get");
    assert_eq!(info.state(), bpb::BackupState::Running, "killed mid-copy");
    server.kill9();
    let killed_at = Instant::now();
    let after_kill = chunk_files(&store).len();
    let orphans = after_kill - kept_chunks;
    assert_eq!(
        index_files(&store),
        [format!("{}.json", kept.backup_id)],
        "no index of the killed backup"
    );
    let writers = std::fs::read_dir(store.join("writers"))
        .expect("writers")
        .count();
    assert_eq!(writers, 1, "the killed backup's writer record stays");

    let server = NodeProcess::start("backup-server", &args);
    let client = harness::backup_client(&server.url());
    let gc = |when: &str| {
        let out = harness::command("backup-server")
            .args(["gc", "--store", store_arg, "--gc-grace", GRACE])
            .output()
            .expect("run backup-server gc");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("gc {when}: {stdout}");
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    gc("at once");
    eprintln!(
        "the first collection ran {:.1} s after the kill (the grace is {GRACE})",
        killed_at.elapsed().as_secs_f64()
    );
    assert_eq!(
        chunk_files(&store).len(),
        after_kill,
        "within the grace period the orphaned chunks stay"
    );
    assert_eq!(
        std::fs::read_dir(store.join("writers"))
            .expect("writers")
            .count(),
        1,
        "the writer record has not expired yet"
    );

    // Waiting out the grace period is what this checks.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let report = client.collect_garbage().await.expect("collect garbage");
    eprintln!("collection after the grace period: {report:?}");
    assert_eq!(report.chunks_removed, orphans as u64, "{report:?}");
    assert_eq!(report.writers_expired, 1, "{report:?}");
    assert_eq!(chunk_files(&store).len(), kept_chunks);
    assert_eq!(
        std::fs::read_dir(store.join("writers"))
            .expect("writers")
            .count(),
        0,
        "the expired writer record is removed"
    );
    let verified = client.verify_backup(&kept.backup_id).await.expect("verify");
    assert!(verified.ok, "{}", verified.proved);
    drop(server);
    array.shutdown().await.expect("shutdown");
}

/// An old-format backup: `<store>/<id>/image.raw` and its format-2
/// `manifest.json`, as versions before the chunk store wrote them.
fn write_old_backup(store: &Path, id: &str, image: &[u8]) {
    let digests: Vec<[u8; 32]> = image
        .chunks(CHUNK_BYTES as usize)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect();
    let now = manifest::now_unix_ms();
    let old = Manifest {
        format_version: 2,
        backup_id: id.into(),
        run_id: format!("old-{id}"),
        label: "written before the chunk store".into(),
        source_array: "http://127.0.0.1:50051".into(),
        source_lu: 2,
        block_size_bytes: 4096,
        block_count: image.len() as u64 / 4096,
        size_bytes: image.len() as u64,
        started_at_unix_ms: now - 1000,
        completed_at_unix_ms: now,
        ledger_sequence: None,
        snapshot: None,
        live: true,
        chunk_size_bytes: CHUNK_BYTES,
        chunk_digests: digests.iter().map(manifest::to_hex).collect(),
        image_digest: manifest::to_hex(&manifest::image_digest(&digests)),
        counts: None,
    };
    let dir = store.join(id);
    std::fs::create_dir_all(&dir).expect("create the old backup's directory");
    std::fs::write(dir.join("image.raw"), image).expect("write image.raw");
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&old).expect("serialize"),
    )
    .expect("write manifest.json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn convert_moves_raw_image_backups_into_the_store_and_keeps_a_damaged_one() {
    let seed = harness::seed("generations::convert");
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    // 5.5 MiB: a random chunk, a zero chunk, the first chunk again, two
    // random chunks and a short last chunk.
    let mut image = vec![0u8; (5 << 20) + (512 << 10)];
    rng.fill(&mut image[..1 << 20]);
    image.copy_within(..1 << 20, 2 << 20);
    rng.fill(&mut image[3 << 20..]);
    let good = "0190aaaa-0000-7000-8000-000000000001";
    let damaged = "0190aaaa-0000-7000-8000-000000000002";
    write_old_backup(&store, good, &image);
    let mut other = vec![0u8; 3 << 20];
    rng.fill(&mut other[..]);
    write_old_backup(&store, damaged, &other);
    let damaged_image = store.join(damaged).join("image.raw");
    let mut bytes = std::fs::read(&damaged_image).expect("read");
    bytes[(1 << 20) + 77] ^= 0x01;
    std::fs::write(&damaged_image, &bytes).expect("damage the image");

    match spawn_backup_server("http://127.0.0.1:1", StoreLocation::Dir(store.clone())).await {
        Ok(_) => panic!("a backup server started on raw-image backups"),
        Err(SpawnError::Store(StoreError::NeedsConversion { count, .. })) => {
            assert_eq!(count, 2);
        }
        Err(other) => panic!("expected NeedsConversion, got {other:?}"),
    }

    let store_arg = store.to_str().expect("utf-8 path");
    let out = harness::command("backup-server")
        .args(["convert", "--store", store_arg])
        .output()
        .expect("run backup-server convert");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("convert: {:?}\n{stdout}", out.status);
    assert_eq!(out.status.code(), Some(1), "one backup is not converted");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(damaged) && l.contains("NOT converted")),
        "the damaged backup is named: {stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(good) && l.contains("converted") && !l.contains("NOT")),
        "{stdout}"
    );
    assert!(
        !store.join(good).exists(),
        "the converted raw image is removed"
    );
    assert!(
        damaged_image.is_file() && store.join(damaged).join("manifest.json").is_file(),
        "the damaged backup is left as it was"
    );
    assert_eq!(index_files(&store), [format!("{good}.json")]);
    // Four distinct non-zero chunks: the repeated one is stored once.
    assert_eq!(chunk_files(&store).len(), 4);

    let exported = dir.path().join("converted.raw");
    let out = harness::command("backup-server")
        .args(["export", "--store", store_arg, good])
        .arg(&exported)
        .output()
        .expect("run backup-server export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_bytes(
        &image,
        &std::fs::read(&exported).expect("read the export"),
        "the converted backup vs its raw image",
    );
    let opened = ChunkStore::open_existing(&StoreLocation::Dir(store.clone()), DEFAULT_GC_GRACE)
        .await
        .expect("open the store");
    let verified = opened.verify(good).await.expect("verify");
    assert!(verified.ok, "{}", verified.proved());
    assert_eq!(
        verified.manifest.format_version, 2,
        "a converted backup keeps its format"
    );
}
