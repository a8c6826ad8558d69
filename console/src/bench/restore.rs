//! `bench restore`: what the way back costs. Volume 0 (no ledger) is
//! filled with random data and backed up; then 1 %, 10 % and 100 % of its
//! 1 MiB chunks are overwritten with garbage through the array (onto the
//! mirror LU, so origin and mate both change) and each time the backup is
//! restored in place — BeginRestore → StartRestore / WatchRestore →
//! EndRestore, without a safety backup — counting the chunks written. Then
//! the reverse resync: a snapshot is acquired, 1 % and 10 % of the volume's
//! blocks are written (random 4 KiB writes through db-server), and the
//! volume is put back to the snapshot, timed with the bytes copied.
//!
//! The peer, in the same run: the full copy a user would make without a
//! restore that compares, `qemu-img convert -n -O raw` of the backup's
//! exported image onto an LU file (the scratch LU's, which nothing else
//! writes) + fsync. Figures: each restore's time over the peer's; for
//! 100 %, the restore's write throughput over the peer's.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, bail};
use futures_util::StreamExt;
use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use serde_json::json;
use splitmirror_proto::db::v1 as dpb;
use splitmirror_proto::units::format_bytes;
use tokio_util::sync::CancellationToken;

use super::common::{f2, table};
use super::{BenchOptions, BenchOutput};
use crate::cluster::{Cluster, ClusterBuilder, SCRATCH_LU};
use crate::progress::Quiet;
use crate::restore::{RestoreReport, RestoreRequest};

/// The store's and the array's chunk.
const CHUNK_BYTES: u64 = splitmirror_proto::BACKUP_CHUNK_SIZE_BYTES;

/// The volume's block size (the default pairs').
const BLOCK_BYTES: u64 = 4096;

/// Corruptions before each restore, in percent of the volume's chunks.
const CORRUPTED_PERCENT: [u32; 3] = [1, 10, 100];

/// Blocks written since the split before each reverse resync, in percent
/// of the volume's blocks.
const WRITTEN_PERCENT: [u32; 2] = [1, 10];

/// Writes in flight while the volume is filled, corrupted or written.
const WRITES_IN_FLIGHT: usize = 16;

/// The seed of the data and of the chunks and blocks chosen.
const SEED: u64 = 0x8E57_0AE5;

/// The targets of issue 17.
const TARGET_TIME_RATIO_1PCT: f64 = 0.1;
const TARGET_THROUGHPUT_RATIO_100PCT: f64 = 1.0;

/// One restore of the backup after a corruption.
struct Restore {
    percent: u32,
    corrupted_chunks: u64,
    seconds: f64,
    report: RestoreReport,
}

/// One reverse resync.
struct Reverse {
    percent: u32,
    blocks_written: u64,
    seconds: f64,
    ranges_copied: u64,
    bytes_copied: u64,
    ledger_sequence_restored: bool,
}

/// The peer: seconds to copy and to fsync.
struct Peer {
    copy_seconds: f64,
    sync_seconds: f64,
}

impl Peer {
    fn seconds(&self) -> f64 {
        self.copy_seconds + self.sync_seconds
    }
}

pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchOutput> {
    let size = options.size_bytes;
    if size < CHUNK_BYTES || !size.is_multiple_of(CHUNK_BYTES) {
        bail!(
            "--size must be a whole number of {} chunks",
            format_bytes(CHUNK_BYTES)
        );
    }
    let cluster = ClusterBuilder::new()
        .lu_size_bytes(size)
        .ledger(None)
        .scratch_lu(true)
        .start()
        .await
        .context("starting the nodes")?;
    let result = measure(&cluster, size).await;
    let shutdown = cluster.shutdown().await;
    let (restores, reverses, peer) = result?;
    shutdown.context("stopping the nodes")?;
    Ok(output(size, &restores, &reverses, &peer))
}

