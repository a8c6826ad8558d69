//! Garbage collection racing a backup that reuses old chunks
//! (backup-server/src/gc.rs, ARCHITECTURE.md "Garbage collection"), on a
//! directory store and on a real S3 server (s3s-fs): nothing a backup
//! references is removed, in both orders the race can take. Each scenario
//! has a canary that switches one protection off and must lose a chunk,
//! so that the test can fail.
//!
//! The races are driven by the protocol's pause points, not by timing:
//! backup A's chunks are made old (past the grace period), A is pruned,
//! and a backup B that reuses A's chunks runs beside a collector.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use backup_server::blobs::{Blobs, DirBlobs};
use backup_server::manifest::{self, Manifest};
use backup_server::s3::S3Blobs;
use backup_server::store::{ChunkStore, encode_chunk};
use tokio_util::sync::CancellationToken;

use crate::s3_server::S3Server;

/// Short, so that A's chunks are old after a short wait.
const GRACE: Duration = Duration::from_millis(800);
const CHUNKS: usize = 6;

/// Which protection a run switches off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Canary {
    None,
    /// The collector does not keep the digests of writer records.
    CollectorIgnoresWriters,
    /// The backup does not wait for collectors it sees running.
    BackupSkipsWait,
}

/// Where the store is.
enum Backend {
    Dir(tempfile::TempDir),
    S3(S3Server),
}

impl Backend {
    fn blobs(&self, prefix: &str) -> Arc<dyn Blobs> {
        match self {
            Backend::Dir(dir) => Arc::new(DirBlobs::create(&dir.path().join(prefix)).expect("dir")),
            Backend::S3(server) => Arc::new(
                S3Blobs::connect(server.bucket(), prefix, &server.args()).expect("S3 store"),
            ),
        }
    }
}

fn dir_backend() -> Option<Backend> {
    Some(Backend::Dir(tempfile::tempdir().expect("tempdir")))
}

fn s3_backend() -> Option<Backend> {
    S3Server::start().map(Backend::S3)
}

fn manifest_of(id: &str, chunks: &[Vec<u8>]) -> Manifest {
    let digests: Vec<[u8; 32]> = chunks.iter().map(|c| *blake3::hash(c).as_bytes()).collect();
    Manifest {
        format_version: manifest::FORMAT_VERSION,
        backup_id: id.into(),
        run_id: id.into(),
        label: String::new(),
        source_array: "test".into(),
        source_lu: 2,
        block_size_bytes: 4096,
        block_count: (chunks.len() as u64) << 8,
        size_bytes: (chunks.len() as u64) << 20,
        started_at_unix_ms: manifest::now_unix_ms(),
        completed_at_unix_ms: manifest::now_unix_ms(),
        ledger_sequence: None,
        snapshot: None,
        live: true,
        chunk_size_bytes: 1 << 20,
        image_digest: manifest::to_hex(&manifest::image_digest(&digests)),
        chunk_digests: digests.iter().map(manifest::to_hex).collect(),
        counts: None,
    }
}

