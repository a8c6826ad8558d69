//! One backup run ([0068]–[0070]): acquire (the db-server suspends, splits
//! and resumes) → back up the mate LU → delete the snapshot → follow the
//! resync → compare the backup's digests with the frozen mate's → report.
//!
//! Failure policy: whatever fails after the acquire, the snapshot is still
//! deleted (unless the operator keeps it), and the report says what failed.

use std::time::{Duration, Instant};

use serde::Serialize;
use splitmirror_proto::array::v1 as apb;
use splitmirror_proto::backup::v1 as bpb;
use splitmirror_proto::db::v1 as dpb;
use splitmirror_proto::reason::{Reason, reason};
use tokio_util::sync::CancellationToken;

use crate::clients::{Clients, retry};
use crate::progress::ProgressSink;

/// The chunk size the comparison uses; the same as every backup manifest.
pub const CHUNK_SIZE_BYTES: u64 = backup_server::manifest::CHUNK_SIZE_BYTES;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub volume: u32,
    pub keep_snapshot: bool,
    pub label: String,
    /// Caps the backup's read rate (bytes per second), to leave the
    /// database its share of CPU and I/O; `None` = the server's default.
    pub max_bytes_per_s: Option<u64>,
    /// Cancelled on Ctrl-C: the backup is cancelled and the snapshot deleted.
    pub cancel: CancellationToken,
}

/// How long each phase took, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PhasesMs {
    pub acquire: u64,
    pub backup: u64,
    pub compare: u64,
    pub delete: u64,
    pub resync: u64,
    pub total: u64,
}

/// What `console run` prints (and `--json` prints as one object).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunReport {
    pub run_id: String,
    pub volume: u32,
    pub backup_id: Option<String>,
    pub mate_lu: Option<u32>,
    pub freeze_window_us: Option<u64>,
    pub ledger_sequence: Option<u64>,
    pub bytes: u64,
    pub throughput_mb_per_s: f64,
    pub resync_ranges: u64,
    pub resync_blocks: u64,
    pub resync_bytes: u64,
    pub phases_ms: PhasesMs,
    /// The backup's manifest digests equal `ChecksumRange` of the frozen
    /// mate LU, chunk for chunk.
    pub verified: bool,
    pub mismatched_chunks: Vec<u64>,
    pub snapshot_deleted: bool,
    pub error: Option<String>,
}

impl RunReport {
    pub fn succeeded(&self) -> bool {
        self.error.is_none() && self.verified
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        use splitmirror_proto::units::format_bytes;
        let mut out = String::new();
        let mut line = |key: &str, value: String| out.push_str(&format!("  {key:<18} {value}\n"));
        line("run id", self.run_id.clone());
        line("volume", self.volume.to_string());
        line(
            "backup id",
            self.backup_id.clone().unwrap_or_else(|| "-".into()),
        );
        line(
            "freeze window",
            self.freeze_window_us
                .map_or("-".into(), |us| format!("{us} µs")),
        );
        line(
            "ledger sequence",
            self.ledger_sequence.map_or("-".into(), |s| s.to_string()),
        );
        line(
            "backup",
            format!(
                "{} at {:.1} MB/s",
                format_bytes(self.bytes),
                self.throughput_mb_per_s
            ),
        );
        line(
            "resync",
            format!(
                "{} ranges, {} blocks, {}",
                self.resync_ranges,
                self.resync_blocks,
                format_bytes(self.resync_bytes)
            ),
        );
        let p = self.phases_ms;
        line(
            "phases (ms)",
            format!(
                "acquire {} · backup {} · compare {} · delete {} · resync {} · total {}",
                p.acquire, p.backup, p.compare, p.delete, p.resync, p.total
            ),
        );
        line("snapshot deleted", yes_no(self.snapshot_deleted));
        line("verified", yes_no(self.verified));
        if !self.mismatched_chunks.is_empty() {
            line("mismatched chunks", format!("{:?}", self.mismatched_chunks));
        }
        if let Some(error) = &self.error {
            line("error", error.clone());
        }
        out
    }
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_string()
}

