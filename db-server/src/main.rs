//! `db-server`: the snapshot manager and the ledger database.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use db_server::ledger::LedgerConfig;
use db_server::manager::{ArrayModeKeeping, ManagerConfig, ResyncMethod, SnapshotMethod};
use db_server::{DbServerConfig, ledger_format};
use splitmirror_proto::node;
use splitmirror_proto::security::{Security, SecurityArgs, role};
use splitmirror_proto::telemetry::{self, LogArgs, TelemetryConfig};
use splitmirror_proto::units::{parse_duration, parse_size_bytes};

/// The database server of splitmirror: runs the snapshot manager (the LU
/// status table, the update location table, the resync) and a small ledger
/// database on volume 0.
///
/// Example: db-server --listen 127.0.0.1:50052 --array 127.0.0.1:50051 --data-dir /var/lib/splitmirror/db
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to serve gRPC on.
    #[arg(
        long,
        global = true,
        env = "SPLITMIRROR_DB_LISTEN",
        default_value = "127.0.0.1:50052"
    )]
    listen: String,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    security: SecurityArgs,
    /// Identities that may call Suspend, Resume, AcquireSnapshot,
    /// DeleteSnapshot, the volume Read/Write, BeginRestore, EndRestore and
    /// RestoreSnapshot (repeat for several); any other identity of the
    /// cluster's CA may only read status.
    #[arg(long = "control-identity", value_name = "NAME", default_value = role::CONSOLE)]
    control_identities: Vec<String>,
    /// The identity the array lets write a volume's LUs during a restore
    /// from a backup (the backup server's certificate name): db-server,
    /// the pairs' owner, grants it read-write on the pair's mirror, origin
    /// and mate LUs at BeginRestore and withdraws it at EndRestore. Unused
    /// with --insecure (the array masks nothing).
    #[arg(long, value_name = "NAME", default_value = role::BACKUP)]
    restore_writer: String,
    /// The array-node to use.
    #[arg(long, env = "SPLITMIRROR_ARRAY", default_value = "127.0.0.1:50051")]
    array: String,
    /// How long start-up waits for the array (e.g. 60s, 5m; 0 = for ever).
    /// Meanwhile db-server already listens: health answers NOT_SERVING and
    /// every call UNAVAILABLE ("waiting for the array at …"). When the wait
    /// runs out, db-server logs why and exits with status 1.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    array_wait: std::time::Duration,
    /// The longest lease a Suspend may ask for (e.g. 60s, 2m). A longer one
    /// is refused with INVALID_ARGUMENT, so that a lost console never
    /// freezes the database for long; a console renews a lease by calling
    /// Suspend again before it runs out.
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    max_suspend_lease: std::time::Duration,
    /// Directory for db-server's own files (the journal).
    #[arg(long, env = "SPLITMIRROR_DB_DATA_DIR", default_value = "db-data")]
    data_dir: PathBuf,
    /// How the resync copies recorded ranges: `offload` (CopyRange inside
    /// the array) or `writeback` (read origin, write the mirror LU).
    #[arg(long, default_value = "offload")]
    resync: ResyncMethod,
    /// Cap the resync's copy rate (bytes per second, e.g. 100MB), so that a
    /// large resync leaves the database its share of CPU and disk.
    #[arg(long, value_parser = parse_size_bytes)]
    resync_max_rate: Option<u64>,
    /// The rate the resync's copies are guaranteed however busy the
    /// database (bytes per second, e.g. 32MiB), sent with each CopyRange:
    /// the array's adaptive pace never slows them below it. Unset: the
    /// array's own minimum (array-node --background-min-rate).
    #[arg(long, value_parser = parse_nonzero_rate)]
    resync_min_rate: Option<u64>,
    /// How an AcquireSnapshot that names no method takes the snapshot:
    /// `split` (the pair is split; the mate LU is the frozen image and the
    /// backup server reads it from the array; the writes made meanwhile are
    /// resynced after the delete) or `cow` (copy-on-write: the pair stays
    /// mirrored; before a block is first overwritten its old data is saved
    /// to the volume's --save-area; the backup server reads the image
    /// through db-server's Read of the snapshot virtual LU; nothing to
    /// resync after the delete). `cow` needs a --save-area for every
    /// volume. A request naming a method gets that method.
    #[arg(long, default_value = "split", value_name = "split|cow")]
    snapshot_method: SnapshotMethod,
    /// Who keeps each pair's mode: `stateless` (db-server keeps it and
    /// routes every write: to the origin alone while a snapshot is held;
    /// the array enforces nothing) or `stateful` (the array keeps it in its
    /// mirroring management table: db-server sets it with ModeSelect and
    /// always writes the mirror LU, and the array refuses whoever breaks
    /// it: a write to a frozen mate, a read of a mate being
    /// resynchronized). At start-up a stateful db-server sets every pair's
    /// array mode to what its journal says; a stateless one hands every
    /// pair back to host-managed. `stateful` needs `--resync offload` (the
    /// array refuses the host's writes to the mate while it resyncs).
    #[arg(long, default_value = "stateless", value_name = "stateless|stateful")]
    array_mode: ArrayModeKeeping,
    /// The save area of a volume's copy-on-write snapshots, as
    /// VOLUME=LU (repeat for several volumes): LU is a plain LU of the
    /// array (in no mirror) with the volume's block size; its block count
    /// is how many blocks a snapshot can save before it is invalidated
    /// (the database keeps running; the snapshot's reads are refused with
    /// reason snapshot-invalidated). Checked against the array at
    /// start-up. The save-area map is kept in memory only: a restart
    /// invalidates a held copy-on-write snapshot.
    #[arg(long = "save-area", value_name = "VOLUME=LU", value_parser = parse_save_area)]
    save_areas: Vec<(u32, u32)>,
    /// Run no ledger, only the snapshot manager.
    #[arg(long)]
    no_ledger: bool,
    /// Volume (mirror LU) that holds the ledger.
    #[arg(long, default_value_t = 0)]
    ledger_volume: u32,
    /// Ledger transactions per second over all workers; 0 = as fast as it goes.
    #[arg(long, default_value_t = 200)]
    workload_tps: u32,
    /// Concurrent ledger workers.
    #[arg(long, default_value_t = 8)]
    workload_workers: u32,
    /// Accounts of a newly formatted ledger.
    #[arg(long, default_value_t = 1000)]
    accounts: u32,
    /// Journal intents are rounded out to regions of this size.
    #[arg(long, default_value = "64KiB", value_parser = parse_size_bytes)]
    journal_region: u64,
    /// Run without the journal: a crash may lose a snapshot's differences.
    /// Only for measuring what the journal costs.
    #[arg(long)]
    no_journal: bool,
    /// Switches that break db-server on purpose (only in a build with the
    /// `testing` feature).
    #[cfg(feature = "testing")]
    #[command(flatten)]
    unsafe_test: UnsafeTestArgs,
}

