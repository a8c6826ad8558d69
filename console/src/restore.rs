//! The way back (issue 17): a restore from a backup, in place onto a
//! volume or elsewhere onto a plain LU, and the reverse resync to a held
//! snapshot. Plain functions over the typed clients that answer a report
//! or a typed error; `console restore`, `console snapshot restore`, the
//! demo, the benchmark and the tests call them.
//!
//! A restore of a volume ([`restore`] with [`RestoreTarget::Volume`]):
//!
//! 1. Checks that touch nothing: the backup is complete and of the
//!    volume's size and block size (GetBackup, db-server's Status); the
//!    volume's ledger runs (else `--force`, saying why).
//! 2. db-server BeginRestore: the ledger stops, the volume goes offline
//!    (its Read and Write answer UNAVAILABLE, reason `restoring`), the
//!    state is journaled and the backup server may write the pair's LUs.
//! 3. A safety backup, unless `--no-safety-backup`: a live backup of the
//!    mirror LU, run id `<R>-safety`, taken while the volume is offline (so
//!    nothing changes under it). If it fails, the restore is abandoned
//!    (the volume is unchanged) unless `--force`.
//! 4. backup-server StartRestore / WatchRestore: only the chunks whose
//!    digests differ from the backup's are written, onto the mirror LU, then
//!    checked on origin and mate by the array's digests ("verified").
//! 5. db-server EndRestore with the backup's image digest: origin and mate
//!    compared whole with each other and with the image, the pair
//!    Synchronized, the ledger reopened at the backup's sequence.
//!
//! A failure after step 2 leaves the volume offline, on purpose: the error
//! says how to continue (the same command with `--run-id R`, which finds
//! the restore begun and writes only what still differs, or `console
//! restore abandon`).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use splitmirror_proto::backup::v1 as bpb;
use splitmirror_proto::client::{ClientError, ErrorKind, retry};
use splitmirror_proto::db::v1 as dpb;
use splitmirror_proto::units::format_bytes;

use crate::clients::Clients;
use crate::progress::ProgressSink;

/// What the safety backup's run id adds to the restore's.
pub const SAFETY_RUN_SUFFIX: &str = "-safety";

/// How often a restore job may be started again after its server lost it
/// (a restart) before the restore gives up.
const MAX_JOB_RESTARTS: u32 = 5;

/// Where a backup is restored to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreTarget {
    /// A db-server volume (its mirror LU id): in place, through
    /// BeginRestore … EndRestore.
    Volume(u32),
    /// A plain LU of the array, of the backup's size: no volume is touched,
    /// db-server is not called.
    Lu(u32),
}

impl std::fmt::Display for RestoreTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Volume(volume) => write!(f, "volume {volume}"),
            Self::Lu(lu) => write!(f, "LU {lu}"),
        }
    }
}

/// One restore, as `console restore` takes it.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub target: RestoreTarget,
    pub backup_id: String,
    /// The restore run's id; `None`: a new one (the report says which).
    /// Giving the id of a restore that did not finish continues it.
    pub run_id: Option<String>,
    /// Take a safety backup of the volume before writing it (ignored for
    /// [`RestoreTarget::Lu`]).
    pub safety_backup: bool,
    /// Go on when the volume's ledger is not reachable or the safety backup
    /// failed.
    pub force: bool,
    /// Caps the restore's write rate (bytes per second).
    pub max_bytes_per_s: Option<u64>,
}

impl RestoreRequest {
    /// A restore of `backup_id` onto `volume`, with its safety backup.
    pub fn volume(volume: u32, backup_id: impl Into<String>) -> Self {
        Self {
            target: RestoreTarget::Volume(volume),
            backup_id: backup_id.into(),
            run_id: None,
            safety_backup: true,
            force: false,
            max_bytes_per_s: None,
        }
    }

    /// A restore of `backup_id` onto the plain LU `lu`.
    pub fn to_lu(lu: u32, backup_id: impl Into<String>) -> Self {
        Self {
            target: RestoreTarget::Lu(lu),
            safety_backup: false,
            ..Self::volume(0, backup_id)
        }
    }
}

/// Why a restore did not complete. Decide on the variant (and on the
/// [`ClientError`]'s kind and reason), never on the words. The variants
/// that carry a report happened after something may have changed: the
/// report says what, and `next_steps` how to continue.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The request itself is unusable (a bad run id); nothing was called.
    #[error("{0}")]
    InvalidRequest(String),
    /// The backup is not one that can be restored: it did not complete, or
    /// its server answered no manifest. Nothing was touched.
    #[error("backup {backup_id} cannot be restored: {reason}")]
    BackupNotRestorable { backup_id: String, reason: String },
    /// The backup is not of the target's size or block size. Nothing was
    /// touched.
    #[error(
        "backup {backup_id} is {backup_block_count} blocks of {backup_block_size_bytes} bytes, \
         but {target} is {target_block_count} blocks of {target_block_size_bytes} bytes: \
         nothing was changed"
    )]
    GeometryMismatch {
        backup_id: String,
        target: RestoreTarget,
        backup_block_size_bytes: u32,
        backup_block_count: u64,
        target_block_size_bytes: u32,
        target_block_count: u64,
    },
    /// `--to-lu` names an LU that is not plain (a mirror, origin or mate
    /// LU). Nothing was touched.
    #[error("LU {lu} is a {kind} LU: --to-lu takes a plain LU; nothing was changed")]
    NotPlainLu { lu: u32, kind: String },
    /// The volume holds the ledger and it does not run, or db-server's
    /// Status failed: `--force` restores anyway. Nothing was touched.
    #[error(
        "{reason}; nothing was changed. Restore anyway with --force (the ledger is reopened \
         from the restored volume at the end)"
    )]
    LedgerNotReachable { reason: String },
    /// A call failed for good (a permanent kind, or a node unreachable past
    /// the step deadline). `step` names the call; the report says what was
    /// done before it (for BeginRestore and before: nothing).
    #[error("{step}: {source}")]
    Call {
        step: &'static str,
        #[source]
        source: ClientError,
        report: Box<RestoreReport>,
    },
    /// The safety backup failed and `--force` was not given. The restore
    /// was abandoned when this run had written nothing yet (`abandoned`):
    /// the volume is unchanged and online again.
    #[error("the safety backup failed: {message}")]
    SafetyBackupFailed {
        message: String,
        abandoned: bool,
        report: Box<RestoreReport>,
    },
    /// The restore job ended FAILED on the backup server. A volume stays
    /// offline: run the same command again with the same run id, or
    /// abandon the restore.
    #[error("the restore job failed ({}): {message}", failure_name(*.failure))]
    JobFailed {
        failure: bpb::RestoreFailure,
        message: String,
        report: Box<RestoreReport>,
    },
}

