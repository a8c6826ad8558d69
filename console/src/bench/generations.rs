//! `bench generations`: what a backup costs once the store holds the
//! previous one. A volume of random data gets a first, full backup; then
//! 0 %, 1 % and 10 % of its 1 MiB chunks change (written through the
//! volume, so that origin and mate both change) and each change gets a
//! backup of its own. For each: wall time, data bytes read from the array
//! and bytes added to the store, and their ratios to the full backup. The
//! full-copy peer, `qemu-img convert` of the frozen mate LU's file into a
//! new file + fsync, runs in the same process on the same volume.
//!
//! The same generations run against a store on a real S3 server when
//! `s3s-fs` is on PATH (`cargo install s3s-fs --version 0.14.1 --features
//! binary --locked`, as `.ci/run` does); without it that leg is skipped
//! with the reason in the table and the figures.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use backup_server::store::StoreLocation;
use futures_util::StreamExt;
use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use serde_json::json;
use splitmirror_proto::backup::v1 as bpb;
use splitmirror_proto::db::v1 as dpb;
use splitmirror_proto::units::format_bytes;

use super::common::{f2, table};
use super::{BenchOptions, BenchOutput};
use crate::cluster::{Cluster, ClusterBuilder};
use crate::progress::Quiet;

/// The store's chunk: what "a chunk changed" means.
const CHUNK_BYTES: u64 = splitmirror_proto::BACKUP_CHUNK_SIZE_BYTES;

/// The changes between generations, in percent of the volume's chunks.
const CHANGES_PERCENT: [u32; 3] = [0, 1, 10];

/// Writes in flight while the volume is filled or changed.
const WRITES_IN_FLIGHT: usize = 8;

/// The seed of the volume's data and of the chunks chosen to change: the
/// same volume and the same changes in every run, so that runs compare.
const SEED: u64 = 0x6E6E_5EED;

/// The targets of issue 16: after a 1 % change, at most this share of the
/// full backup's time and bytes; an unchanged volume reads no data.
const TARGET_TIME_RATIO_1PCT: f64 = 0.1;
const TARGET_BYTES_RATIO_1PCT: f64 = 0.02;

/// The S3 server's credentials: s3s-fs accepts exactly these.
const S3_ACCESS_KEY: &str = "splitmirror";
const S3_SECRET_KEY: &str = "splitmirror-bench-secret";
const S3_BUCKET: &str = "generations";

/// One backup of the volume.
#[derive(Debug, Clone)]
struct Generation {
    name: String,
    changed_percent: Option<u32>,
    changed_chunks: u64,
    seconds: f64,
    counts: bpb::ChunkCounts,
}

/// The generations against one store.
struct Leg {
    store: &'static str,
    location: String,
    outcome: Result<Vec<Generation>, String>,
}

/// The full-copy peer: seconds to copy and to fsync.
struct Peer {
    copy_seconds: f64,
    sync_seconds: f64,
}

pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchOutput> {
    let size = options.size_bytes;
    if size < CHUNK_BYTES || !size.is_multiple_of(CHUNK_BYTES) {
        bail!(
            "--size must be a whole number of {} chunks",
            format_bytes(CHUNK_BYTES)
        );
    }
    let mut peer = Err("not measured".to_string());
    let file = generations(size, None, Some(&mut peer)).await?;
    let mut legs = vec![Leg {
        store: "file",
        location: "directory".into(),
        outcome: Ok(file),
    }];
    legs.push(match s3s_fs_missing() {
        Some(reason) => Leg {
            store: "s3",
            location: "s3s-fs on loopback".into(),
            outcome: Err(reason),
        },
        None => {
            let server = S3Server::start()?;
            let location = server.location();
            let shown = location.to_string();
            Leg {
                store: "s3",
                location: format!("{shown} (s3s-fs on loopback)"),
                outcome: Ok(generations(size, Some(location), None).await?),
            }
        }
    });
    Ok(output(size, &legs, &peer))
}

/// Starts a cluster (its store at `store`, or in its directory), fills
/// volume 0 and takes the generations; measures the peer into `peer` while
/// the first snapshot is held.
async fn generations(
    size: u64,
    store: Option<StoreLocation>,
    peer: Option<&mut Result<Peer, String>>,
) -> anyhow::Result<Vec<Generation>> {
    let mut builder = ClusterBuilder::new().lu_size_bytes(size).ledger(None);
    if let Some(store) = store {
        builder = builder.store(store);
    }
    let cluster = builder.start().await.context("starting the nodes")?;
    let result = generations_on(&cluster, size, peer).await;
    let shutdown = cluster.shutdown().await;
    let generations = result?;
    shutdown.context("stopping the nodes")?;
    Ok(generations)
}

