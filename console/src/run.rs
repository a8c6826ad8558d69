//! One backup run ([0068]–[0070]): acquire (the db-server suspends, splits
//! and resumes) → back up the mate LU → delete the snapshot → follow the
//! resync → compare the backup's digests with the frozen mate's → report.
//!
//! A copy-on-write snapshot ([0072]–[0078]) is no LU of the array: its
//! image is db-server's snapshot virtual LU (saved blocks from the save
//! area, the rest from the mate, which goes on being written). The backup
//! server reads it through db-server; the comparison re-reads it through
//! db-server and hashes it here, before the delete (the array's
//! ChecksumRange of the mate would describe the live volume, not the
//! snapshot); and the delete has nothing to resync.
//!
//! Failure policy: whatever fails after the acquire, the snapshot is still
//! deleted (unless the operator keeps it), and the report says what failed.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use splitmirror_proto::backup::v1 as bpb;
use splitmirror_proto::client::{ClientError, retry};
use splitmirror_proto::db::v1 as dpb;
use splitmirror_proto::reason::Reason;
use splitmirror_proto::telemetry;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::clients::Clients;
use crate::mates::{mate_or_first, of_mate, volume_status_of};
use crate::progress::ProgressSink;

/// The chunk size the mate LU is checksummed with while the backup runs:
/// the backup server's ([`splitmirror_proto::BACKUP_CHUNK_SIZE_BYTES`]).
/// The comparison goes by the manifest's own chunk size
/// (`Manifest.chunk_size_bytes`): a manifest with another one (an older or
/// newer server) has the mate checksummed again with it.
pub const CHUNK_SIZE_BYTES: u64 = splitmirror_proto::BACKUP_CHUNK_SIZE_BYTES;

/// Why a run (or one of its steps) failed. The run's report holds it as
/// text; the steps answer it typed so that callers decide on the variant
/// and the call's [`ClientError::kind`], never on the words.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A call to a node failed for good: a permanent kind, or a transient
    /// one (the node unreachable) past the step deadline. Running again
    /// later may succeed when [`ClientError::is_transient`] says so.
    #[error(transparent)]
    Call(#[from] ClientError),
    /// The backup job ended in another state than Complete (failed on the
    /// backup server, or cancelled there). `failure` says why for a program
    /// (a node that did not answer: a new run may succeed; a snapshot lost:
    /// the image was not frozen), the message for people.
    #[error("the backup {state}: {message}")]
    BackupEnded {
        state: String,
        failure: bpb::BackupFailure,
        message: String,
    },
    /// The operator cancelled the run (Ctrl-C). Not an error to retry.
    #[error("cancelled by the operator")]
    Cancelled,
    /// The backup's manifest is missing or does not describe the LU that
    /// was copied. The image must not be trusted.
    #[error("the backup's manifest is unusable: {0}")]
    Manifest(String),
    /// The image differs from the frozen mate LU in these chunks: the backup
    /// is not a copy of the snapshot. Never retried automatically.
    #[error("the backup differs from the frozen mate LU in {} chunks", .0.len())]
    Mismatch(Vec<u64>),
}

/// Whether a failed acquire must wait for the volume's resync and then be
/// tried again: db-server says so by the reason it attaches
/// ([`Reason::Resynchronizing`]); the message is for the operator and may
/// be reworded.
pub fn must_wait_for_resync(error: &ClientError) -> bool {
    error.reason == Some(Reason::Resynchronizing)
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub volume: u32,
    /// Which of the volume's mates the run splits, backs up, resyncs and
    /// compares with, counted from 1 ([0020]: up to three; 0 is 1).
    pub mate: u32,
    pub keep_snapshot: bool,
    pub label: String,
    /// Caps the backup's read rate (bytes per second), to leave the
    /// database its share of CPU and I/O; `None` = the server's default.
    pub max_bytes_per_s: Option<u64>,
    /// Cancelled on Ctrl-C: the backup is cancelled and the snapshot deleted.
    pub cancel: CancellationToken,
    /// Have the backup server read every non-zero chunk from the array and
    /// compare it with the array's digest, also the chunks its store
    /// already holds (`StartBackupRequest.verify_read`). Without it those
    /// are trusted on the array's digest (ChecksumRange) and not read.
    pub verify_read: bool,
}