impl RestoreError {
    /// The report of what was done, when the error came after the checks.
    pub fn report(&self) -> Option<&RestoreReport> {
        match self {
            Self::Call { report, .. }
            | Self::SafetyBackupFailed { report, .. }
            | Self::JobFailed { report, .. } => Some(report),
            _ => None,
        }
    }

    /// The failed call, when a call failed.
    pub fn client_error(&self) -> Option<&ClientError> {
        match self {
            Self::Call { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// How long each step took, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RestorePhasesMs {
    /// GetBackup, db-server's Status, the geometry and ledger checks.
    pub checks: u64,
    /// BeginRestore (the volume goes offline).
    pub begin: u64,
    pub safety_backup: u64,
    /// The restore job, StartRestore to its end, and its phases as the
    /// backup server reported them.
    pub restore: u64,
    pub compare: u64,
    pub check: u64,
    pub write: u64,
    pub verify: u64,
    /// EndRestore (the whole-volume comparison, the ledger reopened).
    pub end: u64,
    pub total: u64,
}

/// The safety backup, as the report names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SafetyBackup {
    /// Taken by this run before the restore wrote anything.
    Taken { backup_id: String },
    /// Taken on a re-run (the run's first attempt had none): the volume
    /// may already hold part of the restore.
    TakenOnRerun { backup_id: String },
    /// A re-run found the safety backup its first attempt took.
    Reused { backup_id: String },
    /// `--no-safety-backup`.
    Skipped,
    /// It failed; with `--force` the restore went on.
    Failed { message: String },
    /// A restore onto a plain LU overwrites no volume.
    NotApplicable,
    /// The restore stopped before this step.
    NotReached,
}

impl SafetyBackup {
    /// For people.
    pub fn describe(&self) -> String {
        match self {
            Self::Taken { backup_id } => backup_id.clone(),
            Self::TakenOnRerun { backup_id } => format!(
                "{backup_id} (taken on a re-run: the volume may already have held part of the restore)"
            ),
            Self::Reused { backup_id } => {
                format!("{backup_id} (taken by this run's first attempt)")
            }
            Self::Skipped => "none: --no-safety-backup".into(),
            Self::Failed { message } => format!("failed: {message}"),
            Self::NotApplicable => "none: a plain LU".into(),
            Self::NotReached => "-".into(),
        }
    }

    /// The backup id, when there is a safety backup.
    pub fn backup_id(&self) -> Option<&str> {
        match self {
            Self::Taken { backup_id }
            | Self::TakenOnRerun { backup_id }
            | Self::Reused { backup_id } => Some(backup_id),
            _ => None,
        }
    }
}

/// What EndRestore found when it compared the volume.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EndCheck {
    /// The volume's image digest as compared (hex).
    pub image_digest: String,
    /// It equals the backup's.
    pub image_digest_matches: bool,
    /// Chunks of origin and of mate compared (each side's count).
    pub chunks_compared: u64,
    /// The restore had already been ended by this run id (a retry).
    pub already_ended: bool,
}

/// What `console restore` prints (and `--json` prints as one object).
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub run_id: String,
    pub backup_id: String,
    /// The backup's ledger sequence, when it recorded one.
    pub backup_ledger_sequence: Option<u64>,
    /// "volume 0" or "LU 6".
    pub target: String,
    pub volume: Option<u32>,
    /// The LU written (the volume's mirror LU, or the plain LU).
    pub lu: Option<u32>,
    /// BeginRestore found the volume already offline for this run (a
    /// re-run).
    pub already_restoring: bool,
    /// BeginRestore found this run's restore ended already (an earlier
    /// call's EndRestore compared the volume with the backup's image digest
    /// and brought it back online; its answer was lost): nothing was done
    /// now, and `verified` stands on that earlier comparison.
    pub ended_before: bool,
    /// The ledger's sequence when BeginRestore stopped it.
    pub ledger_sequence_stopped: Option<u64>,
    pub safety_backup: SafetyBackup,
    pub phases_ms: RestorePhasesMs,
    pub chunks_total: u64,
    pub chunks_compared: u64,
    pub chunks_to_write: u64,
    pub chunks_written: u64,
    pub bytes_written: u64,
    pub throughput_bytes_per_s: u64,
    /// The backup server's verdict: every chunk written equals the
    /// backup's digest by the array's ChecksumRange on every side after the
    /// flush, and the chunks not written matched before.
    pub verified: bool,
    /// What was compared, for people.
    pub verification: String,
    /// EndRestore's whole-volume comparison (a volume only).
    pub end: Option<EndCheck>,
    pub ledger_running: bool,
    pub ledger_sequence: Option<u64>,
    /// Why the ledger did not reopen, when it did not.
    pub ledger_error: Option<String>,
    /// Things the operator should know that are not failures (`--force`
    /// used, a check skipped).
    pub notes: Vec<String>,
    pub error: Option<String>,
    /// How to continue after a failure.
    pub next_steps: Option<String>,
}

impl RestoreReport {
    fn new(run_id: &str, request: &RestoreRequest) -> Self {
        let (volume, lu) = match request.target {
            RestoreTarget::Volume(volume) => (Some(volume), None),
            RestoreTarget::Lu(lu) => (None, Some(lu)),
        };
        Self {
            run_id: run_id.to_string(),
            backup_id: request.backup_id.clone(),
            backup_ledger_sequence: None,
            target: request.target.to_string(),
            volume,
            lu,
            already_restoring: false,
            ended_before: false,
            ledger_sequence_stopped: None,
            safety_backup: SafetyBackup::NotReached,
            phases_ms: RestorePhasesMs::default(),
            chunks_total: 0,
            chunks_compared: 0,
            chunks_to_write: 0,
            chunks_written: 0,
            bytes_written: 0,
            throughput_bytes_per_s: 0,
            verified: false,
            verification: String::new(),
            end: None,
            ledger_running: false,
            ledger_sequence: None,
            ledger_error: None,
            notes: Vec::new(),
            error: None,
            next_steps: None,
        }
    }

