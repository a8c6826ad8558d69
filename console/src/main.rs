//! `console`: the operator's command line for splitmirror. This file
//! holds the command-line definitions and the dispatch; what each command
//! does is in `cli/` and in the library.

mod cli;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use cli::manual;
use cli::output::{exit, print_report};
use splitmirror_console::clients::{Addresses, Clients, DEFAULT_ARRAY, DEFAULT_BACKUP, DEFAULT_DB};
use splitmirror_console::mates::parse_mate;
use splitmirror_console::progress;
use splitmirror_console::restore::{RestoreRequest, RestoreTarget};
use splitmirror_console::run::{RunOptions, SnapshotMethodArg, backup_run_by};
use splitmirror_proto::node;
use splitmirror_proto::security::{Security, SecurityArgs, role};
use splitmirror_proto::telemetry::{self, LogArgs};
use splitmirror_proto::units::{parse_duration, parse_size_bytes};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

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
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    security: SecurityArgs,
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
    /// The certificate (in --tls-dir) the console calls the array with.
    /// The array shows each identity only the LUs granted to it, and the
    /// console's own is granted none by default: `pair verify` needs one
    /// that may read origin and mate, e.g. `--array-identity db-server`.
    /// `run` needs none: db-server lets the console read the frozen mate
    /// while its snapshot is held.
    #[arg(
        long,
        global = true,
        env = "SPLITMIRROR_ARRAY_IDENTITY",
        value_name = "NAME"
    )]
    array_identity: Option<String>,
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
    #[cfg(feature = "embedded")]
    Demo {
        /// Backup runs to perform.
        #[arg(long, default_value_t = 3)]
        cycles: u32,
        /// Keep the nodes' files here instead of a temporary directory.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
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
    ///
    /// Example: console run --volume 0 --verify-read
    Run {
        #[arg(long, default_value_t = 0)]
        volume: u32,
        /// Which of the volume's mates, counted from 1; see `console
        /// status` (a mirror LU may have up to three mates, each split,
        /// backed up and resynchronized on its own).
        #[arg(long, default_value_t = 1, value_parser = parse_mate)]
        mate: u32,
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
        /// Also read the chunks the store already holds, and compare each
        /// with the array's digest. Without it, a chunk whose digest (the
        /// array's ChecksumRange of the frozen mate) the store holds is
        /// trusted on that digest and not read: only changed chunks cross
        /// the network. With it, every non-zero chunk is read over the
        /// network and hashed by the backup server, which also proves that
        /// the bytes the array serves hash to its digests. Either way the
        /// run ends in the console comparing the manifest with the mate's
        /// digests.
        #[arg(long)]
        verify_read: bool,
        /// How db-server takes the snapshot: split (the mate LU is the
        /// frozen image; the delete resynchronizes) or cow (copy-on-write:
        /// the pair stays whole, written blocks' old data goes to the
        /// volume's save area; the backup and the comparison read the
        /// snapshot through db-server; nothing to resync). Unset: the
        /// server's default (db-server --snapshot-method).
        #[arg(long, value_enum)]
        snapshot_method: Option<SnapshotMethodArg>,
    },
    /// Restores a backup: in place onto a volume, or onto a plain LU
    /// (--to-lu). Exits 0 only for a completed, verified restore.
    ///
    /// Onto a volume (--volume), in five steps:
    ///
    /// 1. Checks that change nothing: the backup is complete and of the
    ///    volume's size and block size; the volume's ledger runs (when the
    ///    volume holds the ledger and it does not run, or db-server's Status
    ///    fails, the restore is refused unless --force).
    ///
    /// 2. db-server takes the volume offline (BeginRestore): the ledger
    ///    stops, every Read and Write of the volume answers UNAVAILABLE
    ///    (reason restoring), the state is journaled (a crash leaves the
    ///    volume offline until the restore ends), and the backup server may
    ///    write the pair's LUs until the end.
    ///
    /// 3. The safety backup, unless --no-safety-backup: a backup of the
    ///    volume as it is now (run id <R>-safety, a live copy of the mirror
    ///    LU, taken while it is offline so that nothing changes under it),
    ///    named in the report, so that the restore can itself be undone. If
    ///    it fails the restore is abandoned and the volume is unchanged,
    ///    unless --force, which restores without it.
    ///
    /// 4. The backup server writes the backup onto the mirror LU (so origin
    ///    and mate both get it): only the chunks whose digest differs from
    ///    the array's, after reading and checking every chunk it will write;
    ///    then it flushes and has the array digest origin and mate again.
    ///    "verified: yes" means: every chunk written equals the backup's
    ///    digest on origin and on mate by the array's ChecksumRange after the
    ///    flush, and every chunk not written matched it before.
    ///
    /// 5. db-server compares origin and mate whole with each other and with
    ///    the backup's image digest (EndRestore), brings the pair back
    ///    Synchronized and reopens the ledger, which continues from the
    ///    backup's sequence.
    ///
    /// The run id (--run-id, or a new one printed at the start) names the
    /// restore. If a restore stops after step 2 (a node down, a damaged
    /// chunk), the volume stays offline on purpose and the report says how
    /// to continue: run the same command again with the same --run-id (it
    /// continues the restore, writing only the chunks still different, and
    /// reuses the safety backup taken the first time), or give it up with
    /// `console restore abandon`.
    ///
    /// Onto a plain LU (--to-lu): the backup server writes and verifies the
    /// LU; no volume is touched and db-server is not called. The LU must be
    /// plain (not a mirror, origin or mate LU), of the backup's size, and
    /// writable by the backup server (a [[grant]] in the array's config).
    ///
    /// Example: console restore --volume 0 --backup-id 0190d3c4-…
    ///
    /// Example: console restore --volume 0 --backup-id 0190d3c4-… --run-id 0190d3d0-… (continue)
    ///
    /// Example: console restore --backup-id 0190d3c4-… --to-lu 6
    ///
    /// Example: console restore abandon --volume 0 --run-id 0190d3d0-…
    Restore(RestoreArgs),
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
        /// Each backup also reads the chunks the store already holds (see
        /// `console run --help`).
        #[arg(long, env = "SPLITMIRROR_VERIFY_READ")]
        verify_read: bool,
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
    /// Each scenario starts its own nodes on loopback (see `console bench
    /// --help` for the scenarios).
    ///
    /// Example: console bench freeze --size 256MiB --json freeze.json --plot freeze.svg
    #[cfg(feature = "embedded")]
    Bench {
        #[arg(value_enum)]
        scenario: splitmirror_console::bench::Scenario,
        /// Size of the LU or volume under test.
        #[arg(long, default_value = "1GiB", value_parser = parse_size_bytes)]
        size: u64,
        /// How long each timed phase runs.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        seconds: Duration,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Draw an SVG plot here (freeze: histogram; timeline: tps over time).
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
        /// A tiny configuration, for smoke tests.
        #[arg(long)]
        quick: bool,
        /// Cap the backup's rate in timeline and run (e.g. 150MB).
        #[arg(long, value_parser = parse_size_bytes)]
        max_rate: Option<u64>,
        /// timeline: bytes written to the volume while its snapshot is held,
        /// for the resync to copy (at most a quarter of the volume).
        #[arg(long, default_value = "256MiB", value_parser = parse_size_bytes)]
        dirty: u64,
        /// freeze: run one uncapped backup of --size of random data first,
        /// so that the writeback after it falls inside the measurement.
        #[arg(long)]
        after_backup: bool,
        /// timeline: how the run takes its snapshot: split (the default)
        /// or cow (copy-on-write: the cluster gets a save area as large as
        /// the volume; the backup reads through db-server and the delete
        /// resyncs nothing).
        #[arg(long, value_enum)]
        snapshot_method: Option<SnapshotMethodArg>,
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
    /// Create the certificates of a cluster.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Creates a certificate authority and a certificate for each of the
    /// four roles in DIR: ca.pem, ca.key and array-node, db-server,
    /// backup-server, console (.pem and .key; keys readable by the owner
    /// only). Each certificate names its role first (the node's identity),
    /// then localhost, 127.0.0.1 and ::1, then every --san. Give each
    /// program the directory with --tls-dir (or SPLITMIRROR_TLS_DIR).
    /// Refuses to replace existing files without --force.
    ///
    /// Example: console certs init ./certs --san backup.example.net --san 10.0.0.7
    Init {
        dir: std::path::PathBuf,
        /// A further DNS name or IP address for every certificate
        /// (repeatable), e.g. the hosts the nodes are reached at.
        #[arg(long = "san", value_name = "NAME_OR_IP")]
        sans: Vec<String>,
        /// How long the certificates are valid.
        #[arg(long, default_value_t = splitmirror_console::certs::DEFAULT_VALIDITY_DAYS)]
        days: u32,
        /// Replace certificates already in DIR.
        #[arg(long, conflicts_with = "if_missing")]
        force: bool,
        /// Do nothing (and succeed) when DIR already holds a CA: for an
        /// init container that runs at every start.
        #[arg(long)]
        if_missing: bool,
    },
}

#[derive(Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    group(clap::ArgGroup::new("target").required(true).args(["volume", "to_lu"]))
)]
struct RestoreArgs {
    #[command(subcommand)]
    action: Option<RestoreAction>,
    /// The volume to restore in place (its mirror LU id).
    #[arg(long)]
    volume: Option<u32>,
    /// Restore onto this plain LU instead, touching no volume.
    #[arg(long, value_name = "LU")]
    to_lu: Option<u32>,
    /// The backup to restore (see `console backup list`). Named
    /// `--backup-id` because `--backup` is the backup server's address.
    #[arg(long, value_name = "ID", required = true)]
    backup_id: Option<String>,
    /// The restore run's id: a new one by default. Give the id of a restore
    /// that did not complete to continue it.
    #[arg(long)]
    run_id: Option<String>,
    /// Do not back up the volume's current content first.
    #[arg(long, conflicts_with = "to_lu")]
    no_safety_backup: bool,
    /// Restore even when the volume's ledger is not running or not
    /// reachable, or when the safety backup fails.
    #[arg(long)]
    force: bool,
    /// Cap the restore's write rate (bytes per second, e.g. 200MB).
    #[arg(long, value_parser = parse_size_bytes)]
    max_rate: Option<u64>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum RestoreAction {
    /// Gives up a restore that did not complete.
    ///
    /// EndRestore with abandon: the volume comes back online with whatever it holds now — the
    /// content before the restore if it had not written yet, else part of
    /// the backup — origin and mate resynchronized, and the ledger reopened
    /// if its check passes. To get the content before the restore back,
    /// restore the safety backup the report named.
    ///
    /// Example: console restore abandon --volume 0 --run-id 0190d3d0-…
    Abandon {
        #[arg(long)]
        volume: u32,
        /// The restore run to give up.
        #[arg(long)]
        run_id: String,
        /// Print the answer as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Suspends the database, splits the pair, resumes; prints the run id
    /// that holds the snapshot. With --writable the mate may be written
    /// while the snapshot is held (the resync undoes those writes; no
    /// backup of it).
    ///
    /// Example: console snapshot acquire --volume 0 (or --writable)
    Acquire {
        #[arg(long, default_value_t = 0)]
        volume: u32,
        /// Which of the volume's mates, counted from 1; see `console
        /// status` (a mirror LU may have up to three mates, each split,
        /// backed up and resynchronized on its own).
        #[arg(long, default_value_t = 1, value_parser = parse_mate)]
        mate: u32,
        /// The holder's run id (a new one by default).
        #[arg(long)]
        run_id: Option<String>,
        /// split or cow (copy-on-write, needs db-server --save-area for
        /// the volume); unset: the server's default.
        #[arg(long, value_enum)]
        snapshot_method: Option<SnapshotMethodArg>,
        /// A writable split snapshot: the mate (the snapshot virtual LU)
        /// may be written while the snapshot is held, e.g. to test on a
        /// copy of the data. Its writes are recorded like the origin's and
        /// undone by the resync when the snapshot is deleted. It is not a
        /// frozen image, so the backup server refuses to back it up. Split
        /// only: refused with --snapshot-method cow.
        #[arg(long)]
        writable: bool,
    },
    /// Releases the snapshot and starts the resync.
    ///
    /// Example: console snapshot delete --volume 0 --run-id 0190… (or --force)
    Delete {
        #[arg(long, default_value_t = 0)]
        volume: u32,
        /// Which of the volume's mates, counted from 1; see `console
        /// status` (a mirror LU may have up to three mates, each split,
        /// backed up and resynchronized on its own).
        #[arg(long, default_value_t = 1, value_parser = parse_mate)]
        mate: u32,
        /// The run id that acquired the snapshot.
        #[arg(long, default_value = "")]
        run_id: String,
        /// Delete even if another run holds the snapshot.
        #[arg(long)]
        force: bool,
    },
    /// Puts the volume back to the held snapshot's frozen mate (the reverse
    /// resync): db-server stops the ledger, takes the volume offline,
    /// copies mate → origin exactly the ranges the update location table
    /// recorded since the split (inside the array), releases the snapshot
    /// (the pair is Synchronized, nothing to resync) and reopens the ledger
    /// at the snapshot's sequence. Its cost is the data written since the
    /// split, not the volume's size. Everything written since the split is
    /// lost. Prints the ranges, blocks and bytes copied.
    ///
    /// Example: console snapshot restore --volume 0 --run-id 0190…
    Restore {
        #[arg(long, default_value_t = 0)]
        volume: u32,
        /// Which of the volume's mates, counted from 1; see `console
        /// status` (a mirror LU may have up to three mates, each split,
        /// backed up and resynchronized on its own).
        #[arg(long, default_value_t = 1, value_parser = parse_mate)]
        mate: u32,
        /// The run id that holds the snapshot.
        #[arg(long)]
        run_id: String,
        /// Print the answer as one JSON object.
        #[arg(long)]
        json: bool,
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
        /// Which of the volume's mates the snapshot split, counted from 1;
        /// see `console status`.
        #[arg(long, default_value_t = 1, value_parser = parse_mate, conflicts_with = "live")]
        mate: u32,
        /// Copy the LU without a snapshot, while it may be written.
        #[arg(long, conflicts_with_all = ["volume", "run_id"])]
        live: bool,
        /// A label stored in the backup's manifest.
        #[arg(long, default_value = "")]
        label: String,
        /// Cap the backup's read rate (bytes per second, e.g. 200MB).
        #[arg(long, value_parser = parse_size_bytes)]
        max_rate: Option<u64>,
        /// Also read the chunks the store already holds and compare them
        /// with the array's digest (see `console run --help`).
        #[arg(long)]
        verify_read: bool,
    },
    /// The generations of each volume, oldest first: when each completed
    /// (UTC), its ledger sequence, logical size, the bytes it added to the
    /// store ("-" for backups converted from raw images) and how it is
    /// consistent (frozen by a snapshot, or "live (not frozen)"); live
    /// copies are listed under "live". Then the store: where it is, its
    /// chunks, the bytes they take, the bytes full images of every backup
    /// would take, and the deduplication ratio (logical ÷ stored). Jobs
    /// that did not complete (running, failed, cancelled) come last.
    ///
    /// Example: console backup list --json
    List {
        /// Print one JSON object: volumes, store, jobs.
        #[arg(long)]
        json: bool,
    },
    /// Applies a volume's retention rules: keeps the newest --keep-last
    /// backups and every backup that completed within --keep-within, and
    /// removes the indexes of the others; then collects garbage (removes
    /// the chunks no backup references, once older than the store's grace
    /// period, never one a running backup may reuse). A backup is kept when
    /// either rule keeps it. Give at least one rule.
    ///
    /// Example: console backup prune --volume 0 --keep-last 7 --keep-within 30d --dry-run
    Prune {
        /// The volume whose backups are pruned (live copies are never
        /// pruned).
        #[arg(long)]
        volume: u32,
        /// Keep the newest N complete backups (N ≥ 1).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        keep_last: Option<u32>,
        /// Keep every backup that completed within this age: 7d, 36h, 90m,
        /// 30s (also w for weeks).
        #[arg(long, value_name = "DURATION", value_parser = manual::parse_age)]
        keep_within: Option<Duration>,
        /// Print what would be removed; remove nothing (and collect no
        /// garbage).
        #[arg(long)]
        dry_run: bool,
        /// Remove the indexes only; leave garbage collection for later.
        #[arg(long)]
        no_gc: bool,
        /// Print one JSON object: the decisions and the collection.
        #[arg(long)]
        json: bool,
    },
    /// Removes the chunks no backup references, once older than the
    /// store's grace period; never one a running backup (from this server
    /// or another one writing to the same store) may reuse.
    ///
    /// Example: console backup gc --json
    Gc {
        #[arg(long)]
        json: bool,
    },
    /// Re-reads and re-hashes every chunk a backup references, and says
    /// what that proves (the image matches its manifest) and what it does
    /// not (that the image is a consistent snapshot). Names each chunk
    /// that is missing from the store or corrupt.
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
        /// Which of the volume's mates, counted from 1; see `console
        /// status`.
        #[arg(long, default_value_t = 1, value_parser = parse_mate)]
        mate: u32,
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
        // The console's output is its reports: it logs warnings only unless
        // RUST_LOG says otherwise.
        let telemetry = match start_telemetry(&cli).await {
            Ok(telemetry) => telemetry,
            Err(error) => {
                eprintln!("error: {error:#}");
                return ExitCode::FAILURE;
            }
        };
        let code = match execute(cli).await {
            Ok(code) => code,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        };
        telemetry.shutdown().await;
        code
    });
    // Dropping a runtime waits without limit for every blocking task it
    // started; once the answer is out, nothing may keep the console from
    // exiting, least of all a node that has stopped answering.
    runtime.shutdown_timeout(EXIT_GRACE);
    code
}