/// How a run asks db-server to take its snapshot (`--snapshot-method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SnapshotMethodArg {
    /// Split the mirror pair: the mate LU is the frozen image; the delete
    /// resynchronizes what was written meanwhile.
    Split,
    /// Copy-on-write: the pair stays whole; the pre-update data of written
    /// blocks goes to the volume's save area (db-server --save-area).
    Cow,
}

impl SnapshotMethodArg {
    /// The wire method; `None` (the option unset) asks for the server's
    /// default.
    pub fn to_pb(method: Option<Self>) -> dpb::SnapshotMethod {
        match method {
            None => dpb::SnapshotMethod::Unspecified,
            Some(Self::Split) => dpb::SnapshotMethod::Split,
            Some(Self::Cow) => dpb::SnapshotMethod::Cow,
        }
    }
}

/// The method a snapshot was taken by, as reports name it: "split" or
/// "cow". A db-server that answers none (older than copy-on-write) split.
pub fn method_name(method: dpb::SnapshotMethod) -> &'static str {
    match method {
        dpb::SnapshotMethod::Cow => "cow",
        dpb::SnapshotMethod::Split | dpb::SnapshotMethod::Unspecified => "split",
    }
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
    /// The W3C trace id of this run, shared by the spans of every node it
    /// called; `None` when traces are not exported.
    pub trace_id: Option<String>,
    pub volume: u32,
    /// Which of the volume's mates (counted from 1).
    pub mate: u32,
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
    /// How db-server took the snapshot: "split" or "cow"; `None` when the
    /// acquire failed.
    pub snapshot_method: Option<String>,
    /// What the backup's digests were compared with: for a split
    /// snapshot, the array's ChecksumRange of the frozen mate LU; for a
    /// copy-on-write one, db-server's snapshot virtual LU read again
    /// through db-server and hashed by the console. `None` when no
    /// comparison was made.
    pub compared_with: Option<String>,
    /// The backup's manifest digests equal the reference's
    /// (`compared_with`), chunk for chunk.
    pub verified: bool,
    pub mismatched_chunks: Vec<u64>,
    pub snapshot_deleted: bool,
    pub error: Option<String>,
    /// What the backup read and stored (`Manifest.counts`), flattened so
    /// that scripts read `chunks_read`, `chunks_reused`, `chunks_zero` and
    /// `new_bytes_stored` at the top of the JSON object. All `null` when
    /// the backup did not complete or its server sent no counts.
    #[serde(flatten)]
    pub counts: StoreCounts,
}

/// What one backup moved and stored, from its manifest's `ChunkCounts`.
/// The JSON names are a contract: scripts rely on them.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StoreCounts {
    /// Chunks read from the array (and compared with its digest).
    pub chunks_read: Option<u64>,
    /// Chunks the store already held, by digest: not written again (and not
    /// read unless `verify_read`).
    pub chunks_reused: Option<u64>,
    /// All-zero chunks: neither read nor stored.
    pub chunks_zero: Option<u64>,
    /// Bytes the backup added to the store (as stored, compressed where
    /// that saved space).
    pub new_bytes_stored: Option<u64>,
    /// Data bytes read from the array.
    pub bytes_read: Option<u64>,
    /// Every non-zero chunk was read and compared, also those the store held.
    pub verify_read: Option<bool>,
}

impl StoreCounts {
    /// The counts of a manifest; all `None` when it has none (an old server,
    /// or a backup converted from a raw image).
    pub fn of(manifest: &bpb::Manifest) -> Self {
        manifest.counts.map_or_else(Self::default, |c| Self {
            chunks_read: Some(c.chunks_read),
            chunks_reused: Some(c.chunks_reused),
            chunks_zero: Some(c.chunks_zero),
            new_bytes_stored: Some(c.new_bytes_stored),
            bytes_read: Some(c.bytes_read),
            verify_read: Some(c.verify_read),
        })
    }

