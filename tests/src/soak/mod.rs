//! The nemesis: a whole cluster of real processes on loopback, driven round
//! after round from one seed — the ledger writing, a `console run` per round
//! — while faults land at random moments: kill -9 of any node (also in the
//! middle of an acquire, a backup or a resync), SIGSTOP pauses, a console
//! lost while the database is suspended, the array restarted, the journal
//! corrupted or cut short while db-server is down, and the journal's or the
//! backup store's filesystem full for a while. Once a backup exists, some
//! rounds are restores instead: volume 0 corrupted through the array, then
//! `console restore` of the newest backup (re-run with the same run id
//! until it completes, whatever the fault did to it), or a reverse resync
//! (`console snapshot restore` to a held snapshot). Two rounds in ten take a
//! copy-on-write snapshot instead (the array has a save area for volume 0):
//! acquired inside a suspension after reading the mate (what a split would
//! freeze), held while the ledger writes and the round's fault lands, read
//! back through db-server and compared with that image and the ledger's
//! check at its sequence (or found invalidated, with a reason, only after a
//! fault), then deleted with nothing to resync. After every round the
//! invariants are checked ([`checks`]) and the run stops at the first
//! violation with the seed and a command that replays it.
//!
//! The seed decides every choice the nemesis makes (which fault, when,
//! where, for how long); the processes' own timing does not replay exactly,
//! so a replay runs the same schedule of faults, not the same interleaving.
//!
//! [`sim`] is the fast, in-process layer: the snapshot manager and its
//! journal over an in-memory array, crashed and reopened, for thousands of
//! seeds a minute.

pub mod checks;
pub mod cluster;
pub mod sim;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use checks::{Checker, Probe, RestorableBackup, RestoredImage, Violation, VolumeState};
use cluster::{Cluster, ClusterOptions, Node};
use splitmirror_proto::db::v1 as pb_db;

/// The faults the nemesis injects, by the names `--faults` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// kill -9 of array-node at a random moment of a run; restarted after a
    /// random delay on the same address.
    KillArray,
    /// kill -9 of db-server (the ledger with it).
    KillDb,
    /// kill -9 of backup-server.
    KillBackup,
    /// SIGSTOP of a random node for 1.5–4 s, then SIGCONT.
    Pause,
    /// A console suspends the database with a short lease and is never
    /// heard of again: the database must resume by itself.
    LostConsole,
    /// array-node stopped cleanly (SIGTERM) and started again.
    RestartArray,
    /// db-server killed, 8 bytes in the middle of its journal overwritten,
    /// db-server started again.
    CorruptJournal,
    /// db-server killed, its journal cut to half its length, started again.
    TruncateJournal,
    /// db-server's filesystem (the journal's) filled for 1–3 s.
    FullJournalFs,
    /// backup-server's store filesystem filled for 1–3 s.
    FullStoreFs,
    /// db-server restarted with one of its named crash points armed
    /// (`SPLITMIRROR_CRASH_AT`), so that it aborts exactly inside an
    /// acquire, a delete, a snapshot write or a resync step of the run.
    CrashPoint,
}

impl Fault {
    pub const ALL: [Fault; 11] = [
        Fault::KillArray,
        Fault::KillDb,
        Fault::KillBackup,
        Fault::Pause,
        Fault::LostConsole,
        Fault::RestartArray,
        Fault::CorruptJournal,
        Fault::TruncateJournal,
        Fault::FullJournalFs,
        Fault::FullStoreFs,
        Fault::CrashPoint,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillArray => "kill-array",
            Fault::KillDb => "kill-db",
            Fault::KillBackup => "kill-backup",
            Fault::Pause => "pause",
            Fault::LostConsole => "lost-console",
            Fault::RestartArray => "restart-array",
            Fault::CorruptJournal => "corrupt-journal",
            Fault::TruncateJournal => "truncate-journal",
            Fault::FullJournalFs => "full-journal-fs",
            Fault::FullStoreFs => "full-store-fs",
            Fault::CrashPoint => "crash-point",
        }
    }

    /// Parses a comma-separated list; `all` is every fault, `none` none.
    pub fn parse_list(text: &str) -> Result<Vec<Fault>, String> {
        let mut faults = Vec::new();
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "all" => faults.extend(Fault::ALL),
                "none" => {}
                _ => faults.push(
                    Fault::ALL
                        .into_iter()
                        .find(|f| f.name() == word)
                        .ok_or_else(|| {
                            format!(
                                "unknown fault {word:?}; known: all, none, {}",
                                Fault::ALL.map(Fault::name).join(", ")
                            )
                        })?,
                ),
            }
        }
        faults.sort();
        faults.dedup();
        Ok(faults)
    }

    fn needs_small_fs(self) -> bool {
        matches!(self, Fault::FullJournalFs | Fault::FullStoreFs)
    }
}

/// The console's backup rate cap: an 8 MiB LU takes about 1 s, so that
/// faults land inside the backup as often as around it.
const BACKUP_RATE: &str = "8MB";
/// A fault lands this long (at most) after the run starts.
const FAULT_WINDOW_MS: u64 = 2000;
/// db-server's named crash points (see `db_server::crash`).
const CRASH_POINTS: &[&str] = &db_server::crash::POINTS;
/// db-server's crash points between its journal and the array's
/// ModeSelect (issue #19), reached only with `--array-mode stateful`:
/// drawn in run rounds when the soak runs it.
pub const STATEFUL_CRASH_POINTS: [&str; 3] = [
    "acquire.after_mode_select",
    "delete.after_mode_select",
    "resync.after_journal_synchronized",
];

/// Broken variants of the nodes that the nemesis must catch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Canary {
    /// db-server journals a write intent after the array write.
    IntentAfterWrite,
    /// db-server does not record writes made in Snapshot mode.
    ForgetSnapshotWrites,
    /// db-server's resync copies without the range lock and re-check.
    ResyncSkipsRecheck,
    /// The ledger writes its blocks side by side and redoes nothing.
    LedgerSideBySide,
    /// array-node lets writes and copies of the same blocks interleave.
    NoRangeLock,
    /// db-server's writes under a copy-on-write snapshot do not save the
    /// pre-update data.
    CowSkipsSave,
}

impl Canary {
    pub const ALL: [Canary; 6] = [
        Canary::IntentAfterWrite,
        Canary::ForgetSnapshotWrites,
        Canary::ResyncSkipsRecheck,
        Canary::LedgerSideBySide,
        Canary::NoRangeLock,
        Canary::CowSkipsSave,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Canary::IntentAfterWrite => "intent-after-write",
            Canary::ForgetSnapshotWrites => "forget-snapshot-writes",
            Canary::ResyncSkipsRecheck => "resync-skips-recheck",
            Canary::LedgerSideBySide => "ledger-side-by-side",
            Canary::NoRangeLock => "no-range-lock",
            Canary::CowSkipsSave => "cow-skips-save",
        }
    }

    pub fn parse(text: &str) -> Result<Canary, String> {
        Canary::ALL
            .into_iter()
            .find(|c| c.name() == text)
            .ok_or_else(|| {
                format!(
                    "unknown canary {text:?}; known: {}",
                    Canary::ALL.map(Canary::name).join(", ")
                )
            })
    }

    /// The hidden flag that breaks a node this way, and the node.
    fn flag(self) -> (Node, &'static str) {
        match self {
            Canary::IntentAfterWrite => (Node::Db, "--unsafe-test-intent-after-write"),
            Canary::ForgetSnapshotWrites => (Node::Db, "--unsafe-test-forget-snapshot-writes"),
            Canary::ResyncSkipsRecheck => (Node::Db, "--unsafe-test-resync-skips-recheck"),
            Canary::LedgerSideBySide => (Node::Db, "--unsafe-test-ledger-writes-side-by-side"),
            Canary::NoRangeLock => (Node::Array, "--unsafe-test-no-range-lock"),
            Canary::CowSkipsSave => (Node::Db, "--unsafe-test-skip-cow-save"),
        }
    }
}