    /// Completed and verified: by the backup server, and for a volume by
    /// EndRestore's comparison with the backup's image digest.
    pub fn succeeded(&self) -> bool {
        self.error.is_none()
            && self.verified
            && (self.volume.is_none()
                || self
                    .end
                    .as_ref()
                    .is_some_and(|e| e.image_digest_matches || e.already_ended))
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |key: &str, value: String| out.push_str(&format!("  {key:<18} {value}\n"));
        line("run id", self.run_id.clone());
        line(
            "backup id",
            match self.backup_ledger_sequence {
                Some(sequence) => format!("{} (ledger sequence {sequence})", self.backup_id),
                None => self.backup_id.clone(),
            },
        );
        let target = match (self.volume, self.lu) {
            (Some(_), Some(lu)) => format!("{} (mirror LU {lu})", self.target),
            _ => self.target.clone(),
        };
        let rerun = if self.ended_before {
            " · ended before by this run (nothing done now)"
        } else if self.already_restoring {
            " · continued (the volume was already offline for this run)"
        } else {
            ""
        };
        line("target", format!("{target}{rerun}"));
        if self.volume.is_some() {
            line("safety backup", self.safety_backup.describe());
        }
        let p = self.phases_ms;
        line(
            "phases (ms)",
            format!(
                "checks {} · begin {} · safety backup {} · restore {} (compare {} · check {} · write {} · verify {}) · end {} · total {}",
                p.checks,
                p.begin,
                p.safety_backup,
                p.restore,
                p.compare,
                p.check,
                p.write,
                p.verify,
                p.end,
                p.total
            ),
        );
        line(
            "chunks",
            format!(
                "{} in the backup · {} compared · {} different · {} written",
                self.chunks_total, self.chunks_compared, self.chunks_to_write, self.chunks_written
            ),
        );
        line(
            "written",
            format!(
                "{} at {}/s",
                format_bytes(self.bytes_written),
                format_bytes(self.throughput_bytes_per_s)
            ),
        );
        let verification = if self.verification.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.verification)
        };
        // Not "verified" alone: the demo prints backup run reports too, and
        // scripts count their "verified" lines.
        line(
            "restore verified",
            format!("{}{verification}", yes_no(self.verified)),
        );
        if let Some(end) = self.end.as_ref().filter(|e| e.already_ended) {
            line(
                "image digest",
                format!(
                    "compared by this run's first EndRestore, whose answer was lost; this call found \
                     the restore ended ({} chunks compared now)",
                    end.chunks_compared
                ),
            );
        } else if let Some(end) = &self.end {
            line(
                "image digest",
                format!(
                    "{} {} the backup's · {} chunks of origin and of mate compared",
                    short_hex(&end.image_digest),
                    if end.image_digest_matches {
                        "matches"
                    } else {
                        "DOES NOT MATCH"
                    },
                    end.chunks_compared
                ),
            );
        }
        if self.volume.is_some() {
            let ledger = if self.ledger_running {
                match self.ledger_sequence {
                    Some(sequence) => {
                        // db-server answers the sequence once the ledger
                        // runs again: its workers may have committed a few
                        // transactions on top of the backup's by then.
                        let relation = match self.backup_ledger_sequence {
                            Some(backup) if backup == sequence => " (= the backup's)".to_string(),
                            Some(backup) if backup < sequence => {
                                format!(" (reopened from the backup's {backup})")
                            }
                            Some(backup) => format!(" (BELOW the backup's {backup})"),
                            None => String::new(),
                        };
                        format!("running at sequence {sequence}{relation}")
                    }
                    None => "running".into(),
                }
            } else {
                match &self.ledger_error {
                    Some(error) => format!("not running: {error}"),
                    None => "not running".into(),
                }
            };
            line("ledger", ledger);
        }
        for note in &self.notes {
            line("note", note.clone());
        }
        if let Some(error) = &self.error {
            line("error", error.clone());
        }
        if let Some(next) = &self.next_steps {
            line("next", next.clone());
        }
        out
    }
}

/// What `console restore abandon` did.
#[derive(Debug, Clone, Serialize)]
pub struct AbandonReport {
    pub volume: u32,
    pub run_id: String,
    /// The restore had already been ended by this run id.
    pub already_ended: bool,
    /// Chunks found different and copied origin → mate.
    pub chunks_resynced: u64,
    pub ledger_running: bool,
    pub ledger_sequence: Option<u64>,
    pub ledger_error: Option<String>,
}

impl AbandonReport {
    pub fn render(&self) -> String {
        let already = if self.already_ended {
            " (it had already ended)"
        } else {
            ""
        };
        let ledger = match (
            self.ledger_running,
            self.ledger_sequence,
            &self.ledger_error,
        ) {
            (true, Some(sequence), _) => format!("the ledger runs at sequence {sequence}"),
            (true, None, _) => "the ledger runs".into(),
            (false, _, Some(error)) => format!("the ledger did not reopen: {error}"),
            (false, _, None) => "no ledger runs on it".into(),
        };
        format!(
            "restore run {} of volume {} abandoned{already}: the volume is online with what it holds; \
             {} chunks resynchronized origin → mate; {ledger}\n",
            self.run_id, self.volume, self.chunks_resynced
        )
    }
}

/// What `console snapshot restore` did.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRestoreReport {
    pub volume: u32,
    /// Which of the volume's mates was copied onto the origin (counted
    /// from 1).
    pub mate: u32,
    pub run_id: String,
    pub already_restored: bool,
    pub ranges_copied: u64,
    pub blocks_copied: u64,
    pub bytes_copied: u64,
    /// db-server's time for the reverse resync.
    pub duration_us: u64,
    /// The console's time for the whole call.
    pub total_ms: u64,
    pub snapshot_ledger_sequence: u64,
    pub ledger_running: bool,
    pub ledger_sequence: Option<u64>,
    pub ledger_error: Option<String>,
}

impl SnapshotRestoreReport {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |key: &str, value: String| out.push_str(&format!("  {key:<18} {value}\n"));
        line("run id", self.run_id.clone());
        let already = if self.already_restored {
            " (already restored by this run)"
        } else {
            ""
        };
        line("volume", format!("{}{already}", self.volume));
        if self.mate > 1 {
            line("mate", self.mate.to_string());
        }
        line(
            "copied",
            format!(
                "{} ranges, {} blocks, {} mate → origin",
                self.ranges_copied,
                self.blocks_copied,
                format_bytes(self.bytes_copied)
            ),
        );
        line(
            "time",
            format!(
                "{:.1} ms on db-server, {} ms in all",
                self.duration_us as f64 / 1000.0,
                self.total_ms
            ),
        );
        line(
            "snapshot sequence",
            self.snapshot_ledger_sequence.to_string(),
        );
        let ledger = match (
            self.ledger_running,
            self.ledger_sequence,
            &self.ledger_error,
        ) {
            (true, Some(sequence), _) => format!("running at sequence {sequence}"),
            (true, None, _) => "running".into(),
            (false, _, Some(error)) => format!("not running: {error}"),
            (false, _, None) => "not running".into(),
        };
        line("ledger", ledger);
        out
    }
}