async fn generations_on(
    cluster: &Cluster,
    size: u64,
    mut peer: Option<&mut Result<Peer, String>>,
) -> anyhow::Result<Vec<Generation>> {
    let chunks = size / CHUNK_BYTES;
    let mut rng = SmallRng::seed_from_u64(SEED);
    // Random data everywhere, so that no chunk is zero and none compresses:
    // the full backup reads and stores the whole volume.
    write_chunks(cluster, &(0..chunks).collect::<Vec<_>>(), &mut rng).await?;
    let mut generations = Vec::new();
    let (seconds, counts) = backup(cluster, "full", |mate_file| {
        if let Some(peer) = peer.take() {
            *peer = measure_peer(mate_file, &cluster.dir.join("peer.raw"));
        }
    })
    .await?;
    generations.push(Generation {
        name: "full".into(),
        changed_percent: None,
        changed_chunks: chunks,
        seconds,
        counts,
    });
    for percent in CHANGES_PERCENT {
        let changed = chunks_to_change(chunks, percent);
        let picked: Vec<u64> = sample(&mut rng, chunks as usize, changed as usize)
            .into_iter()
            .map(|i| i as u64)
            .collect();
        write_chunks(cluster, &picked, &mut rng).await?;
        let name = format!("{percent} % changed");
        let (seconds, counts) = backup(cluster, &name, |_| {}).await?;
        generations.push(Generation {
            name,
            changed_percent: Some(percent),
            changed_chunks: changed,
            seconds,
            counts,
        });
    }
    Ok(generations)
}

/// How many of `chunks` make `percent` of them: at least one for a change
/// that is not zero, so that a tiny volume still changes.
fn chunks_to_change(chunks: u64, percent: u32) -> u64 {
    if percent == 0 {
        return 0;
    }
    (chunks * u64::from(percent)).div_ceil(100).clamp(1, chunks)
}

/// Writes new random data over whole chunks of volume 0, through
/// db-server, so that origin and mate both change.
async fn write_chunks(cluster: &Cluster, chunks: &[u64], rng: &mut SmallRng) -> anyhow::Result<()> {
    let db = &cluster.clients.db;
    let block_size = 4096;
    let writes: Vec<(u64, Vec<u8>)> = chunks
        .iter()
        .map(|&chunk| {
            let mut data = vec![0u8; CHUNK_BYTES as usize];
            rng.fill(&mut data[..]);
            (chunk * CHUNK_BYTES / block_size, data)
        })
        .collect();
    let mut results = futures_util::stream::iter(writes)
        .map(|(lba, data)| db.write(0, dpb::VirtualLu::Data, lba, data))
        .buffer_unordered(WRITES_IN_FLIGHT);
    while let Some(result) = results.next().await {
        result.context("writing volume 0")?;
    }
    Ok(())
}

/// One backup of volume 0's frozen mate: acquire, back up (timed from the
/// start request to completion), `with_frozen` (given the mate LU's file)
/// while the mate is still frozen, delete, wait for the resync. Answers
/// the seconds and the manifest's counts.
async fn backup(
    cluster: &Cluster,
    label: &str,
    with_frozen: impl FnOnce(&Path),
) -> anyhow::Result<(f64, bpb::ChunkCounts)> {
    let clients = &cluster.clients;
    let run_id = uuid::Uuid::now_v7().to_string();
    let acquired = clients.db.acquire_snapshot(0, &run_id).await?;
    let result = async {
        let started = Instant::now();
        let backup_id = clients
            .backup
            .start_backup(bpb::StartBackupRequest {
                run_id: run_id.clone(),
                lu: acquired.mate_lu,
                expected_block_count: Some(acquired.block_count),
                label: format!("bench generations: {label}"),
                snapshot: Some(bpb::SnapshotRef {
                    mate: 1,
                    volume: 0,
                    holder_run_id: run_id.clone(),
                }),
                ..Default::default()
            })
            .await?
            .backup_id;
        let mut stream = clients.backup.watch_backup(&backup_id).await?;
        let mut last = None;
        while let Some(p) = stream.next().await {
            last = Some(p?);
        }
        let seconds = started.elapsed().as_secs_f64();
        let last = last.context("the backup server sent no progress")?;
        if last.state() != bpb::BackupState::Complete {
            bail!("the {label} backup failed: {}", last.error);
        }
        let info = clients.backup.get_backup(&backup_id, false).await?;
        let counts = info
            .manifest
            .and_then(|m| m.counts)
            .with_context(|| format!("backup {backup_id} has no chunk counts"))?;
        with_frozen(
            &cluster
                .dir
                .join("array")
                .join(format!("lu{}.img", acquired.mate_lu)),
        );
        Ok((seconds, counts))
    }
    .await;
    clients.db.delete_snapshot(0, &run_id, false).await?;
    crate::run::wait_synchronized(clients, 0, &Quiet).await?;
    result
}

