//! The nemesis: a whole cluster of real processes on loopback, driven round
//! after round from one seed — the ledger writing, a `console run` per round
//! — while faults land at random moments: kill -9 of any node (also in the
//! middle of an acquire, a backup or a resync), SIGSTOP pauses, a console
//! lost while the database is suspended, the array restarted, the journal
//! corrupted or cut short while db-server is down, and the journal's or the
//! backup store's filesystem full for a while. After every round the
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

use checks::{Checker, Violation};
use cluster::{Cluster, ClusterOptions, Node};

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
const CRASH_POINTS: [&str; 6] = db_server::crash::POINTS;

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
}

impl Canary {
    pub const ALL: [Canary; 5] = [
        Canary::IntentAfterWrite,
        Canary::ForgetSnapshotWrites,
        Canary::ResyncSkipsRecheck,
        Canary::LedgerSideBySide,
        Canary::NoRangeLock,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Canary::IntentAfterWrite => "intent-after-write",
            Canary::ForgetSnapshotWrites => "forget-snapshot-writes",
            Canary::ResyncSkipsRecheck => "resync-skips-recheck",
            Canary::LedgerSideBySide => "ledger-side-by-side",
            Canary::NoRangeLock => "no-range-lock",
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
    pub journals_set_aside: u64,
    pub leftover_snapshots_deleted: u64,
    pub skipped_faults: Vec<String>,
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
    let mut cluster = Cluster::new(
        &dir,
        ClusterOptions {
            lu_size: config.lu_size.clone(),
            workload_tps: config.workload_tps,
            resync_max_rate: "8MB".into(),
            resync_method: config.resync_method.clone(),
            db_flags,
            array_flags,
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
    let mut checker = Checker::new(&cluster).await?;
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
        let fault = if faults.is_empty() || rng.random_range(0..10) == 0 {
            None
        } else {
            Some(faults[rng.random_range(0..faults.len())])
        };
        let outcome = play_round(
            &mut cluster,
            &mut checker,
            &mut rng,
            round,
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

/// One round: a `console run` with at most one fault landing at a random
/// moment of it, then the checks.
async fn play_round(
    cluster: &mut Cluster,
    checker: &mut Checker,
    rng: &mut SmallRng,
    round: u64,
    fault: Option<Fault>,
    summary: &mut Summary,
) -> Result<(), Violation> {
    // A crash point is armed before the run, so that the run's own steps
    // decide the moment db-server dies.
    let armed_crash_point = fault == Some(Fault::CrashPoint);
    if armed_crash_point {
        let point = CRASH_POINTS[rng.random_range(0..CRASH_POINTS.len())];
        let nth = match point {
            "acquire.after_journal" | "delete.after_journal" => 1,
            _ => rng.random_range(1..40),
        };
        *summary
            .kills_by_phase
            .entry(format!("crash point {point}"))
            .or_default() += 1;
        cluster.stop(Node::Db);
        let armed = format!("{point}:{nth}");
        cluster
            .start_with_env(Node::Db, &[("SPLITMIRROR_CRASH_AT", &armed)])
            .map_err(|e| Violation::new(round, format!("restarting db-server: {e}")))?;
    }
    let mut console = Command::new(cluster.console_binary())
        .env("SPLITMIRROR_TLS_DIR", cluster.certs_dir())
        .args([
            "run",
            "--volume",
            "0",
            "--json",
            "--step-deadline",
            "20s",
            // Slow enough that faults land inside the backup, not after it.
            "--max-rate",
            BACKUP_RATE,
            "--array",
            &cluster.addr(Node::Array),
            "--db",
            &cluster.addr(Node::Db),
            "--backup",
            &cluster.addr(Node::Backup),
        ])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Violation::new(round, format!("starting console run: {e}")))?;
    let stdout = console.stdout.take().expect("stdout is piped");
    let report = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stdout }, &mut text);
        text
    });
    let delay = Duration::from_millis(rng.random_range(0..FAULT_WINDOW_MS));
    tokio::time::sleep(delay).await;
    let mut lost_console_at = None;
    if let Some(fault) = fault {
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
            Fault::LostConsole => {
                lost_console_at = checker.suspend_and_vanish().await;
            }
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
            // Armed before the run started (above).
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
    }
    // The console must end by itself: every step has a deadline.
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Ok(Some(status)) = console.try_wait() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = console.kill();
            let _ = console.wait();
            return Err(Violation::new(
                round,
                "the console run did not end within 180 s (wedged)".to_string(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let text = report.join().unwrap_or_default();
    let report: Option<serde_json::Value> = serde_json::from_str(text.trim()).ok();
    match report {
        Some(report) if status.success() => {
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
                    "a console run failed in a round without a fault ({status}): {}",
                    other.map_or_else(|| text.trim().to_string(), |r| r["error"].to_string())
                ),
            ));
        }
        _ => summary.runs_failed += 1,
    }
    if let Some(at) = lost_console_at {
        checker.check_resumed_by_itself(round, at).await?;
    }
    for node in Node::ALL {
        if armed_crash_point && node == Node::Db {
            continue;
        }
        if let Some(status) = cluster.exited_by_itself(node) {
            return Err(Violation::new(
                round,
                format!("{node} exited by itself ({status}) with no fault asking it to"),
            ));
        }
    }
    cluster
        .heal()
        .map_err(|e| Violation::new(round, format!("a node did not come back: {e}")))?;
    // Only a journal damaged on purpose (handled above) may be set aside:
    // a crash or a full filesystem never makes committed records unusable.
    let set_aside = set_aside_journals(&cluster.db_dir());
    if !set_aside.is_empty() {
        return Err(Violation::new(
            round,
            format!("db-server found its journal unusable after no damage: {set_aside:?}"),
        ));
    }
    checker.after_round(cluster, round, summary).await
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