async fn measure(
    cluster: &Cluster,
    size: u64,
) -> anyhow::Result<(Vec<Restore>, Vec<Reverse>, Result<Peer, String>)> {
    let clients = &cluster.clients;
    let chunks = size / CHUNK_BYTES;
    let mut rng = SmallRng::seed_from_u64(SEED);
    // Random data everywhere: every chunk differs from zero and from each
    // other, so that a restore has nothing for free.
    let all: Vec<u64> = (0..chunks).collect();
    write_chunks(cluster, &all, &mut rng).await?;
    let run = crate::run::backup_run(
        clients,
        &crate::run::RunOptions {
            volume: 0,
            mate: 1,
            keep_snapshot: false,
            label: "bench restore".into(),
            max_bytes_per_s: None,
            cancel: CancellationToken::new(),
            verify_read: false,
        },
        &Quiet,
    )
    .await;
    let Some(backup_id) = run.backup_id.clone().filter(|_| run.succeeded()) else {
        bail!(
            "the backup failed: {}",
            run.error.unwrap_or_else(|| "not verified".into())
        );
    };
    let mut restores = Vec::new();
    for percent in CORRUPTED_PERCENT {
        let corrupted = share(chunks, percent);
        let picked: Vec<u64> = sample(&mut rng, chunks as usize, corrupted as usize)
            .into_iter()
            .map(|i| i as u64)
            .collect();
        write_chunks(cluster, &picked, &mut rng).await?;
        // The corruption's own writes made durable before the clock starts,
        // as the peer's fsync covers only what the peer wrote: the
        // restore's flush then costs what the restore wrote, not the
        // writeback of the fill and the corruption.
        clients
            .array
            .flush(0)
            .await
            .context("flushing the corrupted volume")?;
        let request = RestoreRequest {
            safety_backup: false,
            ..RestoreRequest::volume(0, backup_id.clone())
        };
        let started = Instant::now();
        let report = crate::restore::restore(clients, &request, &Quiet)
            .await
            .with_context(|| format!("restoring after {percent} % corrupted"))?;
        let seconds = started.elapsed().as_secs_f64();
        if !report.succeeded() {
            bail!(
                "the restore after {percent} % corrupted did not verify: {}",
                report.render()
            );
        }
        restores.push(Restore {
            percent,
            corrupted_chunks: corrupted,
            seconds,
            report,
        });
    }
    let blocks = size / BLOCK_BYTES;
    let mut reverses = Vec::new();
    for percent in WRITTEN_PERCENT {
        let run_id = uuid::Uuid::now_v7().to_string();
        let acquired = clients.db.acquire_snapshot(0, &run_id).await?;
        let written = share(blocks, percent);
        let picked: Vec<u64> = sample(&mut rng, blocks as usize, written as usize)
            .into_iter()
            .map(|i| i as u64)
            .collect();
        write_blocks(cluster, &picked, &mut rng).await?;
        let started = Instant::now();
        let report = crate::restore::restore_snapshot(clients, 0, &run_id, &Quiet)
            .await
            .with_context(|| format!("the reverse resync after {percent} % written"))?;
        let seconds = started.elapsed().as_secs_f64();
        reverses.push(Reverse {
            percent,
            blocks_written: written,
            seconds,
            ranges_copied: report.ranges_copied,
            bytes_copied: report.bytes_copied,
            ledger_sequence_restored: report.snapshot_ledger_sequence == acquired.ledger_sequence,
        });
    }
    let peer = measure_peer(cluster, &backup_id).await;
    Ok((restores, reverses, peer))
}

/// `percent` of `count`, at least one.
fn share(count: u64, percent: u32) -> u64 {
    (count * u64::from(percent)).div_ceil(100).clamp(1, count)
}

/// Random data over whole chunks of the mirror LU 0, through the array
/// (the cluster's array client acts as db-server, the owner): origin and
/// mate both change, and db-server does not know — a corruption.
async fn write_chunks(cluster: &Cluster, chunks: &[u64], rng: &mut SmallRng) -> anyhow::Result<()> {
    let array = &cluster.clients.array;
    let writes: Vec<(u64, Vec<u8>)> = chunks
        .iter()
        .map(|&chunk| {
            let mut data = vec![0u8; CHUNK_BYTES as usize];
            rng.fill(&mut data[..]);
            (chunk * CHUNK_BYTES / BLOCK_BYTES, data)
        })
        .collect();
    let mut results = futures_util::stream::iter(writes)
        .map(|(lba, data)| array.write(0, lba, data))
        .buffer_unordered(WRITES_IN_FLIGHT);
    while let Some(result) = results.next().await {
        result.context("writing mirror LU 0")?;
    }
    Ok(())
}