/// Flags that break db-server on purpose, so that the crash tests and the
/// nemesis can show they catch what they look for. Hidden from `--help`,
/// and absent from a production build (no `testing` feature).
#[cfg(feature = "testing")]
#[derive(Args)]
struct UnsafeTestArgs {
    /// Breaks durability on purpose (journal the write intent after the
    /// array write), so that the crash tests can show they catch it.
    #[arg(long, hide = true)]
    unsafe_test_intent_after_write: bool,
    /// Breaks the write path on purpose (writes in Snapshot mode are not
    /// recorded), so that the nemesis can show it catches it.
    #[arg(long, hide = true)]
    unsafe_test_forget_snapshot_writes: bool,
    /// Breaks the resync on purpose (no range lock, no re-check), so that
    /// the nemesis can show it catches it.
    #[arg(long, hide = true)]
    unsafe_test_resync_skips_recheck: bool,
    /// Breaks the ledger's crash consistency on purpose (log and account
    /// blocks written side by side, no redo and no check on open), so that
    /// the ledger crash test can show it catches it.
    #[arg(long, hide = true)]
    unsafe_test_ledger_writes_side_by_side: bool,
    /// Breaks the copy-on-write snapshot on purpose (a write does not save
    /// the pre-update data), so that the tests can show they catch it.
    #[arg(long, hide = true)]
    unsafe_test_skip_cow_save: bool,
}

