//! `backup-server`: copies frozen mate LUs into verified backup images.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use backup_server::BackupServerConfig;
use backup_server::store::BackupStore;
use clap::{Parser, Subcommand};
use splitmirror_proto::node;
use splitmirror_proto::security::{Security, SecurityArgs, role};
use splitmirror_proto::telemetry::{self, LogArgs, TelemetryConfig};
use splitmirror_proto::units::{format_bytes, parse_size_bytes};

/// The backup server of splitmirror: reads a frozen mate LU straight from
/// the array and writes `<store>/<backup-id>/image.raw` with a
/// `manifest.json` of BLAKE3 chunk digests. db-server (--db) confirms that
/// the snapshot a backup names holds the mate before the first read and
/// after the last one.
///
/// Example: backup-server --listen 127.0.0.1:50053 --array 127.0.0.1:50051 --db 127.0.0.1:50052 --store /var/lib/splitmirror/backups
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
    /// Identities that may start, cancel and verify backups (repeat for
    /// several); any other identity of the cluster's CA may only list,
    /// get and watch them.
    #[arg(long = "control-identity", value_name = "NAME", default_value = role::CONSOLE)]
    control_identities: Vec<String>,
    /// The array-node to read from.
    #[arg(long, env = "SPLITMIRROR_ARRAY", default_value = "127.0.0.1:50051")]
    array: String,
    /// The db-server that owns the snapshots: asked, before the first read
    /// and after the last one of a backup, whether its snapshot still holds
    /// the mate LU.
    #[arg(long, env = "SPLITMIRROR_DB", default_value = "127.0.0.1:50052")]
    db: String,
    /// The backup store directory.
    #[arg(long, env = "SPLITMIRROR_BACKUP_STORE", default_value = "backups")]
    store: PathBuf,
    /// Cap each backup's read rate (bytes per second, e.g. 200MB) unless the
    /// request sets its own, to leave CPU and I/O to the database.
    #[arg(long, value_parser = parse_size_bytes)]
    max_rate: Option<u64>,
}

#[derive(Subcommand)]
enum Command {
    /// Lists the complete backups in a store (offline, no server needed),
    /// each frozen by its snapshot or "live (not frozen)".
    ///
    /// Example: backup-server list --store /var/lib/splitmirror/backups
    List {
        #[arg(long, env = "SPLITMIRROR_BACKUP_STORE", default_value = "backups")]
        store: PathBuf,
    },
    /// Re-hashes a backup's image against its manifest (offline), and says
    /// what that proves and what it does not. Exits non-zero if any chunk
    /// differs.
    ///
    /// Example: backup-server verify --store /var/lib/splitmirror/backups 0190d3c4-…
    Verify {
        #[arg(long, env = "SPLITMIRROR_BACKUP_STORE", default_value = "backups")]
        store: PathBuf,
        backup_id: String,
    },
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
        Some(Command::List { store }) => {
            let store = BackupStore::open_read_only(&store)?;
            let mut out = std::io::stdout().lock();
            for m in store.list()? {
                let written = writeln!(
                    out,
                    "{}  LU {}  {}  {}  run {}  image {}",
                    m.backup_id,
                    m.source_lu,
                    format_bytes(m.size_bytes),
                    m.consistency(),
                    m.run_id,
                    m.image_digest.get(..16).unwrap_or(&m.image_digest)
                );
                if let Err(e) = written {
                    return stdout_closed(e);
                }
            }
            Ok(())
        }
        Some(Command::Verify { store, backup_id }) => {
            let store = BackupStore::open_read_only(&store)?;
            let outcome = store
                .verify(&backup_id)
                .with_context(|| format!("verifying {backup_id}"))?;
            let verdict = if outcome.ok { "OK" } else { "FAILED" };
            let written = writeln!(
                std::io::stdout().lock(),
                "{backup_id}: {verdict} ({} chunks)\n  proved:      {}\n  not checked: {}",
                outcome.chunks,
                outcome.proved(),
                outcome.not_checked()
            );
            if let Err(e) = written {
                stdout_closed(e)?;
            }
            if outcome.ok {
                Ok(())
            } else {
                std::process::exit(1);
            }
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
        store_dir: cli.store,
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

/// A reader that went away (`backup-server list | head -1`) ends the output
/// quietly; any other failure to write is an error.
fn stdout_closed(error: std::io::Error) -> anyhow::Result<()> {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(anyhow::Error::new(error).context("writing to stdout"))
    }
}