fn ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

/// Performs one backup run. Always answers a report; it succeeded when
/// `error` is `None` and `verified` is true.
pub async fn backup_run(
    clients: &Clients,
    options: &RunOptions,
    progress: &dyn ProgressSink,
) -> RunReport {
    let started = Instant::now();
    let mut report = RunReport {
        run_id: uuid::Uuid::now_v7().to_string(),
        volume: options.volume,
        ..RunReport::default()
    };
    let acquired = acquire(clients, options, progress, &mut report).await;
    if let Some(acquired) = acquired {
        let backup_result = back_up(clients, options, progress, &acquired, &mut report).await;
        if let Err(error) = backup_result {
            report.error = Some(error);
        }
        if options.keep_snapshot {
            progress.phase("keeping the snapshot (--keep-snapshot)");
        } else if let Err(error) =
            delete_and_resync(clients, options, progress, &acquired, &mut report).await
        {
            report.error.get_or_insert(error);
        }
    }
    progress.finish();
    report.phases_ms.total = ms(started);
    report
}

async fn acquire(
    clients: &Clients,
    options: &RunOptions,
    progress: &dyn ProgressSink,
    report: &mut RunReport,
) -> Option<dpb::AcquireSnapshotResponse> {
    progress.phase(&format!(
        "acquiring a snapshot of volume {}",
        options.volume
    ));
    let t = Instant::now();
    let request = dpb::AcquireSnapshotRequest {
        volume: options.volume,
        run_id: report.run_id.clone(),
    };
    let acquire_once = || {
        retry("AcquireSnapshot", clients.step_deadline, || {
            let mut db = clients.db.clone();
            let request = request.clone();
            async move { db.acquire_snapshot(request).await }
        })
    };
    let mut result = acquire_once().await;
    // A pair still resynchronizing (after a restart, or a previous run's
    // resync) cannot be split yet: wait for it, then try once more.
    // db-server says so by the reason it attaches; the message is for the
    // operator and may be reworded.
    if let Err(status) = &result
        && reason(status) == Some(Reason::Resynchronizing)
    {
        progress.phase(&format!(
            "waiting for volume {} to finish resynchronizing",
            options.volume
        ));
        if let Err(error) = wait_synchronized(clients, options.volume, progress).await {
            report.error = Some(error);
            return None;
        }
        result = acquire_once().await;
    }
    report.phases_ms.acquire = ms(t);
    match result {
        Ok(response) => {
            let acquired = response.into_inner();
            report.mate_lu = Some(acquired.mate_lu);
            report.freeze_window_us = Some(acquired.freeze_window_us);
            report.ledger_sequence = Some(acquired.ledger_sequence);
            Some(acquired)
        }
        Err(status) => {
            report.error = Some(format!("acquiring the snapshot: {}", status.message()));
            None
        }
    }
}