/// Logging, and export when OTEL_EXPORTER_OTLP_ENDPOINT is set. `bench
/// export` without an endpoint exports to a collector of its own, so that
/// it measures real export.
async fn start_telemetry(cli: &Cli) -> anyhow::Result<telemetry::Telemetry> {
    #[cfg_attr(not(feature = "embedded"), expect(unused_mut))]
    let mut config = telemetry::TelemetryConfig {
        default_filter: "warn",
        ..telemetry::TelemetryConfig::new("console", cli.log.log_format)
    };
    #[cfg(feature = "embedded")]
    if let Command::Bench {
        scenario: splitmirror_console::bench::Scenario::Export,
        ..
    } = &cli.command
    {
        config.endpoint = Some(splitmirror_console::bench::export_endpoint().await?);
    }
    Ok(telemetry::init(config)?)
}

async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let step_deadline = cli.addresses.step_deadline;
    let addresses = Addresses {
        array: cli.addresses.array,
        db: cli.addresses.db,
        backup: cli.addresses.backup,
    };
    let security_args = cli.security.clone();
    let array_identity = cli.addresses.array_identity.clone();
    let connect = move || -> anyhow::Result<Clients> {
        let security = Security::from_args(&security_args, role::CONSOLE)?;
        let array_security = match &array_identity {
            Some(identity) => Security::from_args(
                &SecurityArgs {
                    identity: Some(identity.clone()),
                    ..security_args.clone()
                },
                role::CONSOLE,
            )?,
            None => security.clone(),
        };
        let mut clients = Clients::with_array_security(addresses, &security, &array_security)?;
        clients.step_deadline = step_deadline;
        Ok(clients)
    };
    match cli.command {
        #[cfg(feature = "embedded")]
        Command::Demo {
            cycles,
            dir,
            lu_size,
            workload_tps,
            workload_workers,
            json,
        } => {
            let options = splitmirror_console::demo::DemoOptions {
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
            let summary = splitmirror_console::demo::demo(&options, sink.as_ref()).await?;
            if json {
                cli::output::print_json(&summary)?;
            }
            Ok(exit(summary.succeeded()))
        }
        #[cfg(feature = "embedded")]
        Command::Bench {
            scenario,
            size,
            seconds,
            json,
            plot,
            quick,
            max_rate,
            dirty,
            after_backup,
            snapshot_method,
        } => {
            use anyhow::Context as _;
            let options = splitmirror_console::bench::BenchOptions {
                size_bytes: size,
                seconds,
                quick,
                plot,
                max_rate,
                dirty_bytes: dirty,
                after_backup,
                snapshot_method: SnapshotMethodArg::to_pb(snapshot_method),
            };
            let output = splitmirror_console::bench::run(scenario, &options).await?;
            cli::output::println(&format!(
                "bench {scenario} ({}):",
                splitmirror_proto::units::format_bytes(size)
            ))?;
            cli::output::print(&output.table)?;
            if let Some(path) = json {
                let text = serde_json::to_string_pretty(&output.figures)?;
                std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            volume,
            mate,
            json,
            keep_snapshot,
            label,
            max_rate,
            verify_read,
            snapshot_method,
        } => {
            let clients = connect()?;
            let cancel = CancellationToken::new();
            let on_signal = cancel.clone();
            let signal_task = tokio::spawn(async move {
                node::shutdown_signal().await;
                eprintln!("interrupted: cancelling the backup and deleting the snapshot");
                on_signal.cancel();
            });
            let options = RunOptions {
                volume,
                mate,
                keep_snapshot,
                label,
                max_bytes_per_s: max_rate,
                cancel,
                verify_read,
            };
            let sink = progress::for_stderr();
            let method = SnapshotMethodArg::to_pb(snapshot_method);
            let report = backup_run_by(&clients, &options, method, sink.as_ref()).await;
            signal_task.abort();
            print_report(&report, "backup run", json)?;
            Ok(exit(report.succeeded()))
        }
        Command::Schedule {
            volume,
            runs,
            interval,
            json,
            max_rate,
            verify_read,
        } => {
            let schedule = cli::schedule::Schedule {
                volume,
                runs,
                interval,
                json,
                max_bytes_per_s: max_rate,
                verify_read,
            };
            cli::schedule::schedule(&connect()?, &schedule).await
        }
        Command::Certs(CertsCommand::Init {
            dir,
            sans,
            days,
            force,
            if_missing,
        }) => cli::certs::init(&dir, sans, days, force, if_missing),
        Command::Status {
            json,
            watch,
            interval,
        } => {
            manual::show_status(&connect()?, json, watch, interval)
                .instrument(command_span("status"))
                .await
        }
        Command::Restore(args) => {
            restore_command(&connect()?, args)
                .instrument(command_span("restore"))
                .await
        }
        Command::Snapshot(SnapshotCommand::Restore {
            volume,
            mate,
            run_id,
            json,
        }) => {
            cli::restore::snapshot_restore(&connect()?, volume, mate, &run_id, json)
                .instrument(command_span("snapshot restore"))
                .await
        }
        Command::Snapshot(SnapshotCommand::Acquire {
            volume,
            mate,
            run_id,
            snapshot_method,
            writable,
        }) => {
            let method = SnapshotMethodArg::to_pb(snapshot_method);
            let request = manual::acquire_request(volume, mate, run_id, method, writable)?;
            manual::snapshot_acquire(&connect()?, request)
                .instrument(command_span("snapshot acquire"))
                .await
        }
        Command::Snapshot(SnapshotCommand::Delete {
            volume,
            mate,
            run_id,
            force,
        }) => {
            manual::snapshot_delete(&connect()?, volume, mate, &run_id, force)
                .instrument(command_span("snapshot delete"))
                .await
        }
        Command::Db(DbCommand::Suspend { lease }) => {
            manual::db_suspend(&connect()?, lease)
                .instrument(command_span("db suspend"))
                .await
        }
        Command::Db(DbCommand::Resume) => {
            manual::db_resume(&connect()?)
                .instrument(command_span("db resume"))
                .await
        }
        Command::Backup(BackupCommand::Start {
            lu,
            volume,
            run_id,
            mate,
            live,
            label,
            max_rate,
            verify_read,
        }) => {
            let start = manual::BackupStart {
                lu,
                snapshot: volume.zip(run_id),
                mate,
                live,
                label,
                max_bytes_per_s: max_rate,
                verify_read,
            };
            manual::backup_start(&connect()?, start)
                .instrument(command_span("backup start"))
                .await
        }
        Command::Backup(BackupCommand::List { json }) => {
            manual::backup_list(&connect()?, json)
                .instrument(command_span("backup list"))
                .await
        }
        Command::Backup(BackupCommand::Prune {
            volume,
            keep_last,
            keep_within,
            dry_run,
            no_gc,
            json,
        }) => {
            let prune = manual::Prune {
                volume,
                keep_last,
                keep_within,
                dry_run,
                collect_garbage: !no_gc,
            };
            manual::backup_prune(&connect()?, &prune, json)
                .instrument(command_span("backup prune"))
                .await
        }
        Command::Backup(BackupCommand::Gc { json }) => {
            manual::backup_gc(&connect()?, json)
                .instrument(command_span("backup gc"))
                .await
        }
        Command::Backup(BackupCommand::Verify { backup_id }) => {
            manual::backup_verify(&connect()?, &backup_id)
                .instrument(command_span("backup verify"))
                .await
        }
        Command::Pair(PairCommand::Verify {
            volume,
            mate,
            quiesce,
            json,
        }) => {
            manual::pair_verify(&connect()?, volume, mate, quiesce, json)
                .instrument(command_span("pair verify"))
                .await
        }
    }
}

/// `console restore` and `console restore abandon`.
async fn restore_command(clients: &Clients, args: RestoreArgs) -> anyhow::Result<ExitCode> {
    if let Some(RestoreAction::Abandon {
        volume,
        run_id,
        json,
    }) = args.action
    {
        return cli::restore::abandon(clients, volume, &run_id, json).await;
    }
    let Some(backup_id) = args.backup_id else {
        anyhow::bail!("--backup-id is required");
    };
    let target = match (args.volume, args.to_lu) {
        (Some(volume), None) => RestoreTarget::Volume(volume),
        (None, Some(lu)) => RestoreTarget::Lu(lu),
        _ => anyhow::bail!("give exactly one of --volume and --to-lu"),
    };
    let request = RestoreRequest {
        target,
        backup_id,
        run_id: args.run_id,
        safety_backup: !args.no_safety_backup,
        force: args.force,
        max_bytes_per_s: args.max_rate,
    };
    cli::restore::restore(clients, &request, args.json).await
}

/// The root span of one manual command: with export on, the command and
/// the calls it makes are one trace (a `run` opens its own, `backup run`).
fn command_span(command: &'static str) -> tracing::Span {
    tracing::info_span!("console command", command)
}