    /// One line for people: "stored 3.10 MiB new (read 3 chunks, reused
    /// 1021, 0 zero)"; `None` without counts.
    pub fn summary(&self) -> Option<String> {
        let (Some(read), Some(reused), Some(zero), Some(stored)) = (
            self.chunks_read,
            self.chunks_reused,
            self.chunks_zero,
            self.new_bytes_stored,
        ) else {
            return None;
        };
        let chunks = if read == 1 { "chunk" } else { "chunks" };
        let verified = if self.verify_read == Some(true) {
            "; --verify-read: every non-zero chunk read"
        } else {
            ""
        };
        Some(format!(
            "stored {} new (read {read} {chunks}, reused {reused}, {zero} zero{verified})",
            splitmirror_proto::units::format_bytes(stored)
        ))
    }
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
        if let Some(trace_id) = &self.trace_id {
            line("trace id", trace_id.clone());
        }
        line("volume", self.volume.to_string());
        if self.mate > 1 {
            line("mate", self.mate.to_string());
        }
        line(
            "snapshot method",
            self.snapshot_method.clone().unwrap_or_else(|| "-".into()),
        );
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
        if let Some(summary) = self.counts.summary() {
            line("store", summary);
        }
        line("snapshot deleted", yes_no(self.snapshot_deleted));
        if let Some(compared_with) = &self.compared_with {
            line("compared with", compared_with.clone());
        }
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

/// Performs one backup run by the server's default snapshot method.
/// Always answers a report; it succeeded when `error` is `None` and
/// `verified` is true.
pub async fn backup_run(
    clients: &Clients,
    options: &RunOptions,
    progress: &dyn ProgressSink,
) -> RunReport {
    backup_run_by(clients, options, dpb::SnapshotMethod::Unspecified, progress).await
}

/// [`backup_run`] with the snapshot taken by `method` (`Unspecified`: the
/// server's default).
pub async fn backup_run_by(
    clients: &Clients,
    options: &RunOptions,
    method: dpb::SnapshotMethod,
    progress: &dyn ProgressSink,
) -> RunReport {
    let started = Instant::now();
    let run_id = uuid::Uuid::now_v7().to_string();
    // The root of the run's trace: every call below, and every span the
    // nodes open for them, belongs to it.
    let run_span = tracing::info_span!(
        "backup run",
        run_id = %run_id,
        volume = options.volume,
        mate = mate_or_first(options.mate),
        otel.status_code = tracing::field::Empty,
    );
    let mut report = RunReport {
        run_id,
        trace_id: telemetry::trace_id(&run_span),
        volume: options.volume,
        mate: mate_or_first(options.mate),
        ..RunReport::default()
    };
    async {
        let acquired = acquire(clients, options, method, progress, &mut report)
            .instrument(tracing::info_span!("acquire"))
            .await;
        if let Some(acquired) = acquired {
            let backup_result = back_up(clients, options, progress, &acquired, &mut report)
                .instrument(tracing::info_span!("back up", lu = acquired.mate_lu))
                .await;
            if let Err(error) = backup_result {
                report.error = Some(error.to_string());
            }
            if options.keep_snapshot {
                progress.phase("keeping the snapshot (--keep-snapshot)");
            } else if let Err(error) =
                delete_and_resync(clients, options, progress, &acquired, &mut report)
                    .instrument(tracing::info_span!("delete and resync"))
                    .await
            {
                report.error.get_or_insert(error.to_string());
            }
        }
        if report.error.is_some() {
            tracing::Span::current().record("otel.status_code", "ERROR");
        }
    }
    .instrument(run_span)
    .await;
    progress.finish();
    report.phases_ms.total = ms(started);
    report
}

async fn acquire(
    clients: &Clients,
    options: &RunOptions,
    method: dpb::SnapshotMethod,
    progress: &dyn ProgressSink,
    report: &mut RunReport,
) -> Option<dpb::AcquireSnapshotResponse> {
    let how = match method {
        dpb::SnapshotMethod::Unspecified => "",
        dpb::SnapshotMethod::Split => "split ",
        dpb::SnapshotMethod::Cow => "copy-on-write ",
    };
    let mate = mate_or_first(options.mate);
    progress.phase(&format!(
        "acquiring a {how}snapshot of volume {}{}",
        options.volume,
        of_mate(mate)
    ));
    let t = Instant::now();
    let (db, volume, run_id) = (&clients.db, options.volume, report.run_id.as_str());
    let acquire_once = || {
        retry("AcquireSnapshot", clients.step_deadline, move || {
            db.acquire_snapshot_with(dpb::AcquireSnapshotRequest {
                volume,
                run_id: run_id.to_string(),
                method: method.into(),
                mate,
                ..Default::default()
            })
        })
    };
    let mut result = acquire_once().await;
    // A pair still resynchronizing (after a restart, or a previous run's
    // resync) cannot be split yet: wait for it, then try once more.
    if let Err(error) = &result
        && must_wait_for_resync(error)
    {
        progress.phase(&format!(
            "waiting for volume {}{} to finish resynchronizing",
            options.volume,
            of_mate(mate)
        ));
        if let Err(error) = wait_synchronized_mate(clients, options.volume, mate, progress).await {
            report.error = Some(error.to_string());
            return None;
        }
        result = acquire_once().await;
    }
    report.phases_ms.acquire = ms(t);
    match result {
        // A db-server that does not know several mates splits mate 1
        // whatever it is asked (it answers mate 0): what it split is not
        // the mate this run backs up, so it is released again.
        Ok(acquired) if mate_or_first(acquired.mate) != mate => {
            let split = mate_or_first(acquired.mate);
            let released = db.delete_snapshot_of(volume, split, run_id, false).await;
            report.error = Some(format!(
                "asked db-server to split mate {mate} of volume {volume}, it split mate {split} (mate LU {}): a db-server that does not know several mates; {}",
                acquired.mate_lu,
                match released {
                    Ok(_) => "that snapshot was deleted again".to_string(),
                    Err(error) => format!("deleting that snapshot failed: {error}"),
                }
            ));
            None
        }
        Ok(acquired) => {
            report.mate_lu = Some(acquired.mate_lu);
            report.freeze_window_us = Some(acquired.freeze_window_us);
            report.ledger_sequence = Some(acquired.ledger_sequence);
            report.snapshot_method = Some(method_name(acquired.method()).to_string());
            Some(acquired)
        }
        Err(error) => {
            report.error = Some(error.to_string());
            None
        }
    }
}

/// Backs up the snapshot's image. A split snapshot's mate LU is frozen:
/// the array's digests of it are asked at the same time. A copy-on-write
/// snapshot's image is re-read through db-server after the backup, before
/// the delete.
async fn back_up(
    clients: &Clients,
    options: &RunOptions,
    progress: &dyn ProgressSink,
    acquired: &dpb::AcquireSnapshotResponse,
    report: &mut RunReport,
) -> Result<(), RunError> {
    let cow = acquired.method() == dpb::SnapshotMethod::Cow;
    if cow {
        progress.phase(&format!(
            "backing up the copy-on-write snapshot of volume {} (read through db-server)",
            options.volume
        ));
    } else {
        progress.phase(&format!("backing up mate LU {}", acquired.mate_lu));
    }
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
            mate: mate_or_first(options.mate),
            volume: options.volume,
            holder_run_id: report.run_id.clone(),
        }),
        live: false,
        verify_read: options.verify_read,
    };
    let backup = &clients.backup;
    let started = retry("StartBackup", clients.step_deadline, || {
        backup.start_backup(request.clone())
    })
    .await?;
    report.backup_id = Some(started.backup_id.clone());
    let (followed, mate_digests) = tokio::join!(
        follow_backup(clients, &started.backup_id, progress, &options.cancel),
        async {
            if cow {
                // Asked after the backup, in the manifest's chunk size.
                Ok(Vec::new())
            } else {
                mate_digests(clients, acquired).await
            }
        },
    );
    report.phases_ms.backup = ms(t);
    let last = followed?;
    report.bytes = last.bytes_done;
    let seconds = report.phases_ms.backup.max(1) as f64 / 1000.0;
    report.throughput_mb_per_s = last.bytes_done as f64 / 1e6 / seconds;
    if last.state() != bpb::BackupState::Complete {
        return Err(RunError::BackupEnded {
            state: state_name(last.state()).to_string(),
            failure: last.failure(),
            message: last.error,
        });
    }
    let t = Instant::now();
    let mate_digests = mate_digests?;
    let backup_id = started.backup_id.as_str();
    let info = retry("GetBackup", clients.step_deadline, || {
        backup.get_backup(backup_id, true)
    })
    .await?;
    let manifest = info
        .manifest
        .ok_or_else(|| RunError::Manifest("the complete backup answered no manifest".into()))?;
    report.counts = StoreCounts::of(&manifest);
    if manifest.chunk_digests.len() as u64 != manifest.chunk_count {
        return Err(RunError::Manifest(format!(
            "it lists {} chunk digests of {}",
            manifest.chunk_digests.len(),
            manifest.chunk_count
        )));
    }
    // The digests are comparable only when both sides cut the LU the same
    // way: the manifest's chunk size decides.
    let mate_digests = if cow {
        progress.phase(&format!(
            "re-reading the copy-on-write snapshot of volume {} through db-server to compare",
            options.volume
        ));
        report.compared_with = Some(format!(
            "the copy-on-write snapshot of volume {} re-read through db-server (its snapshot virtual LU: saved blocks from the save area, the rest from mate LU {}) and hashed by the console; not an array-side checksum",
            options.volume, acquired.mate_lu
        ));
        snapshot_digests(
            clients,
            options.volume,
            mate_or_first(options.mate),
            acquired,
            manifest.chunk_size_bytes,
        )
        .await?
    } else {
        report.compared_with = Some(format!(
            "the array's ChecksumRange of the frozen mate LU {}",
            acquired.mate_lu
        ));
        if manifest.chunk_size_bytes == CHUNK_SIZE_BYTES {
            mate_digests
        } else {
            mate_digests_in_chunks_of(clients, acquired, manifest.chunk_size_bytes).await?
        }
    };
    report.mismatched_chunks = compare(&manifest, &mate_digests);
    report.verified =
        report.mismatched_chunks.is_empty() && manifest.chunk_digests.len() == mate_digests.len();
    report.phases_ms.compare = ms(t);
    if !report.verified {
        return Err(RunError::Mismatch(report.mismatched_chunks.clone()));
    }
    Ok(())
}