/// Backs up the mate LU and, at the same time, asks the array for the
/// mate's chunk digests (the mate is frozen while the snapshot is held).
async fn back_up(
    clients: &Clients,
    options: &RunOptions,
    progress: &dyn ProgressSink,
    acquired: &dpb::AcquireSnapshotResponse,
    report: &mut RunReport,
) -> Result<(), String> {
    progress.phase(&format!("backing up mate LU {}", acquired.mate_lu));
    let t = Instant::now();
    // The backup names the snapshot this run holds: the backup server
    // confirms it with db-server before its first read and after its last,
    // and takes the ledger sequence from there.
    let request = bpb::StartBackupRequest {
        run_id: report.run_id.clone(),
        lu: acquired.mate_lu,
        expected_block_count: Some(acquired.block_count),
        label: options.label.clone(),
        max_bytes_per_s: options.max_bytes_per_s,
        snapshot: Some(bpb::SnapshotRef {
            volume: options.volume,
            holder_run_id: report.run_id.clone(),
        }),
        live: false,
    };
    let started = retry("StartBackup", clients.step_deadline, || {
        let mut backup = clients.backup.clone();
        let request = request.clone();
        async move { backup.start_backup(request).await }
    })
    .await
    .map_err(|s| format!("starting the backup: {}", s.message()))?
    .into_inner();
    report.backup_id = Some(started.backup_id.clone());
    let (followed, mate_digests) = tokio::join!(
        follow_backup(clients, &started.backup_id, progress, &options.cancel),
        mate_digests(clients, acquired),
    );
    report.phases_ms.backup = ms(t);
    let last = followed?;
    report.bytes = last.bytes_done;
    let seconds = report.phases_ms.backup.max(1) as f64 / 1000.0;
    report.throughput_mb_per_s = last.bytes_done as f64 / 1e6 / seconds;
    if last.state() != bpb::BackupState::Complete {
        return Err(format!(
            "the backup {}: {}",
            last.state().as_str_name(),
            last.error
        ));
    }
    let t = Instant::now();
    let mate_digests =
        mate_digests.map_err(|s| format!("checksumming the mate LU: {}", s.message()))?;
    let info = retry("GetBackup", clients.step_deadline, || {
        let mut backup = clients.backup.clone();
        let backup_id = started.backup_id.clone();
        async move { backup.get_backup(bpb::BackupIdRequest { backup_id }).await }
    })
    .await
    .map_err(|s| format!("reading the manifest: {}", s.message()))?
    .into_inner();
    let manifest: backup_server::manifest::Manifest = serde_json::from_str(&info.manifest_json)
        .map_err(|e| format!("the backup's manifest is unreadable: {e}"))?;
    report.mismatched_chunks = compare(&manifest, &mate_digests);
    report.verified = report.mismatched_chunks.is_empty()
        && manifest.chunk_digests.len() == mate_digests.len()
        && manifest.chunk_size_bytes == CHUNK_SIZE_BYTES;
    report.phases_ms.compare = ms(t);
    if !report.verified {
        return Err(format!(
            "the backup differs from the frozen mate LU in {} chunks",
            report.mismatched_chunks.len()
        ));
    }
    Ok(())
}

/// Indexes of the chunks whose manifest digest differs from the array's.
pub fn compare(manifest: &backup_server::manifest::Manifest, digests: &[Vec<u8>]) -> Vec<u64> {
    let longest = manifest.chunk_digests.len().max(digests.len());
    (0..longest)
        .filter(|&i| {
            let ours = manifest
                .chunk_digests
                .get(i)
                .and_then(|hex| backup_server::manifest::from_hex(hex));
            let theirs = digests.get(i).map(Vec::as_slice);
            ours.as_ref().map(|d| &d[..]) != theirs
        })
        .map(|i| i as u64)
        .collect()
}

async fn mate_digests(
    clients: &Clients,
    acquired: &dpb::AcquireSnapshotResponse,
) -> Result<Vec<Vec<u8>>, tonic::Status> {
    let chunk_blocks = CHUNK_SIZE_BYTES / u64::from(acquired.block_size_bytes.max(1));
    let request = apb::ChecksumRangeRequest {
        lu: acquired.mate_lu,
        lba: 0,
        blocks: acquired.block_count,
        chunk_blocks,
    };
    retry("ChecksumRange", clients.step_deadline, || {
        let mut array = clients.array.clone();
        async move { array.checksum_range(request).await }
    })
    .await
    .map(|r| r.into_inner().digests)
}

