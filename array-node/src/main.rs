//! `array-node`: serves the LUs of a directory as a mirroring disk array.

use std::path::PathBuf;

use anyhow::Context;
use array_node::{ArrayConfig, ArrayNodeConfig, ArrayTestHooks};
use clap::{Parser, Subcommand};
use splitmirror_proto::node;
use splitmirror_proto::pace::{PaceConfig, PaceController};
use splitmirror_proto::security::{Security, SecurityArgs, role};
use splitmirror_proto::telemetry::{self, LogArgs, TelemetryConfig};
use splitmirror_proto::units::parse_size_bytes;

/// The disk array of splitmirror: stores real LUs as sparse files and
/// mirrors every write to a mirror LU onto its origin LU and its mate LUs
/// (one to three; each (mirror LU, mate) is a pair with its own mode).
///
/// Without --config it serves mirror LU 0 = origin 1 + mate 2 and mirror LU
/// 3 = origin 4 + mate 5, 64 MiB each with 4096-byte blocks.
///
/// Example: array-node --listen 127.0.0.1:50051 --data-dir /var/lib/splitmirror/array
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to serve gRPC on.
    #[arg(
        long,
        global = true,
        env = "SPLITMIRROR_ARRAY_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    listen: String,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    security: SecurityArgs,
    /// Directory holding the LU files (lu<ID>.img).
    #[arg(long, env = "SPLITMIRROR_ARRAY_DATA_DIR", default_value = "array-data")]
    data_dir: PathBuf,
    /// TOML file with [[lu]] and [[mirror]] tables (see ARCHITECTURE.md). A
    /// [[mirror]] has `mirror`, `origin` and either `mate = N` or
    /// `mates = [a, b, c]` (one to three mates, mate 1 first).
    #[arg(long, env = "SPLITMIRROR_ARRAY_CONFIG")]
    config: Option<PathBuf>,
    /// Size of each default LU (without --config), e.g. 64MiB or 1GiB.
    #[arg(long, default_value = "64MiB", value_parser = parse_size_bytes)]
    lu_size: u64,
    /// The rate background copies (backup reads, resync and restore copies)
    /// are never slowed below, however busy the hosts are, e.g. 16MiB.
    /// At the default a 1 GiB copy still ends within about a minute.
    #[arg(long, default_value = "16MiB", value_parser = parse_size_bytes)]
    background_min_rate: u64,
    /// The rate background copies never exceed, even with the hosts idle
    /// (bytes per second, e.g. 200MB); unset: full speed when idle.
    #[arg(long, value_parser = parse_size_bytes)]
    background_max_rate: Option<u64>,
    /// Breaks the array on purpose (writes and copies of the same blocks
    /// interleave), so that the nemesis can show it catches it. Only in
    /// builds with the `testing` feature.
    #[cfg(feature = "testing")]
    #[arg(long, hide = true)]
    unsafe_test_no_range_lock: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Exits 0 if the array at --listen answers its gRPC health check
    /// (for container healthchecks).
    HealthProbe,
}

/// The fault hooks the command line asks for (none without the `testing`
/// feature).
fn test_hooks(cli: &Cli) -> ArrayTestHooks {
    #[cfg(feature = "testing")]
    return ArrayTestHooks {
        disable_range_lock: cli.unsafe_test_no_range_lock,
    };
    #[cfg(not(feature = "testing"))]
    {
        let _ = cli;
        ArrayTestHooks::default()
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    node::exit_code(run().await)
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::HealthProbe) = cli.command {
        let security = Security::from_args(&cli.security, role::ARRAY)?;
        return node::probe_health(
            &cli.listen.replace("0.0.0.0", "127.0.0.1"),
            "",
            &security,
            role::ARRAY,
        )
        .await
        .map_err(anyhow::Error::msg);
    }
    let telemetry = telemetry::init(TelemetryConfig::new("array-node", cli.log.log_format))?;
    let served = serve(cli).await;
    telemetry.shutdown().await;
    served
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let array = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            ArrayConfig::from_toml(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => ArrayConfig::default_pairs(cli.lu_size)?,
    };
    let security = Security::from_args(&cli.security, role::ARRAY)?;
    let listener = node::bind(&cli.listen).await.map_err(anyhow::Error::msg)?;
    let hooks = test_hooks(&cli);
    let pace_config = PaceConfig {
        min_bytes_per_s: cli.background_min_rate,
        max_bytes_per_s: cli.background_max_rate,
    };
    pace_config
        .validate()
        .map_err(|e| anyhow::anyhow!("--background-min-rate / --background-max-rate: {e}"))?;
    let pace = PaceController::new(pace_config, tokio::time::Instant::now());
    let config = ArrayNodeConfig {
        data_dir: cli.data_dir,
        array,
        hooks,
        security,
    };
    let handle = array_node::spawn_with_pace(config, pace, listener).await?;
    node::serve_until_signal(handle, "array-node")
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(())
}