/// Random 4 KiB writes through db-server's write path, so that the update
/// location table records them.
async fn write_blocks(cluster: &Cluster, blocks: &[u64], rng: &mut SmallRng) -> anyhow::Result<()> {
    let db = &cluster.clients.db;
    let writes: Vec<(u64, Vec<u8>)> = blocks
        .iter()
        .map(|&lba| {
            let mut data = vec![0u8; BLOCK_BYTES as usize];
            rng.fill(&mut data[..]);
            (lba, data)
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

/// The peer: the backup exported to a raw file (not timed), then
/// `qemu-img convert -n -O raw` of it onto the scratch LU's file + fsync.
async fn measure_peer(cluster: &Cluster, backup_id: &str) -> Result<Peer, String> {
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
    let image = cluster.dir.join("peer-export.raw");
    cluster
        .export_backup(backup_id, &image)
        .await
        .map_err(|e| format!("exporting backup {backup_id}: {e}"))?;
    let lu_file = cluster
        .dir
        .join("array")
        .join(format!("lu{SCRATCH_LU}.img"));
    let peer = convert(&image, &lu_file);
    let _ = std::fs::remove_file(&image);
    peer
}

fn convert(image: &Path, lu_file: &Path) -> Result<Peer, String> {
    let started = Instant::now();
    // -n: the LU file exists (the array made it); write into it as a user
    // restoring by hand onto the LU would.
    let status = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(image)
        .arg(lu_file)
        .status()
        .map_err(|e| format!("running qemu-img convert: {e}"))?;
    let copy_seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("qemu-img convert failed: {status}"));
    }
    let started = Instant::now();
    std::fs::OpenOptions::new()
        .write(true)
        .open(lu_file)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("syncing {}: {e}", lu_file.display()))?;
    Ok(Peer {
        copy_seconds,
        sync_seconds: started.elapsed().as_secs_f64(),
    })
}