/// Follows a backup until it ends, re-subscribing after a lost stream. On
/// cancellation, cancels the job and waits for it to end.
async fn follow_backup(
    clients: &Clients,
    backup_id: &str,
    progress: &dyn ProgressSink,
    cancel: &CancellationToken,
) -> Result<bpb::BackupProgress, String> {
    let mut cancelled = false;
    loop {
        let request = bpb::BackupIdRequest {
            backup_id: backup_id.to_string(),
        };
        let mut stream = retry("WatchBackup", clients.step_deadline, || {
            let mut backup = clients.backup.clone();
            let request = request.clone();
            async move { backup.watch_backup(request).await }
        })
        .await
        .map_err(|s| format!("following the backup: {}", s.message()))?
        .into_inner();
        let mut last = None;
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                () = cancel.cancelled(), if !cancelled => {
                    cancelled = true;
                    progress.phase("cancelling the backup");
                    let mut backup = clients.backup.clone();
                    if let Err(s) = backup.cancel_backup(request.clone()).await {
                        tracing::warn!("cancelling backup {backup_id}: {}", s.message());
                    }
                    continue;
                }
            };
            match message {
                Ok(Some(p)) => {
                    if p.bytes_total > 0 {
                        progress.backup(p.bytes_done, p.bytes_total, p.throughput_bytes_per_s);
                    }
                    last = Some(p);
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::warn!("the backup progress stream broke: {}", status.message());
                    break;
                }
            }
        }
        if let Some(last) = last
            && last.state() != bpb::BackupState::Running
        {
            if cancelled && last.state() == bpb::BackupState::Cancelled {
                return Err("cancelled by the operator".into());
            }
            return Ok(last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn delete_and_resync(
    clients: &Clients,
    options: &RunOptions,
    progress: &dyn ProgressSink,
    acquired: &dpb::AcquireSnapshotResponse,
    report: &mut RunReport,
) -> Result<(), String> {
    progress.phase(&format!(
        "deleting the snapshot of volume {}",
        options.volume
    ));
    let t = Instant::now();
    let request = dpb::DeleteSnapshotRequest {
        volume: options.volume,
        run_id: report.run_id.clone(),
        force: false,
    };
    let deleted = retry("DeleteSnapshot", clients.step_deadline, || {
        let mut db = clients.db.clone();
        let request = request.clone();
        async move { db.delete_snapshot(request).await }
    })
    .await
    .map_err(|s| format!("deleting the snapshot: {}", s.message()))?
    .into_inner();
    report.phases_ms.delete = ms(t);
    report.snapshot_deleted = true;
    report.resync_ranges = deleted.ranges_to_resync;
    report.resync_blocks = deleted.blocks_to_resync;
    report.resync_bytes = deleted.blocks_to_resync * u64::from(acquired.block_size_bytes);
    progress.phase("resynchronizing");
    let t = Instant::now();
    wait_synchronized(clients, options.volume, progress).await?;
    report.phases_ms.resync = ms(t);
    Ok(())
}

/// Polls the db-server until the volume is Synchronized, reporting resync
/// progress.
pub async fn wait_synchronized(
    clients: &Clients,
    volume: u32,
    progress: &dyn ProgressSink,
) -> Result<(), String> {
    loop {
        let status = retry("Status", clients.step_deadline, || {
            let mut db = clients.db.clone();
            async move { db.status(dpb::StatusRequest::default()).await }
        })
        .await
        .map_err(|s| format!("following the resync: {}", s.message()))?
        .into_inner();
        let volume_status = status
            .volumes
            .iter()
            .find(|v| v.volume == volume)
            .ok_or_else(|| format!("volume {volume} vanished from the status"))?;
        if let Some(resync) = &volume_status.resync {
            progress.resync(resync.bytes_done, resync.bytes_total);
        }
        match volume_status.data_mode() {
            dpb::Mode::Synchronized => return Ok(()),
            // A pair is split only from Synchronized: split again (by another
            // run, between two polls), the resync waited for has finished.
            // Waiting for Synchronized instead would wait out that other
            // run's whole snapshot, or for ever.
            dpb::Mode::Snapshot => return Ok(()),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