/// Restores a backup (see the module's text for the flow). Answers the
/// report of a completed restore; an error says what failed and, after
/// the checks, carries the report and how to continue.
pub async fn restore(
    clients: &Clients,
    request: &RestoreRequest,
    progress: &dyn ProgressSink,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let run_id = match &request.run_id {
        Some(run_id) => {
            splitmirror_proto::run_id::validate_run_id(run_id)
                .map_err(|e| RestoreError::InvalidRequest(format!("--run-id: {e}")))?;
            run_id.clone()
        }
        None => uuid::Uuid::now_v7().to_string(),
    };
    // The safety backup's run id must be a valid run id too.
    if let RestoreTarget::Volume(_) = request.target {
        splitmirror_proto::run_id::validate_run_id(&format!("{run_id}{SAFETY_RUN_SUFFIX}"))
            .map_err(|e| RestoreError::InvalidRequest(format!("--run-id: {e}")))?;
    }
    progress.phase(&format!(
        "restore run {run_id}: backup {} onto {} (to continue it after a failure, give --run-id {run_id})",
        request.backup_id, request.target
    ));
    let mut report = RestoreReport::new(&run_id, request);
    let result = restore_steps(clients, request, progress, &mut report).await;
    progress.finish();
    report.phases_ms.total = ms(started);
    match result {
        Ok(()) => Ok(report),
        Err(mut error) => {
            let total = report.phases_ms.total;
            if let RestoreError::Call { report, .. }
            | RestoreError::SafetyBackupFailed { report, .. }
            | RestoreError::JobFailed { report, .. } = &mut error
            {
                report.phases_ms.total = total;
            }
            Err(error)
        }
    }
}

async fn restore_steps(
    clients: &Clients,
    request: &RestoreRequest,
    progress: &dyn ProgressSink,
    report: &mut RestoreReport,
) -> Result<(), RestoreError> {
    let t = Instant::now();
    progress.phase("checking the backup and the target");
    let manifest = check_backup(clients, request, report).await?;
    let digest_hex = hex(&manifest.image_digest);
    match request.target {
        RestoreTarget::Volume(volume) => {
            check_volume(clients, request, &manifest, volume, report).await?;
            report.phases_ms.checks = ms(t);
            restore_volume(clients, request, progress, volume, report).await?;
        }
        RestoreTarget::Lu(lu) => {
            check_plain_lu(clients, request, &manifest, lu, report).await?;
            report.phases_ms.checks = ms(t);
            let start = bpb::StartRestoreRequest {
                run_id: report.run_id.clone(),
                backup_id: request.backup_id.clone(),
                volume: None,
                to_lu: Some(lu),
                max_bytes_per_s: request.max_bytes_per_s,
            };
            let last = run_job(clients, start, progress, report).await?;
            if last.image_digest != manifest.image_digest {
                report.notes.push(format!(
                    "the restore job names image digest {}, the backup's manifest {}",
                    short_hex(&hex(&last.image_digest)),
                    short_hex(&digest_hex)
                ));
            }
        }
    }
    Ok(())
}

/// GetBackup: the backup exists, completed, and has a manifest.
async fn check_backup(
    clients: &Clients,
    request: &RestoreRequest,
    report: &mut RestoreReport,
) -> Result<bpb::Manifest, RestoreError> {
    let backup = &clients.backup;
    let backup_id = request.backup_id.as_str();
    let info = retry("GetBackup", clients.step_deadline, || {
        backup.get_backup(backup_id, false)
    })
    .await
    .map_err(|source| call("GetBackup", source, report, None))?;
    if info.state() != bpb::BackupState::Complete {
        let error = if info.error.is_empty() {
            String::new()
        } else {
            format!(": {}", info.error)
        };
        return Err(RestoreError::BackupNotRestorable {
            backup_id: backup_id.to_string(),
            reason: format!(
                "it is {}{error}; only a complete backup can be restored",
                crate::run::state_name(info.state())
            ),
        });
    }
    let manifest = info
        .manifest
        .ok_or_else(|| RestoreError::BackupNotRestorable {
            backup_id: backup_id.to_string(),
            reason: "its server answered no manifest for it".into(),
        })?;
    report.backup_ledger_sequence = manifest.ledger_sequence;
    if manifest.live {
        report.notes.push(
            "the backup is a live copy (not frozen by a snapshot): its image need not be consistent"
                .into(),
        );
    }
    Ok(manifest)
}

/// The target's geometry against the backup's.
fn check_geometry(
    request: &RestoreRequest,
    manifest: &bpb::Manifest,
    block_size_bytes: u32,
    block_count: u64,
) -> Result<(), RestoreError> {
    if (manifest.block_size_bytes, manifest.block_count) == (block_size_bytes, block_count) {
        return Ok(());
    }
    Err(RestoreError::GeometryMismatch {
        backup_id: request.backup_id.clone(),
        target: request.target,
        backup_block_size_bytes: manifest.block_size_bytes,
        backup_block_count: manifest.block_count,
        target_block_size_bytes: block_size_bytes,
        target_block_count: block_count,
    })
}

/// db-server's Status: the volume's geometry, and whether its ledger runs.
async fn check_volume(
    clients: &Clients,
    request: &RestoreRequest,
    manifest: &bpb::Manifest,
    volume: u32,
    report: &mut RestoreReport,
) -> Result<(), RestoreError> {
    let db = &clients.db;
    let status = match retry("Status", clients.step_deadline, || db.status(false)).await {
        Ok(status) => status,
        Err(error) if request.force => {
            report.notes.push(format!(
                "db-server's Status failed ({error}); --force: restoring without checking the volume's ledger"
            ));
            return Ok(());
        }
        Err(error) => {
            return Err(RestoreError::LedgerNotReachable {
                reason: format!(
                    "db-server's Status failed, so the volume's ledger cannot be checked: {error}"
                ),
            });
        }
    };
    // Mirror, origin, geometry and the restore hold are the volume's, the
    // same in every mate's entry: mate 1's is read.
    let Some(volume_status) = crate::mates::pick(&status.volumes, volume, 1) else {
        let source = ClientError::local(
            ErrorKind::NotFound,
            "db-server",
            db.target(),
            "asking for status",
            format!("db-server has no volume {volume}"),
        );
        return Err(call("Status", source, report, None));
    };
    report.lu = Some(volume_status.mirror_lu);
    check_geometry(
        request,
        manifest,
        volume_status.block_size_bytes,
        volume_status.block_count,
    )?;
    // A volume already offline for a restore: BeginRestore says whether it
    // is this run's (a re-run: the ledger stopped for it) or another's.
    if volume_status.restore.is_some() {
        return Ok(());
    }
    if let Some(ledger) = &status.ledger
        && ledger.volume == volume
        && !ledger.running
    {
        let why = if ledger.stopped_reason.is_empty() {
            "no reason given".to_string()
        } else {
            ledger.stopped_reason.clone()
        };
        if !request.force {
            return Err(RestoreError::LedgerNotReachable {
                reason: format!("volume {volume} holds the ledger and it is not running ({why})"),
            });
        }
        report.notes.push(format!(
            "the ledger on volume {volume} was not running ({why}); --force: restored anyway"
        ));
    }
    Ok(())
}

