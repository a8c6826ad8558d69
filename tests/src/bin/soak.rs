//! `soak`: the nemesis. Runs a whole splitmirror cluster of real processes
//! on loopback and injects faults round after round from one seed, checking
//! the invariants after every round; or, with `--fast`, runs the in-process
//! model of the snapshot manager and journal for many seeds.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use splitmirror_proto::units::parse_duration;
use splitmirror_tests::soak::{self, Canary, Fault, SoakConfig};

/// The nemesis of splitmirror: long randomized fault runs with published
/// counts.
///
/// Starts array-node, db-server (with the ledger writing) and backup-server
/// as processes in a temporary directory, then, round after round: one
/// `console run` with a fault at a random moment of it (kill -9 of any
/// node, SIGSTOP pauses, a console that suspends and vanishes, the array
/// restarted, the journal corrupted or truncated while db-server is down,
/// the journal's or the store's filesystem full — small tmpfs mounts, so
/// those two need root), db-server aborting at one of its named crash
/// points (inside an acquire, a delete, a snapshot write or a resync step),
/// then the checks: every node back, the pair
/// Synchronized with origin == mate, the array's mode of each pair equal
/// to db-server's (db-server runs `--array-mode stateful` on odd seeds), the ledger's own check on the quiesced
/// volume, its sequence never going back, every complete backup passing
/// the ledger's check at its sequence. Once a backup exists, two rounds in
/// ten corrupt volume 0 and `console restore` the newest backup, and one
/// in ten reverses a snapshot (`console snapshot restore`); two in ten take
/// a copy-on-write snapshot (the array has a save area), reads it back
/// through db-server and checks it against the split's image, all under the same
/// faults (and the restores' own crash points), re-run with the same run
/// id until they complete: the volume offline meanwhile (never read by
/// anyone), then equal to what was restored, the ledger at its sequence. Stops at the first violation and
/// prints the command that replays the seed. The last line is
/// `soak: R rounds, F faults, V violations`; the exit status is 0 only when
/// V is 0.
///
/// Examples:
///   soak --minutes 60 --seed 7
///   soak --rounds 50 --faults kill-db,corrupt-journal
///   soak --rounds 30 --canary forget-snapshot-writes   (must find a violation)
///   soak --fast --seeds 10000                          (in-process model)
#[derive(Parser)]
#[command(verbatim_doc_comment)]
struct Args {
    /// The seed every choice comes from (default: from the clock, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop after this many rounds.
    #[arg(long)]
    rounds: Option<u64>,
    /// Stop after this long (e.g. 60m, 90s).
    #[arg(long, value_parser = parse_minutes)]
    minutes: Option<Duration>,
    /// Faults to inject, comma-separated: all, none, kill-array, kill-db,
    /// kill-backup, pause, lost-console, restart-array, corrupt-journal,
    /// truncate-journal, full-journal-fs, full-store-fs, crash-point.
    #[arg(long, default_value = "all")]
    faults: String,
    /// Run a deliberately broken db-server that the nemesis must catch:
    /// intent-after-write, forget-snapshot-writes, resync-skips-recheck,
    /// ledger-side-by-side, no-range-lock (array-node).
    #[arg(long)]
    canary: Option<String>,
    /// Size of each LU.
    #[arg(long, default_value = "8MiB")]
    lu_size: String,
    /// The ledger's transactions per second (0 = full speed).
    #[arg(long, default_value_t = 400)]
    workload_tps: u32,
    /// db-server's resync method: offload (CopyRange in the array) or
    /// writeback (read the origin, write the mirror LU; the method whose
    /// race the resync-skips-recheck canary shows).
    #[arg(long, default_value = "offload")]
    resync: String,
    /// Play no restore rounds: every round is a `console run` (the
    /// workload before restores existed).
    #[arg(long)]
    no_restores: bool,
    /// Play no copy-on-write rounds and give the array no save area (the
    /// workload before copy-on-write snapshots existed).
    #[arg(long)]
    no_cow: bool,
    /// Who keeps the pairs' modes (issue #19): `stateless` (db-server
    /// routes; the array enforces nothing), `stateful` (db-server
    /// `--array-mode stateful`: the array holds the mode, and after every
    /// quiesce and acquire its ModeSense must match db-server's Status), or
    /// `alternate`: stateful on odd seeds, stateless on even ones (so that
    /// CI's seeds 1 and 2 run one of each).
    #[arg(
        long,
        default_value = "alternate",
        value_name = "stateless|stateful|alternate"
    )]
    array_mode: String,
    /// Run the cluster in this directory instead of a temporary one.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the cluster's directory at the end.
    #[arg(long)]
    keep_dir: bool,
    /// Write the summary as JSON to this file too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The in-process model instead of processes: the snapshot manager and
    /// journal over an in-memory array, crashed and reopened.
    #[arg(long)]
    fast: bool,
    /// With --fast: how many seeds, from --seed on.
    #[arg(long, default_value_t = 10_000)]
    seeds: u64,
}

