//! `console schedule`: backup runs one after another, as the console
//! container of `docker compose up` performs them.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use splitmirror_console::clients::Clients;
use splitmirror_console::progress;
use splitmirror_console::run::{RunOptions, backup_run, wait_synchronized};
use splitmirror_proto::node;
use tokio_util::sync::CancellationToken;

use super::output::{exit, print_report, println, stdout_closed};

/// How long `schedule` waits for each node to serve before it gives up.
const NODE_WAIT: Duration = Duration::from_secs(120);

/// What `console schedule` does.
pub struct Schedule {
    pub volume: u32,
    /// How many runs; 0 = until stopped.
    pub runs: u32,
    /// From the start of one run to the start of the next.
    pub interval: Duration,
    pub json: bool,
    pub max_bytes_per_s: Option<u64>,
    /// Each backup reads every non-zero chunk (`RunOptions::verify_read`).
    pub verify_read: bool,
}

/// Waits until the nodes answer and the volume is Synchronized, then
/// performs runs `interval` apart; fails (exit 1) if any run failed.
pub async fn schedule(clients: &Clients, schedule: &Schedule) -> anyhow::Result<ExitCode> {
    let addresses = &clients.addresses;
    for (name, address) in [
        ("array-node", &addresses.array),
        ("db-server", &addresses.db),
        ("backup-server", &addresses.backup),
    ] {
        let deadline = tokio::time::Instant::now() + NODE_WAIT;
        while let Err(e) = node::probe_health(address, "", &clients.security, name).await {
            if tokio::time::Instant::now() > deadline {
                bail!("{name} at {address} is not serving: {e}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let sink = progress::for_stderr();
    wait_synchronized(clients, schedule.volume, sink.as_ref())
        .await
        .with_context(|| format!("waiting for volume {} to be Synchronized", schedule.volume))?;
    sink.finish();
    let mut failures = 0u32;
    let mut done = 0u32;
    loop {
        let started = tokio::time::Instant::now();
        let options = RunOptions {
            volume: schedule.volume,
            mate: 1,
            keep_snapshot: false,
            label: format!("scheduled run {}", done + 1),
            max_bytes_per_s: schedule.max_bytes_per_s,
            cancel: CancellationToken::new(),
            verify_read: schedule.verify_read,
        };
        let report = backup_run(clients, &options, sink.as_ref()).await;
        done += 1;
        if !report.succeeded() {
            failures += 1;
        }
        print_report(&report, &format!("backup run {done}"), schedule.json)?;
        if (schedule.runs != 0 && done >= schedule.runs) || stdout_closed() {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep_until(started + schedule.interval) => {}
            () = node::shutdown_signal() => break,
        }
    }
    println(&format!("{done} runs, {failures} failed"))?;
    Ok(exit(failures == 0))
}