/// What one soak run does.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    pub seed: u64,
    pub rounds: Option<u64>,
    pub duration: Option<Duration>,
    pub faults: Vec<Fault>,
    pub canary: Option<Canary>,
    pub lu_size: String,
    pub workload_tps: u32,
    /// db-server's resync method (`offload` or `writeback`).
    pub resync_method: String,
    /// Where the cluster lives; a temporary directory when `None`.
    pub dir: Option<PathBuf>,
    /// Keep the directory even when no violation was found.
    pub keep_dir: bool,
    /// Play restore and reverse-resync rounds (once a backup exists).
    pub restores: bool,
    /// Give the array a save area and play copy-on-write rounds.
    pub cow: bool,
    /// Run db-server `--array-mode stateful` (issue #19: the array holds
    /// each pair's mode and enforces it); after every quiesced round the
    /// array's ModeSense of each pair must match db-server's Status
    /// (stateless: HOST_MANAGED).
    pub stateful: bool,
}

/// Counts of everything the soak did, for the summary and RELIABILITY.md.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub rounds: u64,
    pub faults: BTreeMap<&'static str, u64>,
    /// kill -9 of a node by what the volume was doing at that moment.
    pub kills_by_phase: BTreeMap<String, u64>,
    pub runs_succeeded: u64,
    pub runs_failed: u64,
    pub backups_verified: u64,
    /// Pairs whose mode in the array (ModeSense) was compared with
    /// db-server's Status after a quiesced round.
    pub array_modes_checked: u64,
    pub journals_set_aside: u64,
    pub leftover_snapshots_deleted: u64,
    pub skipped_faults: Vec<String>,
    /// Rounds that restored a backup onto volume 0, and reversed a
    /// snapshot.
    pub restore_rounds: u64,
    pub reverse_rounds: u64,
    /// Restores from a backup that completed, and of those the ones whose
    /// first attempt a fault stopped, completed by re-running the command.
    pub restores_completed: u64,
    pub restores_completed_on_rerun: u64,
    pub reverse_resyncs: u64,
    pub reverse_resyncs_on_rerun: u64,
    /// Attempts of a restore or reverse resync that did not complete.
    pub restore_attempts_failed: u64,
    /// 1 MiB chunks of volume 0 overwritten before a restore.
    pub chunks_corrupted: u64,
    /// Probes that found the volume offline while restored (Status shows
    /// it, no ledger on it, a Read refused `restoring`), and the restore
    /// rounds with at least one.
    pub offline_probes: u64,
    pub restores_seen_offline: u64,
    pub safety_backups_verified: u64,
    /// Copy-on-write rounds; of their snapshots, those acquired, read back
    /// equal to the split's image and passing the ledger's check, found
    /// invalidated after a fault (by reason), and deleted with nothing to
    /// resync.
    pub cow_rounds: u64,
    pub cow_acquired: u64,
    pub cow_images_verified: u64,
    pub cow_invalidated: BTreeMap<String, u64>,
    pub cow_deleted_without_resync: u64,
    pub violations: Vec<Violation>,
    pub elapsed: Duration,
}

impl Summary {
    pub fn fault_count(&self) -> u64 {
        self.faults.values().sum()
    }

    pub fn print(&self, config: &SoakConfig) {
        println!("soak summary (seed {}):", config.seed);
        println!(
            "  elapsed            {:.1} min",
            self.elapsed.as_secs_f64() / 60.0
        );
        println!(
            "  console runs       {} succeeded, {} failed (under faults)",
            self.runs_succeeded, self.runs_failed
        );
        println!("  backups verified   {}", self.backups_verified);
        println!(
            "  array modes        {}: {} pair modes checked against Status",
            if config.stateful {
                "stateful"
            } else {
                "stateless"
            },
            self.array_modes_checked
        );
        println!(
            "  restores           {} completed ({} of them on a re-run after a fault), {} rounds",
            self.restores_completed, self.restores_completed_on_rerun, self.restore_rounds
        );
        println!(
            "  reverse resyncs    {} completed ({} of them on a re-run after a fault), {} rounds",
            self.reverse_resyncs, self.reverse_resyncs_on_rerun, self.reverse_rounds
        );
        println!(
            "  restore attempts failed under faults {}; chunks corrupted {}; safety backups verified {}",
            self.restore_attempts_failed, self.chunks_corrupted, self.safety_backups_verified
        );
        println!(
            "  volume seen offline while restored: {} probes in {} rounds",
            self.offline_probes, self.restores_seen_offline
        );
        println!(
            "  copy-on-write      {} rounds, {} acquired, {} images verified, {} deleted with nothing to resync",
            self.cow_rounds,
            self.cow_acquired,
            self.cow_images_verified,
            self.cow_deleted_without_resync
        );
        for (why, count) in &self.cow_invalidated {
            println!("  cow invalidated    {count} × {why}");
        }
        println!("  damaged journals set aside {}", self.journals_set_aside);
        println!(
            "  leftover snapshots deleted {}",
            self.leftover_snapshots_deleted
        );
        for (fault, count) in &self.faults {
            println!("  fault {fault:<18} {count}");
        }
        for (phase, count) in &self.kills_by_phase {
            println!("  kill -9 while {phase:<12} {count}");
        }
        for skipped in &self.skipped_faults {
            println!("  skipped: {skipped}");
        }
        for violation in &self.violations {
            println!(
                "  VIOLATION in round {}: {}",
                violation.round, violation.what
            );
        }
        println!(
            "soak: {} rounds, {} faults, {} violations",
            self.rounds,
            self.fault_count(),
            self.violations.len()
        );
    }

