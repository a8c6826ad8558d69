//! `backup-server`: copies frozen mate LUs into verified backup images, and
//! writes them back (restore).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use backup_server::BackupServerConfig;
use backup_server::legacy::{self, Converted};
use backup_server::s3::S3Args;
use backup_server::store::{ChunkStore, StoreLocation};
use clap::{Parser, Subcommand};
use splitmirror_proto::node;
use splitmirror_proto::security::{Security, SecurityArgs, role};
use splitmirror_proto::telemetry::{self, LogArgs, TelemetryConfig};
use splitmirror_proto::units::{format_bytes, parse_duration, parse_size_bytes};

/// The backup server of splitmirror: backs up a frozen mate LU straight
/// from the array into a deduplicating chunk store (a directory or an S3
/// bucket). Each backup is logically full; it reads and stores only the
/// 1 MiB chunks whose digest (the array's ChecksumRange) the store does not
/// hold. db-server (--db) confirms that the snapshot a backup names holds
/// the mate before the first read and after the last one.
///
/// It also restores (StartRestore, driven by `console restore`): a complete
/// backup written onto a volume's mirror LU — only while db-server reports
/// the volume offline for that restore run (BeginRestore), asked before the
/// first write and after the last — or onto a plain LU of the same size
/// (`--to-lu`). Only the chunks whose digest differs from the array's
/// ChecksumRange of origin and mate are written; each is read from the
/// store and re-hashed before the first write (a damaged chunk fails the
/// restore with nothing written); after a flush the array digests every
/// written chunk again on every side.
///
/// Example: backup-server --listen 127.0.0.1:50053 --array 127.0.0.1:50051 --db 127.0.0.1:50052 --store /var/lib/splitmirror/backups
///
/// Example (S3): AWS_ACCESS_KEY_ID=… AWS_SECRET_ACCESS_KEY=… backup-server --store s3://backups/site-a --s3-endpoint http://10.0.0.5:3900
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to serve gRPC on.
    #[arg(
        long,
        global = true,
        env = "SPLITMIRROR_BACKUP_LISTEN",
        default_value = "127.0.0.1:50053"
    )]
    listen: String,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    security: SecurityArgs,
    /// Identities that may start, cancel and verify backups and start
    /// restores (repeat for several); any other identity of the cluster's
    /// CA may only list, get and watch them.
    #[arg(long = "control-identity", value_name = "NAME", default_value = role::CONSOLE)]
    control_identities: Vec<String>,
    /// The array-node to read from (and, for a restore, to write to).
    #[arg(long, env = "SPLITMIRROR_ARRAY", default_value = "127.0.0.1:50051")]
    array: String,
    /// The db-server that owns the snapshots: asked, before the first read
    /// and after the last one of a backup, whether its snapshot still holds
    /// the mate LU; and, before the first write and after the last one of
    /// a restore, whether the volume is offline for that restore.
    #[arg(long, env = "SPLITMIRROR_DB", default_value = "127.0.0.1:50052")]
    db: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Cap each backup's read rate (bytes per second, e.g. 200MB) unless the
    /// request sets its own, to leave CPU and I/O to the database. A
    /// restore is capped only by its request (the volume is offline).
    #[arg(long, value_parser = parse_size_bytes)]
    max_rate: Option<u64>,
}

/// Where the chunk store is, shared by the server and the offline commands.
#[derive(clap::Args, Clone)]
struct StoreArgs {
    /// The chunk store: a directory (created if missing), or
    /// s3://BUCKET/PREFIX on any S3-compatible object store (see the
    /// --s3-* flags; credentials from AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY).
    #[arg(
        long,
        global = true,
        env = "SPLITMIRROR_BACKUP_STORE",
        default_value = "backups"
    )]
    store: String,
    /// How long garbage collection leaves unreferenced chunks and the
    /// records of backups that stopped without finishing (e.g. 24h, 30m):
    /// longer than any clock skew between the backup servers sharing a
    /// store and the store itself.
    #[arg(long, global = true, value_parser = parse_duration, default_value = "24h")]
    gc_grace: Duration,
    #[command(flatten)]
    s3: S3Args,
}