/// Indexes of the chunks whose manifest digest (the wire manifest, asked
/// with its digests) differs from the array's; a chunk only one side lists
/// differs.
pub fn compare(manifest: &bpb::Manifest, digests: &[Vec<u8>]) -> Vec<u64> {
    let longest = manifest.chunk_digests.len().max(digests.len());
    (0..longest)
        .filter(|&i| manifest.chunk_digests.get(i) != digests.get(i))
        .map(|i| i as u64)
        .collect()
}

/// The mate LU's chunk digests, as the array computes them.
async fn mate_digests(
    clients: &Clients,
    acquired: &dpb::AcquireSnapshotResponse,
) -> Result<Vec<Vec<u8>>, ClientError> {
    mate_digests_in_chunks_of(clients, acquired, CHUNK_SIZE_BYTES).await
}

/// The mate LU's digests in chunks of `chunk_size_bytes`.
async fn mate_digests_in_chunks_of(
    clients: &Clients,
    acquired: &dpb::AcquireSnapshotResponse,
    chunk_size_bytes: u64,
) -> Result<Vec<Vec<u8>>, ClientError> {
    let chunk_blocks = (chunk_size_bytes / u64::from(acquired.block_size_bytes.max(1))).max(1);
    let array = &clients.array;
    let (lu, blocks) = (acquired.mate_lu, acquired.block_count);
    let digests = retry("ChecksumRange", clients.step_deadline, || {
        array.checksums(lu, 0, blocks, chunk_blocks)
    })
    .await?;
    Ok(digests.iter().map(|d| d.to_vec()).collect())
}

