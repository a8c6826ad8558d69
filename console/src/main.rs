//! `console`: the operator's command line for splitmirror.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use splitmirror_console::clients::{Addresses, Clients, DEFAULT_ARRAY, DEFAULT_BACKUP, DEFAULT_DB};
use splitmirror_console::demo::{DemoOptions, demo};
use splitmirror_console::progress;
use splitmirror_console::run::{RunOptions, backup_run};
use splitmirror_console::status;
use splitmirror_proto::backup::v1 as bpb;
use splitmirror_proto::db::v1 as dpb;
use splitmirror_proto::node;
use splitmirror_proto::units::{parse_duration, parse_size_bytes};
use tokio_util::sync::CancellationToken;

/// `print!` through [`write_out`]: never a panic on a closed stdout.
macro_rules! out {
    ($($arg:tt)*) => {
        write_out(&format!($($arg)*))
    };
}

/// `println!` through [`write_out`].
macro_rules! outln {
    ($($arg:tt)*) => {
        write_out(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// The management console of splitmirror: consistent online backups by
/// splitting a mirror inside the disk array.
///
/// Node addresses come from --array/--db/--backup, then SPLITMIRROR_ARRAY,
/// SPLITMIRROR_DB, SPLITMIRROR_BACKUP, then 127.0.0.1:50051/50052/50053.
///
/// Start here: `console demo` runs the whole scenario on this machine.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(flatten)]
    addresses: AddressArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct AddressArgs {
    /// The array-node.
    #[arg(long, global = true, env = "SPLITMIRROR_ARRAY", default_value = DEFAULT_ARRAY)]
    array: String,
    /// The db-server.
    #[arg(long, global = true, env = "SPLITMIRROR_DB", default_value = DEFAULT_DB)]
    db: String,
    /// The backup-server.
    #[arg(long, global = true, env = "SPLITMIRROR_BACKUP", default_value = DEFAULT_BACKUP)]
    backup: String,
    /// How long a step retries a node that does not answer before the run
    /// reports it.
    #[arg(long, global = true, default_value = "30s", value_parser = parse_duration)]
    step_deadline: Duration,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the whole scenario on this machine, no setup: starts the three
    /// nodes in-process on loopback with a temporary data directory, runs
    /// the ledger, performs backup runs, verifies each image with the ledger
    /// verifier and the digest comparison, and prints the reports.
    ///
    /// Example: console demo --cycles 3
    Demo {
        /// Backup runs to perform.
        #[arg(long, default_value_t = 3)]
        cycles: u32,
        /// Keep the nodes' files here instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Size of each LU (volume 0 holds the ledger).
        #[arg(long, default_value = "64MiB", value_parser = parse_size_bytes)]
        lu_size: u64,
        /// Ledger transactions per second; 0 = as fast as it goes.
        #[arg(long, default_value_t = 0)]
        workload_tps: u32,
        /// Concurrent ledger workers.
        #[arg(long, default_value_t = 4)]
        workload_workers: u32,
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// One backup run across the network: acquire (suspend → split →
    /// resume) → back up the mate LU → delete the snapshot → follow the
    /// resync → compare the backup with the frozen mate → report. Exits 0
    /// only if every step succeeded and the digests match.
    ///
    /// Example: console --db db:50052 --backup backup:50053 --array array:50051 run --volume 0 --json
    Run {
        #[arg(long, default_value_t = 0)]
        volume: u32,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Leave the snapshot acquired after the backup (for inspection).
        #[arg(long)]
        keep_snapshot: bool,
        /// A label stored in the backup's manifest.
        #[arg(long, default_value = "")]
        label: String,
        /// Cap the backup's read rate (bytes per second, e.g. 200MB), to
        /// leave the database its share of CPU and I/O.
        #[arg(long, value_parser = parse_size_bytes)]
        max_rate: Option<u64>,
    },
    /// Performs backup runs one after another — what the console container
    /// of `docker compose up` does. Waits for the nodes and for the volume
    /// to be Synchronized first, then prints each run's report.
    ///
    /// Example: console schedule --runs 5 --interval 20s
    Schedule {
        #[arg(long, default_value_t = 0)]
        volume: u32,
        /// How many runs (0 = until stopped).
        #[arg(long, env = "SPLITMIRROR_RUNS", default_value_t = 0)]
        runs: u32,
        /// Time from the start of one run to the start of the next.
        #[arg(long, env = "SPLITMIRROR_RUN_INTERVAL", default_value = "30s", value_parser = parse_duration)]
        interval: Duration,
        /// Print each report as one JSON line.
        #[arg(long)]
        json: bool,
        /// Cap each backup's read rate (bytes per second, e.g. 200MB).
        #[arg(long, env = "SPLITMIRROR_MAX_RATE", value_parser = parse_size_bytes)]
        max_rate: Option<u64>,
    },
    /// The LU status table (Fig. 10), each volume's update location table
    /// (Fig. 3) with a map of where the dirty blocks lie, resync progress,
    /// the ledger's counters and the backups.
    ///
    /// Example: console status --watch
    Status {
        #[arg(long)]
        json: bool,
        /// Refresh until interrupted.
        #[arg(long)]
        watch: bool,
        /// Refresh interval for --watch.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        interval: Duration,
    },
    /// Measures speed, next to the peer a user would pick where one exists.
    /// Each scenario starts its own nodes on loopback. Scenarios: array
    /// (Read/Write vs qemu-nbd), backup (vs qemu-img convert), freeze
    /// (freeze window), modes (ledger tps per mode, array vs host
    /// mirroring), resync (time and bytes per dirty size), journal (its
    /// cost), timeline (tps during one run, --plot), run (orchestration
    /// overhead).
    ///
    /// Example: console bench freeze --size 256MiB --json freeze.json --plot freeze.svg
    Bench {
        /// One of: array, backup, freeze, modes, resync, journal, timeline, run.
        scenario: String,
        /// Size of the LU or volume under test.
        #[arg(long, default_value = "1GiB", value_parser = parse_size_bytes)]
        size: u64,
        /// How long each timed phase runs.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        seconds: Duration,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Draw an SVG plot here (freeze: histogram; timeline: tps over time).
        #[arg(long)]
        plot: Option<PathBuf>,
        /// A tiny configuration, for smoke tests.
        #[arg(long)]
        quick: bool,
        /// Cap the backup's rate in timeline and run (e.g. 150MB).
        #[arg(long, value_parser = parse_size_bytes)]
        max_rate: Option<u64>,
    },
    /// Acquire or delete a snapshot by hand.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Suspend or resume the database by hand.
    #[command(subcommand)]
    Db(DbCommand),
    /// Start, list or verify backups.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Compare the two sides of a mirror pair.
    #[command(subcommand)]
    Pair(PairCommand),
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Suspends the database, splits the pair, resumes; prints the run id
    /// that holds the snapshot.
    ///
    /// Example: console snapshot acquire --volume 0
    Acquire {
        #[arg(long, default_value_t = 0)]
        volume: u32,
        /// The holder's run id (a new one by default).
        #[arg(long)]
        run_id: Option<String>,
    },
    /// Releases the snapshot and starts the resync.
    ///
    /// Example: console snapshot delete --volume 0 --run-id 0190… (or --force)
    Delete {
        #[arg(long, default_value_t = 0)]
        volume: u32,
        /// The run id that acquired the snapshot.
        #[arg(long, default_value = "")]
        run_id: String,
        /// Delete even if another run holds the snapshot.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum DbCommand {
    /// Stops new transactions and waits for those in flight. Resumes by
    /// itself when the lease runs out.
    ///
    /// Example: console db suspend --lease 10s
    Suspend {
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        lease: Duration,
    },
    /// Lets transactions run again.
    Resume,
}

#[derive(Subcommand)]
enum BackupCommand {
    /// Backs up an LU by hand and follows the copy to its end. Name the
    /// snapshot that freezes it (--volume and the --run-id that holds it,
    /// as `snapshot acquire` prints): the backup server confirms it with
    /// db-server before the first read and after the last. Or copy the LU
    /// unfrozen with --live: the backup is recorded and shown as "live (not
    /// frozen)". Exits non-zero unless the backup completes.
    ///
    /// Example: console backup start --lu 2 --volume 0 --run-id 0190d3c4-…
    #[command(group(clap::ArgGroup::new("frozen_or_live").required(true).args(["volume", "live"])))]
    Start {
        /// The real LU to copy (the snapshot's mate LU).
        #[arg(long)]
        lu: u32,
        /// The volume whose snapshot freezes the LU.
        #[arg(long, requires = "run_id")]
        volume: Option<u32>,
        /// The run id that holds the snapshot; also the backup's run id.
        #[arg(long, requires = "volume")]
        run_id: Option<String>,
        /// Copy the LU without a snapshot, while it may be written.
        #[arg(long, conflicts_with_all = ["volume", "run_id"])]
        live: bool,
        /// A label stored in the backup's manifest.
        #[arg(long, default_value = "")]
        label: String,
        /// Cap the backup's read rate (bytes per second, e.g. 200MB).
        #[arg(long, value_parser = parse_size_bytes)]
        max_rate: Option<u64>,
    },
    /// The backups the backup server knows, each frozen by its snapshot or
    /// "live (not frozen)".
    List {
        #[arg(long)]
        json: bool,
    },
    /// Re-hashes a backup's image against its manifest, and says what that
    /// proves (the image matches its manifest) and what it does not (that
    /// the image is a consistent snapshot).
    ///
    /// Example: console backup verify 0190d3c4-…
    Verify { backup_id: String },
}

#[derive(Subcommand)]
enum PairCommand {
    /// Compares origin and mate with ChecksumRange, outside the recorded
    /// ranges; reports the chunks that differ and exits non-zero if any do.
    ///
    /// Example: console pair verify --volume 0 --quiesce
    Verify {
        #[arg(long, default_value_t = 0)]
        volume: u32,
        /// Suspend the database during the comparison, so that writes in
        /// flight cannot show as differences.
        #[arg(long)]
        quiesce: bool,
        #[arg(long)]
        json: bool,
    },
}

/// How long the console waits, after its command has finished and printed
/// its answer, for background work (connection tasks, a call left running on
/// a blocking thread) before it exits anyway.
const EXIT_GRACE: Duration = Duration::from_millis(500);

fn main() -> ExitCode {
    // The console's output is its reports: it logs warnings only unless
    // RUST_LOG says otherwise.
    node::init_tracing_with_default("warn");
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        match execute(cli).await {
            Ok(code) => code,
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::FAILURE
            }
        }
    });
    // Dropping a runtime waits without limit for every blocking task it
    // started; once the answer is out, nothing may keep the console from
    // exiting, least of all a node that has stopped answering.
    runtime.shutdown_timeout(EXIT_GRACE);
    code
}

async fn execute(cli: Cli) -> Result<ExitCode, String> {
    let step_deadline = cli.addresses.step_deadline;
    let addresses = Addresses {
        array: cli.addresses.array,
        db: cli.addresses.db,
        backup: cli.addresses.backup,
    };
    let connect = |addresses: Addresses| -> Result<Clients, String> {
        let mut clients = Clients::new(addresses)?;
        clients.step_deadline = step_deadline;
        Ok(clients)
    };
    match cli.command {
        Command::Demo {
            cycles,
            dir,
            lu_size,
            workload_tps,
            workload_workers,
            json,
        } => {
            let options = DemoOptions {
                cycles,
                dir,
                lu_size_bytes: lu_size,
                workload_tps,
                workload_workers,
                json,
            };
            let sink: Box<dyn progress::ProgressSink> = if json {
                Box::new(progress::Quiet)
            } else {
                progress::for_stderr()
            };
            let summary = demo(&options, sink.as_ref()).await?;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string(&summary).map_err(|e| e.to_string())?
                )?;
            }
            Ok(exit(summary.succeeded()))
        }
        Command::Run {
            volume,
            json,
            keep_snapshot,
            label,
            max_rate,
        } => {
            let clients = connect(addresses)?;
            let cancel = CancellationToken::new();
            let on_signal = cancel.clone();
            let signal_task = tokio::spawn(async move {
                node::shutdown_signal().await;
                eprintln!("interrupted: cancelling the backup and deleting the snapshot");
                on_signal.cancel();
            });
            let options = RunOptions {
                volume,
                keep_snapshot,
                label,
                max_bytes_per_s: max_rate,
                cancel,
            };
            let sink = progress::for_stderr();
            let report = backup_run(&clients, &options, sink.as_ref()).await;
            signal_task.abort();
            print_report(&report, "backup run", json)?;
            Ok(exit(report.succeeded()))
        }
        Command::Bench {
            scenario,
            size,
            seconds,
            json,
            plot,
            quick,
            max_rate,
        } => {
            let options = splitmirror_console::bench::BenchOptions {
                size_bytes: size,
                seconds,
                quick,
                plot,
                max_rate,
            };
            let output = splitmirror_console::bench::run(&scenario, &options).await?;
            outln!(
                "bench {scenario} ({}):",
                splitmirror_proto::units::format_bytes(size)
            )?;
            out!("{}", output.table)?;
            if let Some(path) = json {
                let text =
                    serde_json::to_string_pretty(&output.figures).map_err(|e| e.to_string())?;
                std::fs::write(&path, text)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Schedule {
            volume,
            runs,
            interval,
            json,
            max_rate,
        } => {
            let clients = connect(addresses)?;
            schedule(&clients, volume, runs, interval, json, max_rate).await
        }
        Command::Status {
            json,
            watch,
            interval,
        } => {
            let clients = connect(addresses)?;
            loop {
                let snapshot = status::fetch(&clients).await?;
                if json {
                    outln!("{}", status::to_json(&snapshot))?;
                } else {
                    if watch {
                        // Clear the screen and go home, as `watch` does.
                        out!("\x1b[2J\x1b[H")?;
                    }
                    out!("{}", status::render(&snapshot))?;
                }
                if !watch || stdout_closed() {
                    return Ok(ExitCode::SUCCESS);
                }
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    () = node::shutdown_signal() => return Ok(ExitCode::SUCCESS),
                }
            }
        }
        Command::Snapshot(SnapshotCommand::Acquire { volume, run_id }) => {
            let mut db = connect(addresses)?.db;
            let run_id = run_id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
            let a = db
                .acquire_snapshot(dpb::AcquireSnapshotRequest {
                    volume,
                    run_id: run_id.clone(),
                })
                .await
                .map_err(|s| format!("acquiring: {}", s.message()))?
                .into_inner();
            outln!(
                "snapshot of volume {volume} acquired by run {run_id}: mate LU {}, freeze window {} µs, ledger sequence {}{}",
                a.mate_lu,
                a.freeze_window_us,
                a.ledger_sequence,
                if a.already_held {
                    " (already held)"
                } else {
                    ""
                }
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshot(SnapshotCommand::Delete {
            volume,
            run_id,
            force,
        }) => {
            let mut db = connect(addresses)?.db;
            let d = db
                .delete_snapshot(dpb::DeleteSnapshotRequest {
                    volume,
                    run_id,
                    force,
                })
                .await
                .map_err(|s| format!("deleting: {}", s.message()))?
                .into_inner();
            outln!(
                "snapshot of volume {volume} deleted; resyncing {} ranges ({} blocks){}",
                d.ranges_to_resync,
                d.blocks_to_resync,
                if d.already_deleted {
                    " (already deleted)"
                } else {
                    ""
                }
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Db(DbCommand::Suspend { lease }) => {
            let mut db = connect(addresses)?.db;
            let s = db
                .suspend(dpb::SuspendRequest {
                    lease_ms: lease.as_millis().min(u128::from(u32::MAX)) as u32,
                })
                .await
                .map_err(|s| format!("suspending: {}", s.message()))?
                .into_inner();
            outln!(
                "database suspended at ledger sequence {}; it resumes by itself in {} ms",
                s.ledger_sequence,
                s.lease_ms
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Db(DbCommand::Resume) => {
            let mut db = connect(addresses)?.db;
            let r = db
                .resume(dpb::ResumeRequest {})
                .await
                .map_err(|s| format!("resuming: {}", s.message()))?
                .into_inner();
            if r.was_suspended {
                outln!("database resumed after {} µs", r.suspended_us)?;
            } else {
                outln!("the database was not suspended (a lease may have run out)")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup(BackupCommand::Start {
            lu,
            volume,
            run_id,
            live,
            label,
            max_rate,
        }) => {
            let clients = connect(addresses)?;
            let snapshot = volume
                .zip(run_id)
                .map(|(volume, holder_run_id)| bpb::SnapshotRef {
                    volume,
                    holder_run_id,
                });
            let request = bpb::StartBackupRequest {
                // One backup per snapshot holder; a live copy gets its own.
                run_id: snapshot.as_ref().map_or_else(
                    || uuid::Uuid::now_v7().to_string(),
                    |s| s.holder_run_id.clone(),
                ),
                lu,
                expected_block_count: None,
                label,
                max_bytes_per_s: max_rate,
                snapshot,
                live,
            };
            backup_start(&clients, request).await
        }
        Command::Backup(BackupCommand::List { json }) => {
            let clients = connect(addresses)?;
            let snapshot = status::Snapshot {
                db: dpb::StatusResponse::default(),
                backups: Some(
                    clients
                        .backup
                        .clone()
                        .list_backups(bpb::ListBackupsRequest {})
                        .await
                        .map_err(|s| format!("listing backups: {}", s.message()))?
                        .into_inner()
                        .backups,
                ),
            };
            if json {
                write_out(&format!("{}\n", status::to_json(&snapshot)["backups"]))?;
            } else {
                let text = status::render(&snapshot);
                write_out(
                    &text
                        .split("\nBackups")
                        .nth(1)
                        .map(|t| format!("Backups{t}"))
                        .unwrap_or(text),
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup(BackupCommand::Verify { backup_id }) => {
            let mut backup = connect(addresses)?.backup;
            let v = backup
                .verify_backup(bpb::BackupIdRequest {
                    backup_id: backup_id.clone(),
                })
                .await
                .map_err(|s| format!("verifying: {}", s.message()))?
                .into_inner();
            let verdict = if v.ok { "OK" } else { "FAILED" };
            write_out(&format!(
                "{backup_id}: {verdict} ({} chunks, image digest {})\n  proved:      {}\n  not checked: {}\n",
                v.chunks, v.image_digest, v.proved, v.not_checked
            ))?;
            Ok(exit(v.ok))
        }
        Command::Pair(PairCommand::Verify {
            volume,
            quiesce,
            json,
        }) => {
            let clients = connect(addresses)?;
            let report = status::pair_verify(&clients, volume, quiesce).await?;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string(&report).map_err(|e| e.to_string())?
                )?;
            } else if report.differing_chunks.is_empty() {
                outln!(
                    "volume {volume}: origin LU {} == mate LU {} ({} chunks compared, {} skipped as recorded)",
                    report.origin_lu,
                    report.mate_lu,
                    report.chunks - report.skipped_chunks,
                    report.skipped_chunks
                )?;
            } else {
                outln!(
                    "volume {volume}: origin LU {} and mate LU {} differ in chunks {:?}",
                    report.origin_lu,
                    report.mate_lu,
                    report.differing_chunks
                )?;
            }
            Ok(exit(report.differing_chunks.is_empty()))
        }
    }
}

/// `console backup start`: starts the backup, follows it (Ctrl-C cancels
/// it), and prints how it ended.
async fn backup_start(
    clients: &Clients,
    request: bpb::StartBackupRequest,
) -> Result<ExitCode, String> {
    let lu = request.lu;
    let started = clients
        .backup
        .clone()
        .start_backup(request)
        .await
        .map_err(|s| {
            format!(
                "starting the backup of LU {lu}: {:?}: {}",
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    let id = bpb::BackupIdRequest {
        backup_id: started.backup_id.clone(),
    };
    let mut stream = clients
        .backup
        .clone()
        .watch_backup(id.clone())
        .await
        .map_err(|s| format!("following the backup: {}", s.message()))?
        .into_inner();
    let sink = progress::for_stderr();
    sink.phase(&format!("backing up LU {lu} as {}", started.backup_id));
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            () = node::shutdown_signal() => {
                let info = clients.backup.clone().cancel_backup(id.clone()).await
                    .map_err(|s| format!("cancelling the backup: {}", s.message()))?
                    .into_inner();
                sink.finish();
                write_out(&format!("{}: {}\n", info.backup_id, info.state().as_str_name().trim_start_matches("BACKUP_STATE_")))?;
                return Ok(ExitCode::FAILURE);
            }
        };
        match message {
            Ok(Some(p)) if p.bytes_total > 0 => {
                sink.backup(p.bytes_done, p.bytes_total, p.throughput_bytes_per_s)
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(s) => return Err(format!("following the backup: {}", s.message())),
        }
    }
    sink.finish();
    let info = clients
        .backup
        .clone()
        .get_backup(id)
        .await
        .map_err(|s| format!("reading the backup: {}", s.message()))?
        .into_inner();
    let state = info
        .state()
        .as_str_name()
        .trim_start_matches("BACKUP_STATE_");
    write_out(&format!(
        "{}: {state}, LU {}, {}, {}{}\n",
        info.backup_id,
        info.lu,
        splitmirror_proto::units::format_bytes(info.bytes_done),
        info.consistency,
        if info.error.is_empty() {
            String::new()
        } else {
            format!(": {}", info.error)
        }
    ))?;
    Ok(exit(info.state() == bpb::BackupState::Complete))
}

/// Writes to stdout. A reader that went away (`console backup list | head
/// -1`) ends the output quietly instead of a panic.
fn write_out(text: &str) -> Result<(), String> {
    use std::io::Write;
    if stdout_closed() {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
        Err(e) => Err(format!("writing to stdout: {e}")),
        Ok(()) => Ok(()),
    }
}

/// Set once a write to stdout found the reader gone; loops that only
/// print (`status --watch`, `schedule`) stop then.
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// `console schedule`: waits until the nodes answer and the volume is
/// Synchronized, then performs runs `interval` apart.
async fn schedule(
    clients: &Clients,
    volume: u32,
    runs: u32,
    interval: Duration,
    json: bool,
    max_rate: Option<u64>,
) -> Result<ExitCode, String> {
    let addresses = &clients.addresses;
    for (name, address) in [
        ("array-node", &addresses.array),
        ("db-server", &addresses.db),
        ("backup-server", &addresses.backup),
    ] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while let Err(e) = node::probe_health(address, "").await {
            if tokio::time::Instant::now() > deadline {
                return Err(format!("{name} at {address} is not serving: {e}"));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let sink = progress::for_stderr();
    splitmirror_console::run::wait_synchronized(clients, volume, sink.as_ref()).await?;
    let mut failures = 0u32;
    let mut done = 0u32;
    loop {
        let started = tokio::time::Instant::now();
        let options = RunOptions {
            volume,
            keep_snapshot: false,
            label: format!("scheduled run {}", done + 1),
            max_bytes_per_s: max_rate,
            cancel: CancellationToken::new(),
        };
        let report = backup_run(clients, &options, sink.as_ref()).await;
        done += 1;
        if !report.succeeded() {
            failures += 1;
        }
        print_report(&report, &format!("backup run {done}"), json)?;
        if (runs != 0 && done >= runs) || stdout_closed() {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep_until(started + interval) => {}
            () = node::shutdown_signal() => break,
        }
    }
    outln!("{done} runs, {failures} failed")?;
    Ok(exit(failures == 0))
}

/// Prints a run's report: one JSON line, or the human-readable form under
/// a heading that says whether the run succeeded.
fn print_report(
    report: &splitmirror_console::run::RunReport,
    heading: &str,
    json: bool,
) -> Result<(), String> {
    if json {
        outln!(
            "{}",
            serde_json::to_string(report).map_err(|e| e.to_string())?
        )?;
    } else {
        let outcome = if report.succeeded() {
            "succeeded"
        } else {
            "FAILED"
        };
        outln!("{heading} {outcome}")?;
        out!("{}", report.render())?;
    }
    Ok(())
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