impl StoreArgs {
    fn location(&self) -> anyhow::Result<StoreLocation> {
        Ok(StoreLocation::parse(&self.store, &self.s3)?)
    }

    async fn open_existing(&self) -> anyhow::Result<ChunkStore> {
        let location = self.location()?;
        ChunkStore::open_existing(&location, self.gc_grace)
            .await
            .with_context(|| format!("opening the store {location}"))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Lists the complete backups in a store (offline, no server needed),
    /// oldest first, each frozen by its snapshot or "live (not frozen)",
    /// with what it read and stored; then the store's totals.
    ///
    /// Example: backup-server list --store /var/lib/splitmirror/backups
    List,
    /// Re-reads every chunk a backup references, decodes and re-hashes it
    /// (offline), names each missing or corrupt chunk, and says what that
    /// proves and what it does not. Exits non-zero if any chunk is bad.
    ///
    /// Example: backup-server verify --store /var/lib/splitmirror/backups 0190d3c4-…
    Verify { backup_id: String },
    /// Writes a backup as a raw sparse image (offline), e.g. to compare it
    /// with `qemu-img compare` or to check it with `db-server verify-image`.
    /// Every chunk is checked against its digest; a missing or corrupt one
    /// fails the export, naming it, and leaves no file at FILE.
    ///
    /// Example: backup-server export --store /var/lib/splitmirror/backups 0190d3c4-… /tmp/vol0.raw
    Export { backup_id: String, file: PathBuf },
    /// Converts the backups of earlier versions (a directory per backup with
    /// image.raw and manifest.json) into the chunk store in the same
    /// directory: each image is checked against its manifest, stored,
    /// verified, and only then its directory removed. A backup whose image
    /// does not match is left as it is and named. Run it with the server
    /// stopped; the server refuses to start on a store that needs it.
    ///
    /// Example: backup-server convert --store /var/lib/splitmirror/backups
    Convert,
    /// Removes the chunks no backup references (offline), once older than
    /// --gc-grace; safe beside running backups (ARCHITECTURE.md, "Garbage
    /// collection").
    ///
    /// Example: backup-server gc --store s3://backups/site-a
    Gc,
    /// Exits 0 if the backup-server at --listen answers its health check.
    HealthProbe,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    node::exit_code(run().await)
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::List) => list(&cli.store.open_existing().await?).await,
        Some(Command::Verify { backup_id }) => {
            let store = cli.store.open_existing().await?;
            let outcome = store
                .verify(&backup_id)
                .await
                .with_context(|| format!("verifying {backup_id}"))?;
            let verdict = if outcome.ok { "OK" } else { "FAILED" };
            let mut text = format!(
                "{backup_id}: {verdict} ({} chunks)\n  proved:      {}\n  not checked: {}",
                outcome.chunks,
                outcome.proved(),
                outcome.not_checked()
            );
            for problem in &outcome.problems {
                text.push_str(&format!(
                    "\n  chunk {} ({}): {}",
                    problem.index,
                    backup_server::manifest::to_hex(&problem.digest),
                    problem.why
                ));
            }
            if let Err(e) = writeln!(std::io::stdout().lock(), "{text}") {
                stdout_closed(e)?;
            }
            if outcome.ok {
                Ok(())
            } else {
                std::process::exit(1);
            }
        }
        Some(Command::Export { backup_id, file }) => {
            let store = cli.store.open_existing().await?;
            let outcome = store
                .export(&backup_id, &file)
                .await
                .with_context(|| format!("exporting {backup_id} to {}", file.display()))?;
            eprintln!(
                "exported {backup_id} to {}: {} ({} chunks written, {} all-zero chunks left sparse; every chunk checked against its digest)",
                file.display(),
                format_bytes(outcome.size_bytes),
                outcome.chunks_written,
                outcome.chunks_zero
            );
            Ok(())
        }
        Some(Command::Convert) => {
            let location = cli.store.location()?;
            let StoreLocation::Dir(dir) = &location else {
                anyhow::bail!(
                    "convert works on a directory store: raw-image backups were only ever written to directories"
                );
            };
            let store = Arc::new(ChunkStore::create(&location, cli.store.gc_grace).await?);
            let outcome = legacy::convert(dir, &store).await?;
            let mut kept = 0;
            for converted in &outcome {
                match converted {
                    Converted::Done { id, chunks_stored } => {
                        println!(
                            "{id}: converted ({chunks_stored} new chunks stored), verified, raw image removed"
                        );
                    }
                    Converted::Kept { id, reason } => {
                        kept += 1;
                        println!("{id}: NOT converted, left as it is: {reason}");
                    }
                }
            }
            println!(
                "{} of {} raw-image backups converted",
                outcome.len() - kept,
                outcome.len()
            );
            if kept > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        Some(Command::Gc) => {
            let store = cli.store.open_existing().await?;
            let report = store.collect_garbage().await?;
            println!(
                "removed {} chunks ({}); kept {} referenced, {} protected by running backups, {} younger than {:?}; {} writer records active, {} expired removed",
                report.chunks_removed,
                format_bytes(report.bytes_removed),
                report.chunks_referenced,
                report.chunks_protected,
                report.chunks_young,
                cli.store.gc_grace,
                report.writers_active,
                report.writers_expired
            );
            Ok(())
        }
        Some(Command::HealthProbe) => {
            let security = Security::from_args(&cli.security, role::BACKUP)?;
            node::probe_health(
                &cli.listen.replace("0.0.0.0", "127.0.0.1"),
                "",
                &security,
                role::BACKUP,
            )
            .await
            .map_err(anyhow::Error::msg)
        }
        None => {
            let telemetry =
                telemetry::init(TelemetryConfig::new("backup-server", cli.log.log_format))?;
            let served = serve(cli).await;
            telemetry.shutdown().await;
            served
        }
    }
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let listener = node::bind(&cli.listen).await.map_err(anyhow::Error::msg)?;
    let security = Security::from_args(&cli.security, role::BACKUP)?;
    let config = BackupServerConfig {
        security,
        control_identities: cli.control_identities,
        array_url: cli.array,
        db_url: cli.db,
        store: cli.store.location()?,
        gc_grace: cli.store.gc_grace,
        default_max_bytes_per_s: cli.max_rate,
    };
    let handle = backup_server::spawn(config, listener)
        .await
        .context("starting the backup server")?;
    node::serve_until_signal(handle, "backup-server")
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(())
}