/// The array's mode-sense page of a plain LU: its geometry and kind. An LU
/// this console may not see is left to the backup server to check.
async fn check_plain_lu(
    clients: &Clients,
    request: &RestoreRequest,
    manifest: &bpb::Manifest,
    lu: u32,
    report: &mut RestoreReport,
) -> Result<(), RestoreError> {
    report.safety_backup = SafetyBackup::NotApplicable;
    let array = &clients.array;
    match retry("ModeSense", clients.step_deadline, || array.mode_sense(lu)).await {
        Ok(page) => {
            use splitmirror_proto::array::v1::LuKind;
            if page.kind != LuKind::Plain {
                return Err(RestoreError::NotPlainLu {
                    lu,
                    kind: page
                        .kind
                        .as_str_name()
                        .trim_start_matches("LU_KIND_")
                        .to_lowercase(),
                });
            }
            check_geometry(request, manifest, page.block_size_bytes, page.block_count)
        }
        Err(error)
            if matches!(
                error.kind,
                ErrorKind::NotFound | ErrorKind::PermissionDenied
            ) =>
        {
            report.notes.push(format!(
                "LU {lu} is not visible to the console ({}); the backup server checks its size and kind",
                error.kind
            ));
            Ok(())
        }
        Err(source) => Err(call("ModeSense", source, report, None)),
    }
}

/// Steps 2 to 5 for a volume.
async fn restore_volume(
    clients: &Clients,
    request: &RestoreRequest,
    progress: &dyn ProgressSink,
    volume: u32,
    report: &mut RestoreReport,
) -> Result<(), RestoreError> {
    let run_id = report.run_id.clone();
    let (db, backup_id) = (&clients.db, request.backup_id.as_str());
    progress.phase(&format!("taking volume {volume} offline (BeginRestore)"));
    let t = Instant::now();
    let begun = retry("BeginRestore", clients.step_deadline, || {
        db.begin_restore(volume, &run_id, backup_id)
    })
    .await
    .map_err(|source| call("BeginRestore", source, report, None))?;
    report.phases_ms.begin = ms(t);
    report.lu = Some(begun.mirror_lu);
    report.already_restoring = begun.already_restoring;
    report.ledger_sequence_stopped = begun.ledger_sequence_stopped;
    let offline = next_steps_offline(volume, &request.backup_id, &run_id);
    if begun.already_ended {
        // An earlier call of this run restored the volume and EndRestore
        // compared it with the backup's image digest before bringing it back
        // online; only its answer was lost. Restoring again would overwrite
        // what the database wrote since: answer how it ended instead.
        report.ended_before = true;
        report.safety_backup = SafetyBackup::NotReached;
        report.notes.push(format!(
            "restore run {run_id} had already ended: nothing was written now"
        ));
        return end_restore(clients, volume, &run_id, None, Some(offline), report).await;
    }
    let t = Instant::now();
    if request.safety_backup {
        safety_backup(clients, request, progress, &begun, report).await?;
    } else {
        report.safety_backup = SafetyBackup::Skipped;
    }
    report.phases_ms.safety_backup = ms(t);
    let start = bpb::StartRestoreRequest {
        run_id: run_id.clone(),
        backup_id: request.backup_id.clone(),
        volume: Some(volume),
        to_lu: None,
        max_bytes_per_s: request.max_bytes_per_s,
    };
    let last = match run_job(clients, start, progress, report).await {
        Ok(last) => last,
        Err(mut error) => {
            if let RestoreError::Call { report, .. } | RestoreError::JobFailed { report, .. } =
                &mut error
            {
                report.next_steps = Some(offline);
            }
            return Err(error);
        }
    };
    progress.phase(&format!(
        "checking volume {volume} whole and bringing it back online (EndRestore)"
    ));
    let expected = (!last.image_digest.is_empty()).then(|| last.image_digest.clone());
    end_restore(clients, volume, &run_id, expected, Some(offline), report).await
}

/// Step 5: EndRestore, and what it answered into the report. An answer
/// `already_ended` (this run's EndRestore had ended the restore, its answer
/// lost: db-server journaled the pair Synchronized only after the
/// comparison passed) counts as the comparison done; after a restart of
/// db-server it carries no digest.
async fn end_restore(
    clients: &Clients,
    volume: u32,
    run_id: &str,
    expected: Option<Vec<u8>>,
    offline: Option<String>,
    report: &mut RestoreReport,
) -> Result<(), RestoreError> {
    let db = &clients.db;
    let t = Instant::now();
    let ended = retry("EndRestore", clients.step_deadline, || {
        db.end_restore(volume, run_id, false, expected.clone())
    })
    .await
    .map_err(|source| call("EndRestore", source, report, offline.clone()))?;
    report.phases_ms.end = ms(t);
    report.end = Some(EndCheck {
        image_digest: hex(&ended.image_digest),
        image_digest_matches: ended.image_digest_matches,
        chunks_compared: ended.chunks_compared,
        already_ended: ended.already_ended,
    });
    report.ledger_running = ended.ledger_running;
    report.ledger_sequence = ended.ledger_sequence;
    report.ledger_error = (!ended.ledger_error.is_empty()).then(|| ended.ledger_error.clone());
    if ended.already_ended {
        if ended.abandoned {
            report.error = Some(format!(
                "restore run {run_id} was abandoned earlier: the volume holds whatever it held then"
            ));
        } else if report.ended_before {
            // Nothing ran now: the earlier call's comparison is the proof.
            report.verified = true;
            report.verification =
                "by this run's first EndRestore: origin and mate compared whole with the backup's \
                 image digest before the volume came back online"
                    .into();
        }
    } else if !ended.image_digest_matches && expected.is_some() {
        report.error =
            Some("EndRestore found the volume's image digest different from the backup's".into());
    }
    Ok(())
}