/// A store holding backup A (old enough to be collected once pruned), and
/// A's chunks.
async fn store_with_old_backup(backend: &Backend, prefix: &str) -> (Arc<ChunkStore>, Vec<Vec<u8>>) {
    let store = Arc::new(ChunkStore::over(backend.blobs(prefix), GRACE));
    // A probe of the store writes its header too.
    let _ = store.probe().await;
    let chunks: Vec<Vec<u8>> = (0..CHUNKS)
        .map(|i| {
            let mut data = vec![0x42u8; 1 << 20];
            data[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            data
        })
        .collect();
    for chunk in &chunks {
        let digest = *blake3::hash(chunk).as_bytes();
        store
            .put_chunk(&digest, encode_chunk(chunk))
            .await
            .expect("put chunk");
    }
    store
        .write_index(&manifest_of(
            "00000000-0000-7000-8000-00000000000a",
            &chunks,
        ))
        .await
        .expect("index of A");
    // Past the grace period: unreferenced, they are the collector's.
    tokio::time::sleep(GRACE + Duration::from_millis(400)).await;
    (store, chunks)
}

const A: &str = "00000000-0000-7000-8000-00000000000a";
const B: &str = "00000000-0000-7000-8000-00000000000b";

/// The collector lists writers before B records itself; B sees the
/// collector's lease and must wait for it before it decides what to reuse.
/// Answers how many chunks B's backup lost.
async fn collector_first(backend: &Backend, prefix: &str, canary: Canary) -> usize {
    let (store, chunks) = store_with_old_backup(backend, prefix).await;
    set_canary(&store, canary);
    let digests: Vec<[u8; 32]> = chunks.iter().map(|c| *blake3::hash(c).as_bytes()).collect();
    store.hooks().collector_listed_writers.arm();
    let collector = {
        let store = store.clone();
        tokio::spawn(async move { store.collect_garbage().await })
    };
    store.hooks().collector_listed_writers.reached().await;
    // The collector has listed the writers (none). A is pruned; B starts.
    store.remove_index(A).await.expect("prune A");
    let cancel = CancellationToken::new();
    let writing = {
        let store = store.clone();
        let digests = digests.clone();
        tokio::spawn(async move { store.begin_writing(B, &digests, &cancel).await })
    };
    if canary != Canary::BackupSkipsWait {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !writing.is_finished(),
            "B decided what to reuse while a collector that did not see it was running"
        );
    } else {
        // Without the wait B decides at once, with the collector paused.
        while !writing.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    store.hooks().collector_listed_writers.release();
    let report = collector.await.expect("collector task").expect("collect");
    let (writer, held) = writing.await.expect("writer task").expect("begin writing");
    finish_backup_b(&store, writer, &held, &chunks).await;
    eprintln!("collector first, {canary:?}: {report:?}");
    lost_chunks(&store).await
}

/// B records itself and decides to reuse A's chunks; then A is pruned and a
/// collector runs while B is still copying. Answers how many chunks B's
/// backup lost.
async fn backup_first(backend: &Backend, prefix: &str, canary: Canary) -> usize {
    let (store, chunks) = store_with_old_backup(backend, prefix).await;
    set_canary(&store, canary);
    let digests: Vec<[u8; 32]> = chunks.iter().map(|c| *blake3::hash(c).as_bytes()).collect();
    let cancel = CancellationToken::new();
    let (writer, held) = store
        .begin_writing(B, &digests, &cancel)
        .await
        .expect("begin writing");
    assert_eq!(held.len(), CHUNKS, "B finds all of A's chunks to reuse");
    store.remove_index(A).await.expect("prune A");
    let report = store.collect_garbage().await.expect("collect");
    eprintln!("backup first, {canary:?}: {report:?}");
    if canary == Canary::None {
        assert_eq!(report.chunks_protected, CHUNKS as u64, "{report:?}");
        assert_eq!(report.chunks_removed, 0, "{report:?}");
    }
    finish_backup_b(&store, writer, &held, &chunks).await;
    lost_chunks(&store).await
}

fn set_canary(store: &ChunkStore, canary: Canary) {
    let hooks = store.hooks();
    hooks
        .canary_collector_ignores_writers
        .store(canary == Canary::CollectorIgnoresWriters, Ordering::SeqCst);
    hooks
        .canary_skip_wait_for_collectors
        .store(canary == Canary::BackupSkipsWait, Ordering::SeqCst);
}

/// What a backup job does after `begin_writing`: stores the chunks the
/// store did not hold, writes its index, removes its record.
async fn finish_backup_b(
    store: &Arc<ChunkStore>,
    writer: backup_server::gc::WriterGuard,
    held: &std::collections::HashSet<[u8; 32]>,
    chunks: &[Vec<u8>],
) {
    for chunk in chunks {
        let digest = *blake3::hash(chunk).as_bytes();
        if !held.contains(&digest) {
            store
                .put_chunk(&digest, encode_chunk(chunk))
                .await
                .expect("store a chunk B lacked");
        }
    }
    writer.check_fresh().expect("B's record is fresh");
    store
        .write_index(&manifest_of(B, chunks))
        .await
        .expect("index of B");
    writer.finish(store).await;
}

/// The chunks B's index references that verify finds missing or corrupt.
async fn lost_chunks(store: &ChunkStore) -> usize {
    store.verify(B).await.expect("verify B").problems.len()
}

async fn both_orders_and_their_canaries(backend: Option<Backend>) {
    let Some(backend) = backend else { return };
    assert_eq!(
        backup_first(&backend, "first-safe", Canary::None).await,
        0,
        "a chunk B reused was removed though B's writer record named it"
    );
    assert!(
        backup_first(&backend, "first-canary", Canary::CollectorIgnoresWriters).await > 0,
        "canary: a collector that ignores writer records must lose B's chunks"
    );
    assert_eq!(
        collector_first(&backend, "second-safe", Canary::None).await,
        0,
        "B reused a chunk that a collector which had not seen it removed"
    );
    assert!(
        collector_first(&backend, "second-canary", Canary::BackupSkipsWait).await > 0,
        "canary: a backup that does not wait for the running collector must lose chunks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_racing_a_backup_that_reuses_old_chunks_removes_nothing_it_references_on_a_directory() {
    both_orders_and_their_canaries(dir_backend()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_racing_a_backup_that_reuses_old_chunks_removes_nothing_it_references_on_s3() {
    both_orders_and_their_canaries(s3_backend()).await;
}