/// `backup-server list`: every backup, then the store's totals.
async fn list(store: &ChunkStore) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for m in store.list().await? {
        let stored = m.counts.map_or_else(
            || "converted".to_string(),
            |c| {
                format!(
                    "+{} new ({} read, {} reused, {} zero)",
                    format_bytes(c.new_bytes_stored),
                    c.chunks_read,
                    c.chunks_reused,
                    c.chunks_zero
                )
            },
        );
        let written = writeln!(
            out,
            "{}  LU {}  {}  {}  {}  run {}  image {}",
            m.backup_id,
            m.source_lu,
            format_bytes(m.size_bytes),
            stored,
            m.consistency(),
            m.run_id,
            m.image_digest.get(..16).unwrap_or(&m.image_digest)
        );
        if let Err(e) = written {
            return stdout_closed(e);
        }
    }
    let summary = store.summary().await?;
    let written = writeln!(
        out,
        "store {}: {} chunks, {} stored for {} of backups",
        summary.location,
        summary.chunks,
        format_bytes(summary.stored_bytes),
        format_bytes(summary.logical_bytes)
    );
    if let Err(e) = written {
        return stdout_closed(e);
    }
    Ok(())
}

/// A reader that went away (`backup-server list | head -1`) ends the output
/// quietly; any other failure to write is an error.
fn stdout_closed(error: std::io::Error) -> anyhow::Result<()> {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(anyhow::Error::new(error).context("writing to stdout"))
    }
}
