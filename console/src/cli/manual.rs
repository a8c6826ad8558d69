//! The commands an operator runs by hand: `snapshot`, `db`, `backup`,
//! `pair verify` and `status`. Each makes its calls once (no retry: the
//! operator sees the error and decides) and prints what happened.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt;
use splitmirror_console::clients::Clients;
use splitmirror_console::progress;
use splitmirror_console::run::state_name;
use splitmirror_console::status;
use splitmirror_proto::backup::v1 as bpb;
use splitmirror_proto::db::v1 as dpb;
use splitmirror_proto::node;
use splitmirror_proto::units::format_bytes;

use super::output::{exit, print, print_json, println, stdout_closed};

/// `console snapshot acquire`: suspends, splits, resumes; prints the run id
/// that holds the snapshot.
pub async fn snapshot_acquire(
    clients: &Clients,
    volume: u32,
    run_id: Option<String>,
) -> anyhow::Result<ExitCode> {
    let run_id = run_id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let a = clients.db.acquire_snapshot(volume, &run_id).await?;
    let already = if a.already_held {
        " (already held)"
    } else {
        ""
    };
    println(&format!(
        "snapshot of volume {volume} acquired by run {run_id}: mate LU {}, freeze window {} µs, ledger sequence {}{already}",
        a.mate_lu, a.freeze_window_us, a.ledger_sequence,
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// `console snapshot delete`: releases the snapshot and starts the resync.
pub async fn snapshot_delete(
    clients: &Clients,
    volume: u32,
    run_id: &str,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let d = clients.db.delete_snapshot(volume, run_id, force).await?;
    let already = if d.already_deleted {
        " (already deleted)"
    } else {
        ""
    };
    println(&format!(
        "snapshot of volume {volume} deleted; resyncing {} ranges ({} blocks){already}",
        d.ranges_to_resync, d.blocks_to_resync,
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// `console db suspend`: closes the write gate for at most `lease`.
pub async fn db_suspend(clients: &Clients, lease: Duration) -> anyhow::Result<ExitCode> {
    let lease_ms = u32::try_from(lease.as_millis()).unwrap_or(u32::MAX);
    let s = clients.db.suspend(lease_ms).await?;
    println(&format!(
        "database suspended at ledger sequence {}; it resumes by itself in {} ms",
        s.ledger_sequence, s.lease_ms
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// `console db resume`: opens the write gate.
pub async fn db_resume(clients: &Clients) -> anyhow::Result<ExitCode> {
    let r = clients.db.resume().await?;
    if r.was_suspended {
        println(&format!("database resumed after {} µs", r.suspended_us))?;
    } else {
        println("the database was not suspended (a lease may have run out)")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// What `console backup start` copies.
pub struct BackupStart {
    pub lu: u32,
    /// The snapshot that freezes the LU: its volume and holder run id.
    pub snapshot: Option<(u32, String)>,
    /// Copy without a snapshot.
    pub live: bool,
    pub label: String,
    pub max_bytes_per_s: Option<u64>,
}

/// `console backup start`: starts the backup, follows it (Ctrl-C cancels
/// it), and prints how it ended; exit 0 only if it completed.
pub async fn backup_start(clients: &Clients, start: BackupStart) -> anyhow::Result<ExitCode> {
    let lu = start.lu;
    let snapshot = start
        .snapshot
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
        label: start.label,
        max_bytes_per_s: start.max_bytes_per_s,
        snapshot,
        live: start.live,
    };
    let backup = &clients.backup;
    let started = backup.start_backup(request).await?;
    let backup_id = started.backup_id.as_str();
    let mut stream = backup.watch_backup(backup_id).await?;
    let sink = progress::for_stderr();
    sink.phase(&format!("backing up LU {lu} as {backup_id}"));
    loop {
        let message = tokio::select! {
            message = stream.next() => message,
            () = node::shutdown_signal() => {
                let info = backup.cancel_backup(backup_id).await?;
                sink.finish();
                println(&format!("{}: {}", info.backup_id, state_name(info.state())))?;
                return Ok(ExitCode::FAILURE);
            }
        };
        match message {
            Some(Ok(p)) if p.bytes_total > 0 => {
                sink.backup(p.bytes_done, p.bytes_total, p.throughput_bytes_per_s)
            }
            Some(Ok(_)) => {}
            None => break,
            Some(Err(error)) => return Err(error.into()),
        }
    }
    sink.finish();
    let info = backup.get_backup(backup_id, false).await?;
    let error = if info.error.is_empty() {
        String::new()
    } else {
        format!(": {}", info.error)
    };
    println(&format!(
        "{}: {}, LU {}, {}, {}{error}",
        info.backup_id,
        state_name(info.state()),
        info.lu,
        format_bytes(info.bytes_done),
        info.consistency,
    ))?;
    Ok(exit(info.state() == bpb::BackupState::Complete))
}

/// `console backup list`.
pub async fn backup_list(clients: &Clients, json: bool) -> anyhow::Result<ExitCode> {
    let snapshot = status::Snapshot {
        db: dpb::StatusResponse::default(),
        backups: Some(clients.backup.list_backups().await?),
    };
    if json {
        println(&status::to_json(&snapshot)["backups"].to_string())?;
    } else {
        print(&status::render_backups(&snapshot))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `console backup verify`: re-hashes the image against its manifest and
/// says what that proves.
pub async fn backup_verify(clients: &Clients, backup_id: &str) -> anyhow::Result<ExitCode> {
    let v = clients.backup.verify_backup(backup_id).await?;
    let verdict = if v.ok { "OK" } else { "FAILED" };
    print(&format!(
        "{backup_id}: {verdict} ({} chunks, image digest {})\n  proved:      {}\n  not checked: {}\n",
        v.chunks, v.image_digest, v.proved, v.not_checked
    ))?;
    Ok(exit(v.ok))
}

/// `console pair verify`: compares origin and mate outside the recorded
/// ranges; exit 1 if any chunk differs.
pub async fn pair_verify(
    clients: &Clients,
    volume: u32,
    quiesce: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let report = status::pair_verify(clients, volume, quiesce)
        .await
        .with_context(|| format!("comparing the pair of volume {volume}"))?;
    if json {
        print_json(&report)?;
    } else if report.differing_chunks.is_empty() {
        println(&format!(
            "volume {volume}: origin LU {} == mate LU {} ({} chunks compared, {} skipped as recorded)",
            report.origin_lu,
            report.mate_lu,
            report.chunks - report.skipped_chunks,
            report.skipped_chunks
        ))?;
    } else {
        println(&format!(
            "volume {volume}: origin LU {} and mate LU {} differ in chunks {:?}",
            report.origin_lu, report.mate_lu, report.differing_chunks
        ))?;
    }
    Ok(exit(report.differing_chunks.is_empty()))
}

/// `console status`: once, or refreshed every `interval` with `watch`.
pub async fn show_status(
    clients: &Clients,
    json: bool,
    watch: bool,
    interval: Duration,
) -> anyhow::Result<ExitCode> {
    loop {
        let snapshot = status::fetch(clients).await?;
        if json {
            println(&status::to_json(&snapshot).to_string())?;
        } else {
            if watch {
                // Clear the screen and go home, as `watch` does.
                print("\x1b[2J\x1b[H")?;
            }
            print(&status::render(&snapshot))?;
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