fn output(
    size: u64,
    restores: &[Restore],
    reverses: &[Reverse],
    peer: &Result<Peer, String>,
) -> BenchOutput {
    let peer_seconds = peer.as_ref().ok().map(Peer::seconds);
    let over_peer = |seconds: f64| peer_seconds.map(|p| seconds / p.max(1e-9));
    let chunks = size / CHUNK_BYTES;
    let mut rows = Vec::new();
    let mut restores_json = Vec::new();
    let mut verdicts = Vec::new();
    for r in restores {
        let p = &r.report.phases_ms;
        let throughput = r.report.bytes_written as f64 / r.seconds.max(1e-9);
        let ratio = over_peer(r.seconds);
        rows.push(vec![
            format!("restore, {} % corrupted", r.percent),
            r.corrupted_chunks.to_string(),
            format!("{}/{}", r.report.chunks_written, r.report.chunks_total),
            format_bytes(r.report.bytes_written),
            format!("{:.3}", r.seconds),
            format!("{}/s", format_bytes(throughput as u64)),
            ratio.map_or("-".into(), |x| format!("{x:.3}")),
        ]);
        restores_json.push(json!({
            "corrupted_percent": r.percent,
            "corrupted_chunks": r.corrupted_chunks,
            "chunks_total": r.report.chunks_total,
            "chunks_compared": r.report.chunks_compared,
            "chunks_written": r.report.chunks_written,
            "bytes_written": r.report.bytes_written,
            "seconds": r.seconds,
            "write_bytes_per_s": throughput,
            "phases_ms": {
                "checks": p.checks,
                "begin": p.begin,
                "restore": p.restore,
                "compare": p.compare,
                "check": p.check,
                "write": p.write,
                "verify": p.verify,
                "end": p.end,
            },
            "verified": r.report.verified,
            "image_digest_matches": r.report.end.as_ref().is_some_and(|e| e.image_digest_matches),
            "time_over_peer": ratio,
        }));
        match (r.percent, peer) {
            // On a small volume "1 %" rounds up to far more than 1 % of the
            // chunks: the target does not apply.
            (1, _) if share(chunks, 1) * 200 > 3 * chunks => verdicts.push(format!(
                "1 % corrupted is not measurable on {chunks} chunks (it rounds up to {} chunk): use --size 1GiB",
                r.corrupted_chunks
            )),
            (1, Ok(_)) => {
                let x = ratio.unwrap_or(f64::INFINITY);
                verdicts.push(format!(
                    "1 % corrupted: {x:.3}× the peer's time (target ≤ {TARGET_TIME_RATIO_1PCT}): {}",
                    met(x <= TARGET_TIME_RATIO_1PCT)
                ));
            }
            (100, Ok(peer)) => {
                let peer_throughput = size as f64 / peer.seconds().max(1e-9);
                let x = throughput / peer_throughput;
                verdicts.push(format!(
                    "100 % corrupted: {x:.3}× the peer's throughput ({}/s vs {}/s; target ≥ {TARGET_THROUGHPUT_RATIO_100PCT}): {}",
                    format_bytes(throughput as u64),
                    format_bytes(peer_throughput as u64),
                    met(x >= TARGET_THROUGHPUT_RATIO_100PCT)
                ));
            }
            _ => {}
        }
    }
    let mut reverses_json = Vec::new();
    for r in reverses {
        let throughput = r.bytes_copied as f64 / r.seconds.max(1e-9);
        let ratio = over_peer(r.seconds);
        rows.push(vec![
            format!("reverse resync, {} % written", r.percent),
            format!("{} blocks", r.blocks_written),
            format!("{} ranges", r.ranges_copied),
            format_bytes(r.bytes_copied),
            format!("{:.3}", r.seconds),
            format!("{}/s", format_bytes(throughput as u64)),
            ratio.map_or("-".into(), |x| format!("{x:.3}")),
        ]);
        reverses_json.push(json!({
            "written_percent": r.percent,
            "blocks_written": r.blocks_written,
            "ranges_copied": r.ranges_copied,
            "bytes_copied": r.bytes_copied,
            "bytes_copied_over_written": r.bytes_copied as f64 / (r.blocks_written * BLOCK_BYTES).max(1) as f64,
            "seconds": r.seconds,
            "ledger_sequence_is_the_snapshots": r.ledger_sequence_restored,
            "time_over_peer": ratio,
        }));
    }
    let peer_json = match peer {
        Ok(p) => {
            rows.push(vec![
                "peer: qemu-img convert + fsync".into(),
                chunks.to_string(),
                format!("{chunks}/{chunks}"),
                format_bytes(size),
                format!("{:.3}", p.seconds()),
                format!(
                    "{}/s",
                    format_bytes((size as f64 / p.seconds().max(1e-9)) as u64)
                ),
                "1".into(),
            ]);
            json!({
                "convert_seconds": p.copy_seconds,
                "fsync_seconds": p.sync_seconds,
                "seconds": p.seconds(),
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
            "what",
            "changed",
            "written/total",
            "bytes",
            "seconds",
            "speed",
            "time ÷ peer",
        ],
        &rows,
    );
    for verdict in &verdicts {
        text.push_str(&format!("  {verdict}\n"));
    }
    if let Some(full) = restores.iter().find(|r| r.percent == 100)
        && let Some(x) = over_peer(full.seconds)
    {
        text.push_str(&format!(
            "  the full restore (100 % corrupted) took {}× the peer's time\n",
            f2(x)
        ));
    }
    BenchOutput {
        table: text,
        figures: json!({
            "chunk_size_bytes": CHUNK_BYTES,
            "chunks": chunks,
            "block_size_bytes": BLOCK_BYTES,
            "restores": restores_json,
            "reverse_resyncs": reverses_json,
            "peer": peer_json,
            "targets": {
                "time_over_peer_at_1_percent": TARGET_TIME_RATIO_1PCT,
                "throughput_over_peer_at_100_percent": TARGET_THROUGHPUT_RATIO_100PCT,
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
    fn a_share_is_at_least_one_and_at_most_all() {
        assert_eq!(share(1024, 1), 11);
        assert_eq!(share(1024, 10), 103);
        assert_eq!(share(1024, 100), 1024);
        assert_eq!(share(16, 1), 1);
        assert_eq!(share(262_144, 1), 2622);
    }
}