/// `qemu-img convert -O raw` of the frozen mate's file into `out`, then
/// fsync: the full copy a user would make without a chunk store.
fn measure_peer(mate_file: &Path, out: &Path) -> Result<Peer, String> {
    let found = Command::new("qemu-img")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        return Err(
            "qemu-img is not installed (apt-get install qemu-utils): the peer is skipped".into(),
        );
    }
    let started = Instant::now();
    let status = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(mate_file)
        .arg(out)
        .status()
        .map_err(|e| format!("running qemu-img convert: {e}"))?;
    let copy_seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("qemu-img convert failed: {status}"));
    }
    let started = Instant::now();
    std::fs::File::open(out)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("syncing {}: {e}", out.display()))?;
    let sync_seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(out);
    Ok(Peer {
        copy_seconds,
        sync_seconds,
    })
}

/// Why the S3 leg cannot run, or `None` when `s3s-fs` is on PATH.
fn s3s_fs_missing() -> Option<String> {
    let found = Command::new("s3s-fs")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!found).then(|| {
        "s3s-fs is not on PATH (cargo install s3s-fs --version 0.14.1 --features binary --locked): the S3 store is skipped".to_string()
    })
}

/// An `s3s-fs` process serving a temporary directory on a loopback port,
/// with one bucket; stopped and removed when dropped.
struct S3Server {
    child: Child,
    endpoint: String,
    _root: tempfile::TempDir,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    fn start() -> anyhow::Result<Self> {
        let root = tempfile::Builder::new()
            .prefix("splitmirror-s3-")
            .tempdir()
            .context("creating a temporary directory")?;
        // s3s-fs serves each directory under its root as a bucket.
        let bucket: PathBuf = root.path().join(S3_BUCKET);
        std::fs::create_dir(&bucket).with_context(|| format!("creating {}", bucket.display()))?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a loopback port")?
            .port();
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting s3s-fs")?;
        let mut server = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            _root: root,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                bail!("s3s-fs exited at start: {status}");
            }
            if Instant::now() > deadline {
                bail!("s3s-fs did not start listening on port {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// The bucket, as the backup server's `--store s3://…` with the
    /// endpoint and credentials of this server.
    fn location(&self) -> StoreLocation {
        StoreLocation::S3 {
            bucket: S3_BUCKET.into(),
            prefix: "store".into(),
            args: backup_server::s3::S3Args {
                endpoint: Some(self.endpoint.clone()),
                region: Some("us-east-1".into()),
                virtual_hosted_style: false,
                credentials: Some(backup_server::s3::S3Credentials {
                    access_key_id: S3_ACCESS_KEY.into(),
                    secret_access_key: S3_SECRET_KEY.into(),
                    session_token: None,
                }),
            },
        }
    }
}

/// The table and the figures of both legs.
fn output(size: u64, legs: &[Leg], peer: &Result<Peer, String>) -> BenchOutput {
    let mut rows = Vec::new();
    let mut legs_json = Vec::new();
    let mut verdicts = Vec::new();
    for leg in legs {
        let generations = match &leg.outcome {
            Ok(generations) => generations,
            Err(reason) => {
                rows.push(vec![leg.store.into(), "skipped".into(), reason.clone()]);
                legs_json.push(json!({
                    "store": leg.store,
                    "location": leg.location,
                    "skipped": reason,
                }));
                continue;
            }
        };
        let full = &generations[0];
        let ratio = |value: f64, of: f64| if of > 0.0 { value / of } else { 0.0 };
        let mut generations_json = Vec::new();
        for g in generations {
            let time_ratio = ratio(g.seconds, full.seconds);
            let read_ratio = ratio(g.counts.bytes_read as f64, full.counts.bytes_read as f64);
            let stored_ratio = ratio(
                g.counts.new_bytes_stored as f64,
                full.counts.new_bytes_stored as f64,
            );
            rows.push(vec![
                leg.store.into(),
                g.name.clone(),
                g.changed_chunks.to_string(),
                format!("{:.3}", g.seconds),
                format_bytes(g.counts.bytes_read),
                format_bytes(g.counts.new_bytes_stored),
                format!(
                    "{}/{}/{}",
                    g.counts.chunks_read, g.counts.chunks_reused, g.counts.chunks_zero
                ),
                format!("{time_ratio:.3}"),
                format!("{read_ratio:.4}"),
                format!("{stored_ratio:.4}"),
            ]);
            generations_json.push(json!({
                "name": g.name,
                "changed_percent": g.changed_percent,
                "changed_chunks": g.changed_chunks,
                "seconds": g.seconds,
                "bytes_read": g.counts.bytes_read,
                "new_bytes_stored": g.counts.new_bytes_stored,
                "chunks_read": g.counts.chunks_read,
                "chunks_reused": g.counts.chunks_reused,
                "chunks_zero": g.counts.chunks_zero,
                "time_over_full": time_ratio,
                "read_over_full": read_ratio,
                "stored_over_full": stored_ratio,
            }));
            match g.changed_percent {
                Some(0) => verdicts.push(format!(
                    "{}: unchanged volume read {} data bytes (target 0): {}",
                    leg.store,
                    g.counts.bytes_read,
                    met(g.counts.bytes_read == 0)
                )),
                // On a small volume "1 %" rounds up to more than 1.5 % of
                // the chunks: the target does not apply.
                Some(1) if chunks_to_change(full.changed_chunks, 1) * 200 > 3 * full.changed_chunks => {
                    verdicts.push(format!(
                        "{}: 1 % changed is not measurable on {} chunks (it rounds up to {} chunk, {:.1} %): use --size 1GiB",
                        leg.store,
                        full.changed_chunks,
                        g.changed_chunks,
                        100.0 * g.changed_chunks as f64 / full.changed_chunks as f64
                    ))
                }
                Some(1) => verdicts.push(format!(
                    "{}: 1 % changed took {time_ratio:.3}× the time (target ≤ {TARGET_TIME_RATIO_1PCT}), \
                     read {read_ratio:.4}× and stored {stored_ratio:.4}× the bytes (target ≤ {TARGET_BYTES_RATIO_1PCT}): {}",
                    leg.store,
                    met(time_ratio <= TARGET_TIME_RATIO_1PCT
                        && read_ratio <= TARGET_BYTES_RATIO_1PCT
                        && stored_ratio <= TARGET_BYTES_RATIO_1PCT)
                )),
                _ => {}
            }
        }
        legs_json.push(json!({
            "store": leg.store,
            "location": leg.location,
            "generations": generations_json,
        }));
    }
    let peer_json = match peer {
        Ok(p) => {
            let total = p.copy_seconds + p.sync_seconds;
            rows.push(vec![
                "peer".into(),
                "qemu-img convert + fsync".into(),
                (size / CHUNK_BYTES).to_string(),
                format!("{total:.3}"),
                format_bytes(size),
                format_bytes(size),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
            json!({
                "convert_seconds": p.copy_seconds,
                "fsync_seconds": p.sync_seconds,
                "seconds": total,
                "bytes": size,
            })
        }
        Err(reason) => {
            rows.push(vec!["peer".into(), "skipped".into(), reason.clone()]);
            json!(reason)
        }
    };
    let mut text = table(
        &[
            "store",
            "generation",
            "changed",
            "seconds",
            "read from array",
            "new in store",
            "read/reused/zero",
            "time ÷ full",
            "read ÷ full",
            "stored ÷ full",
        ],
        &rows,
    );
    for verdict in &verdicts {
        text.push_str(&format!("  {verdict}\n"));
    }
    if let Ok(p) = peer
        && let Some(Ok(generations)) = legs.first().map(|l| &l.outcome)
    {
        let full = generations[0].seconds;
        text.push_str(&format!(
            "  file: the full backup took {}× the peer's time (qemu-img convert + fsync of the frozen mate)\n",
            f2(full / (p.copy_seconds + p.sync_seconds).max(1e-9))
        ));
    }
    BenchOutput {
        table: text,
        figures: json!({
            "chunk_size_bytes": CHUNK_BYTES,
            "chunks": size / CHUNK_BYTES,
            "legs": legs_json,
            "peer": peer_json,
            "targets": {
                "time_over_full_at_1_percent": TARGET_TIME_RATIO_1PCT,
                "bytes_over_full_at_1_percent": TARGET_BYTES_RATIO_1PCT,
                "bytes_read_unchanged": 0,
            },
            "verdicts": verdicts,
        }),
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_at_least_one_chunk_and_at_most_all() {
        assert_eq!(chunks_to_change(1024, 0), 0);
        assert_eq!(chunks_to_change(1024, 1), 11);
        assert_eq!(chunks_to_change(1024, 10), 103);
        assert_eq!(chunks_to_change(16, 1), 1);
        assert_eq!(chunks_to_change(1, 10), 1);
        assert_eq!(chunks_to_change(4, 100), 4);
    }
}