/// `--minutes 60` or any duration the nodes take (`90s`, `2h`).
fn parse_minutes(text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(minutes) if minutes >= 0.0 => Ok(Duration::from_secs_f64(minutes * 60.0)),
        _ => parse_duration(text),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("soak: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    let canary = match args.canary.as_deref().map(Canary::parse).transpose() {
        Ok(canary) => canary,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(2);
        }
    };
    if args.fast {
        return runtime.block_on(fast(seed, args.seeds, canary, args.json));
    }
    let faults = match Fault::parse_list(&args.faults) {
        Ok(faults) => faults,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(2);
        }
    };
    let stateful = match args.array_mode.as_str() {
        "stateless" => false,
        "stateful" => true,
        "alternate" => seed % 2 == 1,
        other => {
            eprintln!("soak: --array-mode {other:?}: expected stateless, stateful or alternate");
            return ExitCode::from(2);
        }
    };
    if args.rounds.is_none() && args.minutes.is_none() {
        eprintln!("soak: say how long: --rounds N and/or --minutes M");
        return ExitCode::from(2);
    }
    let config = SoakConfig {
        seed,
        rounds: args.rounds,
        duration: args.minutes,
        faults,
        canary,
        lu_size: args.lu_size,
        workload_tps: args.workload_tps,
        resync_method: args.resync,
        dir: args.dir,
        keep_dir: args.keep_dir,
        restores: !args.no_restores,
        cow: !args.no_cow,
        stateful,
    };
    println!(
        "soak: seed {seed}; replay with: {}",
        soak::replay_command(&config, None)
    );
    match runtime.block_on(soak::run(&config)) {
        Ok(summary) => {
            summary.print(&config);
            if let Some(path) = &args.json
                && let Err(e) = std::fs::write(path, summary.to_json(&config).to_string())
            {
                eprintln!("soak: writing {}: {e}", path.display());
            }
            if summary.violations.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("soak: could not run: {e}");
            println!("soak: 0 rounds, 0 faults, 0 violations (did not run)");
            ExitCode::from(2)
        }
    }
}

async fn fast(seed: u64, seeds: u64, canary: Option<Canary>, json: Option<PathBuf>) -> ExitCode {
    println!("soak --fast: {seeds} seeds from {seed}");
    let started = std::time::Instant::now();
    let summary = soak::sim::run_seeds(seed, seeds, canary, |s| {
        eprintln!(
            "soak --fast: {} seeds, {:.1} s",
            s.seeds,
            started.elapsed().as_secs_f64()
        );
    })
    .await;
    println!(
        "soak --fast: {} seeds, {} steps, {} crashes, {} crashes mid-write, {} damaged journals, {} failed writes in {:.1} s",
        summary.seeds,
        summary.steps,
        summary.crashes,
        summary.crashes_mid_write,
        summary.damaged_journals,
        summary.failed_writes,
        started.elapsed().as_secs_f64()
    );
    println!(
        "soak --fast: {} copy-on-write snapshots, {} invalidated by a full save area, {} by a restart",
        summary.cow_acquires, summary.cow_invalidated_full, summary.cow_invalidated_restart
    );
    if let Some(path) = json {
        let value = serde_json::json!({
            "first_seed": seed, "seeds": summary.seeds, "steps": summary.steps,
            "crashes": summary.crashes, "crashes_mid_write": summary.crashes_mid_write,
            "damaged_journals": summary.damaged_journals, "failed_writes": summary.failed_writes,
            "cow_acquires": summary.cow_acquires, "cow_invalidated_full": summary.cow_invalidated_full,
            "cow_invalidated_restart": summary.cow_invalidated_restart,
            "seconds": started.elapsed().as_secs_f64(),
            "failure": summary.failure.as_ref().map(|(s, w)| serde_json::json!({"seed": s, "what": w})),
        });
        let _ = std::fs::write(path, value.to_string());
    }
    match &summary.failure {
        None => {
            println!("soak: {} seeds, 0 violations", summary.seeds);
            ExitCode::SUCCESS
        }
        Some((failed, what)) => {
            println!("soak --fast: VIOLATION at seed {failed}: {what}");
            println!(
                "soak: replay with: cargo run --release -p splitmirror-tests --bin soak -- --fast --seed {failed} --seeds 1"
            );
            println!("soak: {} seeds, 1 violations", summary.seeds);
            ExitCode::FAILURE
        }
    }
}