/// Bytes of the snapshot virtual LU one read asks db-server for.
const SNAPSHOT_READ_BYTES: u64 = 16 << 20;

/// The digests of a volume's snapshot virtual LU in chunks of
/// `chunk_size_bytes`, read through db-server (a copy-on-write snapshot:
/// the array holds no LU with its image) and hashed here.
async fn snapshot_digests(
    clients: &Clients,
    volume: u32,
    mate: u32,
    acquired: &dpb::AcquireSnapshotResponse,
    chunk_size_bytes: u64,
) -> Result<Vec<Vec<u8>>, ClientError> {
    let block_size_bytes = u64::from(acquired.block_size_bytes.max(1));
    let chunk_blocks = (chunk_size_bytes / block_size_bytes).max(1);
    // Whole chunks per read, so that no chunk straddles two reads.
    let blocks_per_read =
        (SNAPSHOT_READ_BYTES / block_size_bytes / chunk_blocks).max(1) * chunk_blocks;
    let db = &clients.db;
    let mut digests = Vec::new();
    let mut lba = 0;
    while lba < acquired.block_count {
        let blocks = blocks_per_read.min(acquired.block_count - lba);
        let data = retry("Read", clients.step_deadline, || {
            db.read_mate(volume, dpb::VirtualLu::Snapshot, mate, lba, blocks)
        })
        .await?;
        digests.extend(chunk_digests(&data, chunk_blocks * block_size_bytes));
        lba += blocks;
    }
    Ok(digests)
}