    pub fn to_json(&self, config: &SoakConfig) -> serde_json::Value {
        serde_json::json!({
            "seed": config.seed,
            "rounds": self.rounds,
            "minutes": self.elapsed.as_secs_f64() / 60.0,
            "faults": self.faults,
            "kills_by_phase": self.kills_by_phase,
            "runs_succeeded": self.runs_succeeded,
            "runs_failed": self.runs_failed,
            "backups_verified": self.backups_verified,
            "journals_set_aside": self.journals_set_aside,
            "skipped_faults": self.skipped_faults,
            "restore_rounds": self.restore_rounds,
            "restores_completed": self.restores_completed,
            "restores_completed_on_rerun": self.restores_completed_on_rerun,
            "reverse_rounds": self.reverse_rounds,
            "reverse_resyncs": self.reverse_resyncs,
            "reverse_resyncs_on_rerun": self.reverse_resyncs_on_rerun,
            "restore_attempts_failed": self.restore_attempts_failed,
            "chunks_corrupted": self.chunks_corrupted,
            "offline_probes": self.offline_probes,
            "restores_seen_offline": self.restores_seen_offline,
            "safety_backups_verified": self.safety_backups_verified,
            "cow_rounds": self.cow_rounds,
            "cow_acquired": self.cow_acquired,
            "cow_images_verified": self.cow_images_verified,
            "cow_invalidated": self.cow_invalidated,
            "cow_deleted_without_resync": self.cow_deleted_without_resync,
            "array_mode": if config.stateful { "stateful" } else { "stateless" },
            "array_modes_checked": self.array_modes_checked,
            "canary": config.canary.map(Canary::name),
            "violations": self.violations.iter().map(|v| serde_json::json!({
                "round": v.round, "what": v.what,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The command that replays a run up to the round that failed.
/// `rounds` = `None` repeats the run as configured (its rounds or minutes).
pub fn replay_command(config: &SoakConfig, rounds: Option<u64>) -> String {
    let faults = if config.faults.is_empty() {
        "none".to_string()
    } else {
        config
            .faults
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(",")
    };
    let length = match (rounds.or(config.rounds), config.duration) {
        (Some(rounds), _) => format!("--rounds {rounds}"),
        (None, Some(duration)) => format!("--minutes {}", duration.as_secs_f64() / 60.0),
        (None, None) => String::new(),
    };
    let mut command = format!(
        "cargo run --release -p splitmirror-tests --bin soak -- --seed {} {length} --faults {faults} --lu-size {} --workload-tps {}",
        config.seed, config.lu_size, config.workload_tps
    );
    command.push_str(&format!(" --resync {}", config.resync_method));
    command.push_str(if config.stateful {
        " --array-mode stateful"
    } else {
        " --array-mode stateless"
    });
    if !config.restores {
        command.push_str(" --no-restores");
    }
    if !config.cow {
        command.push_str(" --no-cow");
    }
    if let Some(canary) = config.canary {
        command.push_str(&format!(" --canary {}", canary.name()));
    }
    command
}

/// Runs the nemesis until the rounds or the minutes are done, or the first
/// violation.
pub async fn run(config: &SoakConfig) -> Result<Summary, String> {
    let started = Instant::now();
    let temp = match &config.dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("splitmirror-soak-")
                .tempdir()
                .map_err(|e| format!("creating a temporary directory: {e}"))?,
        ),
    };
    let dir = config
        .dir
        .clone()
        .or_else(|| temp.as_ref().map(|t| t.path().to_path_buf()))
        .ok_or("no directory for the cluster")?;
    let (mut db_flags, mut array_flags) = (Vec::new(), Vec::new());
    match config.canary.map(Canary::flag) {
        Some((Node::Array, flag)) => array_flags.push(flag.to_string()),
        Some((_, flag)) => db_flags.push(flag.to_string()),
        None => {}
    }
    if config.stateful {
        db_flags.extend(["--array-mode".to_string(), "stateful".to_string()]);
    }
    let mut cluster = Cluster::new(
        &dir,
        ClusterOptions {
            lu_size: config.lu_size.clone(),
            workload_tps: config.workload_tps,
            resync_max_rate: "8MB".into(),
            resync_method: config.resync_method.clone(),
            db_flags,
            array_flags,
            save_area_blocks: if config.cow {
                Some(save_area_blocks(&config.lu_size)?)
            } else {
                None
            },
        },
    )?;
    let mut summary = Summary::default();
    let mut faults = config.faults.clone();
    if faults.iter().any(|f| f.needs_small_fs()) {
        let mounted = cluster
            .mount_small_fs(&cluster.db_dir(), "8m")
            .and_then(|()| cluster.mount_small_fs(&cluster.store_dir(), "256m"));
        if let Err(e) = mounted {
            let reason = format!(
                "full-journal-fs and full-store-fs need root to mount small tmpfs filesystems ({e})"
            );
            eprintln!("soak: SKIPPING {reason}");
            summary.skipped_faults.push(reason);
            faults.retain(|f| !f.needs_small_fs());
        }
    }
    for node in Node::ALL {
        cluster.start(node)?;
    }
    let mut checker = Checker::new(&cluster, config.stateful).await?;
    checker
        .wait_settled(&mut cluster, 0)
        .await
        .map_err(|v| v.what)?;
    let mut rng = SmallRng::seed_from_u64(config.seed);
    let mut round = 0u64;
    while config.rounds.is_none_or(|n| round < n)
        && config.duration.is_none_or(|d| started.elapsed() < d)
    {
        round += 1;
        // Two rounds in ten restore a backup and one reverses a snapshot,
        // once the prune keeps a backup (so that round 1 draws as before).
        // Two in ten take a copy-on-write snapshot.
        let kind = if config.restores && checker.has_kept_backup() {
            match rng.random_range(0..10) {
                0 | 1 => RoundKind::Restore,
                2 => RoundKind::ReverseResync,
                3 | 4 if config.cow => RoundKind::Cow,
                _ => RoundKind::Run,
            }
        } else if config.cow && rng.random_range(0..10) < 2 {
            RoundKind::Cow
        } else {
            RoundKind::Run
        };
        let allowed: Vec<Fault> = faults.iter().copied().filter(|f| kind.allows(*f)).collect();
        let fault = if allowed.is_empty() || rng.random_range(0..10) == 0 {
            None
        } else {
            Some(allowed[rng.random_range(0..allowed.len())])
        };
        let outcome = play_round(
            &mut cluster,
            &mut checker,
            &mut rng,
            round,
            kind,
            fault,
            &mut summary,
        )
        .await;
        summary.rounds = round;
        if let Err(violation) = outcome {
            summary.violations.push(violation);
            break;
        }
        if round.is_multiple_of(25) {
            eprintln!(
                "soak: round {round}, {} faults, {:.1} min",
                summary.fault_count(),
                started.elapsed().as_secs_f64() / 60.0
            );
        }
    }
    summary.elapsed = started.elapsed();
    let found = !summary.violations.is_empty();
    if found {
        let _ = cluster.write_logs(&dir.join("violation-logs"));
    }
    cluster.shutdown();
    if found || config.keep_dir {
        // Keep the evidence: the directory outlives the run.
        if let Some(temp) = temp {
            let _ = temp.keep();
        }
        println!(
            "soak: the cluster's directory and logs are kept in {}",
            dir.display()
        );
    }
    if found {
        println!(
            "soak: replay with: {}",
            replay_command(config, Some(summary.rounds))
        );
    }
    Ok(summary)
}

/// What a round does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundKind {
    /// One `console run`: acquire → backup → delete → resync → verify.
    Run,
    /// Volume 0 corrupted through the array, then `console restore` of the
    /// newest backup the prune keeps, re-run until it completes.
    Restore,
    /// `console snapshot acquire`, the ledger writes, then `console
    /// snapshot restore` (the reverse resync), re-run until it completes.
    ReverseResync,
    /// A copy-on-write snapshot held while the ledger writes, read back
    /// through db-server and checked, then deleted.
    Cow,
}

impl RoundKind {
    /// The faults that may land in a round of this kind. A reverse resync
    /// is not given a damaged journal: an unusable journal drops the
    /// snapshot (it cannot be trusted), and with it the frozen image the
    /// reverse resync was copying back — nothing is left to finish it from,
    /// by design (see RELIABILITY.md).
    fn allows(self, fault: Fault) -> bool {
        self != RoundKind::ReverseResync
            || !matches!(fault, Fault::CorruptJournal | Fault::TruncateJournal)
    }
}

/// One round of `kind` with at most one fault, then the checks.
async fn play_round(
    cluster: &mut Cluster,
    checker: &mut Checker,
    rng: &mut SmallRng,
    round: u64,
    kind: RoundKind,
    fault: Option<Fault>,
    summary: &mut Summary,
) -> Result<(), Violation> {
    match kind {
        RoundKind::Run => play_run_round(cluster, checker, rng, round, fault, summary).await,
        RoundKind::Restore => {
            play_restore_round(cluster, checker, rng, round, fault, summary).await
        }
        RoundKind::ReverseResync => {
            play_reverse_round(cluster, checker, rng, round, fault, summary).await
        }
        RoundKind::Cow => play_cow_round(cluster, checker, rng, round, fault, summary).await,
    }
}

/// The save area the soak gives volume 0: as many blocks as the volume, so
/// that it never fills (a snapshot is invalidated only by a fault).
fn save_area_blocks(lu_size: &str) -> Result<u64, String> {
    let bytes = splitmirror_proto::units::parse_size_bytes(lu_size)
        .map_err(|e| format!("--lu-size {lu_size}: {e}"))?;
    Ok(bytes / 4096)
}

/// db-server's crash points a copy-on-write round passes: its acquire and
/// its delete.
fn cow_crash_points() -> Vec<(Node, &'static str)> {
    ["acquire.after_journal", "delete.after_journal"]
        .into_iter()
        .map(|p| (Node::Db, p))
        .collect()
}

/// The faults after which a held copy-on-write snapshot may be found
/// invalidated: db-server restarted (its save-area map is not journaled),
/// or the array failed a save under it.
fn may_invalidate(fault: Option<Fault>) -> bool {
    fault.is_some_and(|f| {
        !matches!(
            f,
            Fault::KillBackup | Fault::LostConsole | Fault::FullStoreFs | Fault::FullJournalFs
        )
    })
}

/// A copy-on-write round: the checker takes a COW snapshot of volume 0
/// inside a suspension (after reading the mate, the image a split at that
/// quiesce would freeze); the ledger writes over it while the round's
/// fault lands at a random moment; then the snapshot, read through
/// db-server's snapshot virtual LU, must equal that image and pass the
/// ledger's check at the acquire's sequence — or, only after a fault that
/// can cause it, be refused as invalidated with a reason in Status. Its
/// delete must resync nothing (and, without a fault, leave the pair
/// Synchronized at once). Then the usual checks (origin == mate while
/// quiesced).
async fn play_cow_round(
    cluster: &mut Cluster,
    checker: &mut Checker,
    rng: &mut SmallRng,
    round: u64,
    fault: Option<Fault>,
    summary: &mut Summary,
) -> Result<(), Violation> {
    summary.cow_rounds += 1;
    let armed = match fault {
        Some(Fault::CrashPoint) => Some(arm_crash_point(
            cluster,
            rng,
            round,
            &cow_crash_points(),
            summary,
        )?),
        _ => None,
    };
    let run_id = format!("soak-cow-{round}");
    let taken = match checker.take_cow_snapshot(round, &run_id).await? {
        Ok(taken) => Some(taken),
        Err(e) if fault.is_none() => {
            return Err(Violation::new(
                round,
                format!("a copy-on-write acquire failed in a round without a fault: {e}"),
            ));
        }
        // A crash point in the acquire: the snapshot may be journaled and
        // held after the restart (the checks delete what is left).
        Err(_) => None,
    };
    summary.cow_acquired += u64::from(taken.is_some());
    // The ledger writes over the snapshot's blocks; the fault lands.
    let delay = Duration::from_millis(rng.random_range(0..FAULT_WINDOW_MS));
    tokio::time::sleep(delay).await;
    let mut lost_console_at = None;
    if let Some(fault) = fault {
        lost_console_at = land_fault(cluster, checker, rng, round, fault, summary).await?;
    }
    tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
    if let Some(node) = armed
        && cluster.exited_by_itself(node).is_some()
    {
        cluster.kill9(node);
        start(cluster, node, round)?;
    }
    after_fault(cluster, checker, round, lost_console_at, armed).await?;
    checker.wait_db_answers(round).await?;
    let Some(taken) = taken else {
        summary.runs_failed += 1;
        return checker.after_round(cluster, round, summary).await;
    };
    let held = checker
        .volume0()
        .await
        .map_err(|e| Violation::new(round, e))?;
    // After a restart Status may show the invalidated snapshot by its
    // reason alone (the journal holds the pair Synchronized).
    let invalidated_unnamed =
        held.snapshot_holder.is_empty() && !held.snapshot_invalidated_reason.is_empty();
    if held.snapshot_holder == run_id || invalidated_unnamed {
        if !invalidated_unnamed && held.snapshot_method() != pb_db::SnapshotMethod::Cow {
            return Err(Violation::new(
                round,
                format!("the copy-on-write snapshot of {run_id} shows another method: {held:?}"),
            ));
        }
        if fault.is_none() && held.data_mode() != pb_db::Mode::Synchronized {
            return Err(Violation::new(
                round,
                format!("a held copy-on-write snapshot left the pair not Synchronized: {held:?}"),
            ));
        }
        check_cow_read(checker, round, fault, &taken, held.block_count, summary).await?;
        match checker.delete_snapshot(&run_id).await {
            Ok(deleted) if deleted.ranges_to_resync != 0 || deleted.blocks_to_resync != 0 => {
                return Err(Violation::new(
                    round,
                    format!(
                        "the delete of a copy-on-write snapshot has a resync to do: {deleted:?}"
                    ),
                ));
            }
            Ok(_) => {
                summary.cow_deleted_without_resync += 1;
                if fault.is_none() {
                    let after = checker
                        .volume0()
                        .await
                        .map_err(|e| Violation::new(round, e))?;
                    if after.data_mode() != pb_db::Mode::Synchronized
                        || !after.snapshot_holder.is_empty()
                    {
                        return Err(Violation::new(
                            round,
                            format!(
                                "right after a copy-on-write delete the pair is not Synchronized and free: {after:?}"
                            ),
                        ));
                    }
                }
            }
            Err(e) if fault.is_none() => {
                return Err(Violation::new(
                    round,
                    format!("a copy-on-write delete failed in a round without a fault: {e}"),
                ));
            }
            Err(_) => summary.runs_failed += 1,
        }
    } else if fault.is_none() {
        return Err(Violation::new(
            round,
            format!(
                "the copy-on-write snapshot of {run_id} vanished in a round without a fault: {held:?}"
            ),
        ));
    }
    checker.after_round(cluster, round, summary).await
}

/// The held copy-on-write snapshot, read through db-server: the split's
/// image at the same quiesce, passing the ledger's check at its sequence;
/// or refused as invalidated, which only a fault excuses.
async fn check_cow_read(
    checker: &mut Checker,
    round: u64,
    fault: Option<Fault>,
    taken: &checks::CowSnapshot,
    block_count: u64,
    summary: &mut Summary,
) -> Result<(), Violation> {
    // A fault may leave db-server a moment from serving reads: try again
    // (bounded) while the read fails otherwise than invalidated.
    let mut attempts = 0;
    loop {
        attempts += 1;
        match checker.read_cow_image(block_count).await {
            checks::CowRead::Image(image) => {
                if let Some(block) = first_differing_block(&image, &taken.split_image) {
                    return Err(Violation::new(
                        round,
                        format!(
                            "the copy-on-write snapshot of {} (sequence {}) read through db-server differs from the mate at its quiesce (what a split would hold) from block {block} on (fault: {})",
                            taken.run_id,
                            taken.sequence,
                            fault.map_or("none", Fault::name)
                        ),
                    ));
                }
                let report = db_server::ledger_format::verify_image(&image, Some(taken.sequence));
                if !report.ok {
                    return Err(Violation::new(
                        round,
                        format!(
                            "the copy-on-write snapshot of {} fails the ledger's check at its sequence {}: {:?}",
                            taken.run_id, taken.sequence, report.violations
                        ),
                    ));
                }
                summary.cow_images_verified += 1;
                return Ok(());
            }
            checks::CowRead::Invalidated(reason) => {
                if !may_invalidate(fault) {
                    return Err(Violation::new(
                        round,
                        format!(
                            "the copy-on-write snapshot of {} was invalidated with no fault that could (fault: {}): {reason}",
                            taken.run_id,
                            fault.map_or("none", Fault::name)
                        ),
                    ));
                }
                let why = if reason.contains("restarted") {
                    "db-server restarted"
                } else if reason.contains("save area") {
                    "the save area"
                } else {
                    "another reason"
                };
                *summary.cow_invalidated.entry(why.to_string()).or_default() += 1;
                return Ok(());
            }
            checks::CowRead::Failed(e) if fault.is_none() || attempts >= 5 => {
                return Err(Violation::new(
                    round,
                    format!(
                        "reading the held copy-on-write snapshot of {} failed (fault: {}, attempt {attempts}): {e}",
                        taken.run_id,
                        fault.map_or("none", Fault::name)
                    ),
                ));
            }
            checks::CowRead::Failed(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// The first 4 KiB block where two images differ (or the shorter's end).
fn first_differing_block(a: &[u8], b: &[u8]) -> Option<usize> {
    const BLOCK: usize = 4096;
    if a.len() != b.len() {
        return Some(a.len().min(b.len()) / BLOCK);
    }
    a.chunks(BLOCK)
        .zip(b.chunks(BLOCK))
        .position(|(x, y)| x != y)
}

/// The console's command line, its addresses and certificates given by
/// the environment (so that nothing on the command line but `--backup-id` names a backup).
fn console_command(cluster: &Cluster, args: &[&str]) -> Command {
    let mut command = Command::new(cluster.console_binary());
    command
        .env("SPLITMIRROR_TLS_DIR", cluster.certs_dir())
        .env("SPLITMIRROR_ARRAY", cluster.addr(Node::Array))
        .env("SPLITMIRROR_DB", cluster.addr(Node::Db))
        .env("SPLITMIRROR_BACKUP", cluster.addr(Node::Backup))
        .env("NO_COLOR", "1")
        .args(args)
        .args(["--step-deadline", "20s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    command
}

/// A console started, with its standard output gathered.
struct RunningConsole {
    child: std::process::Child,
    stdout: std::thread::JoinHandle<String>,
}

impl RunningConsole {
    fn spawn(mut command: Command, round: u64, what: &str) -> Result<Self, Violation> {
        let mut child = command
            .spawn()
            .map_err(|e| Violation::new(round, format!("starting console {what}: {e}")))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut { stdout }, &mut text);
            text
        });
        Ok(Self { child, stdout })
    }
}

/// How a console ended: its exit status and its JSON report, if any.
struct ConsoleOutcome {
    success: bool,
    status: String,
    text: String,
    report: Option<serde_json::Value>,
}

/// How long a console may take before it counts as wedged.
const CONSOLE_DEADLINE: Duration = Duration::from_secs(180);
/// Attempts of one restore (the first and its re-runs) before a restore
/// that does not complete, once its fault has healed, is a violation.
const RESTORE_ATTEMPTS: u32 = 5;
/// A restore round's fault lands this long (at most) after its console
/// starts: a restore of an 8 MiB volume takes about a second.
const RESTORE_FAULT_WINDOW_MS: u64 = 1200;
/// A reverse resync copies what the ledger wrote in half a second.
const REVERSE_FAULT_WINDOW_MS: u64 = 600;
/// How often the probes look at a volume under restore.
const PROBE_EVERY: Duration = Duration::from_millis(60);

/// Waits for a console to end (a console that does not end within
/// [`CONSOLE_DEADLINE`] is a violation), probing the volume meanwhile when
/// `probes` is given, and restarting `supervised` — the node with a crash
/// point armed — once it has aborted, as a service manager would.
async fn wait_console(
    cluster: &mut Cluster,
    checker: &mut Checker,
    round: u64,
    mut console: RunningConsole,
    mut probes: Option<&mut u64>,
    supervised: Option<Node>,
) -> Result<ConsoleOutcome, Violation> {
    let deadline = Instant::now() + CONSOLE_DEADLINE;
    let status = loop {
        if let Ok(Some(status)) = console.child.try_wait() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = console.child.kill();
            let _ = console.child.wait();
            return Err(Violation::new(
                round,
                format!(
                    "the console did not end within {} s (wedged)",
                    CONSOLE_DEADLINE.as_secs()
                ),
            ));
        }
        if let Some(node) = supervised
            && cluster.exited_by_itself(node).is_some()
        {
            cluster.kill9(node);
            start(cluster, node, round)?;
        }
        match probes.as_deref_mut() {
            Some(count) => {
                if checker.probe_offline(round).await? == Probe::Offline {
                    *count += 1;
                }
                tokio::time::sleep(PROBE_EVERY).await;
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let text = console.stdout.join().unwrap_or_default();
    Ok(ConsoleOutcome {
        success: status.success(),
        status: status.to_string(),
        report: serde_json::from_str(text.trim()).ok(),
        text,
    })
}

/// Sleeps `duration`, probing the volume meanwhile.
async fn probe_for(
    checker: &mut Checker,
    round: u64,
    duration: Duration,
    probes: &mut u64,
) -> Result<(), Violation> {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        if checker.probe_offline(round).await? == Probe::Offline {
            *probes += 1;
        }
        tokio::time::sleep(PROBE_EVERY.min(until.saturating_duration_since(Instant::now()))).await;
    }
    Ok(())
}

/// Restarts `node` with one of `points` armed, so that the round's own
/// steps decide the moment it aborts. Answers the node.
fn arm_crash_point(
    cluster: &mut Cluster,
    rng: &mut SmallRng,
    round: u64,
    points: &[(Node, &'static str)],
    summary: &mut Summary,
) -> Result<Node, Violation> {
    let (node, point) = points[rng.random_range(0..points.len())];
    let nth = match point {
        // Reached once per acquire, delete, begin or end of a restore.
        "acquire.after_journal"
        | "delete.after_journal"
        | "acquire.after_mode_select"
        | "delete.after_mode_select"
        | "resync.after_journal_synchronized"
        | "restore.after_journal"
        | "restore.after_grant"
        | "end_restore.after_journal"
        | "reverse.after_journal"
        | "restore.before_verify" => 1,
        // Once per copied range, per written stream.
        "reverse.after_copy" | "restore.after_first_write" => rng.random_range(1..3),
        _ => rng.random_range(1..40),
    };
    *summary
        .kills_by_phase
        .entry(format!("crash point {point}"))
        .or_default() += 1;
    cluster.stop(node);
    let armed = format!("{point}:{nth}");
    cluster
        .start_with_env(node, &[("SPLITMIRROR_CRASH_AT", &armed)])
        .map_err(|e| Violation::new(round, format!("restarting {node}: {e}")))?;
    Ok(node)
}

/// db-server's crash points for a `console run` (with the stateful ones
/// when db-server runs `--array-mode stateful`).
fn run_crash_points(stateful: bool) -> Vec<(Node, &'static str)> {
    let stateful_points = STATEFUL_CRASH_POINTS.iter().filter(|_| stateful);
    CRASH_POINTS
        .iter()
        .chain(stateful_points)
        .map(|p| (Node::Db, *p))
        .collect()
}

/// The crash points inside a restore from a backup: db-server's at its
/// begin and end, the backup server's inside the job.
fn restore_crash_points() -> Vec<(Node, &'static str)> {
    let db = db_server::crash::RESTORE_POINTS
        .iter()
        .filter(|p| p.starts_with("restore.") || p.starts_with("end_restore."))
        .map(|p| (Node::Db, *p));
    let backup = backup_server::crash::POINTS
        .iter()
        .filter(|p| p.starts_with("restore."))
        .map(|p| (Node::Backup, *p));
    db.chain(backup).collect()
}

/// The crash points of a reverse resync round: its own, and the snapshot
/// writes of the ledger before it.
fn reverse_crash_points() -> Vec<(Node, &'static str)> {
    db_server::crash::RESTORE_POINTS
        .iter()
        .filter(|p| p.starts_with("reverse."))
        .chain(["write.after_intent", "write.after_array"].iter())
        .map(|p| (Node::Db, *p))
        .collect()
}

/// Lands `fault` now (a crash point was armed before). Answers when a
/// lost console suspended the database, if it did.
async fn land_fault(
    cluster: &mut Cluster,
    checker: &mut Checker,
    rng: &mut SmallRng,
    round: u64,
    fault: Fault,
    summary: &mut Summary,
) -> Result<Option<Instant>, Violation> {
    *summary.faults.entry(fault.name()).or_default() += 1;
    let phase = checker.phase().await;
    let mut kill = |node: Node, summary: &mut Summary| {
        *summary
            .kills_by_phase
            .entry(format!("{phase} ({node})"))
            .or_default() += 1;
        cluster.kill9(node);
    };
    match fault {
        Fault::KillArray | Fault::KillDb | Fault::KillBackup => {
            let node = match fault {
                Fault::KillArray => Node::Array,
                Fault::KillDb => Node::Db,
                _ => Node::Backup,
            };
            kill(node, summary);
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..1500))).await;
            start(cluster, node, round)?;
        }
        Fault::Pause => {
            let node = Node::ALL[rng.random_range(0..3)];
            cluster.pause(node);
            tokio::time::sleep(Duration::from_millis(rng.random_range(1500..4000))).await;
            cluster.resume(node);
        }
        Fault::LostConsole => return Ok(checker.suspend_and_vanish().await),
        Fault::RestartArray => {
            cluster.stop(Node::Array);
            start(cluster, Node::Array, round)?;
        }
        Fault::CorruptJournal | Fault::TruncateJournal => {
            kill(Node::Db, summary);
            let damaged = damage_journal(cluster, fault, rng, round)?;
            start(cluster, Node::Db, round)?;
            // The damage lies inside what was committed: the journal
            // must be judged unusable and kept aside as evidence (not
            // taken for a torn tail and cut), and the pairs compared
            // whole.
            let set_aside = set_aside_journals(&cluster.db_dir());
            if damaged && set_aside.is_empty() {
                return Err(Violation::new(
                    round,
                    "a journal damaged inside its committed part was not set aside as unusable",
                ));
            }
            summary.journals_set_aside += set_aside.len() as u64;
            // Evidence looked at: removed, so that the small journal
            // filesystem does not fill up over a long run.
            for path in set_aside {
                let _ = std::fs::remove_file(path);
            }
        }
        // Armed before the round's console started.
        Fault::CrashPoint => {}
        Fault::FullJournalFs | Fault::FullStoreFs => {
            let dir = if fault == Fault::FullJournalFs {
                cluster.db_dir()
            } else {
                cluster.store_dir()
            };
            let ballast = dir.join("soak-ballast");
            fill(&ballast);
            tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
            let _ = std::fs::remove_file(&ballast);
        }
    }
    Ok(None)
}

/// After a round's fault: the lost console's lease ran out by itself, no
/// node exited unasked (`armed`, the node with a crash point, may have),
/// a crash point that never fired is disarmed, every node is back, and no
/// journal was set aside without damage.
async fn after_fault(
    cluster: &mut Cluster,
    checker: &mut Checker,
    round: u64,
    lost_console_at: Option<Instant>,
    armed: Option<Node>,
) -> Result<(), Violation> {
    if let Some(at) = lost_console_at {
        checker.check_resumed_by_itself(round, at).await?;
    }
    for node in Node::ALL {
        if armed == Some(node) {
            continue;
        }
        if let Some(status) = cluster.exited_by_itself(node) {
            return Err(Violation::new(
                round,
                format!("{node} exited by itself ({status}) with no fault asking it to"),
            ));
        }
    }
    if let Some(node) = armed {
        cluster
            .disarm(node)
            .map_err(|e| Violation::new(round, format!("restarting {node} unarmed: {e}")))?;
    }
    cluster
        .heal()
        .map_err(|e| Violation::new(round, format!("a node did not come back: {e}")))?;
    // Only a journal damaged on purpose (handled where it was damaged) may
    // be set aside: a crash or a full filesystem never makes committed
    // records unusable.
    let set_aside = set_aside_journals(&cluster.db_dir());
    if !set_aside.is_empty() {
        return Err(Violation::new(
            round,
            format!("db-server found its journal unusable after no damage: {set_aside:?}"),
        ));
    }
    Ok(())
}

/// One round: a `console run` with at most one fault landing at a random
/// moment of it, then the checks.
async fn play_run_round(
    cluster: &mut Cluster,
    checker: &mut Checker,
    rng: &mut SmallRng,
    round: u64,
    fault: Option<Fault>,
    summary: &mut Summary,
) -> Result<(), Violation> {
    // A crash point is armed before the run, so that the run's own steps
    // decide the moment db-server dies.
    let armed = match fault {
        Some(Fault::CrashPoint) => Some(arm_crash_point(
            cluster,
            rng,
            round,
            &run_crash_points(checker.stateful()),
            summary,
        )?),
        _ => None,
    };
    let command = console_command(
        cluster,
        &[
            "run",
            "--volume",
            "0",
            "--json",
            // Slow enough that faults land inside the backup, not after it.
            "--max-rate",
            BACKUP_RATE,
        ],
    );
    // Without a fault, the ledger commits every transaction through the
    // whole run, the snapshot's split included (stateful: the array routes
    // its mirror-LU writes to the origin alone).
    let failed_before = match fault {
        None => checker.ledger_failed().await,
        Some(_) => None,
    };
    let console = RunningConsole::spawn(command, round, "run")?;
    let delay = Duration::from_millis(rng.random_range(0..FAULT_WINDOW_MS));
    tokio::time::sleep(delay).await;
    let mut lost_console_at = None;
    if let Some(fault) = fault {
        lost_console_at = land_fault(cluster, checker, rng, round, fault, summary).await?;
    }
    // The console must end by itself: every step has a deadline.
    let outcome = wait_console(cluster, checker, round, console, None, None).await?;
    match &outcome.report {
        Some(report) if outcome.success => {
            summary.runs_succeeded += 1;
            if report["verified"] != serde_json::Value::Bool(true) {
                return Err(Violation::new(
                    round,
                    format!("a console run exited 0 without a verified backup: {report}"),
                ));
            }
        }
        // With no fault in the round, nothing excuses a failed run.
        other if fault.is_none() => {
            return Err(Violation::new(
                round,
                format!(
                    "a console run failed in a round without a fault ({}): {}",
                    outcome.status,
                    other.as_ref().map_or_else(
                        || outcome.text.trim().to_string(),
                        |r| r["error"].to_string()
                    )
                ),
            ));
        }
        _ => summary.runs_failed += 1,
    }
    if let Some(before) = failed_before
        && let Some(after) = checker.ledger_failed().await
        && after > before
    {
        return Err(Violation::new(
            round,
            format!(
                "the ledger failed {} transactions during a console run without a fault",
                after - before
            ),
        ));
    }
    after_fault(cluster, checker, round, lost_console_at, armed).await?;
    checker.after_round(cluster, round, summary).await
}

/// A restore round: a few chunks of volume 0 overwritten with garbage
/// under the running ledger, then `console restore` of the newest backup
/// the prune keeps, with the round's fault landing at a random moment; the
/// same command (same run id) is run again until it completes. Falls back
/// to a run round while no backup can be restored.
async fn play_restore_round(
    cluster: &mut Cluster,
    checker: &mut Checker,
    rng: &mut SmallRng,
    round: u64,
    fault: Option<Fault>,
    summary: &mut Summary,
) -> Result<(), Violation> {
    let Some(backup) = checker.restorable_backup(cluster).await else {
        return play_run_round(cluster, checker, rng, round, fault, summary).await;
    };
    summary.restore_rounds += 1;
    let armed = match fault {
        Some(Fault::CrashPoint) => Some(arm_crash_point(
            cluster,
            rng,
            round,
            &restore_crash_points(),
            summary,
        )?),
        _ => None,
    };
    let count = rng.random_range(1..=3);
    let corrupted = checker.corrupt_chunks(rng, count).await.map_err(|e| {
        Violation::new(round, format!("corrupting volume 0 through the array: {e}"))
    })?;
    summary.chunks_corrupted += corrupted.len() as u64;
    let mut run_id = format!("soak-restore-{round}");
    let restore_args = |run_id: &str, force: bool| {
        let mut args = vec![
            "restore".to_string(),
            "--volume".into(),
            "0".into(),
            "--backup-id".into(),
            backup.backup_id.clone(),
            "--run-id".into(),
            run_id.to_string(),
            "--json".into(),
        ];
        if force {
            args.push("--force".into());
        }
        args
    };
    let mut probes = 0u64;
    let args = restore_args(&run_id, false);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let console = RunningConsole::spawn(console_command(cluster, &args), round, "restore")?;
    let delay = Duration::from_millis(rng.random_range(0..RESTORE_FAULT_WINDOW_MS));
    probe_for(checker, round, delay, &mut probes).await?;
    let mut lost_console_at = None;
    if let Some(fault) = fault {
        lost_console_at = land_fault(cluster, checker, rng, round, fault, summary).await?;
        // The fault has landed: is the volume, if still under restore,
        // offline?
        if checker.probe_offline(round).await? == Probe::Offline {
            probes += 1;
        }
    }
    let mut outcome =
        wait_console(cluster, checker, round, console, Some(&mut probes), armed).await?;
    if !outcome.success && fault.is_none() {
        return Err(Violation::new(
            round,
            format!(
                "console restore of backup {} failed in a round without a fault ({}): {}",
                backup.backup_id,
                outcome.status,
                outcome.text.trim()
            ),
        ));
    }
    after_fault(cluster, checker, round, lost_console_at, armed).await?;
    let mut attempts = 1;
    let mut forced = false;
    while !outcome.success {
        summary.restore_attempts_failed += 1;
        if attempts == RESTORE_ATTEMPTS {
            return Err(Violation::new(
                round,
                format!(
                    "restore run {run_id} of backup {} did not complete in {attempts} attempts after its fault ({}) had healed; the last ended {}: {}",
                    backup.backup_id,
                    fault.map_or("none", Fault::name),
                    outcome.status,
                    outcome.text.trim()
                ),
            ));
        }
        // The operator's next move: once the nodes answer and the volume
        // is either offline for this run or Synchronized again, the same
        // command — with --force when the ledger is down on a volume that
        // is online (a restart found the corrupted volume failing the
        // ledger's check) or when the safety backup failed.
        // A run the console abandoned (its safety backup failed under the
        // fault before anything was written) is over for good: the
        // operator's next move is the same restore under a new run id.
        let abandoned = outcome
            .report
            .as_ref()
            .is_some_and(|r| r["error"].as_str().is_some_and(|e| e.contains("abandoned")));
        if abandoned {
            run_id = format!("soak-restore-{round}-{}", attempts + 1);
        }
        let state = wait_restorable(cluster, checker, round, &run_id).await?;
        let safety_failed = outcome
            .report
            .as_ref()
            .is_some_and(|r| r["safety_backup"]["status"] == "failed");
        let force = safety_failed || (state.restore_run_id.is_none() && !state.ledger_running);
        forced |= force;
        attempts += 1;
        let args = restore_args(&run_id, force);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let console = RunningConsole::spawn(console_command(cluster, &args), round, "restore")?;
        outcome = wait_console(cluster, checker, round, console, Some(&mut probes), None).await?;
        after_fault(cluster, checker, round, None, None).await?;
    }
    summary.offline_probes += probes;
    summary.restores_seen_offline += u64::from(probes > 0);
    let report = outcome.report.unwrap_or_default();
    check_restore_report(&report, &backup, attempts, forced, fault.is_some()).map_err(|e| {
        Violation::new(
            round,
            format!(
                "console restore of backup {} (run {run_id}) exited 0 but {e}: {report}",
                backup.backup_id
            ),
        )
    })?;
    if let Some(safety) = report["safety_backup"]["backup_id"].as_str() {
        checker.verify_backup(round, safety).await?;
        summary.safety_backups_verified += 1;
    }
    summary.restores_completed += 1;
    if attempts > 1 {
        summary.restores_completed_on_rerun += 1;
    }
    checker.restored(RestoredImage {
        what: format!("backup {}", backup.backup_id),
        image: backup.image,
        sequence: backup.ledger_sequence,
    });
    checker.after_round(cluster, round, summary).await
}

/// What a completed restore's report must say: verified by the backup
/// server and by EndRestore's comparison with the backup's image digest,
/// the ledger reopened at the backup's sequence (or later, when a re-run
/// found the restore already ended), the safety backup named (unless a
/// re-run had to go without it), and on a first attempt of a round without
/// a fault at least one chunk written (the garbage differs from every
/// backup).
fn check_restore_report(
    report: &serde_json::Value,
    backup: &RestorableBackup,
    attempts: u32,
    forced: bool,
    faulted: bool,
) -> Result<(), String> {
    if report["verified"] != true {
        return Err("its report does not say verified".into());
    }
    // A call that found the restore ended (its EndRestore answer lost, the
    // comparison done then) carries no digest after a restart of db-server.
    let already_ended = report["end"]["already_ended"] == true;
    if report["end"]["image_digest_matches"] != true && !already_ended {
        return Err("EndRestore did not find the backup's image digest".into());
    }
    if report["backup_ledger_sequence"].as_u64() != Some(backup.ledger_sequence) {
        return Err(format!(
            "it names backup ledger sequence {}, the backup's index {}",
            report["backup_ledger_sequence"], backup.ledger_sequence
        ));
    }
    if report["ledger_running"] != true {
        return Err("the ledger did not reopen on the restored volume".into());
    }
    let sequence = report["ledger_sequence"].as_u64();
    let sequence_right = match sequence {
        Some(s) if already_ended => s >= backup.ledger_sequence,
        Some(s) => s == backup.ledger_sequence,
        None => false,
    };
    if !sequence_right {
        return Err(format!(
            "the ledger reopened at sequence {sequence:?}, not the backup's {}{}",
            backup.ledger_sequence,
            if already_ended { " or later" } else { "" }
        ));
    }
    let safety = report["safety_backup"]["status"].as_str().unwrap_or("");
    let named = report["safety_backup"]["backup_id"].is_string();
    // A re-run that found the restore ended took nothing: the first
    // attempt's safety backup is its.
    let ended_before = report["ended_before"] == true;
    if !(named || ended_before || (forced && safety == "failed")) {
        return Err(format!("its safety backup is {safety:?}"));
    }
    // A fault may have killed the first restore job after it wrote the
    // chunks, and the console's own retry of the job then finds nothing
    // left to write, within one attempt of the command.
    if attempts == 1 && !faulted && report["chunks_written"].as_u64().unwrap_or(0) == 0 {
        return Err("it wrote no chunk over a corrupted volume".into());
    }
    Ok(())
}

/// Between attempts of a restore: every node answers and volume 0 is
/// offline for `run_id` or Synchronized (what BeginRestore needs); a
/// snapshot a failed attempt could not have left is no reason to wait.
async fn wait_restorable(
    cluster: &mut Cluster,
    checker: &mut Checker,
    round: u64,
    run_id: &str,
) -> Result<VolumeState, Violation> {
    let started = Instant::now();
    loop {
        if let Some(state) = checker.volume_state().await
            && (state.restore_run_id.as_deref() == Some(run_id)
                || (state.synchronized && state.restore_run_id.is_none()))
        {
            return Ok(state);
        }
        if started.elapsed() > Duration::from_secs(180) {
            return Err(Violation::new(
                round,
                format!(
                    "volume 0 was neither offline for restore run {run_id} nor Synchronized within 180 s: {:?}",
                    checker.volume_state().await
                ),
            ));
        }
        cluster
            .heal()
            .map_err(|e| Violation::new(round, format!("a node did not come back: {e}")))?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A reverse-resync round: `console snapshot acquire`, the ledger writes
/// for half a second into the split pair, then `console snapshot restore`
/// with the round's fault landing at a random moment, run again until it
/// completes; the volume must then hold the frozen mate (but for what the
/// ledger wrote after it reopened).
async fn play_reverse_round(
    cluster: &mut Cluster,
    checker: &mut Checker,
    rng: &mut SmallRng,
    round: u64,
    fault: Option<Fault>,
    summary: &mut Summary,
) -> Result<(), Violation> {
    let run_id = format!("soak-reverse-{round}");
    let acquire = console_command(
        cluster,
        &["snapshot", "acquire", "--volume", "0", "--run-id", &run_id],
    );
    let acquired = wait_console(
        cluster,
        checker,
        round,
        RunningConsole::spawn(acquire, round, "snapshot acquire")?,
        None,
        None,
    )
    .await?;
    if !acquired.success {
        return Err(Violation::new(
            round,
            format!(
                "console snapshot acquire failed before any fault ({}): {}",
                acquired.status,
                acquired.text.trim()
            ),
        ));
    }
    summary.reverse_rounds += 1;
    let frozen = checker.frozen_image(round, &run_id).await?;
    checker.check_snapshot_array_mode(round).await?;
    let armed = match fault {
        Some(Fault::CrashPoint) => Some(arm_crash_point(
            cluster,
            rng,
            round,
            &reverse_crash_points(),
            summary,
        )?),
        _ => None,
    };
    // The ledger writes into the split pair: these are the ranges the
    // reverse resync copies back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let args = [
        "snapshot", "restore", "--volume", "0", "--run-id", &run_id, "--json",
    ];
    let mut probes = 0u64;
    let console =
        RunningConsole::spawn(console_command(cluster, &args), round, "snapshot restore")?;
    let delay = Duration::from_millis(rng.random_range(0..REVERSE_FAULT_WINDOW_MS));
    probe_for(checker, round, delay, &mut probes).await?;
    let mut lost_console_at = None;
    if let Some(fault) = fault {
        lost_console_at = land_fault(cluster, checker, rng, round, fault, summary).await?;
        if checker.probe_offline(round).await? == Probe::Offline {
            probes += 1;
        }
    }
    let mut outcome =
        wait_console(cluster, checker, round, console, Some(&mut probes), armed).await?;
    if !outcome.success && fault.is_none() {
        return Err(Violation::new(
            round,
            format!(
                "console snapshot restore failed in a round without a fault ({}): {}",
                outcome.status,
                outcome.text.trim()
            ),
        ));
    }
    after_fault(cluster, checker, round, lost_console_at, armed).await?;
    let mut attempts = 1;
    while !outcome.success {
        summary.restore_attempts_failed += 1;
        if attempts == RESTORE_ATTEMPTS {
            return Err(Violation::new(
                round,
                format!(
                    "the reverse resync of run {run_id} did not complete in {attempts} attempts after its fault ({}) had healed; the last ended {}: {}",
                    fault.map_or("none", Fault::name),
                    outcome.status,
                    outcome.text.trim()
                ),
            ));
        }
        wait_reversible(cluster, checker, round, &run_id).await?;
        attempts += 1;
        let console =
            RunningConsole::spawn(console_command(cluster, &args), round, "snapshot restore")?;
        outcome = wait_console(cluster, checker, round, console, Some(&mut probes), None).await?;
        after_fault(cluster, checker, round, None, None).await?;
    }
    summary.offline_probes += probes;
    summary.restores_seen_offline += u64::from(probes > 0);
    let report = outcome.report.unwrap_or_default();
    let already = report["already_restored"] == true;
    let sequence = report["ledger_sequence"].as_u64();
    let problem = if report["snapshot_ledger_sequence"].as_u64() != Some(frozen.sequence) {
        Some(format!(
            "it names snapshot sequence {}, the acquire's {}",
            report["snapshot_ledger_sequence"], frozen.sequence
        ))
    } else if report["ledger_running"] != true {
        Some("the ledger did not reopen".into())
    } else if !sequence.is_some_and(|s| s == frozen.sequence || (already && s > frozen.sequence)) {
        Some(format!(
            "the ledger reopened at sequence {sequence:?}, not the snapshot's {}",
            frozen.sequence
        ))
    } else {
        None
    };
    if let Some(problem) = problem {
        return Err(Violation::new(
            round,
            format!("console snapshot restore of run {run_id} exited 0 but {problem}: {report}"),
        ));
    }
    summary.reverse_resyncs += 1;
    if attempts > 1 {
        summary.reverse_resyncs_on_rerun += 1;
    }
    checker.restored(frozen);
    checker.after_round(cluster, round, summary).await
}

/// Between attempts of a reverse resync: db-server answers, and volume 0
/// is still held by `run_id`, offline for its reverse resync, or already
/// Synchronized (the resync ended, its answer lost).
async fn wait_reversible(
    cluster: &mut Cluster,
    checker: &mut Checker,
    round: u64,
    run_id: &str,
) -> Result<(), Violation> {
    let started = Instant::now();
    loop {
        if let Some(state) = checker.volume_state().await
            && (state.snapshot_holder == run_id
                || state.restore_run_id.as_deref() == Some(run_id)
                || state.synchronized)
        {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(180) {
            return Err(Violation::new(
                round,
                format!(
                    "volume 0 was neither held by run {run_id}, nor offline for it, nor Synchronized within 180 s: {:?}",
                    checker.volume_state().await
                ),
            ));
        }
        cluster
            .heal()
            .map_err(|e| Violation::new(round, format!("a node did not come back: {e}")))?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn start(cluster: &mut Cluster, node: Node, round: u64) -> Result<(), Violation> {
    cluster
        .start(node)
        .map_err(|e| Violation::new(round, format!("restarting {node}: {e}")))
}

/// Overwrites 8 bytes in the middle of the journal, or cuts it to half.
/// Answers whether the journal was long enough to damage.
fn damage_journal(
    cluster: &Cluster,
    fault: Fault,
    rng: &mut SmallRng,
    round: u64,
) -> Result<bool, Violation> {
    damage_journal_file(
        &cluster.db_dir().join("journal.log"),
        fault == Fault::CorruptJournal,
        rng,
    )
    .map_err(|e| Violation::new(round, e))
}

/// Where the journal's records start and end: its commit block (offset 8)
/// names the committed length; records start at offset 24.
const JOURNAL_RECORDS_AT: usize = 24;

/// Damages what a journal file has committed — 8 bytes overwritten at a
/// random place among its committed records, or the file cut to a random
/// length below the committed one — so that the damage is always evidence
/// of corruption, never a torn tail that was never acknowledged. Answers
/// false (and changes nothing) when too little is committed to damage.
pub fn damage_journal_file(path: &Path, corrupt: bool, rng: &mut SmallRng) -> Result<bool, String> {
    let mut bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let committed = bytes
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .map_or(0, |len| (len as usize).min(bytes.len()));
    if committed < JOURNAL_RECORDS_AT + 16 {
        return Ok(false);
    }
    if corrupt {
        let at = rng.random_range(JOURNAL_RECORDS_AT..committed - 8);
        for byte in &mut bytes[at..at + 8] {
            *byte ^= 0x5A;
        }
    } else {
        bytes.truncate(rng.random_range(JOURNAL_RECORDS_AT..committed));
    }
    std::fs::write(path, &bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(true)
}

/// The journals db-server has set aside as unusable (`journal.damaged-*`).
pub fn set_aside_journals(db_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(db_dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("journal.damaged-"))
        })
        .collect()
}

/// Fills the filesystem of `ballast` until it is full.
fn fill(ballast: &std::path::Path) {
    use std::io::Write;
    let Ok(mut file) = std::fs::File::create(ballast) else {
        return;
    };
    let block = vec![0xEEu8; 64 << 10];
    while file.write_all(&block).is_ok() {}
    let _ = file.sync_all();
}