/// The safety backup (step 3): reused on a re-run when the first attempt
/// took one, else taken now. Without `--force` a failure abandons the
/// restore (only when this run has written nothing: on a re-run the volume
/// may already hold part of the restore, and it stays offline).
async fn safety_backup(
    clients: &Clients,
    request: &RestoreRequest,
    progress: &dyn ProgressSink,
    begun: &dpb::BeginRestoreResponse,
    report: &mut RestoreReport,
) -> Result<(), RestoreError> {
    let safety_run_id = format!("{}{SAFETY_RUN_SUFFIX}", report.run_id);
    let backup = &clients.backup;
    if begun.already_restoring {
        let listed = retry("ListBackups", clients.step_deadline, || {
            backup.list_backups()
        })
        .await;
        if let Ok(backups) = &listed
            && let Some(found) = backups
                .iter()
                .find(|b| b.run_id == safety_run_id && b.state() == bpb::BackupState::Complete)
        {
            report.safety_backup = SafetyBackup::Reused {
                backup_id: found.backup_id.clone(),
            };
            return Ok(());
        }
    }
    progress.phase(&format!(
        "taking the safety backup of mirror LU {} (run {safety_run_id})",
        begun.mirror_lu
    ));
    let start = bpb::StartBackupRequest {
        run_id: safety_run_id.clone(),
        lu: begun.mirror_lu,
        expected_block_count: Some(begun.block_count),
        label: format!(
            "safety backup before restore {} of {}",
            report.run_id, request.backup_id
        ),
        max_bytes_per_s: None,
        snapshot: None,
        live: true,
        verify_read: false,
    };
    let outcome = take_backup(clients, start, progress).await;
    match outcome {
        Ok(backup_id) => {
            report.safety_backup = if begun.already_restoring {
                SafetyBackup::TakenOnRerun { backup_id }
            } else {
                SafetyBackup::Taken { backup_id }
            };
            Ok(())
        }
        Err(message) if request.force => {
            report.notes.push(
                "--force: restoring without a safety backup (the volume's current content is not kept)"
                    .into(),
            );
            report.safety_backup = SafetyBackup::Failed { message };
            Ok(())
        }
        Err(message) => {
            report.safety_backup = SafetyBackup::Failed {
                message: message.clone(),
            };
            let volume = begun.volume;
            let run_id = report.run_id.clone();
            if begun.already_restoring {
                report.error = Some(format!("the safety backup failed: {message}"));
                report.next_steps = Some(format!(
                    "volume {volume} stays offline (an earlier attempt of this run may have written part of the restore). \
                     Run the same command again with --run-id {run_id} --force to restore without a safety backup, \
                     or give the restore up: console restore abandon --volume {volume} --run-id {run_id}"
                ));
                return Err(RestoreError::SafetyBackupFailed {
                    message,
                    abandoned: false,
                    report: Box::new(report.clone()),
                });
            }
            progress.phase(
                "the safety backup failed: abandoning the restore (the volume is unchanged)",
            );
            let db = &clients.db;
            let abandoned = retry("EndRestore", clients.step_deadline, || {
                db.end_restore(volume, &run_id, true, None)
            })
            .await;
            report.error = Some(format!("the safety backup failed: {message}"));
            let abandoned = match abandoned {
                Ok(_) => {
                    report.next_steps = Some(format!(
                        "the restore was abandoned before any byte was written: volume {volume} is unchanged and online. \
                         Fix the backup server, or restore without a safety backup with --force"
                    ));
                    true
                }
                Err(error) => {
                    report.next_steps = Some(format!(
                        "abandoning the restore failed too ({error}): volume {volume} is offline but unchanged; \
                         run console restore abandon --volume {volume} --run-id {run_id}"
                    ));
                    false
                }
            };
            Err(RestoreError::SafetyBackupFailed {
                message,
                abandoned,
                report: Box::new(report.clone()),
            })
        }
    }
}