/// The BLAKE3 digest of each `chunk_bytes` piece of `data` (the last may
/// be shorter), as the array's ChecksumRange and the manifest cut it.
pub fn chunk_digests(data: &[u8], chunk_bytes: u64) -> Vec<Vec<u8>> {
    data.chunks(chunk_bytes.max(1) as usize)
        .map(|chunk| blake3::hash(chunk).as_bytes().to_vec())
        .collect()
}

/// A backup state's name without its prefix: "COMPLETE", "FAILED", ….
pub fn state_name(state: bpb::BackupState) -> &'static str {
    state.as_str_name().trim_start_matches("BACKUP_STATE_")
}

/// Follows a backup until it ends, re-subscribing after a lost stream. On
/// cancellation, cancels the job and waits for it to end.
async fn follow_backup(
    clients: &Clients,
    backup_id: &str,
    progress: &dyn ProgressSink,
    cancel: &CancellationToken,
) -> Result<bpb::BackupProgress, RunError> {
    let mut cancelled = false;
    let backup = &clients.backup;
    loop {
        let mut stream = retry("WatchBackup", clients.step_deadline, || {
            backup.watch_backup(backup_id)
        })
        .await?;
        let mut last = None;
        loop {
            let message = tokio::select! {
                message = stream.next() => message,
                () = cancel.cancelled(), if !cancelled => {
                    cancelled = true;
                    progress.phase("cancelling the backup");
                    if let Err(error) = backup.cancel_backup(backup_id).await {
                        tracing::warn!("{error}");
                    }
                    continue;
                }
            };
            match message {
                Some(Ok(p)) => {
                    if p.bytes_total > 0 {
                        progress.backup(p.bytes_done, p.bytes_total, p.throughput_bytes_per_s);
                    }
                    last = Some(p);
                }
                None => break,
                Some(Err(error)) => {
                    tracing::warn!("the backup progress stream broke: {error}");
                    break;
                }
            }
        }
        if let Some(last) = last
            && last.state() != bpb::BackupState::Running
        {
            if cancelled && last.state() == bpb::BackupState::Cancelled {
                return Err(RunError::Cancelled);
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
) -> Result<(), RunError> {
    let mate = mate_or_first(options.mate);
    progress.phase(&format!(
        "deleting the snapshot of volume {}{}",
        options.volume,
        of_mate(mate)
    ));
    let t = Instant::now();
    let (db, volume, run_id) = (&clients.db, options.volume, report.run_id.as_str());
    let deleted = retry("DeleteSnapshot", clients.step_deadline, || {
        db.delete_snapshot_of(volume, mate, run_id, false)
    })
    .await?;
    report.phases_ms.delete = ms(t);
    report.snapshot_deleted = true;
    report.resync_ranges = deleted.ranges_to_resync;
    report.resync_blocks = deleted.blocks_to_resync;
    report.resync_bytes = deleted.blocks_to_resync * u64::from(acquired.block_size_bytes);
    if acquired.method() == dpb::SnapshotMethod::Cow {
        // The pair never split: both copies are up to date, and the save
        // area's map is dropped with the snapshot. Nothing to wait for.
        progress.phase("no resync: a copy-on-write snapshot never split the pair");
        return Ok(());
    }
    progress.phase("resynchronizing");
    let t = Instant::now();
    wait_synchronized_mate(clients, options.volume, mate, progress).await?;
    report.phases_ms.resync = ms(t);
    Ok(())
}

/// Polls the db-server until the volume's (first mate's) pair is
/// Synchronized, reporting resync progress. A volume db-server does not
/// know fails with
/// [`ErrorKind::NotFound`](splitmirror_proto::client::ErrorKind::NotFound).
pub async fn wait_synchronized(
    clients: &Clients,
    volume: u32,
    progress: &dyn ProgressSink,
) -> Result<(), RunError> {
    wait_synchronized_mate(clients, volume, 1, progress).await
}

/// [`wait_synchronized`] for the pair of the volume's mate `mate`
/// (counted from 1): each mate resyncs on its own, so the others' modes
/// say nothing of this one. A mate the volume does not have fails with
/// [`ErrorKind::NotFound`](splitmirror_proto::client::ErrorKind::NotFound).
pub async fn wait_synchronized_mate(
    clients: &Clients,
    volume: u32,
    mate: u32,
    progress: &dyn ProgressSink,
) -> Result<(), RunError> {
    let db = &clients.db;
    loop {
        let volume_status = retry("Status", clients.step_deadline, || {
            volume_status_of(db, volume, mate)
        })
        .await?;
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

#[cfg(test)]
mod tests {
    use splitmirror_proto::client::ErrorKind;

    use super::*;

    /// An acquire refused by db-server with `message` and `reason`.
    fn refused(message: &str, reason: Option<Reason>) -> ClientError {
        let mut error = ClientError::local(
            ErrorKind::FailedPrecondition,
            "db-server",
            "127.0.0.1:50052",
            "acquiring a snapshot of volume 0",
            message,
        );
        error.reason = reason;
        error
    }

    #[test]
    fn the_report_carries_the_counts_at_the_top_of_its_json() {
        let manifest = bpb::Manifest {
            counts: Some(bpb::ChunkCounts {
                chunks_read: 3,
                chunks_reused: 1021,
                chunks_zero: 0,
                new_bytes_stored: 3 << 20,
                bytes_read: 3 << 20,
                verify_read: false,
            }),
            ..Default::default()
        };
        let report = RunReport {
            counts: StoreCounts::of(&manifest),
            ..RunReport::default()
        };
        let json = serde_json::to_value(&report).expect("JSON");
        assert_eq!(json["chunks_read"], 3);
        assert_eq!(json["chunks_reused"], 1021);
        assert_eq!(json["chunks_zero"], 0);
        assert_eq!(json["new_bytes_stored"], 3 << 20);
        assert!(
            report
                .render()
                .contains("stored 3.00 MiB new (read 3 chunks, reused 1021, 0 zero)"),
            "{}",
            report.render()
        );
        // Without counts (an old server), the names are there, null.
        let json = serde_json::to_value(RunReport::default()).expect("JSON");
        assert!(json["chunks_read"].is_null() && json.get("new_bytes_stored").is_some());
    }

    #[test]
    fn the_snapshot_digests_are_cut_as_the_manifest_cuts_the_image() {
        let chunk = CHUNK_SIZE_BYTES as usize;
        let mut image = vec![1u8; chunk];
        image.extend(vec![2u8; chunk / 2]);
        let digests = chunk_digests(&image, CHUNK_SIZE_BYTES);
        assert_eq!(digests.len(), 2);
        assert_eq!(
            digests[0],
            blake3::hash(&image[..chunk]).as_bytes().to_vec()
        );
        assert_eq!(
            digests[1],
            blake3::hash(&image[chunk..]).as_bytes().to_vec()
        );
        let manifest = bpb::Manifest {
            chunk_digests: digests.clone(),
            ..Default::default()
        };
        assert!(compare(&manifest, &digests).is_empty());
        let mut changed = image.clone();
        changed[chunk + 7] ^= 1;
        assert_eq!(
            compare(&manifest, &chunk_digests(&changed, CHUNK_SIZE_BYTES)),
            vec![1]
        );
    }

    #[test]
    fn the_report_names_the_method_and_what_the_backup_was_compared_with() {
        assert_eq!(
            SnapshotMethodArg::to_pb(None),
            dpb::SnapshotMethod::Unspecified
        );
        assert_eq!(
            SnapshotMethodArg::to_pb(Some(SnapshotMethodArg::Cow)),
            dpb::SnapshotMethod::Cow
        );
        assert_eq!(method_name(dpb::SnapshotMethod::Unspecified), "split");
        let report = RunReport {
            snapshot_method: Some("cow".into()),
            compared_with: Some("the snapshot re-read through db-server".into()),
            ..RunReport::default()
        };
        let text = report.render();
        assert!(text.contains("snapshot method    cow"), "{text}");
        assert!(
            text.contains("compared with      the snapshot re-read through db-server"),
            "{text}"
        );
        let json = serde_json::to_value(&report).expect("JSON");
        assert_eq!(json["snapshot_method"], "cow");
        assert_eq!(
            json["compared_with"],
            "the snapshot re-read through db-server"
        );
    }

    #[test]
    fn the_resync_wait_follows_the_reason_whatever_the_message_says() {
        for message in [
            "volume 0 is Resynchronizing",
            "la paire se resynchronise",
            "",
        ] {
            assert!(must_wait_for_resync(&refused(
                message,
                Some(Reason::Resynchronizing)
            )));
            assert!(!must_wait_for_resync(&refused(message, None)));
            assert!(!must_wait_for_resync(&refused(
                message,
                Some(Reason::SnapshotHeld)
            )));
        }
    }
}