#[cfg(feature = "testing")]
impl UnsafeTestArgs {
    /// The hooks these flags set in the manager and the ledger.
    fn apply(&self, manager: &mut ManagerConfig, ledger: Option<&mut LedgerConfig>) {
        manager.hooks = db_server::manager::ManagerTestHooks {
            journal_intent_after_write: self.unsafe_test_intent_after_write,
            forget_snapshot_writes: self.unsafe_test_forget_snapshot_writes,
            resync_skips_recheck: self.unsafe_test_resync_skips_recheck,
            skip_cow_save: self.unsafe_test_skip_cow_save,
        };
        if let Some(ledger) = ledger {
            ledger.hooks = db_server::ledger::LedgerTestHooks {
                writes_side_by_side: self.unsafe_test_ledger_writes_side_by_side,
            };
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Checks a ledger image (a backup's image.raw or an LU file):
    /// superblock, checksums, the balance invariant, torn transactions and
    /// the highest sequence. Exits non-zero on any violation.
    ///
    /// Example: db-server verify-image backups/0190…/image.raw --expect-sequence 4711
    VerifyImage {
        file: PathBuf,
        /// Fail unless the highest sequence in the image is exactly this.
        #[arg(long)]
        expect_sequence: Option<u64>,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Exits 0 if the db-server at --listen answers its health check.
    HealthProbe,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    node::exit_code(run().await)
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::VerifyImage {
            file,
            expect_sequence,
            json,
        }) => verify_image(&file, expect_sequence, json),
        Some(Command::HealthProbe) => {
            let security = Security::from_args(&cli.serve.security, role::DB)?;
            node::probe_health(
                &cli.serve.listen.replace("0.0.0.0", "127.0.0.1"),
                "",
                &security,
                role::DB,
            )
            .await
            .map_err(anyhow::Error::msg)
        }
        None => serve(cli.serve).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let telemetry = telemetry::init(TelemetryConfig::new("db-server", args.log.log_format))?;
    let served = serve_until_signal(args).await;
    telemetry.shutdown().await;
    served
}

async fn serve_until_signal(args: ServeArgs) -> anyhow::Result<()> {
    if let (Some(min), Some(max)) = (args.resync_min_rate, args.resync_max_rate)
        && min > max
    {
        anyhow::bail!(
            "--resync-min-rate {min} B/s is above --resync-max-rate {max} B/s: a resync \
             cannot be guaranteed more than it is allowed"
        );
    }
    let mut save_areas = std::collections::BTreeMap::new();
    for (volume, lu) in args.save_areas {
        if let Some(other) = save_areas.insert(volume, lu) {
            anyhow::bail!(
                "--save-area {volume}={lu}: volume {volume} already has the save area LU {other}"
            );
        }
    }
    #[cfg_attr(not(feature = "testing"), expect(unused_mut))]
    let mut manager = ManagerConfig {
        snapshot_method: args.snapshot_method,
        array_mode: args.array_mode,
        save_areas,
        resync_method: args.resync,
        resync_max_bytes_per_s: args.resync_max_rate,
        resync_min_bytes_per_s: args.resync_min_rate,
        restore_writer: args.restore_writer,
        ..ManagerConfig::default()
    };
    #[cfg_attr(not(feature = "testing"), expect(unused_mut))]
    let mut ledger = (!args.no_ledger).then(|| LedgerConfig {
        volume: args.ledger_volume,
        accounts: args.accounts,
        target_tps: args.workload_tps,
        workers: args.workload_workers,
        ..LedgerConfig::default()
    });
    #[cfg(feature = "testing")]
    args.unsafe_test.apply(&mut manager, ledger.as_mut());
    let security = Security::from_args(&args.security, role::DB)?;
    let config = DbServerConfig {
        security,
        control_identities: args.control_identities,
        array_url: args.array,
        data_dir: args.data_dir,
        manager,
        ledger,
        journal_region_bytes: (!args.no_journal).then_some(args.journal_region),
        array_wait: (!args.array_wait.is_zero()).then_some(args.array_wait),
        max_suspend_lease: args.max_suspend_lease,
    };
    let listener = node::bind(&args.listen).await.map_err(anyhow::Error::msg)?;
    let handle = db_server::spawn(config, listener)
        .await
        .context("starting db-server")?;
    node::serve_until_signal(handle, "db-server")
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(())
}

/// A duration that must not be zero (a zero cap would refuse every lease).
fn parse_positive_duration(text: &str) -> Result<std::time::Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err(format!("{text:?} must be longer than zero"));
    }
    Ok(duration)
}

fn verify_image(file: &PathBuf, expect_sequence: Option<u64>, json: bool) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    use std::io::Write as _;
    let image = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let report = ledger_format::verify_image(&image, expect_sequence);
    let mut text = String::new();
    if json {
        writeln!(text, "{}", serde_json::to_string(&report)?)?;
    } else {
        writeln!(
            text,
            "{}: {}",
            file.display(),
            if report.ok { "OK" } else { "FAILED" }
        )?;
        writeln!(
            text,
            "  accounts {}  log records {}  highest sequence {}  balance {} of {}",
            report.accounts_checked,
            report.log_records_checked,
            report.highest_sequence,
            report.total_balance,
            report.expected_total_balance
        )?;
        for violation in &report.violations {
            writeln!(text, "  violation: {violation}")?;
        }
    }
    // A reader that went away (`verify-image … | head -1`) is no reason to
    // panic; the exit status still tells the verdict.
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(anyhow::Error::new(e).context("writing to stdout"));
        }
        _ => {}
    }
    if !report.ok {
        std::process::exit(1);
    }
    Ok(())
}

/// `VOLUME=LU` of `--save-area`.
fn parse_save_area(text: &str) -> Result<(u32, u32), String> {
    let (volume, lu) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not VOLUME=LU (e.g. 0=5)"))?;
    let number = |what: &str, n: &str| {
        n.trim()
            .parse::<u32>()
            .map_err(|e| format!("{text:?}: the {what} {n:?} is not a number: {e}"))
    };
    Ok((number("volume", volume)?, number("LU", lu)?))
}

/// A rate above 0 (the array refuses a guarantee of 0).
fn parse_nonzero_rate(text: &str) -> Result<u64, String> {
    match parse_size_bytes(text)? {
        0 => Err("a guaranteed rate must be above 0".to_string()),
        rate => Ok(rate),
    }
}