/// Starts a backup and follows it to its end; answers its id, or why it
/// did not complete (for people).
async fn take_backup(
    clients: &Clients,
    start: bpb::StartBackupRequest,
    progress: &dyn ProgressSink,
) -> Result<String, String> {
    let backup = &clients.backup;
    let started = retry("StartBackup", clients.step_deadline, || {
        backup.start_backup(start.clone())
    })
    .await
    .map_err(|e| e.to_string())?;
    let backup_id = started.backup_id;
    loop {
        let mut stream = retry("WatchBackup", clients.step_deadline, || {
            backup.watch_backup(&backup_id)
        })
        .await
        .map_err(|e| e.to_string())?;
        let mut last = None;
        while let Some(message) = stream.next().await {
            match message {
                Ok(p) => {
                    if p.bytes_total > 0 {
                        progress.backup(p.bytes_done, p.bytes_total, p.throughput_bytes_per_s);
                    }
                    last = Some(p);
                }
                Err(error) => {
                    tracing::warn!("the safety backup's progress stream broke: {error}");
                    break;
                }
            }
        }
        match last {
            Some(p) if p.state() == bpb::BackupState::Complete => return Ok(backup_id),
            Some(p) if p.state() != bpb::BackupState::Running => {
                return Err(format!(
                    "backup {backup_id} {}: {}",
                    crate::run::state_name(p.state()),
                    p.error
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The restore job (step 4): StartRestore, then WatchRestore to its end.
/// A broken stream is watched again; a job its server lost (a restart:
/// WatchRestore answers NOT_FOUND) is started again with the same run id,
/// which writes only what still differs.
async fn run_job(
    clients: &Clients,
    start: bpb::StartRestoreRequest,
    progress: &dyn ProgressSink,
    report: &mut RestoreReport,
) -> Result<bpb::RestoreProgress, RestoreError> {
    let t = Instant::now();
    let backup = &clients.backup;
    let run_id = start.run_id.clone();
    let mut phases = PhaseClock::default();
    let mut restarts = 0;
    let last = 'job: loop {
        progress.phase(&format!(
            "restoring backup {} onto {}",
            start.backup_id, report.target
        ));
        retry("StartRestore", clients.step_deadline, || {
            backup.start_restore(start.clone())
        })
        .await
        .map_err(|source| call("StartRestore", source, report, None))?;
        loop {
            let mut stream = match retry("WatchRestore", clients.step_deadline, || {
                backup.watch_restore(&run_id)
            })
            .await
            {
                Ok(stream) => stream,
                Err(error) if error.kind == ErrorKind::NotFound && restarts < MAX_JOB_RESTARTS => {
                    restarts += 1;
                    continue 'job;
                }
                Err(source) => return Err(call("WatchRestore", source, report, None)),
            };
            let mut last = None;
            while let Some(message) = stream.next().await {
                match message {
                    Ok(p) => {
                        show(&p, progress);
                        phases.saw(&p);
                        absorb(&p, report);
                        last = Some(p);
                    }
                    Err(error) => {
                        tracing::warn!("the restore's progress stream broke: {error}");
                        break;
                    }
                }
            }
            if let Some(p) = last
                && p.state() != bpb::RestoreState::Running
            {
                break 'job p;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    report.phases_ms.restore = ms(t);
    phases.finish(&last, &mut report.phases_ms);
    if last.state() != bpb::RestoreState::Complete {
        report.error = Some(format!(
            "the restore job failed ({}): {}",
            failure_name(last.failure()),
            last.error
        ));
        if report.volume.is_none() {
            report.next_steps = Some(format!(
                "run the same command again with --run-id {}; {} holds part of the backup meanwhile",
                report.run_id, report.target
            ));
        }
        return Err(RestoreError::JobFailed {
            failure: last.failure(),
            message: last.error.clone(),
            report: Box::new(report.clone()),
        });
    }
    if !last.verified {
        report.error = Some(format!(
            "the restore job completed but says it is not verified: {}",
            last.verification
        ));
    }
    Ok(last)
}

/// Copies a progress message's figures into the report.
fn absorb(p: &bpb::RestoreProgress, report: &mut RestoreReport) {
    report.lu = Some(p.lu);
    report.chunks_total = p.chunks_total;
    report.chunks_compared = p.chunks_compared;
    report.chunks_to_write = p.chunks_to_write;
    report.chunks_written = p.chunks_written;
    report.bytes_written = p.bytes_written;
    report.throughput_bytes_per_s = p.throughput_bytes_per_s;
    report.verified = p.verified;
    report.verification = p.verification.clone();
    if p.ledger_sequence.is_some() {
        report.backup_ledger_sequence = p.ledger_sequence;
    }
}

/// Shows a progress message on the sink.
fn show(p: &bpb::RestoreProgress, progress: &dyn ProgressSink) {
    let (name, done, total) = match p.phase() {
        bpb::RestorePhase::Comparing => ("compare", p.chunks_compared, p.chunks_total),
        bpb::RestorePhase::Checking => ("check", p.chunks_to_write, p.chunks_to_write),
        bpb::RestorePhase::Writing => ("write", p.chunks_written, p.chunks_to_write),
        bpb::RestorePhase::Verifying => ("verify", p.chunks_written, p.chunks_to_write),
        bpb::RestorePhase::Done | bpb::RestorePhase::Unspecified => return,
    };
    progress.restore(name, done, total, p.bytes_written, p.throughput_bytes_per_s);
}

/// When each phase of the job began, by the job's own clock (elapsed_ms).
#[derive(Default)]
struct PhaseClock {
    /// (phase, elapsed_ms when first seen), in the order seen.
    seen: Vec<(bpb::RestorePhase, u64)>,
}

impl PhaseClock {
    fn saw(&mut self, p: &bpb::RestoreProgress) {
        let phase = p.phase();
        if self.seen.last().is_none_or(|(last, _)| *last != phase) {
            // A job started again begins its phases again: keep the latest.
            self.seen.retain(|(seen, _)| *seen != phase);
            self.seen.push((phase, p.elapsed_ms));
        }
    }

    /// Each phase's time: from its start to the next one's (the last to the
    /// job's end).
    fn finish(&self, last: &bpb::RestoreProgress, phases: &mut RestorePhasesMs) {
        for (i, (phase, began)) in self.seen.iter().enumerate() {
            let ended = self.seen.get(i + 1).map_or(last.elapsed_ms, |(_, at)| *at);
            let took = ended.saturating_sub(*began);
            match phase {
                bpb::RestorePhase::Comparing => phases.compare += took,
                bpb::RestorePhase::Checking => phases.check += took,
                bpb::RestorePhase::Writing => phases.write += took,
                bpb::RestorePhase::Verifying => phases.verify += took,
                bpb::RestorePhase::Done | bpb::RestorePhase::Unspecified => {}
            }
        }
    }
}

/// Gives a restore up (EndRestore with `abandon`): the volume comes back
/// online with whatever it holds, origin and mate resynchronized.
pub async fn abandon(
    clients: &Clients,
    volume: u32,
    run_id: &str,
) -> Result<AbandonReport, ClientError> {
    let db = &clients.db;
    let ended = retry("EndRestore", clients.step_deadline, || {
        db.end_restore(volume, run_id, true, None)
    })
    .await?;
    Ok(AbandonReport {
        volume,
        run_id: run_id.to_string(),
        already_ended: ended.already_ended,
        chunks_resynced: ended.chunks_resynced,
        ledger_running: ended.ledger_running,
        ledger_sequence: ended.ledger_sequence,
        ledger_error: (!ended.ledger_error.is_empty()).then_some(ended.ledger_error),
    })
}

/// The reverse resync: db-server RestoreSnapshot, with its progress from
/// WatchStatus meanwhile.
pub async fn restore_snapshot(
    clients: &Clients,
    volume: u32,
    run_id: &str,
    progress: &dyn ProgressSink,
) -> Result<SnapshotRestoreReport, ClientError> {
    restore_snapshot_of(clients, volume, 1, run_id, progress).await
}

/// [`restore_snapshot`] from the snapshot of the volume's mate `mate`
/// (counted from 1): that mate is copied onto the origin; db-server
/// records the ranges in the other mates' tables.
pub async fn restore_snapshot_of(
    clients: &Clients,
    volume: u32,
    mate: u32,
    run_id: &str,
    progress: &dyn ProgressSink,
) -> Result<SnapshotRestoreReport, ClientError> {
    let started = Instant::now();
    let db = &clients.db;
    let mate = crate::mates::mate_or_first(mate);
    progress.phase(&format!(
        "restoring volume {volume} to the snapshot{} of run {run_id} (copying mate → origin the recorded ranges)",
        crate::mates::of_mate(mate)
    ));
    let call = retry("RestoreSnapshot", clients.step_deadline, || {
        db.restore_snapshot_of(volume, mate, run_id)
    });
    tokio::pin!(call);
    // Progress is a nicety: a status stream that fails is given up quietly.
    let mut status = db.watch_status(200, false).await.ok();
    let restored = loop {
        let next = async {
            match status.as_mut() {
                Some(stream) => stream.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            restored = &mut call => break restored,
            message = next => match message {
                Some(Ok(s)) => {
                    if let Some(v) = crate::mates::pick(&s.volumes, volume, mate)
                        && let Some(r) = &v.restore
                        && r.kind() == dpb::RestoreKind::ToSnapshot
                        && r.blocks_total > 0
                    {
                        let block = u64::from(v.block_size_bytes);
                        progress.reverse_resync(r.blocks_done * block, r.blocks_total * block);
                    }
                }
                _ => status = None,
            },
        }
    }?;
    progress.finish();
    Ok(SnapshotRestoreReport {
        volume,
        mate,
        run_id: run_id.to_string(),
        already_restored: restored.already_restored,
        ranges_copied: restored.ranges_copied,
        blocks_copied: restored.blocks_copied,
        bytes_copied: restored.bytes_copied,
        duration_us: restored.duration_us,
        total_ms: ms(started),
        snapshot_ledger_sequence: restored.snapshot_ledger_sequence,
        ledger_running: restored.ledger_running,
        ledger_sequence: restored.ledger_sequence,
        ledger_error: (!restored.ledger_error.is_empty()).then_some(restored.ledger_error),
    })
}

/// A failed call as a [`RestoreError`], the report recording it.
fn call(
    step: &'static str,
    source: ClientError,
    report: &mut RestoreReport,
    next_steps: Option<String>,
) -> RestoreError {
    report.error = Some(format!("{step}: {source}"));
    if next_steps.is_some() {
        report.next_steps = next_steps;
    }
    RestoreError::Call {
        step,
        source,
        report: Box::new(report.clone()),
    }
}

/// How to continue once the volume is offline and the restore did not
/// complete.
fn next_steps_offline(volume: u32, backup_id: &str, run_id: &str) -> String {
    format!(
        "volume {volume} stays offline (its Read and Write answer UNAVAILABLE, reason restoring) until this \
         restore ends. Continue it: console restore --volume {volume} --backup-id {backup_id} --run-id {run_id} \
         (it writes only the chunks still different); or give it up: console restore abandon --volume {volume} \
         --run-id {run_id} (the volume comes back with what it holds now)"
    )
}

/// A restore failure's name without its prefix: "CHUNK_DAMAGED", ….
pub fn failure_name(failure: bpb::RestoreFailure) -> &'static str {
    failure.as_str_name().trim_start_matches("RESTORE_FAILURE_")
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first 16 hex digits, for a line meant for people.
fn short_hex(hex: &str) -> String {
    if hex.len() > 16 {
        format!("{}…", &hex[..16])
    } else if hex.is_empty() {
        "-".into()
    } else {
        hex.to_string()
    }
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

fn ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completed() -> RestoreReport {
        let mut report = RestoreReport::new(
            "r1",
            &RestoreRequest {
                safety_backup: true,
                ..RestoreRequest::volume(0, "b1")
            },
        );
        report.backup_ledger_sequence = Some(42);
        report.lu = Some(0);
        report.safety_backup = SafetyBackup::Taken {
            backup_id: "s1".into(),
        };
        report.chunks_total = 64;
        report.chunks_compared = 64;
        report.chunks_to_write = 3;
        report.chunks_written = 3;
        report.bytes_written = 3 << 20;
        report.verified = true;
        report.verification = "3 chunks written, 64 compared on origin and mate".into();
        report.end = Some(EndCheck {
            image_digest: "ab".repeat(32),
            image_digest_matches: true,
            chunks_compared: 64,
            already_ended: false,
        });
        report.ledger_running = true;
        report.ledger_sequence = Some(42);
        report
    }

    #[test]
    fn a_completed_report_says_what_was_written_verified_and_where_the_ledger_is() {
        let report = completed();
        assert!(report.succeeded());
        let text = report.render();
        for expected in [
            "b1 (ledger sequence 42)",
            "volume 0 (mirror LU 0)",
            "safety backup      s1",
            "64 in the backup · 64 compared · 3 different · 3 written",
            "3.00 MiB",
            "restore verified   yes (3 chunks written",
            "abababababababab… matches the backup's",
            "running at sequence 42 (= the backup's)",
        ] {
            assert!(text.contains(expected), "{expected:?} in\n{text}");
        }
        let json = serde_json::to_value(&report).expect("JSON");
        assert_eq!(json["safety_backup"]["status"], "taken");
        assert_eq!(json["safety_backup"]["backup_id"], "s1");
        assert_eq!(json["end"]["image_digest_matches"], true);
        assert_eq!(json["chunks_written"], 3);
        assert_eq!(json["ledger_sequence"], 42);
    }

    #[test]
    fn a_report_fails_without_verification_or_a_matching_image() {
        let mut report = completed();
        report.verified = false;
        assert!(!report.succeeded());
        let mut report = completed();
        report.end.as_mut().expect("end").image_digest_matches = false;
        assert!(!report.succeeded());
        assert!(report.render().contains("DOES NOT MATCH"));
        // A plain LU has no EndRestore: the job's verification decides.
        let mut report = completed();
        report.volume = None;
        report.end = None;
        assert!(report.succeeded());
        let mut report = completed();
        report.error = Some("x".into());
        assert!(!report.succeeded());
    }

    #[test]
    fn the_safety_backup_says_which_and_why_not() {
        assert_eq!(SafetyBackup::Skipped.describe(), "none: --no-safety-backup");
        assert_eq!(
            SafetyBackup::Failed {
                message: "disk full".into()
            }
            .describe(),
            "failed: disk full"
        );
        assert!(
            SafetyBackup::TakenOnRerun {
                backup_id: "s".into()
            }
            .describe()
            .contains("re-run")
        );
        assert_eq!(
            SafetyBackup::Reused {
                backup_id: "s".into()
            }
            .backup_id(),
            Some("s")
        );
        assert_eq!(SafetyBackup::Skipped.backup_id(), None);
    }

    #[test]
    fn phases_take_the_time_from_one_start_to_the_next() {
        let at = |phase: bpb::RestorePhase, elapsed_ms: u64| {
            let mut p = bpb::RestoreProgress {
                elapsed_ms,
                ..Default::default()
            };
            p.set_phase(phase);
            p
        };
        let mut clock = PhaseClock::default();
        for p in [
            at(bpb::RestorePhase::Comparing, 0),
            at(bpb::RestorePhase::Comparing, 5),
            at(bpb::RestorePhase::Checking, 10),
            at(bpb::RestorePhase::Writing, 30),
            at(bpb::RestorePhase::Verifying, 70),
        ] {
            clock.saw(&p);
        }
        let mut phases = RestorePhasesMs::default();
        clock.finish(&at(bpb::RestorePhase::Done, 100), &mut phases);
        assert_eq!(
            (phases.compare, phases.check, phases.write, phases.verify),
            (10, 20, 40, 30)
        );
    }

    #[test]
    fn the_next_steps_name_the_run_id_to_continue_or_abandon_with() {
        let text = next_steps_offline(3, "b9", "r7");
        assert!(text.contains("console restore --volume 3 --backup-id b9 --run-id r7"));
        assert!(text.contains("console restore abandon --volume 3 --run-id r7"));
    }

    #[test]
    fn the_snapshot_restore_report_says_what_was_copied() {
        let report = SnapshotRestoreReport {
            volume: 0,
            mate: 1,
            run_id: "r".into(),
            already_restored: false,
            ranges_copied: 4,
            blocks_copied: 256,
            bytes_copied: 1 << 20,
            duration_us: 1500,
            total_ms: 3,
            snapshot_ledger_sequence: 17,
            ledger_running: true,
            ledger_sequence: Some(17),
            ledger_error: None,
        };
        let text = report.render();
        assert!(
            text.contains("4 ranges, 256 blocks, 1.00 MiB mate → origin"),
            "{text}"
        );
        assert!(text.contains("running at sequence 17"), "{text}");
    }

    #[test]
    fn hex_is_lowercase_and_whole() {
        assert_eq!(hex(&[0x00, 0xab, 0x0f]), "00ab0f");
        assert_eq!(short_hex(""), "-");
    }
}
